"""DDP on CPU: `medseg train` with two gloo processes; one MLflow run, metrics from all cases (slow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient


@pytest.mark.slow
def test_ddp_two_cpu_processes(cohort: Path, make_experiment, tmp_path: Path) -> None:
    experiment = make_experiment(cohort, split={"n_folds": 3, "test_fraction": 0.2})
    settings = ["model.encoder=test_resnet", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
                "trainer.max_epochs=2", "tracking.log_overlays=1", "model.encoder_freeze_epochs=1"]
    command = [str(Path(sys.executable).parent / "medseg"), "train", str(experiment)]
    for item in settings:
        command += ["--set", item]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("MLflow run ") == 1  # rank 0 alone reports
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    metrics = runs[0].data.metrics
    assert metrics["val/n_cases"] == 4 and metrics["test/n_cases"] == 2  # every case once, gathered from both ranks
    assert 0 <= metrics["val/dice"] <= 1
