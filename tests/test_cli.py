"""The `medseg` entry point: commands listed, installed script works, verbs call the library."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from medseg_lightning.cli import main
from medseg_lightning.config.registry import Registry


def test_help_lists_the_commands() -> None:
    script = Path(sys.executable).parent / "medseg"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    for command in ("config", "data"):
        assert command in result.stdout
    data_help = subprocess.run([str(script), "data", "--help"], capture_output=True, text=True, check=True).stdout
    for action in ("manifest", "check", "prepare", "synth"):
        assert action in data_help


def test_synth_then_prepare(tmp_path: Path, make_experiment, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cohort"
    assert main(["data", "synth", "--out", str(out), "--cases", "6", "--shape", "24", "24", "6",
                 "--hard-group", "sex=F:0.5"]) == 0
    manifest = pd.read_csv(out / "manifest.csv")
    assert list(manifest.columns) == ["case_id", "image", "mask", "subject_id", "sex", "age", "site"]
    experiment = make_experiment(out, preprocessing={"target_size": [24, 24]}, split={"n_folds": 2})
    fingerprint = tmp_path / "fp.json"
    assert main(["data", "prepare", str(experiment), "--out", str(fingerprint)]) == 0
    assert fingerprint.is_file() and "prepared 6 case(s)" in capsys.readouterr().out
    assert main(["data", "synth", "--out", str(out), "--hard-group", "height=tall"]) == 2
    assert "height" in capsys.readouterr().err


def test_registry_suggests_close_names() -> None:
    registry: Registry[int] = Registry("decoder")
    registry.register("unet")(1)
    registry.register("segnet")(2)
    assert registry.get("unet") == 1 and "segnet" in registry
    with pytest.raises(KeyError, match=r"unknown decoder 'unte'\. Did you mean 'unet'\? Valid: segnet, unet"):
        registry.get("unte")
    with pytest.raises(ValueError, match="already registered"):
        registry.register("unet")(3)


def test_ui_starts_mlflow_on_the_project_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg_lightning.studies import launch

    calls: list[list[str]] = []  # the server itself is started by tests/test_ui.py; here only its command line
    monkeypatch.setattr(launch, "run_process_group", lambda command: calls.append(command) or 0)
    (tmp_path / "mlruns").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["ui", "--port", "5123"]) == 0
    command = calls[0]
    assert command[1:4] == ["-m", "mlflow", "ui"]
    assert command[command.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert command[command.index("--port") + 1] == "5123"
