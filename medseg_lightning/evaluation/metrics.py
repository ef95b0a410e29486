"""Segmentation metrics: per case on whole label volumes in physical spacing, and per class on training slices.

The numbers users compare (Dice, IoU, HD95, ASSD, volumes) are computed per case on the re-stacked 3D volume and
then averaged over cases, as nnU-Net does; pooling voxels over a dataset would let big cases drown small ones.
torchmetrics has no HD95, so surface distances come from scipy distance transforms with ``sampling=spacing``,
evaluated only on the bounding box of the two masks so that small structures in big volumes stay cheap. The
surface and percentile definitions match MONAI's ``HausdorffDistanceMetric(percentile=95)`` and
``SurfaceDistanceMetric(symmetric=True)``; the empty-mask conventions differ on purpose (see ``case_metrics``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TypeVar

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassJaccardIndex
from torchmetrics.segmentation import DiceScore

from medseg_lightning.evaluation.statistics import finite, interval

V = TypeVar("V")
Box = tuple[slice, ...]


def case_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    spacing: Sequence[float],
    num_classes: int,
    spacing_known: bool = True,
) -> dict[str, float]:
    """Per-class metrics of one case, keyed by class index (``dice/1``), plus means over foreground classes.

    For each foreground class ``c`` in ``1..num_classes-1``: ``dice/c``, ``iou/c``, ``hd95/c`` (symmetric 95th
    percentile Hausdorff distance in mm: the larger of the two directed 95th percentiles of surface-to-surface
    distances, as MONAI computes it), ``assd/c`` (mean of both directed surface distance sets pooled, in mm) and
    ``vol_pred_ml/c``, ``vol_true_ml/c``, ``vol_err_ml/c`` (predicted minus true). ``dice/mean``, ``iou/mean``,
    ``hd95/mean`` and ``assd/mean`` average the foreground classes. Surfaces are mask voxels with a 6-connected
    (4 in 2D) background neighbour; voxels on the image border count as surface.

    Empty masks, by convention: both empty -> dice 1, iou 1, hd95 0, assd 0 (nothing to find, nothing found);
    exactly one empty -> dice 0, iou 0 and hd95 = assd = the image diagonal (``shape * spacing``), a finite
    worst case so that means over cases stay comparable. MONAI gives NaN (both empty) and inf (one empty) there.

    Args:
        pred: integer label volume (X, Y, Z) or image (H, W).
        target: integer label volume of the same shape.
        spacing: voxel size in mm along each axis of ``pred``.
        num_classes: number of classes, background (0) included.
        spacing_known: when False (e.g. PNG masks) distances are in pixels: keys ``hd95_px/c``, ``assd_px/c`` and
            voxel counts ``vol_pred_vox/c``, ``vol_true_vox/c``, ``vol_err_vox/c``; ``spacing`` is ignored.
    """
    pred, target = _check_labels(pred, target)
    sampling = _check_spacing(spacing, pred.ndim) if spacing_known else np.ones(pred.ndim)
    unit, volume_key, voxel_volume = ("", "ml", float(np.prod(sampling)) / 1000) if spacing_known else ("_px", "vox", 1)
    diagonal = float(np.linalg.norm(np.asarray(pred.shape) * sampling))
    pred, target, boxes = _class_boxes(pred, target, num_classes)
    out: dict[str, float] = {}
    for c, box in enumerate(boxes, start=1):
        p = pred[box] == c if box else np.zeros((0,), bool)
        t = target[box] == c if box else np.zeros((0,), bool)
        n_pred, n_true = int(p.sum()), int(t.sum())
        intersection = int(np.logical_and(p, t).sum())
        if n_pred == 0 and n_true == 0:
            dice, iou, hd95, assd = 1.0, 1.0, 0.0, 0.0
        elif n_pred == 0 or n_true == 0:
            dice, iou, hd95, assd = 0.0, 0.0, diagonal, diagonal
        else:
            dice = 2 * intersection / (n_pred + n_true)
            iou = intersection / (n_pred + n_true - intersection)
            hd95, assd = surface_distances(p, t, sampling)
        out |= {f"dice/{c}": dice, f"iou/{c}": iou, f"hd95{unit}/{c}": hd95, f"assd{unit}/{c}": assd}
        out |= {
            f"vol_pred_{volume_key}/{c}": n_pred * voxel_volume,
            f"vol_true_{volume_key}/{c}": n_true * voxel_volume,
            f"vol_err_{volume_key}/{c}": (n_pred - n_true) * voxel_volume,
        }
    for name in ("dice", "iou", f"hd95{unit}", f"assd{unit}"):
        out[f"{name}/mean"] = float(np.mean([out[f"{name}/{c}"] for c in range(1, num_classes)]))
    return out


def surface_distances(pred: np.ndarray, target: np.ndarray, sampling: np.ndarray) -> tuple[float, float]:
    """Symmetric HD95 and ASSD between two non-empty boolean masks, in the units of ``sampling``.

    The masks should already be cropped to their joint bounding box padded by one voxel (as ``case_metrics`` does):
    the distance transforms then cover only that box, and stay exact because every surface voxel lies inside it.
    """
    edges_pred = pred ^ ndimage.binary_erosion(pred)
    edges_true = target ^ ndimage.binary_erosion(target)
    # distance from every voxel to the nearest surface voxel of the other mask, read at this mask's surface
    pred_to_true = ndimage.distance_transform_edt(~edges_true, sampling=sampling)[edges_pred]
    true_to_pred = ndimage.distance_transform_edt(~edges_pred, sampling=sampling)[edges_true]
    hd95 = max(np.percentile(pred_to_true, 95), np.percentile(true_to_pred, 95))
    assd = (pred_to_true.sum() + true_to_pred.sum()) / (pred_to_true.size + true_to_pred.size)
    return float(hd95), float(assd)


def _check_labels(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, target = _as_labels(pred, "pred"), _as_labels(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {pred.shape} vs {target.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"expected a 2D image or a 3D volume of labels, got shape {pred.shape}")
    return pred, target


def _as_labels(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == bool:
        return array.astype(np.uint8)  # find_objects wants integers; a bool mask is class 1
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must hold integer class labels, got dtype {array.dtype}")
    return array


def _check_spacing(spacing: Sequence[float], ndim: int) -> np.ndarray:
    sampling = np.asarray(spacing, dtype=np.float64).ravel()
    if sampling.size != ndim or not np.all(np.isfinite(sampling)) or np.any(sampling <= 0):
        raise ValueError(f"spacing must hold {ndim} positive finite numbers (one per axis), got {list(spacing)}")
    return sampling


def _class_boxes(
    pred: np.ndarray, target: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray, list[Box | None]]:
    """Both volumes cropped to their foreground, and per class the padded box holding it in both (None if absent).

    Two cheap projections find the foreground first, so ``find_objects`` (slow on big arrays) sees only the crop.
    """
    outer = _union_box(_foreground_box(pred), _foreground_box(target), pred.shape)
    if outer is None:
        return pred, target, [None] * (num_classes - 1)
    pred, target = pred[outer], target[outer]
    boxes_pred = ndimage.find_objects(pred, max_label=num_classes - 1)
    boxes_true = ndimage.find_objects(target, max_label=num_classes - 1)
    return pred, target, [_union_box(a, b, pred.shape) for a, b in zip(boxes_pred, boxes_true, strict=True)]


def _foreground_box(labels: np.ndarray) -> Box | None:
    """The bounding box of the non-zero labels, from one projection per axis."""
    box = []
    for axis in range(labels.ndim):
        hits = np.flatnonzero(labels.any(axis=tuple(a for a in range(labels.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _union_box(a: Box | None, b: Box | None, shape: tuple[int, ...]) -> Box | None:
    """The bounding box of both masks padded by one voxel (so surfaces keep a background neighbour), or None."""
    if a is None and b is None:
        return None
    boxes = [box for box in (a, b) if box is not None]
    return tuple(
        slice(max(0, min(box[axis].start for box in boxes) - 1), min(size, max(box[axis].stop for box in boxes) + 1))
        for axis, size in enumerate(shape)
    )


def name_metrics(metrics: Mapping[str, V], labels: Mapping[int, str]) -> dict[str, V]:
    """Replaces class indices in metric keys by class names: ``dice/1`` -> ``dice/anterior``; others unchanged."""
    named: dict[str, V] = {}
    for key, value in metrics.items():
        prefix, _, suffix = key.rpartition("/")
        if prefix and suffix.isdigit() and int(suffix) in labels:
            key = f"{prefix}/{labels[int(suffix)]}"
        named[key] = value
    return named


def aggregate(
    per_case: Sequence[Mapping[str, float]], n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Mean, median, standard deviation and bootstrap interval over cases of every key, ignoring NaN.

    Returns ``<key>`` (mean), ``<key>_median``, ``<key>_std`` (sample standard deviation, 0 for one case) and
    ``<key>_ci_low`` / ``<key>_ci_high`` (percentile bootstrap of the mean); a key NaN in every case stays NaN.
    """
    rng = np.random.default_rng(seed)
    keys = list(dict.fromkeys(key for case in per_case for key in case))
    out: dict[str, float] = {}
    for key in keys:
        values = finite(np.asarray([case[key] for case in per_case if key in case], dtype=np.float64))
        estimate = interval(values, n_bootstrap, confidence, rng)
        if values.size == 0:
            out |= {f"{key}{suffix}": math.nan for suffix in ("", "_median", "_std", "_ci_low", "_ci_high")}
            continue
        std = float(values.std(ddof=1)) if values.size > 1 else 0.0
        out |= {key: estimate.mean, f"{key}_median": float(np.median(values)), f"{key}_std": std,
                f"{key}_ci_low": estimate.ci_low, f"{key}_ci_high": estimate.ci_high}
    return out


