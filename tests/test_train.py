"""`medseg train` end to end on a tiny synthetic cohort: training, evaluation, MLflow records, resume, transfer."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

from medseg_lightning.cli import main
from medseg_lightning.config import load_config
from medseg_lightning.inference.bundle import build_network
from medseg_lightning.training.train import RunResult, run
from medseg_lightning.training.transfer import load_pretrained

TINY = ["model.encoder=test_resnet", "trainer.accelerator=cpu", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
        "trainer.keep_checkpoints=both", "tracking.log_checkpoint=weights",
        "tracking.log_overlays=2"]


def _tiny_experiment(cohort: Path, folder: Path) -> Path:
    data = {"source": str(cohort), "labels": {0: "background", 1: "organ", 2: "lesion"},
            "preprocessing": {"target_size": [32, 32]}, "split": {"n_folds": 3, "test_fraction": 0.2},
            "loader": {"batch_size": 4, "num_workers": 0}}
    path = folder / "test.yaml"
    path.write_text(yaml.safe_dump({"name": "test", "data": data}))
    return path


@pytest.fixture
def tiny_experiment(cohort: Path, tmp_path: Path) -> Path:
    return _tiny_experiment(cohort, tmp_path)


def _artifacts(client: MlflowClient, run_id: str, path: str = "") -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


@pytest.fixture(scope="module")
def trained(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[RunResult, Path]:
    """One tiny training run shared by the read-only tests below (training is the slow part)."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDSEG_CACHE_DIR", str(root / "cache"))
        result = run(load_config(_tiny_experiment(cohort, root), TINY), root=root)
    return result, root


def test_run_logs_metrics_provenance_and_artifacts(trained: tuple[RunResult, Path]) -> None:
    result, root = trained
    assert result.tracking_uri == f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    assert 0 <= result.metrics["val/dice"] <= 1 and 0 <= result.metrics["test/dice"] <= 1
    assert result.best_epoch in (0, 1) and Path(result.best_checkpoint).is_file()
    client = MlflowClient(result.tracking_uri)
    logged = client.get_run(result.run_id)
    assert logged.data.params["model.encoder"] == "test_resnet"
    assert logged.data.params["data.split.n_folds"] == "3"
    experiment = client.get_experiment(logged.info.experiment_id).name
    assert re.fullmatch(rf"{experiment}-\d{{8}}-\d{{6}}", logged.info.run_name)  # not a seeded random name
    assert logged.data.tags["data.fingerprint"] and logged.data.tags["data.n_test"] == "2"
    for key in ("train/loss_epoch", "train/dice/organ", "val/dice", "val/dice/lesion", "val/hd95/organ",
                "test/dice", "lr-AdamW/decoder"):
        assert key in logged.data.metrics, key
    assert len(client.get_metric_history(result.run_id, "val/dice")) >= 2  # one value per epoch
    artifacts = _artifacts(client, result.run_id)
    for name in ("config.yaml", "data_fingerprint.json", "environment.json", "metrics/val_cases.csv",
                 "metrics/test_cases.csv"):
        assert name in artifacts
    assert any(a.startswith("overlays/epoch_001/") and a.endswith(".png") for a in artifacts)
    assert any(a.startswith("checkpoints/") and a.endswith(".ckpt") for a in artifacts)
    assert logged.inputs.dataset_inputs[0].dataset.digest == logged.data.tags["data.fingerprint"][:36]


def test_no_patient_identifiers_in_params_or_tags(trained: tuple[RunResult, Path]) -> None:
    result, _ = trained
    logged = MlflowClient(result.tracking_uri).get_run(result.run_id)
    text = " ".join([*map(str, logged.data.params.values()), *map(str, logged.data.tags.values())])
    assert "synth_0" not in text and "subj_0" not in text


def test_logged_model_loads_without_pickles_and_predicts(trained: tuple[RunResult, Path]) -> None:
    result, _ = trained
    mlflow.set_tracking_uri(result.tracking_uri)
    model = mlflow.pyfunc.load_model(result.model_uri)
    slices = np.random.default_rng(0).normal(size=(3, 1, 32, 32)).astype(np.float32)
    labels = model.predict(slices)
    assert labels.shape == (3, 32, 32) and labels.dtype == np.uint8
    network = model.unwrap_python_model().bundle.network
    with torch.no_grad():
        expected = network(torch.from_numpy(slices)).argmax(1).numpy()
    np.testing.assert_array_equal(labels, expected)
    assert model.metadata.signature is not None
    stored = Path(mlflow.artifacts.download_artifacts(result.model_uri))
    assert not list(stored.rglob("*.pkl"))  # models from code: nothing pickled


def test_transfer_from_a_logged_run(trained: tuple[RunResult, Path], tiny_experiment: Path) -> None:
    result, root = trained
    mlflow.set_tracking_uri(result.tracking_uri)
    source = mlflow.pyfunc.load_model(result.model_uri).unwrap_python_model().bundle.network
    config = load_config(tiny_experiment, TINY)
    fresh = build_network(config, in_channels=1)
    report = load_pretrained(fresh, f"runs:/{result.run_id}", root)
    assert report is not None and "pretrained encoder weights" in report
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(fresh.encoder.state_dict()[key], value), key
    assert not torch.equal(fresh.state_dict()["head.weight"], source.state_dict()["head.weight"])


