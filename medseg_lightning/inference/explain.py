"""``medseg explain``: saliency maps of a model's segmentation of new cases, in the inputs' own geometry.

For each case: the mask (as ``medseg predict`` writes it), one map per method (``NAME_gradcam``,
``NAME_integrated_gradients``: NIfTI with the source's affine and header, or PNG for 2D inputs) and
``NAME_saliency.png``, the slice with the largest explained region, with the maps over the image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medseg_lightning.data.preprocess import restore_volume
from medseg_lightning.inference.inputs import PredictInput, check_finite, load_input
from medseg_lightning.inference.outputs import write_continuous_map, write_label_map
from medseg_lightning.inference.postprocess import keep_largest_components
from medseg_lightning.inference.predict import Predictor
from medseg_lightning.inference.saliency import METHODS, SaliencyMaps, saliency_maps

SALIENCY_PLOT = "saliency"  # NAME_saliency.png


@dataclass
class ExplainOutput:
    name: str
    mask: Path
    maps: dict[str, Path]
    plot: Path | None
    region_pixels: int  # in the model's slice grid; 0: nothing predicted, so nothing to explain (maps are zero)
    seconds: float


def explained_region(labels: np.ndarray, class_id: int | None) -> np.ndarray:
    """The region whose prediction is explained: the predicted structure (every foreground class), or the pixels
    predicted as ``class_id``; class ids inside, 0 outside."""
    if class_id is None:
        return labels.astype(np.int64)
    return np.where(labels == class_id, class_id, 0).astype(np.int64)


def explain_case(predictor: Predictor, case: PredictInput, out_dir: Path, class_id: int | None = None,
                 methods: tuple[str, ...] = METHODS, stage: int | None = None) -> ExplainOutput:
    """Segments one case, explains the region's prediction and writes the mask, the maps and the plot."""
    started = time.perf_counter()
    volume, reference = load_input(case)
    check_finite(volume, case)
    out_dir.mkdir(parents=True, exist_ok=True)
    slices, meta = predictor.preprocessed_slices(volume, case.name)
    labels = predictor.labels(slices).numpy()
    region = explained_region(labels, class_id)
    found = saliency_maps(predictor.networks[0], slices, region, methods, stage, min(predictor.batch_size, 8))
    cleaned = keep_largest_components(restore_volume(labels, meta), predictor.keep_largest)
    mask = write_label_map(cleaned, volume, case, reference, predictor.config.data.label_mapping, out_dir)
    paths = {method: write_continuous_map(restore_volume(values, meta, nearest=False), volume, case, reference,
                                          out_dir, method) for method, values in found.maps.items()}
    pixels = int((region > 0).sum())
    plot = saliency_plot(slices, found, predictor, out_dir / f"{case.name}_{SALIENCY_PLOT}.png", case.name)
    return ExplainOutput(case.name, mask, paths, plot, pixels, time.perf_counter() - started)


def saliency_plot(slices: torch.Tensor, found: SaliencyMaps, predictor: Predictor, path: Path,
                  title: str) -> Path | None:
    """The slice with the largest region, with each map over it (None when there is no region)."""
    from medseg_lightning.reporting.plots import save_saliency_grid

    area = (found.region > 0).reshape(len(found.region), -1).sum(1)
    if not area.any():
        return None
    index = int(area.argmax())
    centre = predictor.config.data.slicing.context * predictor.modalities  # the slice itself, first modality
    row = {"title": f"{title}, slice {index}", "image": slices[index, centre].numpy(),
           "region": found.region[index], "maps": {method: values[index] for method, values in found.maps.items()}}
    return save_saliency_grid([row], predictor.config.data.labels, path)
