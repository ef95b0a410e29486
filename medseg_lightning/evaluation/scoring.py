"""Scoring a network on whole cases: per-case metrics, aggregates with intervals, fairness, report files.

The same code scores validation epochs, the test pass at the end of ``medseg train`` and ``medseg evaluate``, so
a number means the same thing wherever it appears. Nothing here touches MLflow: ``report_files`` writes the
files, the tracking module logs them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from medseg_lightning.config.schema import ExperimentConfig, FairnessConfig
from medseg_lightning.data.cache import PreparedCase
from medseg_lightning.data.manifest import Case
from medseg_lightning.data.preprocess import restore_volume
from medseg_lightning.evaluation.calibration import HISTOGRAM, calibration_summary, case_histogram, pooled, reliability
from medseg_lightning.evaluation.fairness import (
    AttributeAudit,
    audit,
    fairness_metrics,
    fairness_report,
    group_counts,
    group_table,
    metric_name,
)
from medseg_lightning.evaluation.metrics import aggregate, case_metrics, name_metrics
from medseg_lightning.evaluation.uncertainty_ranking import (
    MIN_CASES,
    ranking_quality,
    risk_coverage,
    score_names,
    scored_pairs,
)
from medseg_lightning.inference.postprocess import classes_to_clean, keep_largest_components
from medseg_lightning.inference.uncertainty import case_uncertainty, summarise_members


@torch.no_grad()
def predict_labels(network: nn.Module, image: torch.Tensor, batch_size: int) -> np.ndarray:
    """Label map ``(S, H, W)`` of a case's slices ``(S, C, H, W)``, in chunks that fit in memory."""
    device = next(network.parameters()).device
    chunks = [network(image[start : start + batch_size].to(device)).argmax(1).to(torch.uint8).cpu()
              for start in range(0, len(image), batch_size)]
    return torch.cat(chunks).numpy()


@dataclass
class SlicePrediction:
    """A case's slices ``(S, H, W)``: labels, normalised predictive entropy and the softmax confidence."""

    labels: np.ndarray
    entropy: np.ndarray
    confidence: np.ndarray


@torch.no_grad()
def predict_with_confidence(network: nn.Module, image: torch.Tensor, batch_size: int,
                            temperature: float = 1.0) -> SlicePrediction:
    """Labels with what one softmax says about them (for uncertainty scores and calibration), in chunks; the
    logits are divided by ``temperature`` first (``inference.temperature``, fitted by ``medseg calibrate``)."""
    device = next(network.parameters()).device
    labels, entropy, confidence = [], [], []
    for start in range(0, len(image), batch_size):
        logits = network(image[start : start + batch_size].to(device)).float()
        probability = torch.softmax(logits / temperature if temperature != 1.0 else logits, dim=1).cpu()
        summary = summarise_members([probability])
        labels.append(summary.member_labels[0])
        entropy.append(summary.entropy)
        confidence.append(probability.amax(1))
    return SlicePrediction(torch.cat(labels).numpy(), torch.cat(entropy).numpy(), torch.cat(confidence).numpy())


def score_case(item: dict[str, Any], slices: np.ndarray | SlicePrediction, class_names: dict[int, str],
               keep_largest: Sequence[int] = ()) -> dict[str, Any]:
    """One per-case row: the prediction re-stacked into the native grid (only the largest connected component of
    the ``keep_largest`` classes kept, as ``medseg predict`` does) and scored against the untouched labels. A
    ``SlicePrediction`` adds the case's uncertainty scores (``uncertainty/...``, see ``case_uncertainty``) and its
    calibration histogram (under ``calibration.HISTOGRAM``, which ``summarize`` takes out of the row)."""
    labels = slices.labels if isinstance(slices, SlicePrediction) else slices
    prediction = keep_largest_components(restore_volume(labels, item["meta"]), list(keep_largest))
    target = item["target"].numpy() if isinstance(item["target"], torch.Tensor) else item["target"]
    metrics = case_metrics(prediction, target, item["meta"]["spacing"], len(class_names),
                           spacing_known=item["meta"]["spacing_known"])
    row: dict[str, Any] = {"case_id": item["case_id"], **name_metrics(metrics, class_names)}
    if isinstance(slices, SlicePrediction):
        scores = case_uncertainty(prediction, restore_volume(slices.entropy, item["meta"], nearest=False), None)
        row.update({f"uncertainty/{key}": value for key, value in scores.items() if key != "member_agreement"})
        confidence = restore_volume(slices.confidence, item["meta"], nearest=False)
        row[HISTOGRAM] = case_histogram(confidence, prediction, target)
    row.update({f"attr/{key}": value for key, value in item["attributes"].items()})
    return row


@dataclass
class EvaluationReport:
    """Everything one split's evaluation produced: per-case rows, the summary and the fairness audit."""

    split: str
    cases: list[dict[str, Any]]
    summary: dict[str, float]
    audits: list[AttributeAudit] = field(default_factory=list)
    fairness: dict[str, Any] = field(default_factory=dict)
    group_counts: dict[str, dict[str, int | None]] = field(default_factory=dict)
    reliability: np.ndarray | None = None  # the split's pooled calibration histogram (``calibration.py``)
    saliency: dict[str, Any] | None = None  # best and worst case's maps (``saliency_examples.attach_saliency``)

    def metrics(self) -> dict[str, float]:
        """The metrics as logged: ``<split>/dice``, ``<split>/dice/anterior_ci_low``, ``<split>/fairness/...``."""
        out = {f"{self.split}/{key}": value for key, value in self.summary.items()}
        if "dice/mean" in self.summary:
            out[f"{self.split}/dice"] = self.summary["dice/mean"]
        out |= fairness_metrics(self.audits, self.split)
        return {key: float(value) for key, value in out.items() if math.isfinite(value)}


