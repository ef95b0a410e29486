"""Mask R-CNN end to end on CPU: a tiny model over a tiny timm encoder trains for one epoch, logs instance and
merged-mask metrics, and its logged model predicts, evaluates and serves like any other medseg model."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from medseg_lightning.cli import main
from medseg_lightning.config import load_config
from medseg_lightning.data.synth_instances import generate_instance_cohort
from medseg_lightning.training.train import RunResult, run

FAST = ["trainer.accelerator=cpu", "trainer.max_epochs=1", "tracking.log_overlays=0", "fairness.n_bootstrap=200"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunResult, Path, Path]:
    root = tmp_path_factory.mktemp("mask_rcnn")
    generate_instance_cohort(root / "cohort", 10, seed=2, shape=(32, 32, 3))
    experiment = root / "instances.yaml"
    experiment.write_text(yaml.safe_dump({
        "name": "instances", "task": "instance", "model": {"arch": "mask_rcnn", "encoder": "test_resnet"},
        "data": {"source": str(root / "cohort"), "labels": {0: "background", 1: "cell"},
                 "instances": {"source": "column", "column": "instances"},
                 "preprocessing": {"target_size": [32, 32]},
                 "split": {"n_folds": 3, "holdout": "test", "val_fraction": 0.3},
                 "loader": {"batch_size": 4, "num_workers": 0}},
        "fairness": {"attributes": ["sex"], "min_group_size": 2}}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDSEG_CACHE_DIR", str(root / "cache"))
        result = run(load_config(experiment, FAST), root=root)
    return result, root, experiment


def test_one_epoch_logs_instance_and_merged_mask_metrics(trained: tuple[RunResult, Path, Path]) -> None:
    result, _, _ = trained
    run_data = MlflowClient(result.tracking_uri).get_run(result.run_id).data
    metrics, params = run_data.metrics, run_data.params
    for name in ("train/loss_epoch", "train/loss_mask", "val/dice", "test/dice", "test/dice/cell",
                 "test/instance/pq", "test/instance/pq_ci_low", "test/instance/count_error", "test/instance/n_true",
                 "test/instance/ap", "test/instance/ap50", "test/fairness/sex/groups_measured"):
        assert name in metrics, (name, sorted(metrics))
    assert 0 <= metrics["test/instance/pq"] <= 1 and 0 <= metrics["test/instance/ap"] <= 1
    assert metrics["test/instance/n_true"] > 1  # several objects per case
    anchors = json.loads(params["model.anchor_sizes"])
    assert len(anchors) == 5 and anchors == sorted(anchors)  # derived from the training objects, then logged
    assert result.model_uri


def test_the_logged_model_serves_instance_maps(trained: tuple[RunResult, Path, Path]) -> None:
    result, _, _ = trained
    mlflow.set_tracking_uri(result.tracking_uri)
    model = mlflow.pyfunc.load_model(result.model_uri)
    output = model.predict(np.random.default_rng(0).normal(size=(2, 1, 32, 32)).astype(np.float32))
    assert output.shape == (2, 32, 32) and output.dtype == np.int32 and output.min() >= 0
    assert model.metadata.signature is not None


def test_predict_writes_an_instance_map_with_the_input_geometry_and_an_object_table(
        trained: tuple[RunResult, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, root, _ = trained
    monkeypatch.chdir(root)
    source = root / "cohort" / "imagesTr" / "synth_000.nii.gz"
    # after one epoch the model is unsure of everything: a low score threshold makes it write objects
    assert main(["predict", "--model", f"runs:/{result.run_id}", str(source), "--out", str(tmp_path),
                 "--min-score", "0.01"]) == 0
    written = nib.load(str(tmp_path / "synth_000.nii.gz"))
    original = nib.load(str(source))
    assert written.shape == original.shape and np.allclose(written.affine, original.affine)
    assert written.get_data_dtype() == np.uint16
    table = pd.read_csv(tmp_path / "synth_000_objects.csv")
    assert list(table.columns[:5]) == ["object", "class", "score", "voxels", "volume_ml"] and len(table) > 0
    ids = np.asarray(written.dataobj)
    assert sorted(table["object"]) == sorted(int(i) for i in np.unique(ids) if i > 0)
    for row in table.itertuples():
        assert (ids == row.object).sum() == row.voxels and row.volume_ml == pytest.approx(row.voxels * 2 / 1000)


def test_evaluate_scores_an_instance_model_as_its_own_run(trained: tuple[RunResult, Path, Path],
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    result, root, experiment = trained
    monkeypatch.chdir(root)
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(root / "cache"))
    assert main(["evaluate", "--model", f"runs:/{result.run_id}", "--data", str(experiment)]) == 0
    out = capsys.readouterr().out
    assert "test:" in out and "objects: PQ" in out and "found /" in out  # the instance metrics are printed
    client = MlflowClient(result.tracking_uri)
    runs = client.search_runs([client.get_run(result.run_id).info.experiment_id],
                              "tags.`medseg.kind` = 'evaluation'")
    metrics = runs[0].data.metrics
    assert metrics["test/instance/pq"] == pytest.approx(
        client.get_run(result.run_id).data.metrics["test/instance/pq"], abs=1e-6)


def test_onnx_export_refuses_instance_models(trained: tuple[RunResult, Path, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    result, root, _ = trained
    monkeypatch.chdir(root)
    assert main(["export", "--model", f"runs:/{result.run_id}", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "instance models are not exported" in capsys.readouterr().err


def test_an_instance_model_is_promoted_with_its_card_and_predicts_from_the_registry(
        trained: tuple[RunResult, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, root, _ = trained
    monkeypatch.chdir(root)
    assert main(["promote", "--run", result.run_id, "--name", "cells", "--min-dice", "0.0"]) == 0
    client = MlflowClient(result.tracking_uri)
    version = client.get_model_version_by_alias("cells", "champion")
    assert version.run_id == result.run_id and "Model card" in version.description
    source = root / "cohort" / "imagesTr" / "synth_001.nii.gz"
    assert main(["predict", "--model", "models:/cells@champion", str(source), "--out", str(tmp_path),
                 "--min-score", "0.01"]) == 0
    assert nib.load(str(tmp_path / "synth_001.nii.gz")).shape == nib.load(str(source)).shape
    assert (tmp_path / "synth_001_objects.csv").is_file()


@pytest.mark.slow
def test_a_sweep_over_an_instance_experiment_optimises_panoptic_quality(
        trained: tuple[RunResult, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, root, experiment = trained
    monkeypatch.chdir(root)
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(root / "cache"))
    sweep = tmp_path / "cells.yaml"
    sweep.write_text(yaml.safe_dump({
        "experiment": str(experiment), "n_trials": 2, "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"}, "overrides": {"trainer.accelerator": "cpu", "trainer.max_epochs": 1,
                                                  "tracking.log_overlays": 0, "fairness.n_bootstrap": 200},
        "objectives": [{"metric": "val/instance/pq", "direction": "maximize"}],
        "space": {"model.score_threshold": {"type": "float", "low": 0.05, "high": 0.5}}}))
    assert main(["sweep", str(sweep)]) == 0
    study = optuna.load_study(study_name="cells", storage=f"sqlite:///{tmp_path / 'cells.optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    client = MlflowClient(result.tracking_uri)
    for trial in study.trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert trial.values[0] == pytest.approx(run.data.metrics["val/instance/pq"], abs=1e-6)
        assert float(run.data.params["model.score_threshold"]) == pytest.approx(trial.params["model.score_threshold"])
