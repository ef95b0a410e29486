"""Pictures for people: overlays of predictions, fairness and cross-site plots, as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: training machines have no display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]


def label_colormap(num_classes: int) -> ListedColormap:
    """Transparent background, then one distinct colour per class."""
    colours = [(0, 0, 0, 0)] + [matplotlib.colors.to_rgba(_COLOURS[i % len(_COLOURS)], 0.55)
                                for i in range(num_classes - 1)]
    return ListedColormap(colours)


def save_overlay(image: np.ndarray, truth: np.ndarray | None, prediction: np.ndarray, labels: dict[int, str],
                 path: Path, title: str = "") -> Path:
    """Panels image, truth over image (when known) and prediction over image, with a class legend."""
    cmap = label_colormap(len(labels))
    panels = [(None, "image"), *([(truth, "ground truth")] if truth is not None else []), (prediction, "prediction")]
    figure, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.4))
    for axis, (overlay, name) in zip(axes, panels, strict=True):
        axis.imshow(image.T, cmap="gray", origin="lower")
        if overlay is not None:
            axis.imshow(overlay.T, cmap=cmap, vmin=0, vmax=len(labels) - 1, origin="lower", interpolation="nearest")
        axis.set_title(name, fontsize=9)
        axis.axis("off")
    handles = [matplotlib.patches.Patch(color=cmap(k), label=name) for k, name in labels.items() if k > 0]
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        figure.suptitle(title, fontsize=10)
    return _save(figure, path, dpi=100)


def _save(figure: Figure, path: Path, dpi: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(figure)
    return path


def save_fairness_plot(audit: dict[str, Any], path: Path, confidence: float, min_group_size: int) -> Path:
    """Writes :func:`fairness_figure` as a PNG file.

    Args:
        audit: one attribute of the fairness report (``fairness.json``'s ``attributes`` entries).
    """
    figure = fairness_figure(audit, confidence, min_group_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def close(figure: Figure) -> None:
    """Frees a figure (pyplot keeps every figure it made until it is closed)."""
    plt.close(figure)


def fairness_figure(audit: dict[str, Any], confidence: float, min_group_size: int) -> Figure:
    """Mean Dice per group with its confidence interval, zoomed to the intervals so that a gap is visible.

    The worst group is red, a dashed line marks the best group's mean, and too-small groups are named on the axis
    but never drawn as a number.

    Args:
        audit: one attribute of the fairness report (``fairness.json``'s ``attributes`` entries).
    """
    groups = audit["groups"]
    measured = [group["dice"] for group in groups if group["measured"] and group.get("dice")]
    figure, axis = plt.subplots(figsize=(max(3.8, 1.2 * len(groups) + 1.8), 3.4))
    low = min((dice["ci_low"] for dice in measured), default=0.0)
    high = max((dice["ci_high"] for dice in measured), default=1.0)
    pad = max(0.01, 0.25 * (high - low))
    bottom, top = max(0.0, low - pad), min(1.0, high + pad)  # Dice never exceeds 1
    top = top if top > high else high + pad / 4
    has_gap = audit.get("dice_gap") is not None
    for x, group in enumerate(groups):
        if not group["measured"]:
            axis.text(x, (bottom + top) / 2, f"< {min_group_size} cases:\nnot measured", ha="center", va="center",
                      fontsize=7, color="#666666")
            continue
        dice = group["dice"]
        colour = "#d62728" if has_gap and group["group"] == audit.get("worst_group") else "#1f77b4"
        axis.errorbar(x, dice["mean"], yerr=[[dice["mean"] - dice["ci_low"]], [dice["ci_high"] - dice["mean"]]],
                      fmt="o", color=colour, capsize=5)
        axis.annotate(f" {dice['mean']:.3f}\n n={group['n']}", (x, dice["mean"]), textcoords="offset points",
                      xytext=(8, -8), fontsize=7)
    if has_gap:
        axis.axhline(audit["dice_best"], color="#888888", linestyle="--", linewidth=0.8)
    axis.set_xticks(range(len(groups)), [group["group"] for group in groups])
    axis.set_xlim(-0.6, len(groups) - 0.2)
    axis.set_ylim(bottom, top)
    axis.set_ylabel("mean case Dice")
    title = f"{audit['attribute']}: group means, {round(confidence * 100)}% bootstrap CI"
    if has_gap:
        gap = audit["dice_gap"]
        title += f"\ngap {gap['mean']:.3f} [{gap['ci_low']:.3f}, {gap['ci_high']:.3f}], worst: {audit['worst_group']}"
    axis.set_title(title, fontsize=9)
    axis.grid(axis="y", alpha=0.3)
    return figure


def save_crosssite_plot(groups: list[dict[str, Any]], attribute: str, path: Path, confidence: float) -> Path:
    """Per held-out group: mean Dice when the group was seen in training and when it was not, with intervals.

    Args:
        groups: the cross-site rows (``group``, ``n``, ``dice_in``, ``dice_out``, ``dice_drop`` estimates).
    """
    figure, axis = plt.subplots(figsize=(max(4.0, 1.4 * len(groups) + 2.0), 3.4))
    for x, row in enumerate(groups):
        for offset, key, colour, label in ((-0.12, "dice_in", "#1f77b4", "seen in training"),
                                           (0.12, "dice_out", "#d62728", "not seen (held out)")):
            value = row[key]
            axis.errorbar(x + offset, value["mean"], yerr=[[value["mean"] - value["ci_low"]],
                                                           [value["ci_high"] - value["mean"]]],
                          fmt="o", color=colour, capsize=4, label=label if x == 0 else None)
        drop = row["dice_drop"]
        axis.annotate(f"drop {drop['mean']:.3f}\n[{drop['ci_low']:.3f}, {drop['ci_high']:.3f}]\nn={row['n']}",
                      (x, min(row["dice_in"]["ci_low"], row["dice_out"]["ci_low"])), textcoords="offset points",
                      xytext=(0, -34), ha="center", fontsize=7)
    low = min((min(r["dice_in"]["ci_low"], r["dice_out"]["ci_low"]) for r in groups), default=0.0)
    high = max((max(r["dice_in"]["ci_high"], r["dice_out"]["ci_high"]) for r in groups), default=1.0)
    pad = max(0.02, 0.35 * (high - low))
    axis.set_ylim(max(0.0, low - 2 * pad), min(1.0, high + pad / 2) if high < 1.0 else 1.0)
    axis.set_xticks(range(len(groups)), [row["group"] for row in groups])
    axis.set_xlim(-0.6, len(groups) - 0.4)
    axis.set_xlabel(f"held-out {attribute}")
    axis.set_ylabel("mean case Dice")
    axis.set_title(f"cross-{attribute} generalisation, {round(confidence * 100)}% bootstrap CI", fontsize=9)
    axis.legend(fontsize=7, loc="upper right", frameon=False)
    axis.grid(axis="y", alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def save_risk_coverage_plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, split: str) -> Path:
    """Mean Dice of the cases kept when the most uncertain ones are set aside, one line per uncertainty score
    (``name -> (1 - mean Dice of the k most certain, the cases' Dice)``), with the oracle (cases ranked by their
    true Dice) and the no-skill level (the mean Dice of those cases) of the score with the most cases."""
    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    for name, (risk, _) in curves.items():
        axis.plot(1.0 - np.arange(1, len(risk) + 1) / len(risk), 1.0 - risk, label=name, linewidth=1.2)
    dice = max((dice for _, dice in curves.values()), key=len)
    kept = np.arange(1, len(dice) + 1)
    axis.plot(1.0 - kept / len(dice), np.cumsum(np.sort(dice)[::-1]) / kept, color="#888888", linestyle=":",
              label="oracle")
    axis.axhline(float(dice.mean()), color="#888888", linestyle="--", linewidth=0.8, label="no skill")
    axis.set_xlabel("fraction of cases set aside (most uncertain first)")
    axis.set_ylabel("mean Dice of the cases kept")
    axis.set_title(f"{split}: do the uncertain cases have the poor segmentations? (n={len(dice)})", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def save_reliability_plot(confidence: np.ndarray, accuracy: np.ndarray, counts: np.ndarray, ece: float, path: Path,
                          split: str) -> Path:
    """Reliability diagram of the foreground region: accuracy against softmax confidence per bin (point size:
    the bin's share of voxels), the diagonal being perfect calibration."""
    figure, axis = plt.subplots(figsize=(4.2, 4.0))
    axis.plot([0, 1], [0, 1], color="#888888", linestyle="--", linewidth=0.8, label="calibrated")
    sizes = 20 + 300 * counts / counts.sum()
    axis.plot(confidence, accuracy, color=_COLOURS[0], linewidth=1.0)
    axis.scatter(confidence, accuracy, s=sizes, color=_COLOURS[0], zorder=3, label="model")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_xlabel("softmax confidence")
    axis.set_ylabel("fraction of voxels right")
    axis.set_title(f"{split}: reliability (foreground region), ECE {ece:.3f}", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="upper left")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def save_saliency_grid(rows: list[dict[str, Any]], labels: dict[int, str], path: Path, title: str = "") -> Path:
    """One row per case: the image with the explained region, then each saliency map over the image, scaled to
    its own maximum on that slice (the written maps are scaled per case, where one extreme slice can leave the
    others dark).

    Args:
        rows: ``{"title", "image" (H, W), "region" (H, W) class ids, "maps": {method: (H, W) in [0, 1]}}``.
    """
    methods = list(rows[0]["maps"])
    cmap = label_colormap(len(labels))
    figure, axes = plt.subplots(len(rows), 1 + len(methods), figsize=(2.8 * (1 + len(methods)), 2.9 * len(rows)),
                                squeeze=False)
    for axis_row, row in zip(axes, rows, strict=True):
        axis_row[0].imshow(row["image"].T, cmap="gray", origin="lower")
        axis_row[0].imshow(row["region"].T, cmap=cmap, vmin=0, vmax=len(labels) - 1, origin="lower",
                           interpolation="nearest")
        axis_row[0].set_title(row["title"], fontsize=8)
        for axis, method in zip(axis_row[1:], methods, strict=True):
            axis.imshow(row["image"].T, cmap="gray", origin="lower")
            values = row["maps"][method]
            axis.imshow(values.T, cmap="inferno", alpha=0.55, vmin=0, vmax=max(float(values.max()), 1e-12),
                        origin="lower")
            axis.contour(row["region"].T > 0, levels=[0.5], colors="#42d4f4", linewidths=0.6, origin="lower")
            axis.set_title(method.replace("_", " "), fontsize=8)
        for axis in axis_row:
            axis.axis("off")
    if title:
        figure.suptitle(title, fontsize=9)
    return _save(figure, path, dpi=100)
