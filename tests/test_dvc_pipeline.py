"""dvc.yaml: the `prepare` stage names existing deps and its command works; `dvc` lists it when installed."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medseg_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]


def _prepare_stage() -> dict:
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    return pipeline["stages"]["prepare"]


def test_prepare_stage_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stage = _prepare_stage()
    cmd = stage["cmd"]
    assert cmd.startswith("medseg data prepare")
    for dep in stage["deps"]:
        assert (REPO / dep).exists(), f"dvc.yaml dep {dep} is missing"

    argv = shlex.split(cmd)[1:]
    declared = argv[argv.index("--out") + 1]
    metrics = [next(iter(item)) if isinstance(item, dict) else item for item in stage["metrics"]]
    assert declared in metrics  # the stage writes the file DVC tracks

    out = tmp_path / Path(declared).name
    argv[argv.index("--out") + 1] = str(out)
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(tmp_path / "cache"))
    assert main(argv) == 0
    fingerprint = json.loads(out.read_text())
    assert fingerprint["n_cases"] == 32
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint["fingerprint"])


def test_dvc_lists_prepare_stage() -> None:
    pytest.importorskip("dvc")
    dvc = Path(sys.executable).parent / "dvc"
    if not dvc.is_file():
        pytest.skip(f"no dvc script next to {sys.executable}")
    result = subprocess.run([str(dvc), "stage", "list"], cwd=REPO, capture_output=True, text=True, check=True,
                            env={**os.environ, "DVC_NO_ANALYTICS": "1"}, timeout=60)
    assert re.search(r"^prepare\b", result.stdout, re.MULTILINE), result.stdout
