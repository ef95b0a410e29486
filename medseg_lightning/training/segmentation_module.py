"""The LightningModule of semantic segmentation: trains a network on slices and scores whole cases in 3D.

It receives the network, the loss and the optimiser settings; it knows nothing of files, MLflow or Optuna.
Validation and test batches are whole cases: slices are predicted in chunks, re-stacked into the original voxel
grid and scored per case in physical spacing (the metrics users compare), then averaged over cases.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from medseg_lightning.config.schema import FairnessConfig, OptimizerConfig
from medseg_lightning.evaluation.metrics import SliceMetrics, name_metrics
from medseg_lightning.evaluation.scoring import predict_with_confidence, score_case
from medseg_lightning.training.case_module import CaseModule


class SegmentationModule(CaseModule):
    """Slice-wise training with a loss over label maps, case-wise evaluation.

    Args:
        network: ``(B, C, H, W) -> (B, num_classes, H, W)`` logits (see ``CaseModule`` for the encoder).
        loss: ``(logits, target) -> scalar``.
        channels_last: keep the network and its inputs in channels-last memory format, which oneDNN (CPU) and
            cuDNN (GPU, mixed precision) convolutions run faster on.
        keep_largest: classes of which only the largest 3D connected component is kept before scoring (the
            model's ``inference.largest_component``, so validation scores what ``medseg predict`` writes).
        compile_network: run training steps through ``torch.compile`` of the network (same parameters); whole-case
            evaluation keeps the eager network, whose varying slice counts would make the compiler recompile.
    """

    def __init__(
        self,
        network: nn.Module,
        loss: nn.Module,
        labels: dict[int, str],
        optimizer: OptimizerConfig,
        encoder_freeze_epochs: int = 0,
        encoder_lr_multiplier: float = 1.0,
        inference_batch_size: int = 64,
        overlay_cases: int = 0,
        fairness: FairnessConfig | None = None,
        channels_last: bool = False,
        keep_largest: list[int] | None = None,
        compile_network: bool = False,
    ) -> None:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        super().__init__(network.to(memory_format=memory_format), labels, optimizer,
                         encoder_freeze_epochs=encoder_freeze_epochs, encoder_lr_multiplier=encoder_lr_multiplier,
                         inference_batch_size=inference_batch_size, fairness=fairness)
        self.memory_format = memory_format
        self.loss = loss
        self.overlay_cases = overlay_cases
        self.keep_largest = keep_largest or []
        self.train_metrics = SliceMetrics(len(labels))
        self.overlays: list[dict[str, Any]] = []
        # not a submodule: the checkpoint and the logged model hold the plain network's weights only
        self._compiled = {"network": torch.compile(self.network)} if compile_network else {}

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.network(image.contiguous(memory_format=self.memory_format))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        network = self._compiled.get("network")
        image = batch["image"].contiguous(memory_format=self.memory_format)
        logits = network(image) if network is not None else self(image)
        loss = self.loss(logits, batch["mask"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at epoch {self.current_epoch}, step {batch_idx}")
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(logits))
        self.train_metrics.update(logits.detach().argmax(1), batch["mask"])
        return loss

    def on_train_epoch_end(self) -> None:
        values = self.train_metrics.compute()
        self.train_metrics.reset()
        for key, value in name_metrics(values, self.labels).items():
            self.log(f"train/{key}", float(value), sync_dist=False)

    def _score_cases(self, batch: list[dict[str, Any]], split: str) -> None:
        for item in batch:
            prediction = predict_with_confidence(self, item["image"], self.inference_batch_size)
            self.case_rows[split].append(score_case(item, prediction, self.labels, self.keep_largest))
            if split == "val" and len(self.overlays) < self.overlay_cases:
                self.overlays.append(_overlay_sample(item, prediction.labels))

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self.overlays = []


def _overlay_sample(item: dict[str, Any], prediction: np.ndarray) -> dict[str, Any]:
    """The slice with the most foreground: image (first channel of the centre slice), truth and prediction."""
    truth = item["mask"].numpy()
    index = int(truth.reshape(len(truth), -1).sum(1).argmax())
    image = item["image"][index].numpy()
    centre = image.shape[0] // 2
    return {"case_id": item["case_id"], "image": image[centre], "truth": truth[index], "prediction": prediction[index]}
