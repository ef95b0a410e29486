"""`medseg promote` and `medseg models list`: gates, forced overrides, tags, model card, aliases, predict from the
registry."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import pytest
import yaml
from mlflow.tracking import MlflowClient

from medseg_lightning.cli import main
from medseg_lightning.config import load_config
from medseg_lightning.config.schema import PromotionConfig
from medseg_lightning.tracking.promotion import evaluate_gates
from medseg_lightning.training.train import RunResult, run

TINY = ["model.encoder=test_resnet", "trainer.accelerator=cpu", "trainer.max_epochs=1", "tracking.log_overlays=0",
        "fairness.attributes=[sex]", "fairness.min_group_size=2"]


@pytest.fixture(scope="module")
def runs(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[RunResult], Path]:
    """Two tiny training runs in one project folder."""
    root = tmp_path_factory.mktemp("promote")
    data = {"source": str(cohort), "labels": {0: "background", 1: "organ", 2: "lesion"},
            "preprocessing": {"target_size": [32, 32]}, "split": {"n_folds": 3, "test_fraction": 0.35},
            "loader": {"batch_size": 4, "num_workers": 0}}
    experiment = root / "test.yaml"
    experiment.write_text(yaml.safe_dump({"name": "test", "data": data, "promotion": {"min_cases": 2}}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDSEG_CACHE_DIR", str(root / "cache"))
        results = [run(load_config(experiment, TINY), root=root) for _ in range(2)]
    return results, root


def test_gates_read_the_logged_metrics() -> None:
    metrics = {"test/dice": 0.81, "test/dice/organ": 0.9, "test/fairness/sex/dice_gap": 0.07, "test/n_cases": 12,
               "test/fairness/sex/groups_too_small": 1}
    gates = PromotionConfig(min_dice=0.8, min_class_dice={"organ": 0.95, "lesion": 0.5},
                            max_fairness_gap={"sex": 0.05}, min_cases=10, require_all_groups_measured=True)
    results = {result.gate: result for result in evaluate_gates(metrics, gates)}
    assert results["test/dice"].passed and results["test/n_cases"].passed
    assert not results["test/dice/organ"].passed and results["test/dice/organ"].value == 0.9
    assert not results["test/dice/lesion"].passed and results["test/dice/lesion"].value is None  # never logged
    assert not results["test/fairness/sex/dice_gap"].passed
    assert not results["test/fairness/*/groups_too_small"].passed
    assert "FAIL  test/dice/lesion: not logged (required >= 0.5)" in results["test/dice/lesion"].line()


def test_failing_gates_refuse_and_list_every_gate(runs, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    results, root = runs
    monkeypatch.chdir(root)
    code = main(["promote", "--run", results[0].run_id, "--name", "refused", "--min-dice", "0.999",
                 "--max-gap", "sex=0.5"])
    captured = capsys.readouterr()
    assert code == 1 and "promotion refused: 1 gate(s) failed" in captured.err
    assert "FAIL  test/dice:" in captured.out and "(required >= 0.999)" in captured.out
    assert "test/n_cases" in captured.out  # the experiment's own promotion section is applied too
    assert "test/fairness/sex/dice_gap" in captured.out
    client = MlflowClient(results[0].tracking_uri)
    assert not client.search_registered_models("name = 'refused'")


def test_a_gate_on_an_unlogged_metric_of_a_tested_run_is_not_blamed_on_development_mode(
        runs, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    results, root = runs
    monkeypatch.chdir(root)
    assert main(["promote", "--run", results[0].run_id, "--name", "unlogged", "--max-gap", "site=0.1"]) == 1
    captured = capsys.readouterr()
    assert "FAIL  test/fairness/site/dice_gap: not logged" in captured.out
    assert "evaluate_test" not in captured.err  # the run scored test; only this attribute was never audited


def test_promotion_registers_tags_describes_and_moves_the_alias(runs, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str],
                                                                tmp_path: Path, cohort: Path) -> None:
    results, root = runs
    monkeypatch.chdir(root)
    assert main(["promote", "--run", results[0].run_id, "--name", "hippo", "--min-dice", "0.0"]) == 0
    assert main(["promote", "--run", results[1].run_id, "--name", "hippo", "--min-dice", "0.999",
                 "--force", "demo: accepted by the reviewer"]) == 0
    out = capsys.readouterr().out
    assert "registered hippo version 2 as @champion (FORCED" in out and "version 1 is now @previous" in out
    client = MlflowClient(results[0].tracking_uri)
    assert str(client.get_model_version_by_alias("hippo", "champion").version) == "2"
    assert str(client.get_model_version_by_alias("hippo", "previous").version) == "1"
    first = client.get_model_version("hippo", "1")
    assert first.run_id == results[0].run_id and first.tags["source_run_id"] == results[0].run_id
    assert first.tags["data.fingerprint"] and len(first.tags["config.sha256"]) == 64
    assert all(gate["passed"] for gate in json.loads(first.tags["gates"]))
    assert "Model card: test" in first.description  # the card, or its digest when the card is too long
    assert "model_card/model_card.md" in first.description or first.description.startswith("# Model card")
    second = client.get_model_version("hippo", "2")
    assert second.tags["promotion.forced_reason"] == "demo: accepted by the reviewer"
    assert second.tags["gates.passed"] == "false"
    assert main(["models", "list", "hippo"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert "champion" in listing[1] and "FORCED" in listing[1] and "previous" in listing[2]
    source = cohort / "imagesTr" / "synth_003.nii.gz"
    assert main(["predict", "--model", "models:/hippo@champion", str(source), "--out", str(tmp_path)]) == 0
    assert nib.load(str(tmp_path / "synth_003.nii.gz")).shape == nib.load(str(source)).shape
    assert main(["evaluate", "--model", "models:/hippo@champion", "--data", str(root / "test.yaml")]) == 0


def test_promote_names_what_is_wrong(runs, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    _, root = runs
    monkeypatch.chdir(root)
    assert main(["promote", "--run", "0" * 32, "--name", "x"]) == 2
    assert "no such MLflow run" in capsys.readouterr().err
    assert main(["promote", "--run", "0" * 32, "--name", "x", "--max-gap", "sex"]) == 2
    assert "expected NAME=NUMBER" in capsys.readouterr().err
