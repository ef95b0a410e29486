"""The deployment recipes in deploy/ parse, and every medseg command in them is one the CLI and configs accept."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from medseg_lightning.cli import build_parser
from medseg_lightning.config import load_config
from medseg_lightning.sweep.config import load_sweep

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "deploy").rglob("*.sbatch")) + sorted((REPO / "deploy").rglob("*.sh"))
MANIFESTS = sorted((REPO / "deploy").rglob("*.yaml"))
# values a scheduler or the user's environment gives these variables
ENVIRONMENT = {"OPTUNA_STORAGE": "postgresql://u:p@db/optuna", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4",
               "DEVICES": "1", "EXPERIMENT": "experiments/hippocampus_unet.yaml", "NODE_RANK": "0",
               "MASTER_ADDR": "10.0.0.1", "MEDSEG_DATA_ROOT": "/data"}


def _medseg_commands(text: str) -> list[list[str]]:
    """The argument lists of every ``medseg`` invocation (continuation lines joined, variables substituted)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    commands = []
    for line in joined.splitlines():
        if line.lstrip().startswith("#"):
            continue
        line = re.sub(r'"?\$\(which medseg\)"?', "medseg", line)
        line = re.sub(r"\$\{?(\w+)(?::-[^}]*)?\}?", lambda m: ENVIRONMENT.get(m.group(1), m.group(0)), line)
        words = shlex.split(line)
        if "medseg" in words:
            commands.append(words[words.index("medseg") + 1:])
    return commands


def _check(arguments: list[str]) -> None:
    args = build_parser().parse_args(arguments)  # unknown verbs or options exit 2 here
    overrides = [item for item in getattr(args, "overrides", [])]
    if args.verb == "train":
        load_config(REPO / args.experiment, overrides)
    elif args.verb == "sweep":
        load_sweep(REPO / args.target[-1], overrides)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_deploy_script_parses_and_runs_real_commands(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSEG_DATA_ROOT", "/data")
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    commands = _medseg_commands(path.read_text())
    assert commands, f"{path.name} runs no medseg command"
    for arguments in commands:
        _check(arguments)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_kubernetes_manifest_parses_and_runs_real_commands(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSEG_DATA_ROOT", "/data")
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert documents and all({"apiVersion", "kind", "spec"} <= set(doc) for doc in documents)
    containers = [container for doc in documents for container in doc["spec"]["template"]["spec"]["containers"]]
    for container in containers:
        command = [re.sub(r"\$\((\w+)\)", lambda m: ENVIRONMENT[m.group(1)], part) for part in container["command"]]
        assert command[0] == "medseg"
        _check(command[1:])
        names = {item["name"] for item in container.get("env", [])}
        assert "MEDSEG_DATA_ROOT" in names
