"""The documentation site: generated references complete, every config field described, every results block that
``docs/results/regenerate.sh`` fills present where it says, and no page naming a machine's folders or a run id."""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from medseg_lightning.cli import build_parser
from medseg_lightning.config.schema import ExperimentConfig
from medseg_lightning.sweep.config import SweepConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SCHEMAS = [ExperimentConfig, SweepConfig]


def _load_hook():
    spec = importlib.util.spec_from_file_location("medseg_docs_reference", DOCS / "hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as mkdocs loads hooks (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


reference = _load_hook()


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda schema: schema.__name__)
def test_every_config_field_has_a_description(schema):
    missing = [key for key, _, _, info in reference.iter_fields(schema) if not (info.description or "").strip()]
    assert not missing, f"fields without Field(description=...) in {schema.__name__}: {missing}"


def _actions(parser: argparse.ArgumentParser, prog: str = "medseg"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{prog} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield prog, action


def test_every_cli_argument_has_help():
    missing = [f"{prog} {action.option_strings or action.dest}" for prog, action in _actions(build_parser())
               if not action.help]
    assert not missing, f"arguments without help: {missing}"


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda schema: schema.__name__)
def test_config_reference_has_a_row_for_every_field(schema):
    text = reference.config_reference(schema)
    rows = {(section.model, row.key.rsplit(".", 1)[-1]) for section in reference.walk_model(schema)
            for row in section.rows}
    for key, model, name, info in reference.iter_fields(schema):
        assert (model, info.alias or name) in rows, key
    for section in reference.walk_model(schema):
        for row in section.rows:
            assert f"| `{row.key}` |" in text
    if schema is ExperimentConfig:
        assert "| `trainer.keep_checkpoints` | `str` | `none` | `none`, `last`, `best`, `both` |" in text


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Semantic(_Strict):
    """A semantic network."""

    task: Literal["semantic"] = Field("semantic", description="the task")
    arch: Literal["unet", "fcn"] = Field("unet", description="decoder")


class _Instance(_Strict):
    """An instance network."""

    task: Literal["instance"] = Field(description="the task")
    fpn_channels: int = Field(256, ge=8, description="pyramid width")


class _Column(_Strict):
    column: str = Field(description="a column")


class _Top(_Strict):
    """Top."""

    model: Annotated[_Semantic | _Instance, Field(discriminator="task")] = Field(
        default_factory=_Semantic, description="the network")
    columns: dict[str, _Column] = Field(default_factory=dict, description="by name")
    items: list[_Column] | None = Field(None, description="a list")
    plain: tuple[int, int] = Field((1, 2), description="a pair")


def test_the_walker_follows_unions_dicts_and_lists_of_models():
    sections = {(section.path, section.condition): section for section in reference.walk_model(_Top)}
    assert set(sections) == {("", ""), ("model", "task: semantic"), ("model", "task: instance"),
                             ("columns.<name>", ""), ("items[]", "")}
    semantic = {row.key: row for row in sections["model", "task: semantic"].rows}
    assert semantic["model.arch"].allowed == "`unet`, `fcn`" and semantic["model.arch"].default == "unet"
    instance = {row.key: row for row in sections["model", "task: instance"].rows}
    assert instance["model.task"].default == "required" and instance["model.fpn_channels"].allowed == ">= 8"
    top = {row.key: row for row in sections["", ""].rows}
    assert top["plain"].type == "list[int, int]" and top["plain"].default == "[1, 2]"
    assert top["items"].type == "list[section] | null"
    text = reference.config_reference(_Top)
    assert "## `model` (`task: semantic`)" in text and "## `model` (`task: instance`)" in text
    assert "| `columns.<name>.column` | `str` | `required` |" in text
    assert {key for key, *_ in reference.iter_fields(_Top)} == {
        "model", "model.task", "model.arch", "model.fpn_channels", "columns", "columns.<name>.column", "items",
        "items[].column", "plain"}


