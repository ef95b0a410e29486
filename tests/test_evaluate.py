"""Evaluation, fairness and model cards in MLflow: the training run's own, and `medseg evaluate`'s linked run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from medseg_lightning.cli import main
from medseg_lightning.config import load_config
from medseg_lightning.evaluation.evaluate import run_evaluation
from medseg_lightning.inference.bundle import save_bundle
from medseg_lightning.tracking import load_logged_bundle
from medseg_lightning.training.train import RunResult, run

TINY = ["model.encoder=test_resnet", "trainer.accelerator=cpu", "trainer.max_epochs=2", "tracking.log_overlays=0"]
AUDIT = ["fairness.attributes=[sex, age, ethnicity]", "fairness.bins={age: [0, 50, 120]}",
         "fairness.min_group_size=2", "fairness.n_bootstrap=200"]


@pytest.fixture(scope="module")
def trained(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[RunResult, Path, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    data = {"source": str(cohort), "labels": {0: "background", 1: "organ", 2: "lesion"},
            "preprocessing": {"target_size": [32, 32]}, "split": {"n_folds": 3, "test_fraction": 0.35},
            "loader": {"batch_size": 4, "num_workers": 0}}
    experiment = root / "test.yaml"
    experiment.write_text(yaml.safe_dump({"name": "test", "data": data}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDSEG_CACHE_DIR", str(root / "cache"))
        result = run(load_config(experiment, TINY + AUDIT), root=root)
    return result, root, experiment


def _download_json(client: MlflowClient, run_id: str, path: str, tmp_path: Path) -> dict:
    return json.loads(Path(client.download_artifacts(run_id, path, str(tmp_path))).read_text())


def _artifacts(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    found: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_training_run_logs_intervals_fairness_and_a_model_card(trained: tuple[RunResult, Path, Path]) -> None:
    result, _, _ = trained
    client = MlflowClient(result.tracking_uri)
    logged = client.get_run(result.run_id).data
    metrics = logged.metrics
    assert metrics["test/dice/mean_ci_low"] <= metrics["test/dice/mean"] <= metrics["test/dice/mean_ci_high"]
    assert "test/vol_err_ml/organ" in metrics and "val/fairness/sex/groups_measured" in metrics
    measured = [key for key in metrics if key.startswith("test/fairness/sex/") and key.endswith("/dice")]
    assert measured, sorted(k for k in metrics if "fairness" in k)
    artifacts = _artifacts(client, result.run_id)
    for name in ("metrics/test_cases.csv", "metrics/test_summary.json", "metrics/test_fairness.json",
                 "metrics/test_fairness_groups.csv", "metrics/test_fairness_sex.png", "metrics/val_fairness.json",
                 "model_card/model_card.md", "model_card/model_card.json", "model_card/model_card.html"):
        assert name in artifacts, name
    assert "metrics/test_fairness_ethnicity.png" not in artifacts  # not a manifest column: reported, not plotted
    assert logged.tags["mlflow.note.content"].lstrip().startswith("#")  # the card, rendered on the run page


def test_model_card_numbers_are_the_logged_metrics(trained: tuple[RunResult, Path, Path], tmp_path: Path) -> None:
    result, _, _ = trained
    client = MlflowClient(result.tracking_uri)
    card = _download_json(client, result.run_id, "model_card/model_card.json", tmp_path)
    metrics = client.get_run(result.run_id).data.metrics
    assert list(card) == ["model_details", "intended_use", "factors", "metrics", "evaluation_data", "training_data",
                          "quantitative_analyses", "ethical_considerations", "caveats_and_recommendations"]
    quantitative = card["quantitative_analyses"]
    assert quantitative["split"] == "test"
    assert len(quantitative["overall"]) > 10
    for row in quantitative["overall"]:
        for statistic in ("mean", "median", "std", "ci_low", "ci_high"):
            name = f"test/{row['metric']}" + ("" if statistic == "mean" else f"_{statistic}")
            if row[statistic] is not None:
                assert metrics[name] == pytest.approx(row[statistic], rel=1e-6), name  # Lightning logs float32
    sex = next(item for item in quantitative["by_attribute"] if item["attribute"] == "sex")
    measured = [group for group in sex["groups"] if group["measured"]]
    assert measured
    for group in measured:
        prefix = f"test/fairness/sex/{group['group']}"
        assert metrics[f"{prefix}/dice"] == pytest.approx(group["dice"]["mean"], rel=1e-6)
        assert metrics[f"{prefix}/dice_ci_low"] == pytest.approx(group["dice"]["ci_low"], rel=1e-6)
    caveats = " ".join(card["caveats_and_recommendations"]["generated"])
    assert "ethnicity" in caveats and not card["intended_use"]["stated"]
    assert card["model_details"]["mlflow_run_id"] == result.run_id


def test_evaluate_cli_creates_a_linked_run_with_the_same_numbers(
    trained: tuple[RunResult, Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    result, root, experiment = trained
    monkeypatch.chdir(root)
    assert main(["evaluate", "--model", f"runs:/{result.run_id}", "--data", str(experiment), *_sets(AUDIT)]) == 0
    printed = capsys.readouterr().out
    assert "test: " in printed and "sex:" in printed and "MLflow run" in printed
    client = MlflowClient(result.tracking_uri)
    runs = client.search_runs([client.get_run(result.run_id).info.experiment_id],
                              "tags.`medseg.kind` = 'evaluation'")
    assert len(runs) == 1
    evaluation = runs[0]
    assert evaluation.info.status == "FINISHED"
    assert evaluation.data.tags["medseg.source_run_id"] == result.run_id
    trained_metrics = client.get_run(result.run_id).data.metrics
    for key in ("test/dice", "test/dice/organ", "test/hd95/mean", "test/n_cases"):
        assert evaluation.data.metrics[key] == pytest.approx(trained_metrics[key], abs=1e-6), key
    artifacts = _artifacts(client, evaluation.info.run_id)
    assert {"metrics/test_cases.csv", "metrics/test_fairness.json", "model_card/model_card.html"} <= artifacts


def test_evaluate_a_saved_model_folder_on_another_split(trained: tuple[RunResult, Path, Path], tmp_path: Path) -> None:
    result, root, experiment = trained
    bundle = load_logged_bundle(f"runs:/{result.run_id}", root)
    folder = save_bundle(bundle.network, bundle.config, bundle.in_channels, tmp_path / "saved")
    evaluation = run_evaluation(str(folder), load_config(experiment, AUDIT), split="val", root=root)
    assert evaluation.report.summary["dice/mean"] == pytest.approx(result.metrics["val/dice"], abs=1e-6)
    tags = MlflowClient(result.tracking_uri).get_run(evaluation.run_id).data.tags
    assert tags["medseg.model_uri"] == str(folder) and "medseg.source_run_id" not in tags


@pytest.mark.parametrize(("arguments", "message"), [
    (["--set", "data.image_columns=[image, image]"], "the model takes 1 modalities"),
    (["--set", "data.split.test_fraction=0"], "split 'test' has no cases"),
])
def test_evaluate_refuses_mismatched_data_in_one_line(
    trained: tuple[RunResult, Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    arguments: list[str], message: str,
) -> None:
    result, root, experiment = trained
    monkeypatch.chdir(root)
    assert main(["evaluate", "--model", f"runs:/{result.run_id}", "--data", str(experiment), *arguments]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1


def test_evaluate_refuses_data_with_other_classes(
    trained: tuple[RunResult, Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    result, root, experiment = trained
    monkeypatch.chdir(root)
    config = yaml.safe_load(experiment.read_text())
    config["data"]["labels"] = {0: "background", 1: "organ"}
    other = root / "two_classes.yaml"
    other.write_text(yaml.safe_dump(config))
    assert main(["evaluate", "--model", f"runs:/{result.run_id}", "--data", str(other)]) == 2
    assert "the model predicts 3 classes" in capsys.readouterr().err


def test_evaluate_names_a_model_that_cannot_be_found(tmp_path: Path, make_experiment, monkeypatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    experiment = make_experiment(tmp_path / "nowhere")
    assert main(["evaluate", "--model", str(tmp_path / "missing"), "--data", str(experiment)]) == 2
    assert "missing: not runs:/" in capsys.readouterr().err


def _sets(overrides: list[str]) -> list[str]:
    return [part for item in overrides for part in ("--set", item)]


@pytest.mark.slow
def test_train_on_a_cohort_with_an_injected_gap_shows_it_everywhere(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's acceptance check: the gap is in the metrics, in the plot and a caveat in the model card."""
    from medseg_lightning.data.synth import HardGroup, generate_cohort

    generate_cohort(tmp_path / "cohort", 60, seed=5, shape=(32, 32, 16), hard_group=HardGroup("sex", "F", 2.0))
    data = {"source": str(tmp_path / "cohort"), "labels": {0: "background", 1: "organ"}, "label_mapping": {2: 1},
            "preprocessing": {"target_size": [32, 32]}, "slicing": {"background_fraction": 0.2},
            "split": {"n_folds": 3, "holdout": "test", "val_fraction": 0.15, "stratify_by": "sex"},
            "loader": {"batch_size": 16, "num_workers": 0}}
    experiment = tmp_path / "gap.yaml"
    experiment.write_text(yaml.safe_dump({
        "name": "gap", "data": data, "model": {"encoder": "test_resnet"},
        "trainer": {"accelerator": "cpu", "max_epochs": 4}, "tracking": {"log_overlays": 0, "log_model": False},
        "fairness": {"attributes": ["sex"], "min_group_size": 5, "gap_threshold": 0.0}}))
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(experiment)]) == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (logged,) = client.search_runs([client.get_experiment_by_name("gap").experiment_id])
    assert logged.data.tags["fairness.test.sex.worst_group"] == "F"
    assert logged.data.metrics["test/fairness/sex/dice_gap"] > 0
    assert "metrics/test_fairness_sex.png" in _artifacts(client, logged.info.run_id)
    card = Path(client.download_artifacts(logged.info.run_id, "model_card/model_card.md", str(tmp_path)))
    assert "sex: mean Dice of group 'F'" in card.read_text()
    assert "sex: mean Dice of group 'F'" in logged.data.tags["mlflow.note.content"]
