"""Per-group (fairness) metrics over a per-case table: group means with bootstrap intervals, worst group and gap.

Clinicians and regulators ask whether a model works equally well for every group of patients. The answer is
computed from the same per-case rows as every other metric (columns ``dice/mean``, ``dice/<class>``,
``hd95/mean`` and ``attr/<name>``), so it needs no extra inference. Intervals are percentile bootstraps of the
mean over cases. The gap is the best group's mean minus the worst group's, with best and worst fixed from the
point estimates and every group resampled independently: recomputing max - min on each resample would be biased
upwards and could never contain zero. Groups with fewer than ``min_group_size`` cases are too small to measure
and are never reported as a number, not even their size (small groups also risk re-identification).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from medseg_lightning.config.schema import FairnessConfig
from medseg_lightning.data.manifest import UNKNOWN
from medseg_lightning.evaluation.statistics import Estimate, bootstrap_means, finite, interval, percentiles
from medseg_lightning.utilities.names import metric_name

DICE = "dice/mean"


@dataclass
class GroupResult:
    """One group of one attribute; the numbers are None when the group is too small to measure."""

    group: str
    n: int | None
    measured: bool
    dice: Estimate | None = None
    dice_per_class: dict[str, Estimate] = field(default_factory=dict)
    hd95: float | None = None
    distance_unit: str = "mm"


@dataclass
class AttributeAudit:
    """Every group of one attribute, the worst and best measured groups and the gap between them."""

    attribute: str
    available: bool
    bins: list[float] | None = None
    groups: list[GroupResult] = field(default_factory=list)
    worst_group: str | None = None
    best_group: str | None = None
    dice_worst: float | None = None
    dice_best: float | None = None
    dice_gap: Estimate | None = None
    dice_ratio: float | None = None
    note: str | None = None


def group_labels(values: pd.Series, edges: list[float] | None) -> pd.Series:
    """Group of every case: the value itself, or its bin (``40-60`` holds 40 <= age < 60) for binned attributes.

    Blank and unparsable values are ``unknown``; values outside the edges get ``<first`` or ``>=last``.
    """
    text = values.fillna(UNKNOWN).astype(str).str.strip().replace("", UNKNOWN)
    if edges is None:
        return text
    numbers = pd.to_numeric(text.where(text != UNKNOWN), errors="coerce")
    names = [f"{_number(a)}-{_number(b)}" for a, b in itertools.pairwise(edges)]
    position = np.searchsorted(np.asarray(edges, dtype=float), numbers.to_numpy(dtype=float), side="right")
    labels = []
    for value, pos in zip(numbers, position, strict=True):
        if math.isnan(value):
            labels.append(UNKNOWN)
        elif pos == 0:
            labels.append(f"<{_number(edges[0])}")
        elif pos == len(edges):
            labels.append(f">={_number(edges[-1])}")
        else:
            labels.append(names[pos - 1])
    return pd.Series(labels, index=values.index)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def audit_attribute(cases: pd.DataFrame, attribute: str, config: FairnessConfig, class_names: list[str],
                    rng: np.random.Generator) -> AttributeAudit:
    """Per-group metrics of one attribute, its worst group and the best-minus-worst Dice gap."""
    column = f"attr/{attribute}"
    bins = config.bins.get(attribute)
    if column not in cases.columns:
        return AttributeAudit(attribute, available=False, bins=bins, note="not a column of the manifest")
    groups = group_labels(cases[column], bins)
    if (groups == UNKNOWN).all():
        return AttributeAudit(attribute, available=False, bins=bins, note="every value is missing")
    distance = "hd95/mean" if "hd95/mean" in cases.columns else "hd95_px/mean"
    result = AttributeAudit(attribute, available=True, bins=bins)
    dice_by_group: dict[str, np.ndarray] = {}
    for name in sorted(groups.unique(), key=_group_order):
        rows = cases[groups == name]
        if len(rows) < config.min_group_size:
            result.groups.append(GroupResult(name, n=None, measured=False))
            continue
        dice = rows[DICE].to_numpy(dtype=np.float64)
        dice_by_group[name] = dice
        result.groups.append(GroupResult(
            name, n=len(rows), measured=True,
            dice=interval(dice, config.n_bootstrap, config.confidence, rng),
            dice_per_class={c: interval(rows[f"dice/{c}"].to_numpy(dtype=np.float64), config.n_bootstrap,
                                        config.confidence, rng)
                            for c in class_names if f"dice/{c}" in rows.columns},
            hd95=float(np.nanmean(rows[distance].to_numpy(dtype=np.float64))) if distance in rows.columns else None,
            distance_unit="px" if distance.startswith("hd95_px") else "mm",
        ))
    _compare_groups(result, dice_by_group, config, rng)
    return result


def _group_order(name: str) -> tuple[int, float, str]:
    """Bins in numeric order, other values alphabetically, ``unknown`` last."""
    if name == UNKNOWN:
        return (2, 0.0, name)
    match = re.match(r"^(<|>=)?(-?\d+(?:\.\d+)?)", name)
    if match:
        offset = {"<": -0.5, ">=": 0.5}.get(match.group(1) or "", 0.0)
        return (0, float(match.group(2)) + offset, name)
    return (1, 0.0, name)


def _compare_groups(result: AttributeAudit, dice_by_group: dict[str, np.ndarray], config: FairnessConfig,
                    rng: np.random.Generator) -> None:
    """Worst and best measured groups (``unknown`` included: it is a group of patients too) and the gap."""
    if len(dice_by_group) < 2:
        result.note = f"fewer than two groups with at least {config.min_group_size} cases: no gap to measure"
        if dice_by_group:
            (only, values), = dice_by_group.items()
            result.worst_group = result.best_group = only
            result.dice_worst = result.dice_best = float(np.nanmean(values))
        return
    means = {name: float(np.nanmean(values)) for name, values in dice_by_group.items()}
    worst, best = min(means, key=means.__getitem__), max(means, key=means.__getitem__)
    gaps = (bootstrap_means(finite(dice_by_group[best]), config.n_bootstrap, rng)
            - bootstrap_means(finite(dice_by_group[worst]), config.n_bootstrap, rng))
    result.worst_group, result.best_group = worst, best
    result.dice_worst, result.dice_best = means[worst], means[best]
    result.dice_gap = Estimate(means[best] - means[worst], *percentiles(gaps, config.confidence))
    result.dice_ratio = means[worst] / means[best] if means[best] > 0 else math.nan


def audit(cases: pd.DataFrame, config: FairnessConfig, class_names: list[str]) -> list[AttributeAudit]:
    """Audits every configured attribute over a per-case table; the bootstrap is seeded, so reruns agree."""
    if cases.empty or DICE not in cases.columns:
        return [AttributeAudit(name, available=False, bins=config.bins.get(name), note="no evaluated cases")
                for name in config.attributes]
    rng = np.random.default_rng(config.seed)
    return [audit_attribute(cases, name, config, class_names, rng) for name in config.attributes]


def fairness_metrics(audits: list[AttributeAudit], split: str) -> dict[str, float]:
    """Flat metrics with stable names: ``test/fairness/sex/F/dice``, ``test/fairness/sex/dice_gap``, ...

    Too-small groups produce no metric at all; attributes without two measured groups produce no gap.
    """
    out: dict[str, float] = {}
    for item in audits:
        if not item.available:
            continue
        base = f"{split}/fairness/{metric_name(item.attribute)}"
        for group in item.groups:
            if not group.measured or group.dice is None:
                continue
            prefix = f"{base}/{metric_name(group.group)}"
            out[f"{prefix}/n"] = float(group.n or 0)
            out |= _estimate_metrics(f"{prefix}/dice", group.dice)
            for name, estimate in group.dice_per_class.items():
                out |= _estimate_metrics(f"{prefix}/dice/{metric_name(name)}", estimate)
            if group.hd95 is not None:
                out[f"{prefix}/{'hd95_px' if group.distance_unit == 'px' else 'hd95'}"] = group.hd95
        out[f"{base}/groups_measured"] = float(sum(g.measured for g in item.groups))
        out[f"{base}/groups_too_small"] = float(sum(not g.measured for g in item.groups))
        if item.dice_gap is not None:
            out |= _estimate_metrics(f"{base}/dice_gap", item.dice_gap)
            out |= {f"{base}/dice_worst": item.dice_worst, f"{base}/dice_best": item.dice_best,
                    f"{base}/dice_ratio": item.dice_ratio}
    return {key: float(value) for key, value in out.items() if value is not None and math.isfinite(value)}


def _estimate_metrics(name: str, estimate: Estimate) -> dict[str, float]:
    return {name: estimate.mean, f"{name}_ci_low": estimate.ci_low, f"{name}_ci_high": estimate.ci_high}


def fairness_report(audits: list[AttributeAudit], config: FairnessConfig, split: str) -> dict[str, Any]:
    """The JSON-ready report (``fairness.json``) that the model card and the plots are built from."""
    return {
        "split": split, "metric": DICE, "confidence": config.confidence, "n_bootstrap": config.n_bootstrap,
        "min_group_size": config.min_group_size, "gap_threshold": config.gap_threshold,
        "attributes": [asdict(item) for item in audits],
    }


def group_table(audits: list[AttributeAudit], min_group_size: int) -> pd.DataFrame:
    """One row per attribute and group (the per-group CSV); too-small groups carry no numbers."""
    rows = []
    for item in audits:
        for group in item.groups:
            row: dict[str, Any] = {"attribute": item.attribute, "group": group.group,
                                   "n": group.n if group.measured else f"<{min_group_size}",
                                   "measured": group.measured}
            if group.dice is not None:
                row |= {"dice": group.dice.mean, "dice_ci_low": group.dice.ci_low, "dice_ci_high": group.dice.ci_high}
                for name, estimate in group.dice_per_class.items():
                    row |= {f"dice/{name}": estimate.mean, f"dice/{name}_ci_low": estimate.ci_low,
                            f"dice/{name}_ci_high": estimate.ci_high}
                row[f"hd95{'_px' if group.distance_unit == 'px' else ''}"] = group.hd95
            row |= {"worst": group.group == item.worst_group and item.dice_gap is not None,
                    "best": group.group == item.best_group and item.dice_gap is not None}
            rows.append(row)
    return pd.DataFrame(rows)


def group_counts(cases: pd.DataFrame, config: FairnessConfig) -> dict[str, dict[str, int | None]]:
    """Cases per group of every audited attribute; None for groups too small to disclose."""
    counts: dict[str, dict[str, int | None]] = {}
    for name in config.attributes:
        column = f"attr/{name}"
        if column not in cases.columns:
            continue
        sizes = group_labels(cases[column], config.bins.get(name)).value_counts()
        counts[name] = {group: (int(n) if n >= config.min_group_size else None)
                        for group, n in sorted(sizes.items(), key=lambda item: _group_order(str(item[0])))}
    return counts
