"""Loading experiment files: one optional ``base:``, ``--set a.b=value`` overrides, errors that name the file.

Relative paths in a YAML file are relative to that file, so an experiment works from any working directory;
relative paths given with ``--set`` are relative to the working directory, as on any command line.
``${VAR}`` and ``${VAR:-default}`` in strings are replaced from the environment (``${MEDSEG_DATA_ROOT}``).
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from medseg_lightning.config.schema import ExperimentConfig, inherited_model_fields

_ENV_PATTERN = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


class ConfigError(ValueError):
    """A config problem; the message has one line per problem, each naming the file and key path."""


class _Source:
    """One layer of configuration (a file or the command line) and where relative paths start."""

    def __init__(self, label: str, data: dict[str, Any], root: Path) -> None:
        self.label, self.data, self.root = label, data, root


def load_config(path: str | Path, overrides: Iterable[str] = (), schema: type[BaseModel] = ExperimentConfig) -> Any:
    """Reads an experiment file (and its base), applies overrides and validates the result.

    Raises:
        ConfigError: listing every unknown key, wrong type or unreadable file, each with its origin.
    """
    path = Path(path)
    sources = _file_sources(path)
    sources.append(_Source("--set", _parse_overrides(list(overrides)), Path.cwd()))
    problems: list[str] = []
    for source in sources:
        raw = source.data
        source.data = _expand_env(raw, source.label, problems)
        _resolve_paths(source.data, schema.model_fields, source.root, raw)
        problems += _unknown_keys(source.data, schema.model_fields, source.label)
    if problems:
        raise ConfigError("\n".join(problems))
    merged: dict[str, Any] = {}
    for source in sources:
        if schema is ExperimentConfig and isinstance(merged.get("model"), dict) and isinstance(
                source.data.get("model"), dict):
            merged["model"] = inherited_model_fields(merged["model"], source.data["model"])
        merged = _deep_merge(merged, source.data)
    try:
        return schema.model_validate(merged)
    except ValidationError as error:
        errors = [{**err, "loc": _without_union_tags(err["loc"], schema.model_fields)} for err in error.errors()]
        raise ConfigError("\n".join(_describe(err, sources) for err in _relevant(errors))) from None


def config_to_yaml(config: BaseModel, exclude_none: bool = False) -> str:
    """The resolved config as YAML, in field order, loadable again with ``load_config``; optionally without unset
    (``None``) settings."""
    return yaml.safe_dump(config.model_dump(mode="json", exclude_none=exclude_none), sort_keys=False,
                          allow_unicode=True)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def _file_sources(path: Path) -> list[_Source]:
    data = _read_yaml(path)
    base = data.pop("base", None)
    sources = [_Source(str(path), data, path.parent.resolve())]
    if base is None:
        return sources
    base_path = (path.parent / str(base)).resolve()
    base_data = _read_yaml(base_path)
    if "base" in base_data:
        raise ConfigError(f"{base_path}: a base file cannot have its own 'base:' (one level of inheritance)")
    return [_Source(str(base_path), base_data, base_path.parent), *sources]


def _parse_overrides(overrides: list[str]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw_value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. data.loader.batch_size=8")
        try:
            value = yaml.safe_load(raw_value) if raw_value.strip() else None
        except yaml.YAMLError as error:  # values are YAML: a typo must name the option, not raise a parser trace
            problem = " ".join(str(getattr(error, "problem", None) or type(error).__name__).split())
            raise ConfigError(f"--set {item!r}: {key.strip()}: not valid YAML ({problem}); close the brackets, or "
                              "quote the value as a string") from None
        node = result
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is set to a value and used as a section")
        node[leaf] = value
    return result


def _expand_env(value: Any, label: str, problems: list[str], key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, label, problems, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, label, problems, f"{key}.{i}") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        problems.append(f"{label}: {key}: environment variable {name} is not set (used in {value!r})")
        return match.group(0)

    return _ENV_PATTERN.sub(substitute, value)


def _sections_in(annotation: Any) -> list[type[BaseModel]]:
    """The config section classes inside an annotation such as ``X | None`` or a tagged union of sections."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _sections_in(typing.get_args(annotation)[0])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [section for arg in typing.get_args(annotation) for section in _sections_in(arg)]
    return []


