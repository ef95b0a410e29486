"""Generated reference pages: the configuration reference from the pydantic schemas, the CLI reference from the
argparse parser. Never typed by hand, so they cannot drift from the code.

mkdocs loads this file as a hook (``hooks:`` in ``mkdocs.yml``): a page holding a marker line such as
``<!-- generated: config medseg_lightning.config.schema:ExperimentConfig -->`` or
``<!-- generated: cli medseg_lightning.cli:build_parser -->`` gets the generated Markdown in its place. The walkers
are generic: any pydantic model (nested models, lists and dicts of models, unions and discriminated unions of
models) and any argparse parser (sub-commands at any depth). ``tests/test_docs.py`` imports them too.
"""

from __future__ import annotations

import argparse
import enum
import importlib
import inspect
import os
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

MARKER = re.compile(r"^<!-- generated: (?P<kind>config|cli) (?P<target>[\w.]+:\w+) -->$", re.M)


# ---------------------------------------------------------------- pydantic models


@dataclass
class Row:
    """One field of a config section."""

    key: str
    type: str
    default: str
    allowed: str
    description: str


@dataclass
class Section:
    """One model reached from the top-level model: its dotted path, and the rows of its own (non-model) fields."""

    path: str
    model: type[BaseModel]
    condition: str = ""
    rows: list[Row] = field(default_factory=list)


def load_object(target: str) -> Any:
    """``package.module:name`` -> the object."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _strip_annotated(annotation: Any) -> tuple[Any, list[Any]]:
    metadata: list[Any] = []
    while typing.get_origin(annotation) is typing.Annotated:
        annotation, *extra = typing.get_args(annotation)
        metadata.extend(extra)
    return annotation, metadata


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _is_model(annotation: Any) -> bool:
    return inspect.isclass(annotation) and issubclass(annotation, BaseModel)


def _members(annotation: Any) -> list[Any]:
    """The members of a union (``X | None`` gives ``[X, None]``), else ``[annotation]``."""
    annotation, _ = _strip_annotated(annotation)
    if _is_union(annotation):
        return [member for arg in typing.get_args(annotation) for member in _members(arg)]
    return [annotation]


def type_name(annotation: Any) -> str:
    """A readable type: ``int``, ``list[int] | null``, ``path``, ``one of`` for literals, section names for models."""
    annotation, _ = _strip_annotated(annotation)
    if annotation is type(None) or annotation is None:
        return "null"
    if _is_union(annotation):
        names: list[str] = []
        for member in typing.get_args(annotation):
            name = type_name(member)
            if name not in names:
                names.append(name)
        return " | ".join(names)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        kinds = sorted({type(value).__name__ for value in typing.get_args(annotation)})
        return " | ".join("str" if kind == "str" else kind for kind in kinds)
    if _is_model(annotation):
        return "section"
    if inspect.isclass(annotation) and issubclass(annotation, enum.Enum):
        return "str"
    if inspect.isclass(annotation) and issubclass(annotation, PurePath):
        return "path"
    if origin is not None:
        args = typing.get_args(annotation)
        base = {list: "list", dict: "mapping", tuple: "list", set: "list"}.get(origin, getattr(origin, "__name__", ""))
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"list[{', '.join(type_name(arg) for arg in args)}]"
        if origin is tuple:
            args = args[:1]
        return f"{base}[{', '.join(type_name(arg) for arg in args)}]"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _literal_values(annotation: Any) -> list[Any]:
    values: list[Any] = []
    for member in _members(annotation):
        if typing.get_origin(member) is typing.Literal:
            values.extend(typing.get_args(member))
        elif inspect.isclass(member) and issubclass(member, enum.Enum):
            values.extend(item.value for item in member)
    return values


def _constraints(info: FieldInfo) -> list[str]:
    symbols = {annotated_types.Gt: ("gt", ">"), annotated_types.Ge: ("ge", ">="), annotated_types.Lt: ("lt", "<"),
               annotated_types.Le: ("le", "<="), annotated_types.MinLen: ("min_length", "length >="),
               annotated_types.MaxLen: ("max_length", "length <=")}
    texts = []
    for item in info.metadata:
        for kind, (attribute, symbol) in symbols.items():
            if isinstance(item, kind):
                texts.append(f"{symbol} {getattr(item, attribute)}")
    return texts


def _inline(value: Any) -> str:
    """A value as it would be written in YAML, on one line."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list | tuple) and any(isinstance(item, BaseModel) for item in value):
        value = [item.model_dump(mode="json") if isinstance(item, BaseModel) else item for item in value]
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, PurePath):
        value = str(value)
    if isinstance(value, enum.Enum):
        value = value.value
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, allow_unicode=True).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def default_text(info: FieldInfo) -> str:
    """The default as YAML, or ``required``."""
    if info.is_required():
        return "required"
    if info.default_factory is not None:
        try:
            value = info.default_factory()  # type: ignore[call-arg]
        except TypeError:  # a factory that takes the validated data
            return "(computed)"
    else:
        value = info.default
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return "(section)"
    return _inline(value)


