"""``medseg crossval``: every fold of an experiment as a training run, the test predictions pooled into one audit.

Each case is tested once, by the model of the fold that held it out, so pooling the folds' per-case rows gives an
audit over the whole cohort: groups that are too small in one fold's test set (a few dozen patients split by sex,
age band and site) become large enough to measure. Folds are child ``medseg train`` runs under one parent MLflow
run, which gets the pooled metrics (``test/dice``, ``test/fairness/sex/F/dice``, ...), reports and model card.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medseg_lightning.config.schema import ExperimentConfig
from medseg_lightning.data.attributes import apply_attributes
from medseg_lightning.data.manifest import Case, load_cases
from medseg_lightning.data.splits import assign_splits
from medseg_lightning.evaluation.scoring import EvaluationReport, case_group_counts, summarize
from medseg_lightning.studies.children import (
    Child,
    Echo,
    Study,
    StudyError,
    child_test_cases,
    log_study,
    open_study,
    run_children,
    study_context,
)

KIND = "cross-validation"


@dataclass
class CrossValResult:
    """The study's parent run, its fold runs (of the first seed) and the pooled test report (averaged over seeds)."""

    run_id: str
    tracking_uri: str
    fold_runs: dict[int, str]
    report: EvaluationReport
    model_uri: str | None = None  # the fold models as one ensemble (mean of softmax), logged on the parent run
    seed_runs: dict[int, dict[int, str]] = field(default_factory=dict)  # seed -> fold -> run
    spread: dict[str, float] = field(default_factory=dict)  # seeds/... metrics when there are several seeds


def check_crossval_config(config: ExperimentConfig) -> None:
    """Cross-validation tests every fold: the split must be k-fold with the held-out fold as the test set.

    Raises:
        ValueError: naming the fields to change.
    """
    split = config.data.split
    if split.method != "kfold" or split.holdout != "test":
        raise ValueError(f"cross-validation needs data.split.method: kfold and data.split.holdout: test (each fold "
                         f"held out as a test set); this experiment has method {split.method!r}, holdout "
                         f"{split.holdout!r}")
    if not config.trainer.evaluate_test:
        raise ValueError("cross-validation tests every fold, so it needs trainer.evaluate_test: true; choose the "
                         "settings first with medseg train on a fold's validation split (evaluate_test: false)")


def load_cohort(config: ExperimentConfig) -> list[Case]:
    """The experiment's cases with their attributes (no images are read)."""
    cases = load_cases(config.data.source, config.data.image_columns, config.data.mask_column,
                       config.data.file_columns)
    if config.data.attributes is not None:
        apply_attributes(cases, config.data.attributes)  # problems stop the training runs, with the full list
    return cases


def run_crossval(config: ExperimentConfig, root: Path | None = None, parent_run_id: str | None = None,
                 echo: Echo = print, n_seeds: int = 1, jobs: int = 1) -> CrossValResult:
    """Trains (or reuses) every fold (for every seed), pools the test rows and logs the pooled audit and card.

    The first seed's folds are the children of a single-seed cross-validation of the same config, so adding seeds
    to a finished cross-validation trains only the new seeds. ``jobs`` folds train at once (each on its own GPU,
    or on a share of the CPU cores).
    """
    from medseg_lightning import tracking
    from medseg_lightning.studies.repeats import seed_list

    check_crossval_config(config)
    root = root or tracking.project_root(Path.cwd())
    seeds = seed_list(config, n_seeds)
    qualifier, label = (f"seeds={n_seeds}", f"{n_seeds}seeds") if n_seeds > 1 else ("", "")
    with open_study(KIND, config, root, parent_run_id, qualifier=qualifier, label=label) as study:
        children = {(seed, fold): _fold_child(fold, seed, config.seed) for seed in seeds
                    for fold in range(config.data.split.n_folds)}
        finished = run_children(study, list(children.values()), echo, jobs=jobs)
        seed_runs = {seed: {fold: finished[children[seed, fold].key] for fold in range(config.data.split.n_folds)}
                     for seed in seeds}
        reports = {seed: pooled_report(study, fold_runs) for seed, fold_runs in seed_runs.items()}
        report, spread = _log_pooled(study, reports, seed_runs)
        model_uri = log_fold_ensemble(study, seed_runs[seeds[0]]) if config.tracking.log_model else None
    return CrossValResult(study.run_id, study.client.tracking_uri, seed_runs[seeds[0]], report, model_uri, seed_runs,
                          spread)


def log_fold_ensemble(study: Study, fold_runs: dict[int, str]) -> str | None:
    """The fold models as one model on the study's run, as nnU-Net predicts with its five folds: ``medseg promote
    --run <study run>`` registers it (gated on the pooled cross-validation metrics), ``medseg predict`` runs it.
    Each fold's model already exists; a rerun of the study logs the ensemble again only if it has none."""
    import torch

    from medseg_lightning import tracking
    from medseg_lightning.inference.bundle import load_bundle, predict_slices, save_ensemble
    from medseg_lightning.tracking.registry import logged_model_uri

    uri = study.client.tracking_uri
    try:
        return logged_model_uri(study.client, study.client.get_run(study.run_id))
    except ValueError:
        pass  # none yet
    with tempfile.TemporaryDirectory() as tmp:
        members = [tracking.download_bundle(uri, logged_model_uri(study.client, study.client.get_run(run_id)),
                                            Path(tmp) / f"fold-{fold}") for fold, run_id in fold_runs.items()]
        folder = save_ensemble(members, Path(tmp) / "ensemble")
        bundle = load_bundle(folder)
        rows, cols = study.config.data.preprocessing.target_size or (64, 64)
        example = np.zeros((1, bundle.in_channels, rows, cols), dtype=np.float32)
        prediction = predict_slices(bundle.network, bundle.config, torch.from_numpy(example))
        return tracking.log_model_to_run(uri, study.run_id, folder, example, prediction)


