"""Repeats over seeds: one seed is a hint, several are a result.

``medseg train --seeds N`` trains the experiment N times (seeds ``seed``, ``seed + 1``, ...) as child runs of one
parent run; ``medseg crossval --seeds N`` does so for every fold. The parent gets two kinds of spread: the mean
and standard deviation over seeds of the headline figure (how much a rerun moves it), and the bootstrap interval
over cases of each case's metrics averaged over seeds (how much other patients would move it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg_lightning.config.schema import ExperimentConfig
from medseg_lightning.evaluation.scoring import EvaluationReport, summarize
from medseg_lightning.studies.children import Child, Echo, log_study, open_study, run_children, study_context

KIND = "repeats"
SPREAD_KEYS = ("dice/mean", "hd95/mean", "hd95_px/mean")  # plus every per-class Dice


def seed_list(config: ExperimentConfig, n_seeds: int) -> list[int]:
    """The seeds of a repeat study: the experiment's own seed first, so its single run is the first repeat."""
    if n_seeds < 1:
        raise ValueError(f"--seeds {n_seeds}: give at least one seed")
    return [config.seed + index for index in range(n_seeds)]


def seed_key(seed: int, base: str = "") -> str:
    """Child key of one seed (``seed-42``), or of one fold and seed (``fold-0/seed-43``)."""
    return f"{base}/seed-{seed}" if base else f"seed-{seed}"


def average_over_seeds(reports: list[EvaluationReport], config: ExperimentConfig) -> EvaluationReport:
    """One report whose case rows are each case's metrics averaged over the seeds (NaN ignored), summarised with
    bootstrap intervals over cases and the fairness audit, as a single run's report is.

    Raises:
        ValueError: the seeds' reports do not hold the same cases.
    """
    cases = [sorted(row["case_id"] for row in report.cases) for report in reports]
    if any(ids != cases[0] for ids in cases[1:]):
        raise ValueError("the seeds' reports hold different cases; they must come from one split")
    by_case: dict[str, list[dict[str, Any]]] = {}
    for report in reports:
        for row in report.cases:
            by_case.setdefault(row["case_id"], []).append(row)
    rows = [_mean_row(by_case[case_id]) for case_id in cases[0]]
    names = [name for key, name in sorted(config.data.labels.items()) if key > 0]
    return summarize(rows, reports[0].split, config.fairness, names)


def _mean_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for key, value in rows[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool) and key != "fold":
            values = np.array([row.get(key, math.nan) for row in rows], dtype=float)
            finite = values[np.isfinite(values)]
            merged[key] = float(finite.mean()) if finite.size else math.nan
        else:
            merged[key] = value  # case id, attributes, fold
    return merged


def seed_spread(reports: dict[int, EvaluationReport]) -> dict[str, float]:
    """Per seed and across seeds: ``seeds/<seed>/<split>/dice``, ``seeds/<split>/dice_std``, ``seeds/n``, ..."""
    first = next(iter(reports.values()))
    split = first.split
    keys = [key for key in first.summary if key in SPREAD_KEYS or (key.startswith("dice/") and "_" not in key)]
    metrics: dict[str, float] = {"seeds/n": float(len(reports))}
    for key in keys:
        values = np.array([report.summary.get(key, math.nan) for report in reports.values()], dtype=float)
        name = "dice" if key == "dice/mean" else key
        metrics[f"seeds/{split}/{name}_mean"] = float(np.nanmean(values))
        metrics[f"seeds/{split}/{name}_std"] = float(np.nanstd(values, ddof=1)) if len(values) > 1 else 0.0
    for seed, report in reports.items():
        metrics[f"seeds/{seed}/{split}/dice"] = report.summary.get("dice/mean", math.nan)
    return metrics


@dataclass
class RepeatsResult:
    """The parent run, its child run per seed, and the seed-averaged reports (val, and test when tested)."""

    run_id: str
    tracking_uri: str
    seed_runs: dict[int, str]
    reports: dict[str, EvaluationReport]
    spread: dict[str, float]


def run_repeats(config: ExperimentConfig, n_seeds: int, root: Path | None = None, echo: Echo = print,
                jobs: int = 1) -> RepeatsResult:
    """Trains (or reuses) one run per seed and logs the seed-averaged metrics, spread and card on the parent."""
    from medseg_lightning import tracking
    from medseg_lightning.studies.children import child_report

    root = root or tracking.project_root(Path.cwd())
    seeds = seed_list(config, n_seeds)
    splits = ["val", "test"] if config.trainer.evaluate_test else ["val"]
    artifact = f"metrics/{splits[-1]}_cases.csv"
    with open_study(KIND, config, root, qualifier=f"seeds={n_seeds}", label=f"{n_seeds}seeds") as study:
        finished = run_children(study, [Child(seed_key(seed), {"seed": seed}) for seed in seeds], echo, artifact,
                                jobs)
        runs = {seed: finished[seed_key(seed)] for seed in seeds}
        per_split = {split: {seed: child_report(study, run_id, split) for seed, run_id in runs.items()}
                     for split in splits}
        reports = {split: average_over_seeds(list(by_seed.values()), config) for split, by_seed in per_split.items()}
        spread = {key: value for by_seed in per_split.values() for key, value in seed_spread(by_seed).items()}
        metrics = {key: value for report in reports.values() for key, value in report.metrics().items()} | spread
        card_split = splits[-1]
        analyses = {"repeats": {"seeds": seeds, "runs": {str(seed): run for seed, run in runs.items()},
                                "split": card_split,
                                "dice": {str(seed): per_split[card_split][seed].summary.get("dice/mean")
                                         for seed in seeds},
                                "dice_mean": spread.get(f"seeds/{card_split}/dice_mean"),
                                "dice_std": spread.get(f"seeds/{card_split}/dice_std")}}
        context = study_context(study, reports[card_split], runs[seeds[0]], analyses, kind=KIND)
        log_study(study, context, reports, metrics)
    return RepeatsResult(study.run_id, study.client.tracking_uri, runs, reports, spread)
