"""Scoring a split of instance data, case by case: the semantic row (Dice of the merged mask, ...) plus panoptic
quality and mask AP of the objects. Objects are an instance model's detections, or the connected components of a
semantic model's labels, so both kinds of model are compared on the same objects. Used by the instance
LightningModule at validation and by the tasks' ``evaluate`` (``medseg evaluate``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from medseg_lightning.config.schema import ExperimentConfig
from medseg_lightning.data.instances import Objects, components, object_classes
from medseg_lightning.data.preprocess import restore_volume
from medseg_lightning.evaluation.instance_metrics import MaskAP, panoptic
from medseg_lightning.evaluation.scoring import EvaluationReport, predict_labels, score_case, summarize
from medseg_lightning.inference.detections import detect_slices, objects_from_detections, semantic_labels
from medseg_lightning.models.mask_rcnn import InstanceSegmentationModel


def score_instance_case(network: InstanceSegmentationModel, item: dict[str, Any], labels: dict[int, str],
                        batch_size: int, threshold: float) -> tuple[dict[str, Any], Objects, Objects]:
    """The case's per-case row (merged-mask Dice and the other semantic metrics, plus ``instance/...``) and its
    predicted and true objects in the native voxel grid."""
    image = item["image"]
    detections = detect_slices(network, image, batch_size)
    objects = objects_from_detections(detections, tuple(image.shape[-2:]), threshold)
    row = score_case(item, semantic_labels(objects), labels)
    native = restore_volume(objects.ids, item["meta"])
    predicted = Objects(native, objects.classes, objects.scores)
    target = np.asarray(item["target"])
    true_ids = np.asarray(item["target_instances"])
    true = Objects(true_ids, object_classes(true_ids, target))
    row |= {f"instance/{key}": value for key, value in panoptic(predicted, true).items()}
    return row, predicted, true


def score_components_case(network: torch.nn.Module, item: dict[str, Any], labels: dict[int, str], batch_size: int,
                          connectivity: int) -> tuple[dict[str, Any], Objects, Objects]:
    """A semantic model's row on instance data: its objects are the connected components of its label map (the
    usual way to get objects from a U-Net), so they can be compared with an instance model's."""
    slices = predict_labels(network, item["image"], batch_size)
    row = score_case(item, slices, labels)
    native = restore_volume(slices, item["meta"])
    ids = components(native, connectivity)
    predicted = Objects(ids, object_classes(ids, native))
    target = np.asarray(item["target"])
    true_ids = np.asarray(item["target_instances"])
    true = Objects(true_ids, object_classes(true_ids, target))
    row |= {f"instance/{key}": value for key, value in panoptic(predicted, true).items()}
    return row, predicted, true


def evaluate_instance_cases(items: Iterable[dict[str, Any]], split: str, config: ExperimentConfig,
                            score: Callable[[dict[str, Any]], tuple[dict[str, Any], Objects, Objects]]
                            ) -> EvaluationReport:
    """``medseg evaluate`` on instance data: every case's row from ``score`` (an instance model's detections, or a
    semantic model's connected components), then the summary with intervals and mask AP."""
    from tqdm.auto import tqdm

    accumulator, rows = MaskAP(), []
    for item in tqdm(items, desc=f"evaluating {split}", unit="case"):
        row, predicted, true = score(item)
        rows.append(row)
        accumulator.update(predicted, true)
    classes = [name for key, name in sorted(config.data.labels.items()) if key > 0]
    report = summarize(rows, split, config.fairness, classes)
    report.summary |= {f"instance/{key}": value for key, value in accumulator.compute().items()}
    return report
