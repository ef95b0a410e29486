"""Per-case array preprocessing: intensity normalisation, slicing along an axis, in-plane size.

Pure functions on numpy arrays: no files, so they are easy to test and are shared by training and prediction.
The in-plane step records what it did (:class:`InPlaneGeometry`) so predictions can be mapped back exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medseg_lightning.config.registry import Registry
from medseg_lightning.config.schema import IntensityConfig

INTENSITY: Registry[Callable[[np.ndarray, IntensityConfig], np.ndarray]] = Registry("intensity method")


@INTENSITY.register("zscore")
def _zscore(channel: np.ndarray, config: IntensityConfig) -> np.ndarray:
    values = channel[channel != 0] if config.nonzero_only else channel
    if values.size == 0:
        values = channel
    mean, std = float(values.mean()), float(values.std())
    return (channel - mean) / max(std, 1e-8)


@INTENSITY.register("percentile")
def _percentile(channel: np.ndarray, config: IntensityConfig) -> np.ndarray:
    low, high = np.percentile(channel, config.percentiles)
    return (np.clip(channel, low, high) - low) / max(float(high - low), 1e-8)


@INTENSITY.register("ct_window")
def _ct_window(channel: np.ndarray, config: IntensityConfig) -> np.ndarray:
    assert config.window is not None
    low, high = config.window
    return (np.clip(channel, low, high) - low) / (high - low)


@INTENSITY.register("minmax")
def _minmax(channel: np.ndarray, config: IntensityConfig) -> np.ndarray:
    low, high = float(channel.min()), float(channel.max())
    return (channel - low) / max(high - low, 1e-8)


@INTENSITY.register("none")
def _identity(channel: np.ndarray, config: IntensityConfig) -> np.ndarray:
    return channel


def normalize_intensity(image: np.ndarray, settings: list[IntensityConfig]) -> np.ndarray:
    """Normalises each channel of ``(C, ...)`` with its own setting; returns float32."""
    image = image.astype(np.float32, copy=False)
    return np.stack([INTENSITY.get(s.method)(image[c], s) for c, s in enumerate(settings)]).astype(np.float32)


def to_slices(array: np.ndarray, axis: int, channels_first: bool) -> np.ndarray:
    """Moves the slicing axis to the front: image ``(C, X, Y, Z)`` -> ``(S, C, H, W)``, mask -> ``(S, H, W)``."""
    if channels_first:
        return np.ascontiguousarray(np.moveaxis(array, axis + 1, 0))
    return np.ascontiguousarray(np.moveaxis(array, axis, 0))


def from_slices(array: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of :func:`to_slices` for masks and per-class maps without a channel axis: ``(S, H, W)``."""
    return np.moveaxis(array, 0, axis)


@dataclass(frozen=True)
class InPlaneGeometry:
    """How a slice of ``source`` size became ``target`` size, to undo it for predictions."""

    source: tuple[int, int]
    target: tuple[int, int]
    mode: str  # "pad_crop", "resize" or "none"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InPlaneGeometry:
        """From ``to_dict`` output, read back from JSON (lists for the sizes)."""
        rows, cols = data["source"]
        target_rows, target_cols = data["target"]
        return cls(source=(int(rows), int(cols)), target=(int(target_rows), int(target_cols)), mode=str(data["mode"]))


def _pad_crop(array: np.ndarray, target: tuple[int, int], fill: float) -> np.ndarray:
    """Centre pad/crop of the last two axes."""
    result = array
    for offset, size in enumerate(target):
        axis = array.ndim - 2 + offset
        current = result.shape[axis]
        if current > size:
            start = (current - size) // 2
            result = np.take(result, np.arange(start, start + size), axis=axis)
        elif current < size:
            before = (size - current) // 2
            widths = [(0, 0)] * result.ndim
            widths[axis] = (before, size - current - before)
            result = np.pad(result, widths, constant_values=fill)
    return result


def _resize(array: np.ndarray, target: tuple[int, int], nearest: bool) -> np.ndarray:
    """Resizes the last two axes; nearest neighbour keeps label values intact."""
    tensor = torch.from_numpy(np.array(array, copy=True))  # cache arrays are read-only memory maps
    shape = tensor.shape
    flat = tensor.reshape(-1, 1, *shape[-2:]).float()
    if nearest:
        out = F.interpolate(flat, size=target, mode="nearest-exact")
    else:
        out = F.interpolate(flat, size=target, mode="bilinear", align_corners=False, antialias=True)
    return out.reshape(*shape[:-2], *target).numpy().astype(array.dtype, copy=False)


def fit_in_plane(
    image: np.ndarray, mask: np.ndarray | None, target: tuple[int, int] | None, mode: str
) -> tuple[np.ndarray, np.ndarray | None, InPlaneGeometry]:
    """Brings slices ``(S, C, H, W)`` (and masks ``(S, H, W)``) to the target in-plane size."""
    source = (int(image.shape[-2]), int(image.shape[-1]))
    if target is None or tuple(target) == source:
        return image, mask, InPlaneGeometry(source, source, "none")
    target = (int(target[0]), int(target[1]))
    if mode == "resize":
        image = _resize(image, target, nearest=False)
        mask = None if mask is None else _resize(mask, target, nearest=True)
    else:
        fill = float(image.min()) if image.size else 0.0
        image = _pad_crop(image, target, fill)
        mask = None if mask is None else _pad_crop(mask, target, 0)
    return image, mask, InPlaneGeometry(source, target, mode)


def fit_labels_in_plane(labels: np.ndarray, geometry: InPlaneGeometry) -> np.ndarray:
    """Label slices ``(S, H, W)`` brought to the size ``fit_in_plane`` gave the image (nearest neighbour)."""
    if geometry.mode == "none":
        return labels
    if geometry.mode == "resize":
        return _resize(labels, geometry.target, nearest=True)
    return _pad_crop(labels, geometry.target, 0)


def restore_in_plane(array: np.ndarray, geometry: InPlaneGeometry, nearest: bool = True) -> np.ndarray:
    """Maps ``(..., H, W)`` predictions back to the source in-plane size (cropped parts come back as zeros)."""
    if geometry.mode == "none":
        return array
    if geometry.mode == "resize":
        return _resize(array, geometry.source, nearest=nearest)
    return _pad_crop(array, geometry.source, 0)


def restore_volume(slices: np.ndarray, meta: dict[str, Any], nearest: bool = True) -> np.ndarray:
    """Puts per-slice labels ``(S, H, W)`` back into the case's original ``(X, Y, Z)`` voxel grid.

    ``meta`` is a prepared case's metadata (its ``in_plane`` geometry and slicing ``axis``); ``nearest=False``
    interpolates linearly, for continuous maps (uncertainty) rather than labels.
    """
    geometry = InPlaneGeometry.from_dict(meta["in_plane"])
    return from_slices(restore_in_plane(slices, geometry, nearest=nearest), int(meta["axis"]))
