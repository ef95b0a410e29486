"""`medseg results`: tables from the tracking store, checked to the digit."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from medseg_lightning.cli import main

LABELS = {"data.labels.0": "background", "data.labels.1": "anterior", "data.labels.2": "posterior"}


def _run(client: MlflowClient, experiment: str, name: str, metrics: dict[str, float], params: dict[str, str],
         tags: dict[str, str], finished: bool = True) -> str:
    run = client.create_run(experiment, run_name=name, tags=tags)
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                     params=[Param(k, v) for k, v in {**LABELS, **params}.items()])
    client.set_terminated(run.info.run_id, "FINISHED" if finished else "FAILED")
    return run.info.run_id


def _scores(split: str, anterior: float, posterior: float, mean: float, hd95: float, n: int) -> dict[str, float]:
    values = {f"{split}/dice": mean, f"{split}/dice/mean": mean, f"{split}/dice/mean_ci_low": mean - 0.01,
              f"{split}/dice/mean_ci_high": mean + 0.01, f"{split}/dice/anterior": anterior,
              f"{split}/dice/anterior_ci_low": anterior - 0.02, f"{split}/dice/anterior_ci_high": anterior + 0.02,
              f"{split}/dice/posterior": posterior, f"{split}/hd95/mean": hd95, f"{split}/n_cases": n}
    return values


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[MlflowClient, dict[str, str]]:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlruns").mkdir()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.create_experiment("hippocampus")
    other = client.create_experiment("other")
    provenance = {"git.commit": "0123456789abcdef", "git.dirty": "false", "data.fingerprint": "feedbeefcafe0000"}
    ids = {
        "cv": _run(client, experiment, "cross-validation-hippocampus",
                   _scores("test", 0.90123, 0.88456, 0.892895, 1.234, 200)
                   | {"cv/n_folds": 5, "seeds/n": 3, "seeds/test/dice_std": 0.00321},
                   {"data.slicing.context": "1", "seed": "42"},
                   {"medseg.kind": "cross-validation", "medseg.config_hash": "aaaa", "medseg.command":
                    "medseg crossval experiments/hippocampus_unet.yaml --seeds 3", **provenance}),
        "train": _run(client, experiment, "hippocampus-20261202", _scores("test", 0.8, 0.7, 0.75, 2.5, 40)
                      | _scores("val", 0.81, 0.71, 0.76, 2.4, 32), {"data.slicing.context": "0", "seed": "7"},
                      {"medseg.config_hash": "bbbb", **provenance, "git.dirty": "true"}),
        "dev": _run(client, experiment, "dev", _scores("val", 0.85, 0.84, 0.845, 1.5, 32),
                    {"data.slicing.context": "2", "seed": "42"}, {"medseg.config_hash": "cccc", **provenance}),
        "failed": _run(client, experiment, "crashed", _scores("test", 0.1, 0.1, 0.1, 9.0, 40), {}, {},
                       finished=False),
        "other": _run(client, other, "elsewhere", _scores("test", 0.5, 0.5, 0.5, 3.0, 10), {}, {}),
    }
    _run(client, experiment, "fold-0", _scores("test", 0.9, 0.9, 0.9, 1.0, 40), {},
         {"mlflow.parentRunId": ids["cv"], "medseg.config_hash": "aaaa"})  # a child: not a row of its own
    return client, ids


def test_results_table_is_printed_to_the_digit(store: tuple[MlflowClient, dict[str, str]],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["results", "--experiment", "hippocampus"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("| run | settings | kind | cases | folds | seeds | anterior Dice | posterior Dice | "
                        "mean Dice [95% CI] | std over seeds | HD95 (mm) |")
    assert lines[2] == ("| cross-validation-hippocampus | data.slicing.context=1 | cross-validation | 200 | 5 | 3 | "
                        "0.9012 [0.8812, 0.9212] | 0.8846 | 0.8929 [0.8829, 0.9029] | 0.0032 | 1.23 |")
    assert lines[3] == ("| hippocampus-20261202 | data.slicing.context=0 | training | 40 | 1 | 1 | "
                        "0.8000 [0.7800, 0.8200] | 0.7000 | 0.7500 [0.7400, 0.7600] | n/a | 2.50 |")
    assert len([line for line in lines if line.startswith("| ")]) == 2 + 2 + 2 + 2  # tables: header, rule, rows
    assert ("| cross-validation-hippocampus | `medseg crossval experiments/hippocampus_unet.yaml --seeds 3` | `aaaa` "
            "| `0123456789` | `feedbeefcafe` |") in lines
    assert "| hippocampus-20261202 | `n/a (not run from the command line)` | `bbbb` | `0123456789` (dirty) | " \
           "`feedbeefcafe` |" in lines


def test_results_select_by_split_kind_filter_and_run(store: tuple[MlflowClient, dict[str, str]], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    _client, ids = store
    assert main(["results", "--experiment", "hippocampus", "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "| dev | data.slicing.context=2 | training | 32 | 1 | 1 | 0.8500 [0.8300, 0.8700] | 0.8400 | " \
           "0.8450 [0.8350, 0.8550] | n/a | 1.50 |" in out
    assert "cross-validation-hippocampus" not in out  # it logged no validation metrics
    assert main(["results", "--kind", "cross-validation"]) == 0
    assert capsys.readouterr().out.count("| cross-validation |") == 1
    assert main(["results", "--filter", "params.`data.slicing.context` = '0'"]) == 0
    out = capsys.readouterr().out
    assert "hippocampus-20261202" in out and "settings" not in out  # one row: nothing differs
    assert main(["results", "--parent", ids["cv"]]) == 0
    assert "| fold-0 |" in capsys.readouterr().out
    assert main(["results", "--run", ids["other"], "--csv", str(tmp_path / "t.csv")]) == 0
    csv_lines = (tmp_path / "t.csv").read_text().splitlines()
    assert csv_lines[0].startswith("run_id,run,kind,settings,n_cases,n_folds,n_seeds,dice/anterior,")
    assert csv_lines[1].startswith(f"{ids['other']},elsewhere,training,,10,1,1,0.5,0.48,0.52,")
    assert main(["results", "--experiment", "nope"]) == 2
    assert "no such experiment; the store has: Default, hippocampus, other" in capsys.readouterr().err


def test_results_replace_a_marked_block_of_a_document(store: tuple[MlflowClient, dict[str, str]], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Results\nbefore\n<!-- medseg-results cv -->\nstale table\n<!-- /medseg-results -->\nafter\n")
    assert main(["results", "--kind", "cross-validation", "--into", f"{page}:cv"]) == 0
    text = page.read_text()
    assert text.startswith("# Results\nbefore\n<!-- medseg-results cv -->\n| run | kind |") and "stale" not in text
    assert text.endswith("<!-- /medseg-results -->\nafter\n") and "0.8929 [0.8829, 0.9029]" in text
    assert main(["results", "--kind", "cross-validation", "--into", f"{page}:missing"]) == 2
    assert "no '<!-- medseg-results missing -->'" in capsys.readouterr().err


def test_results_show_object_metrics_when_runs_scored_objects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlruns").mkdir()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.create_experiment("cells")
    objects = {"test/instance/pq": 0.30812, "test/instance/pq_ci_low": 0.207, "test/instance/pq_ci_high": 0.4241,
               "test/instance/n_pred": 4.4, "test/instance/n_true": 4.0667, "test/instance/count_error": 0.3333,
               "test/instance/count_error_ci_low": -0.5333, "test/instance/count_error_ci_high": 1.2}
    _run(client, experiment, "mask-rcnn", _scores("test", 0.873, 0.873, 0.873, 1.0, 15) | objects, {}, {})
    assert main(["results", "--experiment", "cells"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("| HD95 (mm) | PQ [95% CI] | objects found / true | count error [95% CI] |")
    assert lines[2].endswith("| 1.00 | 0.308 [0.207, 0.424] | 4.40 / 4.07 | 0.33 [-0.53, 1.20] |")


def test_results_of_a_crosssite_study_are_its_drop_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlruns").mkdir()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.create_experiment("lgg")
    metrics = {"crosssite/site/dice_drop_mean": 0.04325}
    for group, (n, seen, unseen) in {"CS": (13, 0.585, 0.617), "HT": (27, 0.735, 0.691)}.items():
        for name, value in (("dice_in", seen), ("dice_out", unseen), ("dice_drop", seen - unseen)):
            metrics |= {f"crosssite/site/{group}/{name}": value, f"crosssite/site/{group}/{name}_ci_low": value - 0.1,
                        f"crosssite/site/{group}/{name}_ci_high": value + 0.1}
        metrics[f"crosssite/site/{group}/n"] = n
    _run(client, experiment, "cross-site-lgg", metrics, {}, {"medseg.kind": "cross-site",
                                                             "medseg.command": "medseg crosssite x.yaml"})
    assert main(["results", "--kind", "cross-site"]) == 0
    out = capsys.readouterr().out
    assert "| site | cases | seen in training | not seen | drop |" in out
    assert "| CS | 13 | 0.5850 [0.4850, 0.6850] | 0.6170 [0.5170, 0.7170] | -0.0320 [-0.1320, 0.0680] |" in out
    assert "| HT | 27 |" in out and "Mean drop over the groups: 0.0432" in out and "`medseg crosssite x.yaml`" in out


def test_results_uncertainty_table_shows_each_scores_ranking_quality(
        store: tuple[MlflowClient, dict[str, str]], capsys: pytest.CaptureFixture[str]) -> None:
    client, _ = store
    experiment = client.get_experiment_by_name("hippocampus").experiment_id
    ranking = {"test/uncertainty/entropy_structure/spearman": -0.3204, "test/uncertainty/entropy_structure/n": 40,
               "test/uncertainty/entropy_structure/aurc": 0.1161, "test/uncertainty/entropy_structure/aurc_oracle":
               0.1049, "test/uncertainty/entropy_structure/aurc_random": 0.1291}
    _run(client, experiment, "ranked", _scores("test", 0.9, 0.8, 0.85, 1.5, 40) | ranking, {},
         {"medseg.command": "medseg train experiments/hippocampus_unet.yaml"})
    assert main(["results", "--experiment", "hippocampus", "--table", "uncertainty"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| run | score | cases | Spearman with Dice | AURC | AURC oracle | AURC random |"
    assert lines[2] == "| ranked | `entropy_structure` | 40 | -0.320 | 0.116 | 0.105 | 0.129 |"
    assert len([line for line in lines if line.startswith("| ranked")]) == 2  # its row and its provenance
    assert main(["results", "--experiment", "other", "--table", "uncertainty"]) == 2  # no ranking figures: says so
    assert "logged test/uncertainty/<score>/spearman" in capsys.readouterr().err