def _nested(annotation: Any) -> Iterator[tuple[str, type[BaseModel], str | None]]:
    """The models a field's annotation holds: ``(path suffix, model, discriminator)`` for a model, ``X | None``,
    ``list[X]``, ``dict[str, X]``, ``tuple[X, ...]`` and unions of them (each union member once)."""
    annotation, metadata = _strip_annotated(annotation)
    discriminator = next((_discriminator_name(getattr(item, "discriminator", None)) for item in metadata
                          if getattr(item, "discriminator", None)), None)
    if _is_union(annotation):
        for member in typing.get_args(annotation):
            for suffix, model, inner in _nested(member):
                yield suffix, model, inner or discriminator
        return
    if _is_model(annotation):
        yield "", annotation, discriminator
        return
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (list, tuple, set, frozenset):
        for arg in args:
            if arg is not Ellipsis:
                for suffix, model, inner in _nested(arg):
                    yield "[]" + suffix, model, inner or discriminator
    elif origin is dict and len(args) == 2:
        for suffix, model, inner in _nested(args[1]):
            yield ".<name>" + suffix, model, inner or discriminator


def _discriminator_name(discriminator: Any) -> str | None:
    """A discriminator's field name (pydantic also takes a callable ``Discriminator``, which names none)."""
    return discriminator if isinstance(discriminator, str) else None


def _variant_label(model: type[BaseModel], discriminator: str | None) -> str:
    """How a union member is told apart: the value of its discriminator field, else its class name."""
    if discriminator and discriminator in model.model_fields:
        values = _literal_values(model.model_fields[discriminator].annotation)
        if values:
            return f"{discriminator}: {' | '.join(str(value) for value in values)}"
    return model.__name__


def walk_model(model: type[BaseModel], path: str = "", condition: str = "",
               seen: tuple[type[BaseModel], ...] = ()) -> list[Section]:
    """Every section reachable from ``model`` (itself first), each with one row per field; a field holding models
    (``X``, ``X | None``, ``list[X]``, ``dict[str, X]``, unions of models) also gets their sections below."""
    section = Section(path=path, model=model, condition=condition)
    sections = [section]
    for name, info in model.model_fields.items():
        key = f"{path}.{info.alias or name}" if path else info.alias or name
        allowed = ", ".join(f"`{_inline(value)}`" for value in _literal_values(info.annotation))
        limits = ", ".join(_constraints(info))
        section.rows.append(Row(key=key, type=type_name(info.annotation), default=default_text(info),
                                allowed="; ".join(part for part in (allowed, limits) if part),
                                description=(info.description or "").strip()))
        # X | list[X] is one section, at the first form; a field's own Field(discriminator=...) sits on its info
        field_discriminator = _discriminator_name(info.discriminator)
        nested: dict[type[BaseModel], tuple[str, str | None]] = {}
        for suffix, child, discriminator in _nested(info.annotation):
            if child not in seen and child is not model:
                nested.setdefault(child, (suffix, discriminator or field_discriminator))
        for child, (suffix, discriminator) in nested.items():
            label = _variant_label(child, discriminator) if len(nested) > 1 else ""
            sections.extend(walk_model(child, key + suffix, label, (*seen, model)))
    return sections


def iter_fields(model: type[BaseModel], path: str = "",
                seen: tuple[type[BaseModel], ...] = ()) -> Iterator[tuple[str, type[BaseModel], str, FieldInfo]]:
    """Every field of ``model`` and of every model nested in it: ``(dotted key, owning model, name, info)``."""
    for name, info in model.model_fields.items():
        key = f"{path}.{name}" if path else name
        yield key, model, name, info
        for suffix, child, _ in _nested(info.annotation):
            if child not in seen and child is not model:
                yield from iter_fields(child, key + suffix, (*seen, model))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    """A table cell as inline code; a ``|`` inside would end the cell, so it is escaped."""
    return f"`{_cell(text)}`" if text else ""


