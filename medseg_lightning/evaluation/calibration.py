"""Voxel-wise calibration: does a softmax confidence of 0.9 mean right nine times in ten?

Each case contributes a reliability histogram (voxel counts, summed confidence and summed correctness per
confidence bin); a split's (or a group's) expected calibration error pools the histograms of its cases, so a
large case weighs as many voxels as it has. Only the voxels that the prediction or the reference calls
foreground are counted: over the whole image the background, predicted with near-certainty and almost always
right, would make any model look calibrated.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from medseg_lightning.config.schema import FairnessConfig
from medseg_lightning.evaluation.fairness import group_labels
from medseg_lightning.utilities.names import metric_name

N_BINS = 10
HISTOGRAM = "_calibration"  # the per-case row key holding the histogram (left out of tables and aggregates)


def case_histogram(confidence: np.ndarray, prediction: np.ndarray, target: np.ndarray,
                   n_bins: int = N_BINS) -> np.ndarray:
    """``(3, n_bins)``: voxels, summed confidence and summed correctness per bin, over the foreground region."""
    region = (prediction > 0) | (target > 0)
    values = confidence[region].astype(np.float64)
    correct = (prediction[region] == target[region]).astype(np.float64)
    bins = np.clip((values * n_bins).astype(np.int64), 0, n_bins - 1)
    return np.stack([np.bincount(bins, minlength=n_bins).astype(np.float64),
                     np.bincount(bins, weights=values, minlength=n_bins),
                     np.bincount(bins, weights=correct, minlength=n_bins)])


def expected_calibration_error(histogram: np.ndarray) -> float:
    """Sum over bins of |accuracy - confidence| weighted by the bin's share of voxels (NaN without voxels)."""
    counts, confidence, correct = histogram
    total = counts.sum()
    if total == 0:
        return float("nan")
    filled = counts > 0
    return float((np.abs(correct[filled] - confidence[filled])).sum() / total)


def pooled(histograms: Iterable[np.ndarray]) -> np.ndarray | None:
    found = [histogram for histogram in histograms if histogram is not None]
    return np.sum(found, axis=0) if found else None


def calibration_summary(histograms: Sequence[np.ndarray | None], table: pd.DataFrame,
                        fairness: FairnessConfig) -> dict[str, float]:
    """``calibration/ece`` over the split, and per audited attribute ``calibration/<attr>/<group>/ece`` for the
    groups of at least ``min_group_size`` cases (the fairness audit's groups, age bands included) and
    ``calibration/<attr>/ece_gap`` (largest minus smallest group ECE): a calibration gap is a fairness finding."""
    split_histogram = pooled(histograms)
    if split_histogram is None:
        return {}
    out = {"calibration/ece": expected_calibration_error(split_histogram)}
    for attribute in fairness.attributes:
        column = f"attr/{attribute}"
        if column not in table:
            continue
        groups = group_labels(table[column], fairness.bins.get(attribute))
        errors = {}
        for group in groups.dropna().unique():
            members = [histograms[i] for i in np.flatnonzero((groups == group).to_numpy())
                       if histograms[i] is not None]
            if len(members) >= fairness.min_group_size:
                errors[str(group)] = expected_calibration_error(np.sum(members, axis=0))
        errors = {group: value for group, value in errors.items() if np.isfinite(value)}
        name = metric_name(attribute)
        out |= {f"calibration/{name}/{metric_name(group)}/ece": value for group, value in errors.items()}
        if len(errors) >= 2:
            out[f"calibration/{name}/ece_gap"] = max(errors.values()) - min(errors.values())
    return out


def reliability(histogram: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per filled bin: mean confidence, accuracy, and voxel count (the reliability diagram's points)."""
    counts, confidence, correct = histogram
    filled = counts > 0
    return confidence[filled] / counts[filled], correct[filled] / counts[filled], counts[filled]
