"""Where a run came from: the code's git commit, the data's DVC hash and the package versions.

Plain functions with no MLflow import, so model cards and evaluations can state provenance too.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import yaml

COMMAND_TAG = "medseg.command"
_command: str | None = None

PACKAGES = ("medseg-lightning", "torch", "torchvision", "lightning", "timm", "torchmetrics", "mlflow", "optuna",
            "albumentations", "nibabel", "numpy", "safetensors")


def git_state(folder: Path) -> dict[str, str]:
    """Commit and dirty flag of the checkout that runs the code (empty outside a git repository)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                                capture_output=True, text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git.commit": commit, "git.dirty": str(bool(status.strip())).lower()}


def dvc_state(source: Path) -> dict[str, str]:
    """The DVC hash of the dataset when it is tracked with ``dvc add`` (``<source>.dvc`` beside it)."""
    candidates = [source.with_name(source.name + ".dvc"), source.parent.with_name(source.parent.name + ".dvc")]
    for path in candidates:
        if path.is_file():
            try:
                outs = (yaml.safe_load(path.read_text()) or {}).get("outs", [])
            except yaml.YAMLError:
                return {}
            if outs and outs[0].get("md5"):
                return {"data.dvc_md5": str(outs[0]["md5"]), "data.dvc_file": path.name}
    return {}


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def set_command(argv: Sequence[str]) -> None:
    """Remembers the ``medseg`` command line of this process, as a user would retype it (``medseg crossval ...``)."""
    global _command
    _command = shlex.join(["medseg", *argv])


def command_tags() -> dict[str, str]:
    """``{"medseg.command": ...}`` when the process was started from the command line, so a result table can say
    which command produced each row; empty for library calls."""
    return {COMMAND_TAG: _command[:5000]} if _command else {}