class SliceMetrics(nn.Module):
    """Per-class Dice and IoU of slice batches during training, pooled over the epoch (not per case).

    A thin wrapper over torchmetrics (``DiceScore`` and ``MulticlassJaccardIndex``, both global over all pixels seen
    since ``reset``), so states sync across DDP ranks in ``compute``. Only foreground classes are reported; a class
    absent from both predictions and targets all epoch is NaN.

    Args:
        num_classes: number of classes, background (0) included.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.metrics = MetricCollection(
            {
                "dice": DiceScore(
                    num_classes,
                    include_background=False,
                    average="none",
                    aggregation_level="global",
                    input_format="index",
                ),
                "iou": MulticlassJaccardIndex(num_classes, average="none", zero_division=math.nan),
            },
            compute_groups=False,
        )

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Adds a batch of predicted labels (B, H, W) (argmax of the logits) and targets (B, H, W)."""
        self.metrics.update(preds.long(), target.long())

    def compute(self) -> dict[str, torch.Tensor]:
        """``dice/<c>`` and ``iou/<c>`` for foreground classes ``c``, plus ``dice/mean`` and ``iou/mean``."""
        values = self.metrics.compute()
        per_class = {"dice": values["dice"].reshape(-1), "iou": values["iou"].reshape(-1)[1:]}  # 0-d when binary
        out: dict[str, torch.Tensor] = {}
        for name, scores in per_class.items():
            out |= {f"{name}/{c}": scores[c - 1] for c in range(1, self.num_classes)}
            out[f"{name}/mean"] = scores.nanmean()
        return out

    def reset(self) -> None:
        self.metrics.reset()
