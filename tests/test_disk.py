"""Disk: a finished run keeps its model and little else; `medseg gc` frees what no run can resume from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from medseg_lightning.cli import main
from medseg_lightning.config import load_config
from medseg_lightning.training.train import run

QUICK = ["trainer.accelerator=cpu", "trainer.max_epochs=1", "tracking.log_overlays=0", "trainer.log_every_n_steps=1"]


@pytest.fixture
def experiment(cohort: Path, tmp_path: Path) -> Path:
    data = {"source": str(cohort), "labels": {0: "background", 1: "organ", 2: "lesion"},
            "preprocessing": {"target_size": [32, 32]}, "split": {"n_folds": 3, "test_fraction": 0.2},
            "loader": {"batch_size": 4, "num_workers": 0}}
    path = tmp_path / "disk.yaml"
    path.write_text(yaml.safe_dump({"name": "disk", "data": data}))
    return path


def _bytes(folder: Path, skip: tuple[str, ...] = ("mlflow.db",)) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and path.name not in skip)


def test_a_finished_run_uses_at_most_one_and_a_half_times_its_weights(experiment: Path, tmp_path: Path) -> None:
    result = run(load_config(experiment, QUICK), root=tmp_path)  # resnet18: the quickstart's encoder
    mlruns = tmp_path / "mlruns"
    [weights] = list(mlruns.rglob("weights.safetensors"))
    assert not (mlruns / "checkpoints" / result.run_id).exists()  # nothing left to resume: none kept
    assert result.best_epoch == 0
    total = _bytes(mlruns)
    assert total <= 1.5 * weights.stat().st_size, f"{total / 2**20:.1f} MiB for {weights.stat().st_size / 2**20:.1f}"


def test_checkpoints_kept_and_logged_as_asked(experiment: Path, tmp_path: Path) -> None:
    result = run(load_config(experiment, [*QUICK, "model.encoder=test_resnet", "trainer.keep_checkpoints=last",
                                          "tracking.log_checkpoint=weights"]), root=tmp_path)
    kept = sorted(path.name for path in (tmp_path / "mlruns" / "checkpoints" / result.run_id).iterdir())
    assert kept == ["last.ckpt"]
    client = MlflowClient(result.tracking_uri)
    [artifact] = [item.path for item in client.list_artifacts(result.run_id, "checkpoints")]
    assert artifact == "checkpoints/best-epoch000-weights.ckpt"
    logged = torch.load(client.download_artifacts(result.run_id, artifact, str(tmp_path)), weights_only=True)
    assert "state_dict" in logged and "optimizer_states" not in logged  # no optimiser state unless asked


def test_gc_removes_checkpoints_of_finished_and_deleted_runs_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlruns").mkdir()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.create_experiment("gc")
    runs = {}
    for name, status in (("finished", "FINISHED"), ("failed", "FAILED"), ("running", "RUNNING"),
                         ("deleted", "FINISHED")):
        runs[name] = client.create_run(experiment, run_name=name).info.run_id
        if status != "RUNNING":
            client.set_terminated(runs[name], status)
    client.delete_run(runs["deleted"])
    runs["unknown"] = "0123456789abcdef0123456789abcdef"
    folders = {}
    for name, run_id in runs.items():
        folders[name] = tmp_path / "mlruns" / "checkpoints" / run_id
        folders[name].mkdir(parents=True)
        (folders[name] / "last.ckpt").write_bytes(b"x" * 2**20)
    assert main(["gc", "--dry-run"]) == 0
    assert "would remove 2 checkpoint folder(s), 2.0 MiB; kept 3" in capsys.readouterr().out
    assert all(folder.is_dir() for folder in folders.values())
    assert main(["gc"]) == 0
    out = capsys.readouterr().out
    assert "removed 2 checkpoint folder(s), 2.0 MiB" in out and "(failed: resumable)" in out
    assert "(no such run in this store)" in out and "(running: resumable)" in out
    assert {name for name, folder in folders.items() if folder.exists()} == {"failed", "running", "unknown"}