def _doc(model: type[BaseModel]) -> str:
    """The model's own docstring (not one it inherits), its reStructuredText literals as Markdown code."""
    text = inspect.getdoc(model) or ""
    inherited = [inspect.getdoc(base) for base in model.__mro__[1:]]
    return "" if text in inherited else text.replace("``", "`")


def config_reference(model: type[BaseModel], heading_level: int = 2) -> str:
    """Markdown: one table per section of ``model`` (key, type, default, allowed values, description)."""
    lines: list[str] = []
    for section in walk_model(model):
        if not section.rows:
            continue
        title = f"`{section.path}`" if section.path else "Top level"
        if section.condition:
            title += f" (`{section.condition}`)"
        lines += [f"{'#' * heading_level} {title}", ""]
        doc = _doc(section.model)
        if doc:
            lines += [doc, ""]
        lines += ["| key | type | default | allowed | description |", "| --- | --- | --- | --- | --- |"]
        for row in section.rows:
            lines.append(f"| {_code(row.key)} | {_code(row.type)} | {_code(row.default)} | {_cell(row.allowed)} | "
                         f"{_cell(row.description)} |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- argparse


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    """``(name, help, parser)`` of each sub-command, in the order they were added."""
    for action in parser._actions:  # argparse has no public walk; sphinx-argparse reads the same attributes
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name, ""), sub


def _option_row(action: argparse.Action) -> str | None:
    if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
        return None
    if action.option_strings:
        names = ", ".join(action.option_strings)
        if action.nargs != 0:
            if action.metavar is not None:
                metavar = " ".join(action.metavar) if isinstance(action.metavar, tuple) else action.metavar
            else:
                metavar = action.dest.upper()
            names += f" {metavar}"
    else:
        names = action.metavar if isinstance(action.metavar, str) else action.dest
    choices = ", ".join(f"`{choice}`" for choice in action.choices) if action.choices else ""
    default = action.default
    flag = isinstance(action, argparse._VersionAction | argparse._StoreTrueAction | argparse._StoreFalseAction)
    default_text = "" if flag or default in (None, [], argparse.SUPPRESS) else _code(str(default))
    needed = "required" if action.required else ""
    repeat = "repeatable" if isinstance(action, argparse._AppendAction) else ""
    notes = "; ".join(part for part in (needed, repeat) if part)
    help_text = (action.help or "") % {"default": action.default, "prog": ""} if action.help else ""
    return (f"| {_code(names)} | {choices} | {default_text} | {notes} | {_cell(help_text)} |")


def _usage(parser: argparse.ArgumentParser) -> str:
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "110"  # argparse wraps usage to the terminal's width; fixed here so pages do not change
    try:
        return parser.format_usage().strip()
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


def cli_reference(parser: argparse.ArgumentParser, heading_level: int = 2) -> str:
    """Markdown: every command and sub-command with its usage, description and options."""
    lines: list[str] = []

    def visit(prog: str, help_text: str, sub: argparse.ArgumentParser, level: int) -> None:
        children = list(_subcommands(sub))
        lines.extend([f"{'#' * level} `{prog}`", ""])
        if help_text:
            lines.extend([help_text[0].upper() + help_text[1:] + ".", ""])
        if sub.description and sub.description != help_text:
            lines.extend([sub.description, ""])
        lines.extend(["```text", _usage(sub), "```", ""])
        rows = [row for action in sub._actions if (row := _option_row(action)) is not None]
        if rows:
            lines.extend(["| argument | choices | default | notes | help |", "| --- | --- | --- | --- | --- |",
                          *rows, ""])
        if children:
            lines.extend(["Commands: " + ", ".join(f"`{name}`" for name, _, _ in children) + ".", ""])
        for name, child_help, child in children:
            visit(f"{prog} {name}", child_help, child, min(level + 1, 6))

    visit(parser.prog, "", parser, heading_level)
    return "\n".join(lines)


# ---------------------------------------------------------------- the mkdocs hook


def render(kind: str, target: str) -> str:
    """The generated Markdown for one marker."""
    obj = load_object(target)
    if kind == "config":
        return config_reference(obj)
    return cli_reference(obj())


def expand(markdown: str) -> str:
    """Replaces every generated-reference marker in a page by its Markdown."""
    return MARKER.sub(lambda match: render(match["kind"], match["target"]), markdown)


def on_page_markdown(markdown: str, **_: Any) -> str:
    """mkdocs hook: expand the markers of every page."""
    return expand(markdown)
