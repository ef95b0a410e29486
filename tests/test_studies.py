"""Cross-validation and cross-site studies: child training runs, pooled audit, reuse on rerun, held-out groups."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from pydantic import Field

from medseg_lightning.cli import main
from medseg_lightning.config import load_config
from medseg_lightning.config.schema import ExperimentConfig, TrainerConfig
from medseg_lightning.data.synth import generate_cohort
from medseg_lightning.studies import children as studies
from medseg_lightning.studies.children import Child, StudyError, config_hash
from medseg_lightning.studies.crosssite import eligible_groups, run_crosssite
from medseg_lightning.studies.crossval import CrossValResult, run_crossval
from medseg_lightning.tracking.studies import ChildRuns

FAST = ["model.encoder=test_resnet", "trainer.accelerator=cpu", "trainer.max_epochs=1", "tracking.log_overlays=0",
        "tracking.log_model=false", "fairness.attributes=[sex, site]", "fairness.min_group_size=4",
        "fairness.n_bootstrap=200"]


def _experiment(folder: Path, cohort: Path) -> Path:
    data = {"source": str(cohort), "labels": {0: "background", 1: "organ", 2: "lesion"},
            "preprocessing": {"target_size": [32, 32]},
            "split": {"n_folds": 3, "holdout": "test", "val_fraction": 0.2, "stratify_by": "site"},
            "loader": {"batch_size": 8, "num_workers": 0}}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump({"name": "study", "data": data}))
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A project folder with a 15-case cohort (sites A, B, C) and its experiment; studies below share its store."""
    root = tmp_path_factory.mktemp("studies")
    generate_cohort(root / "cohort", 15, seed=3, shape=(32, 32, 6))
    (root / "mlruns").mkdir()
    return root, _experiment(root, root / "cohort")


@pytest.fixture(scope="module")
def crossval(project: tuple[Path, Path]) -> CrossValResult:
    root, experiment = project
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDSEG_CACHE_DIR", str(root / "cache"))
        patch.chdir(root)
        return run_crossval(load_config(experiment, FAST), root)


def _set(items: list[str]) -> list[str]:
    return [part for item in items for part in ("--set", item)]


def _runs(root: Path) -> list:
    client = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("study")
    return client.search_runs([experiment.experiment_id], max_results=1000)


@pytest.mark.slow  # 6 training processes
def test_crossval_tests_every_case_once_and_pools_the_audit(crossval: CrossValResult,
                                                            project: tuple[Path, Path]) -> None:
    root, _ = project
    cases = pd.DataFrame(crossval.report.cases)
    manifest = pd.read_csv(root / "cohort" / "manifest.csv")
    assert sorted(cases["case_id"]) == sorted(manifest["case_id"])  # every case once
    assert sorted(cases["fold"].unique()) == [0, 1, 2]
    client = MlflowClient(crossval.tracking_uri)
    parent = client.get_run(crossval.run_id)
    assert parent.data.tags["medseg.kind"] == "cross-validation" and parent.info.status == "FINISHED"
    metrics = parent.data.metrics
    assert metrics["test/n_cases"] == 15
    assert metrics["test/dice"] == pytest.approx(cases["dice/mean"].mean())
    for fold in range(3):
        fold_cases = cases[cases["fold"] == fold]
        assert metrics[f"folds/{fold}/test/dice"] == pytest.approx(fold_cases["dice/mean"].mean())
        child = client.get_run(crossval.fold_runs[fold])
        assert child.data.tags["mlflow.parentRunId"] == crossval.run_id  # nested in the MLflow UI
        assert child.data.params["data.split.fold"] == str(fold)
    # the pooled audit measures groups that no single fold's 5 test cases could
    assert any(key.startswith("test/fairness/sex/") and key.endswith("/dice") for key in metrics)
    card = json.loads(Path(client.download_artifacts(crossval.run_id, "model_card/model_card.json",
                                                     str(root))).read_text())
    assert card["model_details"]["kind"] == "cross-validation (pooled folds)"
    study = card["quantitative_analyses"]["cross_validation"]
    assert [f["n_test"] for f in study["folds"]] == [len(cases[cases["fold"] == k]) for k in range(3)]
    assert set(study["train_group_counts"]) == {"0", "1", "2"}
    markdown = Path(client.download_artifacts(crossval.run_id, "model_card/model_card.md", str(root))).read_text()
    assert "Cross-validation folds" in markdown and "Training cases per group, by fold" in markdown


