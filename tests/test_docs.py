"""The documentation site: generated references complete, every config field described, every results block that
``docs/results/regenerate.sh`` fills present where it says, no page naming a machine's folders or a run id, every
YAML snippet loading, and every shell block marked ``<!-- run -->`` running as written."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from medseg_lightning.cli import build_parser, main
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


# A shell block the docs promise runs as written: `<!-- run -->` (quick: the default suite runs it) or
# `<!-- run: slow -->` (training and the like: only with -m slow) on the line before its fence.
RUN_MARKER = re.compile(r"^<!-- run(?::\s*(?P<kind>[\w-]+))? -->\n(?P<fence>```(?:bash|sh)\n(?P<body>.*?)^```)?",
                        re.M | re.S)
SHELL_SYNTAX = re.compile(r"[|&;<>$`*(){}]")  # a line with any of these runs in bash, not as a plain command
REPO_FILES = ["pyproject.toml", "experiments", "sweeps", "data/quickstart"]  # what a fresh clone has to run them on


def _run_blocks() -> list[tuple[str, str, str | None]]:
    """``(page#n, block, kind)`` of every marked block, in page order."""
    found = []
    for path in _pages():
        for number, match in enumerate(RUN_MARKER.finditer(path.read_text()), 1):
            found.append((f"{path.relative_to(ROOT)}#run{number}", match["body"], match["kind"]))
    return found


def _clone(folder: Path) -> Path:
    """The files of a fresh clone the blocks run on, so nothing they write lands in the checkout."""
    for name in REPO_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, folder / name, ignore=shutil.ignore_patterns("*.db", "__pycache__"))
        else:
            shutil.copy(source, folder / name)
    (folder / "data" / "prepared").mkdir()
    for fingerprint in (ROOT / "data" / "prepared").glob("*.fingerprint.json"):  # tracked; the rest is a local cache
        shutil.copy(fingerprint, folder / "data" / "prepared")
    return folder


def _plain_commands(block: str) -> list[list[str]] | None:
    """The arguments of each ``medseg`` line when the block is nothing but plain ``medseg`` commands (comments
    allowed), else None: such a block runs in this process through the entry point the ``medseg`` script calls,
    which saves the interpreter start and imports (seconds) per command."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        code = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
        if not code.strip():
            continue
        words = shlex.split(code)
        if SHELL_SYNTAX.search(code) or words[0] not in ("medseg", ".venv/bin/medseg"):
            return None
        commands.append(words[1:])
    return commands


def _run_block(block: str, folder: Path) -> tuple[int, str]:
    """Runs the block in ``folder``; returns its exit status and output."""
    commands = _plain_commands(block)
    if commands is not None:
        output = io.StringIO()
        with contextlib.chdir(folder), contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            for argv in commands:
                try:
                    code = main(argv)
                except SystemExit as exit:  # --help, and argparse's usage errors
                    code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
                if code:
                    return code, output.getvalue()
        return 0, output.getvalue()
    scripts = folder / ".venv" / "bin"  # the docs call it medseg or .venv/bin/medseg
    scripts.mkdir(parents=True, exist_ok=True)
    (scripts / "medseg").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m medseg_lightning.cli "$@"\n')
    (scripts / "medseg").chmod(0o755)
    env = {**os.environ, "PATH": f"{scripts}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=3600)
    return done.returncode, done.stdout + done.stderr


def _check_block(where: str, block: str, folder: Path) -> None:
    code, output = _run_block(block, folder)
    if code:
        pytest.fail(f"{where}: this block exits with status {code}:\n{block}--- its output (end) ---\n{output[-3000:]}",
                    pytrace=False)


def test_the_docs_have_runnable_blocks():
    blocks = _run_blocks()
    assert all(body is not None for _, body, _ in blocks), \
        f"a run marker without a bash block right after it: {[where for where, body, _ in blocks if body is None]}"
    assert {kind for _, _, kind in blocks} <= {None, "slow"}, "markers are <!-- run --> or <!-- run: slow -->"
    assert len([where for where, _, kind in blocks if kind is None]) >= 3


@pytest.mark.parametrize(("where", "block"), [
    pytest.param(where, body, marks=[pytest.mark.slow] if kind == "slow" else [], id=where)
    for where, body, kind in _run_blocks() if body is not None])
def test_every_marked_shell_block_runs_as_written(where, block, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the clone's own mlruns/, never the checkout's store
    _check_block(where, block, _clone(tmp_path))


@pytest.mark.parametrize("block", [
    "medseg data check experiments/quickstart.yaml\nmedseg config show experiments/missing.yaml  # a typo\n",
    "ls experiments | grep -q no-such-experiment\n",  # runs in bash
], ids=["in-process", "bash"])
def test_a_failing_block_names_its_page_and_text(block, tmp_path):
    with pytest.raises(pytest.fail.Exception) as failure:
        _check_block("docs/how-to/example.md#run1", block, _clone(tmp_path))
    message = str(failure.value)
    assert message.startswith("docs/how-to/example.md#run1: this block exits with status ") and block in message


def test_a_bash_block_finds_this_checkouts_medseg(tmp_path):
    """``medseg`` on PATH in a bash block is this checkout's (what the docs describe), run by this interpreter."""
    _check_block("bash", "medseg --version | grep -q 'medseg-lightning'\ntest -x .venv/bin/medseg\n"
                 f"test \"$(pwd -P)\" = {str(tmp_path.resolve())!r}\n", _clone(tmp_path))


def test_plain_medseg_lines_run_in_process_and_anything_else_in_bash():
    assert _plain_commands("medseg data check a.yaml   # comment\n\n# note\n.venv/bin/medseg --help\n") == [
        ["data", "check", "a.yaml"], ["--help"]]
    assert _plain_commands("medseg results --filter \"params.x = '1'\"\n") == [
        ["results", "--filter", "params.x = '1'"]]
    for block in ("medseg ui | head\n", "MEDSEG_DATA_ROOT=x medseg train a.yaml\n", "dvc repro\n",
                  "medseg train $EXP\n", "medseg data synth --out d && medseg train a.yaml\n"):
        assert _plain_commands(block) is None, block