def _fold_child(fold: int, seed: int, base_seed: int) -> Child:
    """Fold ``fold`` trained with ``seed``; the experiment's own seed keeps the single-seed key (``fold-0``)."""
    if seed == base_seed:
        return Child(f"fold-{fold}", {"data.split.fold": fold})
    return Child(f"fold-{fold}/seed-{seed}", {"data.split.fold": fold, "seed": seed})


def pooled_report(study: Study, fold_runs: dict[int, str]) -> EvaluationReport:
    """One test report over every fold's test cases; each case must appear exactly once.

    Raises:
        StudyError: a case tested in two folds, or cases of the cohort that no fold tested.
    """
    tables = [child_test_cases(study, run_id).assign(fold=fold) for fold, run_id in fold_runs.items()]
    table = pd.concat(tables, ignore_index=True)
    repeated = sorted(table["case_id"][table["case_id"].duplicated()].unique())
    if repeated:
        raise StudyError(f"{len(repeated)} case(s) were tested in more than one fold (e.g. {repeated[0]}): the "
                         "folds' runs do not come from one split; rerun the cross-validation")
    untested = sorted({case.case_id for case in load_cohort(study.config)} - set(table["case_id"]))
    if untested:
        raise StudyError(f"{len(untested)} case(s) of the cohort were tested in no fold (e.g. {untested[0]})")
    folds = table.pop("fold").tolist()
    rows = table.to_dict("records")
    names = dict(study.config.data.labels)
    report = summarize(rows, "test", study.config.fairness, [name for key, name in sorted(names.items()) if key > 0])
    for row, fold in zip(report.cases, folds, strict=True):
        row["fold"] = fold  # in the pooled table, not among the aggregated metrics
    return report


def fold_summary(report: EvaluationReport, fold_runs: dict[int, str], config: ExperimentConfig) -> dict[str, Any]:
    """Per-fold case counts and test Dice, and the training cases per group in every fold, for the model card."""
    cases = load_cohort(config)
    folds, train_counts = [], {}
    dice = pd.DataFrame([{"fold": row["fold"], "dice": row.get("dice/mean", math.nan)} for row in report.cases])
    for fold, run_id in fold_runs.items():
        splits = assign_splits(cases, config.data.split.model_copy(update={"fold": fold}))
        members = {name: [case for case in cases if splits.get(case.case_id) == name] for name in ("train", "val")}
        train_counts[str(fold)] = case_group_counts(members["train"], config.fairness)
        fold_dice = dice["dice"][dice["fold"] == fold]
        folds.append({"fold": fold, "run_id": run_id, "n_train": len(members["train"]), "n_val": len(members["val"]),
                      "n_test": len(fold_dice), "dice": float(fold_dice.mean())})
    values = np.array([item["dice"] for item in folds])
    return {"n_folds": len(folds), "folds": folds, "train_group_counts": train_counts,
            "dice_fold_mean": float(values.mean()), "dice_fold_std": float(values.std(ddof=1)) if len(values) > 1
            else math.nan}


def _log_pooled(study: Study, reports: dict[int, EvaluationReport],
                seed_runs: dict[int, dict[int, str]]) -> tuple[EvaluationReport, dict[str, float]]:
    """The pooled report (each case's metrics averaged over seeds when there are several), logged on the parent
    with the per-fold figures and, for several seeds, their spread."""
    from medseg_lightning.studies.repeats import average_over_seeds, seed_spread

    seeds = list(reports)
    report = reports[seeds[0]] if len(seeds) == 1 else average_over_seeds(list(reports.values()), study.config)
    fold_runs = seed_runs[seeds[0]]
    summary = fold_summary(report, fold_runs, study.config)
    metrics = report.metrics() | {f"folds/{f['fold']}/test/dice": f["dice"] for f in summary["folds"]}
    metrics |= {"cv/dice_fold_mean": summary["dice_fold_mean"], "cv/dice_fold_std": summary["dice_fold_std"],
                "cv/n_folds": float(summary["n_folds"])}
    analyses: dict[str, Any] = {"cross_validation": summary}
    spread: dict[str, float] = {}
    if len(seeds) > 1:
        spread = seed_spread(reports)
        metrics |= spread
        analyses["repeats"] = {"seeds": seeds, "split": "test", "n_folds": summary["n_folds"],
                               "runs": {str(seed): ", ".join(runs.values()) for seed, runs in seed_runs.items()},
                               "dice": {str(seed): item.summary.get("dice/mean") for seed, item in reports.items()},
                               "dice_mean": spread["seeds/test/dice_mean"], "dice_std": spread["seeds/test/dice_std"]}
    context = study_context(study, report, fold_runs[0], analyses, kind=KIND)
    log_study(study, context, {"test": report}, metrics)
    return report, spread
