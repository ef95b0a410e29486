"""Pictures for people: image | ground truth | prediction overlays, as PNG files."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: training machines have no display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]


def label_colormap(num_classes: int) -> ListedColormap:
    """Transparent background, then one distinct colour per class."""
    colours = [(0, 0, 0, 0)] + [matplotlib.colors.to_rgba(_COLOURS[i % len(_COLOURS)], 0.55)
                                for i in range(num_classes - 1)]
    return ListedColormap(colours)


def save_overlay(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, labels: dict[int, str],
                 path: Path, title: str = "") -> Path:
    """Three panels (image, truth over image, prediction over image) with a class legend."""
    cmap = label_colormap(len(labels))
    figure, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    for axis, overlay, name in zip(axes, (None, truth, prediction), ("image", "ground truth", "prediction"),
                                   strict=True):
        axis.imshow(image.T, cmap="gray", origin="lower")
        if overlay is not None:
            axis.imshow(overlay.T, cmap=cmap, vmin=0, vmax=len(labels) - 1, origin="lower", interpolation="nearest")
        axis.set_title(name, fontsize=9)
        axis.axis("off")
    handles = [matplotlib.patches.Patch(color=cmap(k), label=name) for k, name in labels.items() if k > 0]
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        figure.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path
