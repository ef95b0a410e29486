"""What every task's LightningModule shares: the optimiser and schedule, encoder freezing, and whole-case
evaluation (cases scored at validation and test, summarised with intervals and audited per group).

A task's module (``SegmentationModule``, ``InstanceModule``) adds its training step and how it scores one case.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import nn

from medseg_lightning.config.schema import FairnessConfig, OptimizerConfig
from medseg_lightning.evaluation.scoring import EvaluationReport, summarize


class CaseModule(pl.LightningModule):
    """Case-wise evaluation and the optimiser of a network; subclasses train it and score a case.

    Args:
        network: the task's network; its ``encoder`` attribute (if any) can be frozen for the first
            ``encoder_freeze_epochs`` and gets ``lr * encoder_lr_multiplier``.
        labels: class index -> name, used in metric names (``val/dice/anterior``).
        fairness: attributes audited at every validation and test pass (``val/fairness/sex/dice_gap``).
    """

    def __init__(self, network: nn.Module, labels: dict[int, str], optimizer: OptimizerConfig,
                 encoder_freeze_epochs: int = 0, encoder_lr_multiplier: float = 1.0, inference_batch_size: int = 64,
                 fairness: FairnessConfig | None = None) -> None:
        super().__init__()
        self.network = network
        self.labels = dict(labels)
        self.optimizer_config = optimizer
        self.encoder_freeze_epochs = encoder_freeze_epochs
        self.encoder_lr_multiplier = encoder_lr_multiplier
        self.inference_batch_size = inference_batch_size
        self.fairness = fairness or FairnessConfig()
        self.case_rows: dict[str, list[dict[str, Any]]] = {"val": [], "test": []}
        self.reports: dict[str, EvaluationReport] = {}

    # --- training -------------------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        encoder = getattr(self.network, "encoder", None)
        if encoder is None or self.encoder_freeze_epochs == 0:
            return
        frozen = self.current_epoch < self.encoder_freeze_epochs
        encoder.requires_grad_(not frozen)
        if frozen:
            encoder.eval()  # BatchNorm statistics stay those of the pretrained weights

    # --- case-level evaluation -----------------------------------------------------------------------------
    def _score_cases(self, batch: list[dict[str, Any]], split: str) -> None:
        """Appends one row per case of ``batch`` to ``self.case_rows[split]``."""
        raise NotImplementedError(f"{type(self).__name__} must say how it scores a case")

    def on_validation_epoch_start(self) -> None:
        self.case_rows["val"] = []

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        self._score_cases(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_case_metrics("val")

    def on_test_epoch_start(self) -> None:
        self.case_rows["test"] = []

    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        self._score_cases(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_case_metrics("test")

    def _log_case_metrics(self, split: str) -> None:
        """Summary, intervals and fairness of all ranks' cases, logged by every rank alike (no sync needed)."""
        rows = _gather_rows(self.case_rows[split])
        if not rows:
            return
        classes = [name for key, name in sorted(self.labels.items()) if key > 0]
        report = summarize(rows, split, self.fairness, classes)
        self.reports[split] = report
        for key, value in report.metrics().items():
            self.log(key, value, sync_dist=False, prog_bar=key == f"{split}/dice")

    # --- optimisation --------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        config = self.optimizer_config
        groups = _parameter_groups(self.network, config.lr, self.encoder_lr_multiplier)
        if config.name == "sgd":
            # Nesterov as nnU-Net; torch refuses it without momentum, and momentum 0 (plain SGD) is a valid setting
            optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                                        nesterov=config.momentum > 0, weight_decay=config.weight_decay)
        else:
            optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        if config.scheduler == "none":
            return {"optimizer": optimizer}
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if config.scheduler == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in groups],
                                                            total_steps=total)
        else:
            warmup = int(total * config.warmup_epochs / max(1, self.trainer.max_epochs or 1))
            factor = _schedule(config.scheduler, total, warmup, config.poly_power)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}



def _schedule(name: str, total: int, warmup: int, power: float) -> Callable[[int], float]:
    """Linear warm-up, then cosine or polynomial decay to zero over the remaining steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if name == "poly":
            return (1 - progress) ** power
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _parameter_groups(network: nn.Module, lr: float, encoder_multiplier: float) -> list[dict[str, Any]]:
    encoder = getattr(network, "encoder", None)
    encoder_ids = {id(p) for p in encoder.parameters()} if encoder is not None else set()
    rest = [p for p in network.parameters() if id(p) not in encoder_ids]
    groups = [{"params": rest, "lr": lr, "name": "decoder"}]
    if encoder_ids:
        groups.append({"params": list(encoder.parameters()), "lr": lr * encoder_multiplier, "name": "encoder"})
    return groups


def _gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All ranks' case rows, once per case (the distributed sampler pads by repeating cases)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[list[dict[str, Any]]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    unique = {row["case_id"]: row for row in rows}
    return [unique[key] for key in sorted(unique)]
