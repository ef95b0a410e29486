"""Temperature scaling: fitted on validation, stored with the model, applied by predict and evaluate."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from medseg_lightning.cli import main
from medseg_lightning.config import load_config
from medseg_lightning.config.schema import ExperimentConfig
from medseg_lightning.evaluation.evaluate import run_evaluation
from medseg_lightning.evaluation.temperature import RegionLogits, fit_temperature
from medseg_lightning.inference.bundle import ModelBundle, load_bundle, save_bundle
from medseg_lightning.inference.predict import Predictor
from medseg_lightning.tracking import load_logged_bundle
from medseg_lightning.tracking.results import find_runs
from medseg_lightning.training.train import RunResult

from .test_evaluate import AUDIT, _sets, trained  # noqa: F401 (the module's trained model)
from .test_predict import _Ramps


@pytest.mark.parametrize("truth", [0.5, 2.5])
def test_the_fit_recovers_the_temperature_that_generated_the_labels(truth: float) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(60_000, 3, generator=generator, dtype=torch.float64) * 3
    target = torch.multinomial(torch.softmax(logits / truth, dim=1), 1, generator=generator).squeeze(1)
    fit = fit_temperature(RegionLogits(logits, target, cases=4))
    assert fit.temperature == pytest.approx(truth, rel=0.05)
    assert fit.nll_after < fit.nll_before and not fit.at_bound
    assert fit.record()["fitted_on"] == "val" and fit.record()["voxels"] == 60_000


def test_the_predictor_divides_every_members_logits_by_its_models_temperature() -> None:
    config = ExperimentConfig(name="t", data={"source": "unused", "labels": {0: "bg", 1: "left", 2: "low"}})
    warm = config.model_copy(update={"inference": config.inference.model_copy(update={"temperature": 2.0})})
    network = _Ramps(0.7, 0.4, 1.5)
    slices = torch.randn(3, 1, 6, 8, generator=torch.Generator().manual_seed(1))
    plain = Predictor([ModelBundle(network, config, 1)], batch_size=2, device="cpu")
    scaled = Predictor([ModelBundle(network, warm, 1)], batch_size=2, device="cpu")
    torch.testing.assert_close(scaled.probabilities(slices), torch.softmax(network(slices) / 2.0, dim=1))
    assert torch.equal(scaled.labels(slices), plain.labels(slices))  # one model: the argmax does not move
    assert scaled.member_summary(slices).entropy.mean() > plain.member_summary(slices).entropy.mean()


def test_calibrate_logs_a_calibrated_model_that_evaluate_and_predict_apply(
    trained: tuple[RunResult, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    result, root, experiment = trained
    monkeypatch.chdir(root)
    out = tmp_path / "calibrated"
    assert main(["calibrate", "--model", f"runs:/{result.run_id}", "--data", str(experiment), "--out", str(out),
                 *_sets(AUDIT)]) == 0
    printed = capsys.readouterr().out
    assert "temperature " in printed and "val ECE:" in printed and "--split test" in printed
    client = MlflowClient(result.tracking_uri)
    experiment_id = client.get_run(result.run_id).info.experiment_id
    [run] = client.search_runs([experiment_id], "tags.`medseg.kind` = 'calibration'")
    metrics, tags = run.data.metrics, run.data.tags
    temperature = metrics["val/calibration/temperature"]
    assert tags["medseg.source_run_id"] == result.run_id and run.info.status == "FINISHED"
    assert metrics["val/calibration/nll"] <= metrics["val/calibration/nll_uncalibrated"]
    assert "val/calibration/ece_uncalibrated" in metrics and "val/calibration/sex/ece_gap" in metrics
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id, "calibration")}
    assert {"calibration/val_reliability.png", "calibration/val_reliability_uncalibrated.png"} <= artifacts

    logged = load_logged_bundle(f"runs:/{run.info.run_id}", root)
    saved = load_bundle(out)
    original = load_logged_bundle(f"runs:/{result.run_id}", root)
    assert logged.config.inference.temperature == saved.config.inference.temperature == pytest.approx(temperature)
    assert original.config.inference.temperature is None  # the trained run's model is left as it was
    assert yaml.safe_load((out / "model.yaml").read_text())["calibration"]["fitted_on"] == "val"
    for key, tensor in original.network.state_dict().items():
        assert torch.equal(tensor, saved.network.state_dict()[key]), key

    # evaluate applies the stored temperature: the same validation ECE as the fit reported, the same Dice
    evaluation = run_evaluation(str(out), load_config(experiment, AUDIT), split="val", root=root)
    assert evaluation.report.summary["calibration/ece"] == pytest.approx(metrics["val/calibration/ece"], abs=1e-6)
    assert evaluation.report.summary["dice/mean"] == pytest.approx(result.metrics["val/dice"], abs=1e-6)

    # a calibration run is no row of the results table unless asked for
    assert run.info.run_id not in {record.run_id for record in find_runs(client, [], [], None, [], None)}
    assert [r.run_id for r in find_runs(client, [], [], None, ["calibration"], None)] == [run.info.run_id]

    # the folder is never replaced
    before = (out / "model.yaml").read_text()
    assert main(["calibrate", "--model", str(out), "--data", str(experiment), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and (out / "model.yaml").read_text() == before


def test_calibrating_an_ensemble_sets_every_members_temperature(
    trained: tuple[RunResult, Path, Path], tmp_path: Path,  # noqa: F811
) -> None:
    from medseg_lightning.evaluation.calibrate import calibrated_copy
    from medseg_lightning.evaluation.temperature import TemperatureFit
    from medseg_lightning.inference.bundle import save_ensemble

    result, root, _ = trained
    bundle = load_logged_bundle(f"runs:/{result.run_id}", root)
    members = [save_bundle(bundle.network, bundle.config, bundle.in_channels, tmp_path / f"m{i}") for i in range(2)]
    ensemble = save_ensemble(members, tmp_path / "ensemble")
    fit = TemperatureFit(1.7, 0.5, 0.4, 100, 3, False)
    copy = calibrated_copy(ensemble, tmp_path / "calibrated", fit)
    for member in ("member-0", "member-1"):
        assert load_bundle(copy / member).config.inference.temperature == 1.7
        assert load_bundle(ensemble / member).config.inference.temperature is None
    assert load_bundle(copy).config.inference.temperature == 1.7


def test_the_calibration_table_shows_validation_and_test_before_and_after(
    trained: tuple[RunResult, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    result, root, experiment = trained
    monkeypatch.chdir(root)
    assert main(["calibrate", "--model", f"runs:/{result.run_id}", "--data", str(experiment), *_sets(AUDIT)]) == 0
    capsys.readouterr()
    assert main(["results", "--kind", "calibration"]) == 0
    pending = capsys.readouterr().out
    assert "not evaluated on test yet" in pending and "val ECE before -> after" in pending
    client = MlflowClient(result.tracking_uri)
    calibration = find_runs(client, [], [], None, ["calibration"], None)[-1]
    assert main(["evaluate", "--model", f"runs:/{calibration.run_id}", "--data", str(experiment),
                 *_sets(AUDIT)]) == 0
    capsys.readouterr()
    assert main(["results", "--kind", "calibration"]) == 0
    table = capsys.readouterr().out
    rows = [cells for cells in (line.split("|") for line in table.splitlines()) if len(cells) == 10
            and cells[1].strip() == "calibrate-val"]
    trained_ece = client.get_run(result.run_id).data.metrics["test/calibration/ece"]
    assert all(row[7].strip().startswith(f"{trained_ece:.4f} -> ") for row in rows)  # the model before: its test pass
    evaluated = [row for row in rows if "n/a" not in row[7]]  # the one whose calibrated model was evaluated
    assert len(evaluated) == 1 and len(rows) >= 1
    assert "medseg evaluate --model runs:/<CALIBRATION_RUN_ID> --data test.yaml" in table  # fit for a page:
    assert "medseg calibrate --model runs:/<RUN_ID>" in table  # no run id of this store, no machine's folders
    assert not re.search(r"[0-9a-f]{32}", table) and str(root) not in table