@pytest.mark.slow  # 6 training processes
def test_a_rerun_reuses_the_finished_folds(crossval: CrossValResult, project: tuple[Path, Path],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    root, experiment = project
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(root / "cache"))
    monkeypatch.chdir(root)
    before = len(_runs(root))
    messages: list[str] = []
    again = run_crossval(load_config(experiment, FAST), root, echo=messages.append)
    assert again.run_id == crossval.run_id and again.fold_runs == crossval.fold_runs
    assert len(_runs(root)) == before  # nothing retrained
    assert all("reused" in line for line in messages)
    assert again.report.summary["dice/mean"] == pytest.approx(crossval.report.summary["dice/mean"])


@pytest.mark.slow  # 6 training processes
def test_crosssite_holds_out_each_large_group_and_reuses_the_crossval(
        crossval: CrossValResult, project: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    root, experiment = project
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(root / "cache"))
    monkeypatch.chdir(root)
    config = load_config(experiment, FAST)
    manifest = pd.read_csv(root / "cohort" / "manifest.csv")
    sizes = manifest["site"].value_counts()
    groups, skipped = eligible_groups(config, "site")
    assert groups == sorted(site for site, n in sizes.items() if n >= 4)
    assert [item["group"] for item in skipped] == sorted(site for site, n in sizes.items() if n < 4)
    result = run_crosssite(config, "site", root)
    assert result.crossval.run_id == crossval.run_id and result.crossval.fold_runs == crossval.fold_runs
    client = MlflowClient(result.tracking_uri)
    metrics = client.get_run(result.run_id).data.metrics
    for item in result.groups:
        held_out = set(manifest["case_id"][manifest["site"] == item.group])
        assert set(item.cases["case_id"]) == held_out and item.n == len(held_out)  # tested on all of them
        child = client.get_run(item.run_id)
        assert child.data.params["data.split.held_out_group"] == item.group
        assert int(child.data.tags["data.n_test"]) == len(held_out)  # none of them in training or validation
        assert int(child.data.tags["data.n_train"]) + int(child.data.tags["data.n_val"]) == 15 - len(held_out)
        pooled = pd.DataFrame(crossval.report.cases).set_index("case_id")["dice/mean"]
        assert item.dice_in.mean == pytest.approx(pooled[sorted(held_out)].mean())
        assert item.dice_drop.mean == pytest.approx(item.dice_in.mean - item.dice_out.mean)
        for key in ("dice_in", "dice_out", "dice_drop"):
            assert metrics[f"crosssite/site/{item.group}/{key}"] == pytest.approx(getattr(item, key).mean)
        assert item.dice_drop.ci_low <= item.dice_drop.mean <= item.dice_drop.ci_high
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "crosssite")}
    assert artifacts == {"crosssite/crosssite_site.csv", "crosssite/crosssite_site_cases.csv",
                         "crosssite/crosssite_site.png"}
    card = Path(client.download_artifacts(result.run_id, "model_card/model_card.md", str(root))).read_text()
    assert "Cross-site generalisation" in card
    # the command line reuses everything and prints the table
    assert main(["crosssite", str(experiment), "--attribute", "site", *_set(FAST)]) == 0
    printed = capsys.readouterr().out
    assert "cross-site generalisation" in printed and all(f"{g}" in printed for g in groups)
    # a study that takes its seen-in-training Dice from an earlier cross-validation trains no folds of its own
    before = len(_runs(root))
    referenced = run_crosssite(config, "site", root, seen_from=crossval.run_id)
    assert len(_runs(root)) == before + 1  # its own parent run; the held-out models are reused
    assert referenced.crossval.fold_runs == crossval.fold_runs and referenced.run_id != result.run_id
    assert [g.dice_drop.mean for g in referenced.groups] == pytest.approx([g.dice_drop.mean for g in result.groups])
    before = len(_runs(root))
    with pytest.raises(ValueError, match="not a cross-validation or cross-site run"):
        run_crosssite(config, "site", root, seen_from=crossval.fold_runs[0])
    assert len(_runs(root)) <= before + 1  # refused before any held-out model was trained
    # a reference still running (a fold not finished): the held-out models are kept, the pairing waits for a rerun
    client.update_run(crossval.fold_runs[0], status="RUNNING")
    with pytest.raises(StudyError, match="rerun this command when it has finished"):
        run_crosssite(config, "site", root, seen_from=crossval.run_id)
    client.update_run(crossval.fold_runs[0], status="FINISHED")
    rerun = run_crosssite(config, "site", root, seen_from=crossval.run_id)
    assert [g.run_id for g in rerun.groups] == [g.run_id for g in referenced.groups]


