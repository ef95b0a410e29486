"""Test-set hygiene: validation chooses, test only reports, and every look at a test split is counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from medseg_lightning.cli import main
from medseg_lightning.config import ConfigError, load_config
from medseg_lightning.config.protocol import configuration_hash, split_key
from medseg_lightning.sweep.config import load_sweep
from medseg_lightning.training.train import run

TINY = ["model.encoder=test_resnet", "trainer.accelerator=cpu", "trainer.max_epochs=1", "tracking.log_overlays=0",
        "trainer.log_every_n_steps=1"]


@pytest.fixture
def experiment(cohort: Path, tmp_path: Path) -> Path:
    data = {"source": str(cohort), "labels": {0: "background", 1: "organ", 2: "lesion"},
            "preprocessing": {"target_size": [32, 32]},
            "split": {"n_folds": 3, "holdout": "test", "val_fraction": 0.25},
            "loader": {"batch_size": 4, "num_workers": 0}}
    path = tmp_path / "hygiene.yaml"
    path.write_text(yaml.safe_dump({"name": "hygiene", "data": data}))
    return path


def test_a_test_metric_cannot_choose_the_checkpoint_or_a_sweep(experiment: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trainer.monitor 'test/dice': a test metric cannot choose the model.*"
                                          r"'val/dice'"):
        load_config(experiment, ["trainer.monitor=test/dice"])
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"experiment": str(experiment), "n_trials": 2,
                                     "objectives": [{"metric": "test/fairness/sex/dice_gap", "direction": "minimize"}],
                                     "pruner": {"name": "none"},
                                     "space": {"optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}}))
    with pytest.raises(ConfigError, match="objective 'test/fairness/sex/dice_gap': a test metric cannot choose"):
        load_sweep(sweep)


def test_configuration_hash_ignores_names_seeds_and_folders_but_not_settings(experiment: Path, cohort: Path,
                                                                             tmp_path: Path) -> None:
    base = load_config(experiment)
    same = [load_config(experiment, ["seed=7"]),
            load_config(experiment, ["name=renamed", "trainer.evaluate_test=false"]),
            load_config(experiment, ["tracking.log_overlays=0", "fairness.n_bootstrap=200"])]
    copied = tmp_path / "elsewhere"
    copied.symlink_to(cohort)
    same.append(load_config(experiment, [f"data.source={copied}"]))
    for config in same:
        assert configuration_hash(config) == configuration_hash(base)
    for change in ["optimizer.lr=0.01", "trainer.max_epochs=3", "data.slicing.context=1", "inference.tta=true",
                   "trainer.ema_decay=0.99", "data.split.fold=1"]:
        assert configuration_hash(load_config(experiment, [change])) != configuration_hash(base), change
    assert split_key(["b", "a"]) == split_key(["a", "b"]) != split_key(["a", "c"])


def test_development_mode_never_scores_the_test_split(experiment: Path, tmp_path: Path, monkeypatch,
                                                      capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(experiment), *(x for item in TINY for x in ("--set", item)),
                 "--set", "trainer.evaluate_test=false"]) == 0
    out = capsys.readouterr().out
    assert "test: not evaluated (" in out and "--split test" in out and "test: dice=" not in out, out
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    [run_info] = client.search_runs([client.get_experiment_by_name("hygiene").experiment_id])
    assert "val/dice" in run_info.data.metrics
    assert not [key for key in run_info.data.metrics if key.startswith("test/")]
    assert "medseg.test_split" not in run_info.data.tags
    assert not [item.path for item in client.list_artifacts(run_info.info.run_id, "metrics") if "test" in item.path]
    assert run_info.data.tags["medseg.command"].startswith(f"medseg train {experiment}")


def test_every_look_at_a_test_split_is_counted_and_shown(experiment: Path, tmp_path: Path, monkeypatch,
                                                         capsys) -> None:
    monkeypatch.chdir(tmp_path)
    first = run(load_config(experiment, TINY), root=tmp_path)
    assert first.test_looks is not None and first.test_looks.line() == \
        "this test split has been evaluated 1 time by 1 configuration"
    repeat = run(load_config(experiment, [*TINY, "seed=3", "tracking.log_model=false"]), root=tmp_path)
    assert (repeat.test_looks.evaluations, repeat.test_looks.configurations) == (2, 1)  # a second seed: a repeat
    other = run(load_config(experiment, [*TINY, "optimizer.lr=0.01", "tracking.log_model=false"]), root=tmp_path)
    assert (other.test_looks.evaluations, other.test_looks.configurations) == (3, 2)
    another_fold = run(load_config(experiment, [*TINY, "data.split.fold=1", "tracking.log_model=false"]),
                       root=tmp_path)
    assert (another_fold.test_looks.evaluations, another_fold.test_looks.configurations) == (1, 1)

    client = MlflowClient(first.tracking_uri)
    cards = {result.run_id: json.loads(Path(client.download_artifacts(result.run_id, "model_card/model_card.json",
                                                                       str(tmp_path / result.run_id))).read_text())
             for result in (first, other)}
    def looks_caveats(run_id: str) -> list[str]:
        return [text for text in cards[run_id]["caveats_and_recommendations"]["generated"] if "This test split" in text]

    assert not looks_caveats(first.run_id)
    caveat = looks_caveats(other.run_id)
    assert caveat and "evaluated 3 times by 2 distinct configurations" in caveat[0]
    assert cards[other.run_id]["evaluation_data"]["test_looks"] == {"evaluations": 3, "configurations": 2}

    capsys.readouterr()
    assert main(["evaluate", "--model", f"runs:/{first.run_id}", "--data", str(experiment), "--split", "val"]) == 0
    assert "evaluated" not in capsys.readouterr().out  # validation looks are not counted
    assert main(["evaluate", "--model", f"runs:/{first.run_id}", "--data", str(experiment)]) == 0
    captured = capsys.readouterr()
    assert "note: this test split has been evaluated 3 times by 2 distinct configurations (1 other than this one)" \
        in captured.err, captured.err
    assert "this test split has been evaluated 4 times by 2 distinct configurations" in captured.out
    assert main(["evaluate", "--model", f"runs:/{first.run_id}", "--data", str(experiment),
                 "--largest-component"]) == 0  # post-processing chosen per call is another configuration
    assert "evaluated 5 times by 3 distinct configurations" in capsys.readouterr().out


def test_evaluating_a_model_on_cases_it_has_seen_is_refused_on_test(experiment: Path, tmp_path: Path, monkeypatch,
                                                                     capsys) -> None:
    monkeypatch.chdir(tmp_path)
    trained = run(load_config(experiment, TINY), root=tmp_path)
    assert main(["evaluate", "--model", f"runs:/{trained.run_id}", "--data", str(experiment), "--split", "train"]) == 0
    assert "note: 6 of the 6 train cases trained or selected this model" in capsys.readouterr().err
    reshuffled = tmp_path / "reshuffled.yaml"  # another split of the same cohort: its test holds training cases
    config = yaml.safe_load(experiment.read_text())
    config["data"]["split"]["seed"] = 5
    reshuffled.write_text(yaml.safe_dump(config))
    assert main(["evaluate", "--model", f"runs:/{trained.run_id}", "--data", str(reshuffled)]) == 2
    error = capsys.readouterr().err
    assert "test cases trained or selected this model" in error and "not how it does on new patients" in error
    assert main(["evaluate", "--model", f"runs:/{trained.run_id}", "--data", str(experiment)]) == 0  # unseen: fine