def _commands(parser: argparse.ArgumentParser, prog: str = "medseg"):
    yield prog, parser
    for name, _, sub in reference._subcommands(parser):
        yield from _commands(sub, f"{prog} {name}")


def test_cli_reference_lists_every_command_and_option():
    parser = build_parser()
    text = reference.cli_reference(parser)
    for prog, _ in _commands(parser):
        assert f"# `{prog}`\n" in text, prog
    for prog, action in _actions(parser):
        for option in action.option_strings:
            assert f"`{option}" in text or f", {option}" in text, (prog, option)


def test_markers_expand_in_pages():
    page = "# CLI\n\n<!-- generated: cli medseg_lightning.cli:build_parser -->\n\nafter\n"
    text = reference.expand(page)
    assert "<!-- generated" not in text and "### `medseg train`" in text and text.endswith("after\n")
    used = {match["kind"] for path in DOCS.rglob("*.md") for match in reference.MARKER.finditer(path.read_text())}
    assert used == {"config", "cli"}, "the reference pages hold the generated-reference markers"


def test_every_results_block_regenerate_writes_exists():
    script = (DOCS / "results" / "regenerate.sh").read_text()
    targets = re.findall(r"^\s*(?:table|bench) (\S+\.md):(\S+)", script, re.M)
    assert len(targets) >= 10
    for file, block in targets:
        text = (ROOT / file).read_text()
        assert f"<!-- medseg-results {block} -->\n" in text, f"{file} has no block {block!r}"
        assert text.count(f"<!-- medseg-results {block} -->") == 1
    blocks = {(str(path.relative_to(ROOT)), name) for path in _pages()
              for name in re.findall(r"<!-- medseg-results ([a-z0-9-]+) -->", path.read_text())}
    assert blocks - set(targets) <= {("README.md", "quickstart-output"),
                                     ("docs/getting-started.md", "quickstart-output")}


MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|root|home)/")
RUN_ID = re.compile(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")


@pytest.mark.parametrize("page", _pages(), ids=lambda path: str(path.relative_to(ROOT)))
def test_no_machine_paths_or_run_ids(page):
    text = page.read_text()
    assert not MACHINE_PATH.search(text), f"{page}: an absolute machine path: {MACHINE_PATH.search(text)[0]}"
    assert not RUN_ID.search(text), f"{page}: an MLflow run id: {RUN_ID.search(text)[0]}"


YAML_BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.M | re.S)
SHIPPED_FILE = re.compile(r"^# ((?:experiments|sweeps)/[\w.-]+\.yaml)\n")


def _yaml_blocks() -> list[tuple[str, str]]:
    return [(f"{path.relative_to(ROOT)}#{number}", block) for path in _pages()
            for number, block in enumerate(YAML_BLOCK.findall(path.read_text()), 1)]


def test_the_docs_have_yaml_snippets():
    assert len(_yaml_blocks()) >= 5


@pytest.mark.parametrize(("where", "block"), _yaml_blocks(), ids=[where for where, _ in _yaml_blocks()])
def test_every_yaml_snippet_loads(where, block, tmp_path, monkeypatch):
    """A snippet headed by a shipped file's name is that file (and it loads); a snippet that names no experiment
    (`name:`) is a fragment, loaded on top of the quickstart experiment as its `base:`."""
    import yaml

    from medseg_lightning.config import load_config
    from medseg_lightning.sweep.config import load_sweep

    monkeypatch.setenv("MEDSEG_DATA_ROOT", str(tmp_path))
    data = yaml.safe_load(block)
    assert isinstance(data, dict), where
    shipped = SHIPPED_FILE.match(block)
    if shipped:
        file = ROOT / shipped[1]
        assert yaml.safe_load(file.read_text()) == data, f"{where} differs from {shipped[1]}"
        load_sweep(file) if "space" in data else load_config(file)
        return
    if "name" not in data:
        data["base"] = str(ROOT / "experiments" / "quickstart.yaml")
    snippet = tmp_path / "snippet.yaml"
    snippet.write_text(yaml.safe_dump(data))
    load_config(snippet)