def test_a_failed_fold_stops_the_study_and_a_rerun_continues(project: tuple[Path, Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    root, experiment = project
    monkeypatch.chdir(root)
    calls: list[list[str]] = []

    def failing_launch(command: list[str], env: dict[str, str], log: Path, cwd: Path) -> int:
        calls.append(command)
        log.write_text("RuntimeError: out of memory\n")
        return 1

    monkeypatch.setattr(studies, "launch", failing_launch)
    config = [*FAST, "trainer.max_epochs=2"]  # another config: nothing to reuse
    assert main(["crossval", str(experiment), *_set(config)]) == 1
    error = capsys.readouterr().err
    assert "fold-0: training failed, exit code 1: RuntimeError: out of memory" in error
    assert "rerun the same command to continue" in error
    assert len(calls) == 1


def test_an_interrupted_child_resumes_from_its_checkpoint(project: tuple[Path, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    root, experiment = project
    config = load_config(experiment, FAST)
    found = iter([ChildRuns(None, "abc123"), ChildRuns("abc123", None)])
    monkeypatch.setattr("medseg_lightning.tracking.studies.child_runs", lambda *args: next(found))
    (root / "mlruns" / "checkpoints" / "abc123").mkdir(parents=True)
    (root / "mlruns" / "checkpoints" / "abc123" / "last.ckpt").write_bytes(b"")
    commands: list[list[str]] = []
    def launch(command: list[str], env: dict[str, str], log: Path, cwd: Path) -> int:
        commands.append(command)
        log.write_text("finished in 0m01s; best epoch 0\n")
        return 0

    monkeypatch.setattr(studies, "launch", launch)
    study = studies.Study("cross-validation", config, root, config_hash(config), None, "parent", root / "s")
    study.folder.mkdir()
    assert studies.run_child(study, Child("fold-0", {"data.split.fold": 0}), echo=lambda _: None) == "abc123"
    assert commands[0][-2:] == ["--resume", "abc123"]


def test_the_config_hash_ignores_fold_names_and_tags_only(project: tuple[Path, Path]) -> None:
    _, experiment = project
    base = config_hash(load_config(experiment, FAST))
    assert config_hash(load_config(experiment, [*FAST, "data.split.fold=2", "tracking.run_name=x",
                                                "tracking.tags={a: b}"])) == base
    assert config_hash(load_config(experiment, [*FAST, "optimizer.lr=0.01"])) != base


def test_an_optional_setting_added_later_keeps_the_config_hash(project: tuple[Path, Path]) -> None:
    """Studies run before an upgrade that adds an optional setting (off by default) are still found by reruns."""
    _, experiment = project

    class NewerTrainer(TrainerConfig):
        future_option: float | None = None

    class NewerExperiment(ExperimentConfig):
        trainer: NewerTrainer = Field(default_factory=NewerTrainer)

    config = load_config(experiment, FAST)
    dumped = config.model_dump()
    assert config_hash(NewerExperiment.model_validate(dumped)) == config_hash(config)
    dumped["trainer"]["future_option"] = 0.5
    assert config_hash(NewerExperiment.model_validate(dumped)) != config_hash(config)


def test_study_commands_refuse_configs_they_cannot_run(project: tuple[Path, Path],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    _, experiment = project
    assert main(["crossval", str(experiment), "--set", "data.split.holdout=val"]) == 2
    assert "cross-validation needs data.split.method: kfold and data.split.holdout: test" in capsys.readouterr().err
    assert main(["crosssite", str(experiment), "--attribute", "scanner"]) == 2
    assert "--attribute scanner: no case has this attribute; available: age, sex, site" in capsys.readouterr().err
    assert main(["crosssite", str(experiment), "--attribute", "age", *_set(FAST),
                 "--set", "fairness.attributes=[age]", "--set", "fairness.bins={age: [0, 50, 120]}"]) == 2
    assert "binned attributes cannot be held out" in capsys.readouterr().err


@pytest.mark.slow  # 3 more training processes: the second seed of every fold
def test_crossval_with_seeds_reuses_the_first_seed_and_averages_each_case(crossval: CrossValResult,
                                                                         project: tuple[Path, Path],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    root, experiment = project
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(root / "cache"))
    monkeypatch.chdir(root)
    messages: list[str] = []
    seeded = run_crossval(load_config(experiment, FAST), root, echo=messages.append, n_seeds=2)
    assert seeded.run_id != crossval.run_id and seeded.seed_runs[42] == crossval.fold_runs
    assert sum("reused" in line for line in messages) == 3 and len(set(seeded.seed_runs[43].values())) == 3
    client = MlflowClient(seeded.tracking_uri)
    metrics = client.get_run(seeded.run_id).data.metrics
    second = pd.concat([pd.DataFrame(studies.child_report(_study_of(seeded, root), run, "test").cases)
                        for run in seeded.seed_runs[43].values()])
    first = pd.DataFrame(crossval.report.cases)
    both = first.set_index("case_id")["dice/mean"].to_frame("a").join(second.set_index("case_id")["dice/mean"])
    assert metrics["seeds/n"] == 2
    assert metrics["seeds/42/test/dice"] == pytest.approx(first["dice/mean"].mean())
    assert metrics["seeds/43/test/dice"] == pytest.approx(second["dice/mean"].mean())
    assert metrics["seeds/test/dice_std"] == pytest.approx(pd.Series([first["dice/mean"].mean(),
                                                                       second["dice/mean"].mean()]).std())
    assert metrics["test/dice"] == pytest.approx(both.mean(axis=1).mean())  # each case averaged over seeds
    markdown = Path(client.download_artifacts(seeded.run_id, "model_card/model_card.md", str(root))).read_text()
    assert "Repeats over seeds" in markdown and "Cross-validation folds" in markdown


def _study_of(result: CrossValResult, root: Path) -> studies.Study:
    config = load_config(root / "study.yaml", FAST)
    client = MlflowClient(result.tracking_uri)
    return studies.Study("cross-validation", config, root, config_hash(config), client, result.run_id, root)


def test_train_with_seeds_repeats_under_one_parent_and_reuses_finished_seeds(project: tuple[Path, Path],
                                                                              monkeypatch: pytest.MonkeyPatch,
                                                                              capsys: pytest.CaptureFixture[str]
                                                                              ) -> None:
    root, experiment = project
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(root / "cache"))
    monkeypatch.chdir(root)
    running, most = [0], [0]  # child processes alive at once (run times would depend on the machine's load)
    launch, lock = studies.launch, threading.Lock()

    def counting_launch(*args: object, **kwargs: object) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            return launch(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(studies, "launch", counting_launch)
    command = ["train", str(experiment), *_set([*FAST, "trainer.evaluate_test=false"]), "--seeds", "2", "--jobs", "2"]
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "repeats over 2 seeds (42, 43)" in out and "val Dice over seeds: mean" in out, out
    assert "test: not evaluated" in out
    runs = _runs(root)
    [parent] = [run for run in runs if run.data.tags.get("medseg.kind") == "repeats"]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(run.data.params["seed"] for run in children) == ["42", "43"]
    values = {run.data.params["seed"]: run.data.metrics["val/dice"] for run in children}
    metrics = parent.data.metrics
    assert metrics["seeds/val/dice_mean"] == pytest.approx(sum(values.values()) / 2)
    assert metrics["seeds/42/val/dice"] == pytest.approx(values["42"])
    assert not [key for key in metrics if key.startswith("test/")]
    assert parent.data.tags["medseg.command"].endswith("--seeds 2 --jobs 2")
    assert most[0] == 2  # --jobs 2: the two seeds trained at the same time
    assert main(command) == 0  # a rerun trains nothing
    assert "seed-42: finished earlier" in capsys.readouterr().out
    assert len(_runs(root)) == len(runs)


@pytest.mark.slow  # 2 training processes
def test_a_crossval_logs_its_fold_ensemble_which_is_promoted_and_predicts(project: tuple[Path, Path],
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from medseg_lightning.evaluation.evaluate import load_model
    from medseg_lightning.inference.bundle import EnsembleNetwork

    root, experiment = project
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(root / "cache"))
    monkeypatch.chdir(root)
    config = load_config(experiment, [*FAST, "tracking.log_model=true", "data.split.n_folds=2"])
    result = run_crossval(config, root)
    assert result.model_uri and result.model_uri.startswith("models:/m-")
    ensemble = load_model(f"runs:/{result.run_id}", root)
    assert isinstance(ensemble.network, EnsembleNetwork) and len(ensemble.network.members) == 2
    for member, run_id in zip(ensemble.network.members, result.fold_runs.values(), strict=True):
        fold = load_model(f"runs:/{run_id}", root).network
        assert all(torch.equal(a, b) for a, b in zip(member.state_dict().values(), fold.state_dict().values(),
                                                     strict=True))
    assert run_crossval(config, root).model_uri == result.model_uri  # a rerun does not log it twice
    assert main(["promote", "--run", result.run_id, "--name", "folds", "--min-cases", "10"]) == 0
    source = root / "cohort" / "imagesTr" / "synth_000.nii.gz"
    assert main(["predict", "--model", "models:/folds@champion", str(source), "--out", str(root / "pred")]) == 0
    assert (root / "pred" / "synth_000.nii.gz").is_file()
