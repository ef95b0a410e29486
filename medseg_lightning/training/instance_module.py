"""The LightningModule for instance segmentation: Mask R-CNN trained on slices, objects scored per case in 3D.

It shares the optimiser and schedule, encoder freezing, the case-level summary with intervals and the fairness
audit with the semantic module (``CaseModule``); its training step is Mask R-CNN's own losses. The merged label map
of a case's objects is scored like a semantic prediction (``val/dice`` is its Dice, so checkpointing, sweeps,
promotion gates and fairness work unchanged), and the objects themselves give ``instance/pq``, counts and AP.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.ops import masks_to_boxes

from medseg_lightning.config.schema import FairnessConfig, OptimizerConfig
from medseg_lightning.evaluation.instance_metrics import MaskAP
from medseg_lightning.evaluation.instance_scoring import score_instance_case
from medseg_lightning.models.mask_rcnn import InstanceSegmentationModel
from medseg_lightning.training.case_module import CaseModule


class InstanceModule(CaseModule):
    """Mask R-CNN's own losses (RPN and box/class/mask heads) in training; objects per case at evaluation."""

    def __init__(self, network: InstanceSegmentationModel, labels: dict[int, str], optimizer: OptimizerConfig,
                 score_threshold: float = 0.5, encoder_freeze_epochs: int = 0, encoder_lr_multiplier: float = 1.0,
                 inference_batch_size: int = 16, fairness: FairnessConfig | None = None) -> None:
        super().__init__(network, labels, optimizer, encoder_freeze_epochs=encoder_freeze_epochs,
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