def _fields_in(annotation: Any) -> dict[str, FieldInfo] | None:
    """The fields a section may hold (of any of its kinds, for a union: which kind is checked on validation)."""
    sections = _sections_in(annotation)
    if not sections:
        return None
    fields: dict[str, FieldInfo] = {}
    for section in sections:
        fields |= {name: field for name, field in section.model_fields.items() if name not in fields}
    return fields


def _is_path(annotation: Any) -> bool:
    return annotation is Path or any(_is_path(arg) for arg in typing.get_args(annotation))


def _resolve_paths(data: dict[str, Any], fields: dict[str, FieldInfo], root: Path, raw: dict[str, Any]) -> None:
    """Relative paths start at the file's folder; a path that starts with an environment variable holding a
    relative path (``MEDSEG_DATA_ROOT=../data``) starts at the working directory, as it would in a shell."""
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            continue
        section = _fields_in(field.annotation)
        raw_value = raw.get(key) if isinstance(raw, dict) else None
        if section is not None and isinstance(value, dict):
            _resolve_paths(value, section, root, raw_value if isinstance(raw_value, dict) else {})
        elif _is_path(field.annotation) and isinstance(value, str) and value and not Path(value).is_absolute():
            from_env = isinstance(raw_value, str) and _ENV_PATTERN.match(raw_value) is not None
            data[key] = str((Path.cwd() if from_env else root) / value)


def _unknown_keys(data: dict[str, Any], fields: dict[str, FieldInfo], label: str, prefix: str = "") -> list[str]:
    problems = []
    for key, value in data.items():
        field = fields.get(key)
        where = f"{prefix}{key}"
        if field is None:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            section = f"under '{prefix[:-1]}'" if prefix else "at the top level"
            valid = ", ".join(fields)
            problems.append(f"{label}: unknown key '{where}'{hint} valid keys {section}: {valid}")
            continue
        section_fields = _fields_in(field.annotation)
        if section_fields is not None and isinstance(value, dict):
            problems += _unknown_keys(value, section_fields, label, f"{where}.")
    return problems


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


_UNION_MISMATCH = {"list_type", "model_type", "model_attributes_type", "dict_type"}


def _without_union_tags(loc: tuple[Any, ...], fields: dict[str, FieldInfo] | None) -> tuple[Any, ...]:
    """``loc`` without the tag pydantic inserts after a tagged union of sections (``model.decoder.x``: model.x)."""
    kept: list[Any] = []
    for part in loc:
        field = fields.get(str(part)) if fields is not None else None
        if field is None and fields is not None and kept and len(_sections_in(kept[-1][1])) > 1:
            continue  # the union member's tag: the next part names a field again
        kept.append((part, field.annotation if field is not None else None))
        fields = _fields_in(field.annotation) if field is not None else None
    return tuple(part for part, _ in kept)


def _relevant(errors: list[Any]) -> list[Any]:
    """Drops "should be a list" noise from the other member of a union when the real error lies deeper."""
    keys = [tuple(str(p) for p in e["loc"] if "[" not in str(p)) for e in errors]
    return [
        error for error, key in zip(errors, keys, strict=True)
        if error["type"] not in _UNION_MISMATCH or not any(len(k) > len(key) and k[: len(key)] == key for k in keys)
    ]


def _describe(error: Any, sources: list[_Source]) -> str:
    """One line for a pydantic error: origin, dotted key path, what was expected and what was given."""
    loc = [str(part) for part in error["loc"] if not str(part).startswith(("function-", "tagged-union"))]
    # pydantic adds the union member's name (e.g. 'list[IntensityConfig]') to the location; drop it.
    loc = [part for part in loc if "[" not in part]
    key = ".".join(loc) or "(top level)"
    origin = _origin(error["loc"], sources)
    if error["type"] == "missing":
        return f"{origin}: {key}: required field is missing"
    shown = repr(error["input"])
    given = "" if isinstance(error["input"], dict) or len(shown) > 80 else f" (got {shown})"
    message = error["msg"].removeprefix("Value error, ")
    return f"{origin}: {key}: {message}{given}"


def _origin(loc: tuple[Any, ...], sources: list[_Source]) -> str:
    """The last layer that sets the deepest existing part of ``loc`` (overrides win over files)."""
    best, best_depth = sources[-2].label if len(sources) > 1 else sources[0].label, -1
    for source in sources:
        node: Any = source.data
        depth = 0
        for part in loc:
            if isinstance(node, dict) and part in node:
                node, depth = node[part], depth + 1
            else:
                break
        if depth > 0 and depth >= best_depth:
            best, best_depth = source.label, depth
    return best
