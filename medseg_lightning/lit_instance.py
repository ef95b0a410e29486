"""The LightningModule for instance segmentation: Mask R-CNN trained on slices, objects scored per case in 3D.

It shares everything but the training step and the per-case scoring with ``SegmentationModule``: optimiser and
schedule, encoder freezing, the case-level summary with intervals and the fairness audit. The merged label map
of a case's objects is scored like a semantic prediction (``val/dice`` is its Dice, so checkpointing, sweeps,
promotion gates and fairness work unchanged), and the objects themselves give ``instance/pq``, counts and AP.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torchvision.ops import masks_to_boxes

from medseg_lightning.config_schema import ExperimentConfig, FairnessConfig, OptimizerConfig
from medseg_lightning.data.instances import components, object_classes
from medseg_lightning.data.preprocess import restore_volume
from medseg_lightning.instance_inference import detect_slices, objects_from_detections, semantic_labels
from medseg_lightning.instance_metrics import MaskAP, Objects, panoptic
from medseg_lightning.lit_module import SegmentationModule
from medseg_lightning.models.mask_rcnn import InstanceSegmentationModel
from medseg_lightning.scoring import EvaluationReport, predict_labels, score_case, summarize


class InstanceModule(SegmentationModule):
    """Mask R-CNN's own losses (RPN and box/class/mask heads) in training; objects per case at evaluation."""

    def __init__(self, network: InstanceSegmentationModel, labels: dict[int, str], optimizer: OptimizerConfig,
                 score_threshold: float = 0.5, encoder_freeze_epochs: int = 0, encoder_lr_multiplier: float = 1.0,
                 inference_batch_size: int = 16, fairness: FairnessConfig | None = None) -> None:
        super().__init__(network, torch.nn.Identity(), labels, optimizer, encoder_freeze_epochs=encoder_freeze_epochs,
                         encoder_lr_multiplier=encoder_lr_multiplier, inference_batch_size=inference_batch_size,
                         fairness=fairness)
        self.score_threshold = score_threshold
        self.mask_ap: dict[str, MaskAP] = {}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        targets = [slice_targets(instances, mask) for instances, mask in zip(batch["instances"], batch["mask"],
                                                                              strict=True)]
        losses = self.network(batch["image"], targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at epoch {self.current_epoch}, step {batch_idx}")
        size = len(batch["image"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        for name, value in losses.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=size)
        return loss

    def on_train_epoch_end(self) -> None:
        pass  # no per-slice semantic metrics: the losses are logged per epoch above

    def _score_cases(self, batch: list[dict[str, Any]], split: str) -> None:
        accumulator = self.mask_ap.setdefault(split, MaskAP())
        for item in batch:
            row, predicted, true = score_instance_case(self.network, item, self.labels, self.inference_batch_size,
                                                       self.score_threshold)
            self.case_rows[split].append(row)
            accumulator.update(predicted, true)

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self.mask_ap["val"] = MaskAP()

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self.mask_ap["test"] = MaskAP()

    def _log_case_metrics(self, split: str) -> None:
        super()._log_case_metrics(split)
        for key, value in self.mask_ap.get(split, MaskAP()).compute().items():
            self.log(f"{split}/instance/{key}", value, sync_dist=False)
            if split in self.reports:
                self.reports[split].summary[f"instance/{key}"] = value


def slice_targets(instances: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mask R-CNN's target for one slice: a box, a class and a binary mask per object present in it."""
    ids = torch.unique(instances)
    ids = ids[ids > 0]
    masks = (instances[None] == ids[:, None, None]).to(torch.uint8)
    if not len(ids):
        return {"boxes": torch.zeros((0, 4), device=mask.device), "labels": torch.zeros(0, dtype=torch.int64,
                                                                                         device=mask.device),
                "masks": masks}
    boxes = masks_to_boxes(masks)
    boxes[:, 2:] += 1  # pixel edges: a one-pixel object has a box of width 1, not 0
    votes = torch.stack([torch.bincount(mask[m.bool()], minlength=int(mask.max()) + 1) for m in masks])
    votes[:, 0] = 0
    return {"boxes": boxes, "labels": votes.argmax(1), "masks": masks}


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


def evaluate_instance_cases(network: torch.nn.Module, items: Iterable[dict[str, Any]], split: str,
                            config: ExperimentConfig) -> EvaluationReport:
    """``medseg evaluate`` on instance data: every case's row, then the summary with intervals and mask AP.
    An instance model's objects are its detections; a semantic model's, the connected components of its labels."""
    from tqdm.auto import tqdm

    accumulator, rows = MaskAP(), []
    labels, batch = dict(config.data.labels), config.trainer.inference_batch_size
    for item in tqdm(items, desc=f"evaluating {split}", unit="case"):
        if config.task == "instance":
            row, predicted, true = score_instance_case(network, item, labels, batch, config.model.score_threshold)
        else:
            connectivity = config.data.instances.connectivity if config.data.instances else 1
            row, predicted, true = score_components_case(network, item, labels, batch, connectivity)
        rows.append(row)
        accumulator.update(predicted, true)
    classes = [name for key, name in sorted(config.data.labels.items()) if key > 0]
    report = summarize(rows, split, config.fairness, classes)
    report.summary |= {f"instance/{key}": value for key, value in accumulator.compute().items()}
    return report