def summarize(rows: list[dict[str, Any]], split: str, fairness: FairnessConfig,
              class_names: list[str]) -> EvaluationReport:
    """Aggregates with bootstrap intervals over the cases, and the per-group audit of the same rows."""
    histograms = [row.get(HISTOGRAM) for row in rows]
    rows = [{key: value for key, value in row.items() if key != HISTOGRAM} for row in rows]
    numeric = [{k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}
               for row in rows]
    summary = aggregate(numeric, fairness.n_bootstrap, fairness.confidence, fairness.seed) if rows else {}
    summary |= ranking_quality(rows)
    summary["n_cases"] = float(len(rows))
    table = pd.DataFrame(rows)
    summary |= calibration_summary(histograms, table, fairness)
    audits = audit(table, fairness, class_names)
    return EvaluationReport(split=split, cases=rows, summary=summary, audits=audits,
                            fairness=fairness_report(audits, fairness, split),
                            group_counts=group_counts(table, fairness) if rows else {},
                            reliability=pooled(histograms))


def evaluate_cases(network: nn.Module, items: Iterable[dict[str, Any]], split: str, config: ExperimentConfig,
                   progress: bool = True) -> EvaluationReport:
    """Predicts and scores every case of ``items`` (a ``CaseDataset``), then summarises."""
    from tqdm.auto import tqdm

    network.eval()
    names = dict(config.data.labels)
    keep = classes_to_clean(config.inference.largest_component, names)
    temperature = config.inference.temperature or 1.0
    rows = [score_case(item, predict_with_confidence(network, item["image"], config.trainer.inference_batch_size,
                                                     temperature), names, keep)
            for item in tqdm(items, desc=f"evaluating {split}", unit="case", disable=not progress)]
    return summarize(rows, split, config.fairness, [name for key, name in sorted(names.items()) if key > 0])


def report_files(report: EvaluationReport, fairness: FairnessConfig, folder: Path) -> list[Path]:
    """Writes the per-case CSV, the summary JSON and, with audited attributes, the fairness JSON, CSV and plots."""
    from medseg_lightning.reporting.plots import save_fairness_plot

    folder.mkdir(parents=True, exist_ok=True)
    split = report.split
    paths = [folder / f"{split}_cases.csv", folder / f"{split}_summary.json"]
    pd.DataFrame(report.cases).to_csv(paths[0], index=False)
    paths[1].write_text(json.dumps(_json_safe(report.summary), indent=2) + "\n")
    paths += _ranking_plot(report, folder)
    if report.reliability is not None and report.reliability[0].sum() > 0:
        from medseg_lightning.reporting.plots import save_reliability_plot

        paths.append(save_reliability_plot(*reliability(report.reliability), report.summary["calibration/ece"],
                                           folder / f"{split}_reliability.png", split))
    if report.saliency:
        from medseg_lightning.reporting.plots import save_saliency_grid

        paths.append(save_saliency_grid(report.saliency["rows"], report.saliency["labels"],
                                        folder / f"{split}_saliency.png", f"{split}: saliency"))
    if not report.audits:
        return paths
    fairness_json = folder / f"{split}_fairness.json"
    fairness_json.write_text(json.dumps(_json_safe(report.fairness), indent=2) + "\n")
    groups_csv = folder / f"{split}_fairness_groups.csv"
    group_table(report.audits, fairness.min_group_size).to_csv(groups_csv, index=False)
    paths += [fairness_json, groups_csv]
    for item in report.fairness["attributes"]:
        if item["available"]:
            plot = folder / f"{split}_fairness_{metric_name(item['attribute'])}.png"
            paths.append(save_fairness_plot(item, plot, fairness.confidence, fairness.min_group_size))
    return paths


def _ranking_plot(report: EvaluationReport, folder: Path) -> list[Path]:
    """``<split>_uncertainty_ranking.png`` when the cases carry uncertainty scores (see ``uncertainty_ranking``)."""
    from medseg_lightning.reporting.plots import save_risk_coverage_plot

    curves = {}
    for name in score_names(report.cases):
        scores, dice = scored_pairs(report.cases, name)
        if len(scores) >= MIN_CASES:
            curves[name] = (risk_coverage(scores, dice), dice)
    if not curves:
        return []
    return [save_risk_coverage_plot(curves, folder / f"{report.split}_uncertainty_ranking.png", report.split)]


def _json_safe(value: Any) -> Any:
    """NaN and infinity become null: JSON has no such numbers and readers choke on them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def split_group_counts(cases_by_split: dict[str, list[PreparedCase]],
                       fairness: FairnessConfig) -> dict[str, dict[str, dict[str, int | None]]]:
    """Cases per audited group in every split (None: too small to disclose), for the model card."""
    return {split: case_group_counts([case.case for case in cases], fairness)
            for split, cases in cases_by_split.items()}


def case_group_counts(cases: list[Case], fairness: FairnessConfig) -> dict[str, dict[str, int | None]]:
    """Cases per audited group (None: too small to disclose)."""
    table = pd.DataFrame([{f"attr/{name}": case.attributes.get(name) for name in fairness.attributes}
                          for case in cases], columns=[f"attr/{name}" for name in fairness.attributes])
    return group_counts(table, fairness) if cases else {}


def worst_group_tags(report: EvaluationReport) -> dict[str, str]:
    """Tags naming each attribute's worst group (a name, so not a metric): ``fairness.test.sex.worst_group``."""
    return {f"fairness.{report.split}.{metric_name(item.attribute)}.worst_group": item.worst_group
            for item in report.audits if item.dice_gap is not None and item.worst_group is not None}