def test_resume_continues_the_same_run(tiny_experiment: Path, tmp_path: Path) -> None:
    first = run(load_config(tiny_experiment, [*TINY, "trainer.max_epochs=1", "tracking.log_model=false"]),
                root=tmp_path)
    resumed = run(load_config(tiny_experiment, [*TINY, "trainer.max_epochs=2", "tracking.log_model=false"]),
                  root=tmp_path, resume=first.run_id, resume_finished=True)
    assert resumed.run_id == first.run_id
    history = MlflowClient(first.tracking_uri).get_metric_history(first.run_id, "train/loss_epoch")
    assert len(history) == 2  # epoch 0 in the first call, epoch 1 (only) after resuming, in the same run
    assert history[0].step < history[1].step


def test_encoder_freeze_keeps_encoder_and_batchnorm_fixed(tiny_experiment: Path, tmp_path: Path) -> None:
    config = load_config(tiny_experiment, [*TINY, "trainer.max_epochs=1", "tracking.log_model=false"])
    start = build_network(config, 1).state_dict()
    weights = tmp_path / "start.safetensors"
    save_file({k: v.contiguous() for k, v in start.items()}, str(weights))
    config = load_config(tiny_experiment, [*TINY, "trainer.max_epochs=1", "tracking.log_model=false",
                                           "model.encoder_freeze_epochs=1", f"model.pretrained={weights}"])
    result = run(config, root=tmp_path)
    after = torch.load(result.best_checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    encoder_keys = [k for k in start if k.startswith("encoder.")]
    assert any("running_mean" in k for k in encoder_keys)
    for key in encoder_keys:
        assert torch.equal(after[f"network.{key}"], start[key]), key
    assert not torch.equal(after["network.head.weight"], start["head.weight"])


def test_weight_averaging_validates_and_ships_the_averaged_weights(tiny_experiment: Path, tmp_path: Path) -> None:
    config = load_config(tiny_experiment, [*TINY, "tracking.log_overlays=0", "trainer.ema_decay=0.5"])
    result = run(config, root=tmp_path)
    checkpoint = torch.load(result.best_checkpoint, map_location="cpu", weights_only=False)
    averaged, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert not torch.equal(averaged["network.head.weight"], raw["network.head.weight"])
    # the final validation of the best checkpoint scores the weights that were scored (and chosen) during training
    chosen = next(state for name, state in checkpoint["callbacks"].items() if name.startswith("ModelCheckpoint"))
    assert result.metrics["val/dice"] == pytest.approx(float(chosen["best_model_score"]), abs=1e-6)
    mlflow.set_tracking_uri(result.tracking_uri)
    shipped = mlflow.pyfunc.load_model(result.model_uri).unwrap_python_model().bundle.network.state_dict()
    for key, value in shipped.items():
        assert torch.equal(value, averaged[f"network.{key}"]), key


def test_cli_train_prints_a_summary(tiny_experiment: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    overrides = [item for pair in zip(["--set"] * len(TINY), TINY, strict=True) for item in pair]
    assert main(["train", str(tiny_experiment), *overrides, "--set", "trainer.max_epochs=1",
                 "--set", "description=a tiny U-Net on the synthetic cohort"]) == 0
    out = capsys.readouterr().out
    assert "best epoch 0" in out and "val: dice=" in out, out
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    experiment = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}").get_experiment_by_name("test")
    # the experiment opens as a training experiment, described by the config, and the summary links its runs table
    assert experiment.tags["mlflow.note.content"] == "a tiny U-Net on the synthetic cohort"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert (f"look at it: medseg ui   (then open http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs)"
            in out), out


def test_bad_transfer_and_resume_arguments_fail_clearly(tiny_experiment: Path, tmp_path: Path, monkeypatch,
                                                        capsys) -> None:
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "nope.safetensors"
    assert main(["train", str(tiny_experiment), "--set", f"model.pretrained={missing}", "--set",
                 "model.encoder=test_resnet"]) == 2
    assert f"model.pretrained: {missing} not found" in capsys.readouterr().err
    assert main(["train", str(tiny_experiment), "--set", "model.encoder=test_resnet", "--resume", "0123abc"]) == 2
    assert "--resume 0123abc: no such MLflow run" in capsys.readouterr().err


def test_precision_auto_takes_bfloat16_only_where_the_hardware_computes_in_it(monkeypatch) -> None:
    from medseg_lightning.training.train import resolve_precision

    assert resolve_precision("16-mixed", "gpu") == "16-mixed"  # an explicit choice is kept
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_precision("auto", "auto") == "32-true"  # emulated bfloat16 would be slower than float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_precision("auto", "auto") == "32-true"  # a GPU without bfloat16 (before Ampere)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision("auto", "gpu") == "bf16-mixed"


@pytest.mark.slow  # torch.compile takes minutes on a 2-core CPU
def test_a_compiled_training_logs_the_plain_network(tiny_experiment: Path, tmp_path: Path) -> None:
    result = run(load_config(tiny_experiment, [*TINY, "trainer.max_epochs=1", "trainer.compile=true"]), root=tmp_path)
    checkpoint = torch.load(result.best_checkpoint, map_location="cpu", weights_only=False)
    assert not [key for key in checkpoint["state_dict"] if "_orig_mod" in key]  # no compiled wrapper in the weights
    assert "val/dice" in result.metrics
    mlflow.set_tracking_uri(result.tracking_uri)
    network = mlflow.pyfunc.load_model(result.model_uri).unwrap_python_model().bundle.network
    for key, value in network.state_dict().items():
        assert torch.equal(value, checkpoint["state_dict"][f"network.{key}"]), key
