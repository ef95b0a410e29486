"""The LightningModule's optimisation settings: schedules, warm-up, encoder learning rate, NaN guard."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from medseg_lightning.config.schema import OptimizerConfig
from medseg_lightning.models import create_model
from medseg_lightning.training.case_module import _parameter_groups, _schedule
from medseg_lightning.training.losses import create_loss
from medseg_lightning.training.segmentation_module import SegmentationModule


def test_schedules_with_warmup() -> None:
    cosine = _schedule("cosine", total=100, warmup=10, power=0.9)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0)
    assert cosine(10) == pytest.approx(1.0) and cosine(55) == pytest.approx(0.5) and cosine(100) == pytest.approx(0)
    poly = _schedule("poly", total=100, warmup=0, power=0.9)
    assert poly(50) == pytest.approx(0.5**0.9) and poly(100) == 0
    assert all(cosine(s) >= cosine(s + 1) for s in range(10, 100))


def test_encoder_gets_its_own_learning_rate() -> None:
    network = create_model("unet", "test_resnet", 1, 3)
    groups = {g["name"]: g for g in _parameter_groups(network, lr=1e-3, encoder_multiplier=0.1)}
    assert groups["encoder"]["lr"] == pytest.approx(1e-4) and groups["decoder"]["lr"] == 1e-3
    n_params = sum(len(g["params"]) for g in groups.values())
    assert n_params == len(list(network.parameters()))


def test_nan_loss_stops_training_with_a_clear_error() -> None:
    class Broken(nn.Module):
        def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return logits.sum() * math.nan

    module = SegmentationModule(create_model("unet", "test_resnet", 1, 2), Broken(), {0: "bg", 1: "fg"},
                                OptimizerConfig())
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    batch = {"image": torch.zeros(2, 1, 32, 32), "mask": torch.zeros(2, 32, 32, dtype=torch.long)}
    with pytest.raises(FloatingPointError, match="training loss is nan at epoch 0, step 3"):
        module.training_step(batch, 3)


class _Tiny(nn.Module):
    """Two 1x1 convolutions, the first called ``encoder`` so it gets its own parameter group: a network that
    trains in milliseconds, for tests about the optimiser rather than the model."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(1, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(image))


def _module(optimizer: OptimizerConfig, encoder_lr_multiplier: float = 1.0) -> SegmentationModule:
    torch.manual_seed(0)
    return SegmentationModule(_Tiny(), create_loss("ce", 2), {0: "bg", 1: "fg"}, optimizer,
                              encoder_lr_multiplier=encoder_lr_multiplier)


class _LearningRates(pl.Callback):
    """The learning rate of every parameter group at each optimiser step, just before the step uses it."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule, optimizer: Any) -> None:
        self.steps.append({group["name"]: group["lr"] for group in optimizer.param_groups})


def _fit(module: SegmentationModule, epochs: int, batches: int, accumulate: int = 1) -> tuple[pl.Trainer, list]:
    """Trains for ``epochs`` epochs of ``batches`` batches; returns the trainer and the learning rates used."""
    generator = torch.Generator().manual_seed(0)
    data = [{"image": torch.randn(1, 8, 8, generator=generator),
             "mask": torch.randint(0, 2, (8, 8), generator=generator)} for _ in range(2 * batches)]
    rates = _LearningRates()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, accumulate_grad_batches=accumulate,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[rates])
    trainer.fit(module, DataLoader(data, batch_size=2))
    return trainer, rates.steps


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_sgd_gets_the_configured_momentum_nesterov_and_weight_decay(momentum: float) -> None:
    """nnU-Net's SGD: Nesterov momentum as configured; momentum 0 (allowed by the schema) is plain SGD."""
    module = _module(OptimizerConfig(name="sgd", lr=0.05, momentum=momentum, weight_decay=3e-5, scheduler="none"),
                     encoder_lr_multiplier=0.1)
    optimizer = module.configure_optimizers()["optimizer"]
    assert type(optimizer) is torch.optim.SGD
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert groups["decoder"]["lr"] == pytest.approx(0.05) and groups["encoder"]["lr"] == pytest.approx(0.005)
    for group in groups.values():
        assert group["momentum"] == momentum and group["nesterov"] is (momentum > 0)
        assert group["weight_decay"] == 3e-5 and group["dampening"] == 0


def test_adamw_gets_the_configured_learning_rate_and_weight_decay() -> None:
    module = _module(OptimizerConfig(name="adamw", lr=2e-3, weight_decay=0.05, scheduler="none"))
    optimizer = module.configure_optimizers()["optimizer"]
    assert type(optimizer) is torch.optim.AdamW
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [
        ("decoder", 2e-3, 0.05), ("encoder", 2e-3, 0.05)]


def test_warmup_epochs_ramp_the_learning_rate_linearly_then_cosine_decays_it() -> None:
    """3 epochs of 4 steps, 1 warm-up epoch: steps 0-3 use lr * (k + 1) / 4, then a cosine over the 8 others;
    the encoder's multiplier applies throughout."""
    module = _module(OptimizerConfig(lr=0.1, scheduler="cosine", warmup_epochs=1), encoder_lr_multiplier=0.5)
    trainer, steps = _fit(module, epochs=3, batches=4)
    assert trainer.estimated_stepping_batches == 12 and len(steps) == 12
    expected = [0.1 * (k + 1) / 4 for k in range(4)] + [0.1 * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert [step["decoder"] for step in steps] == pytest.approx(expected)
    assert [step["encoder"] for step in steps] == pytest.approx([0.5 * lr for lr in expected])


def test_poly_decays_as_one_minus_progress_to_the_power_per_optimizer_step() -> None:
    """Polynomial decay (1 - k / total) ** power over the optimiser steps, which with gradient accumulation are
    fewer than the batches: 2 epochs of 6 batches accumulated by 2 are 6 steps."""
    module = _module(OptimizerConfig(lr=0.01, scheduler="poly", poly_power=2.0))
    trainer, steps = _fit(module, epochs=2, batches=6, accumulate=2)
    assert trainer.estimated_stepping_batches == 6 and len(steps) == 6
    assert [step["decoder"] for step in steps] == pytest.approx([0.01 * (1 - k / 6) ** 2.0 for k in range(6)])


def test_onecycle_spans_the_estimated_steps_and_peaks_at_the_configured_lr() -> None:
    """OneCycleLR over exactly the trainer's optimiser steps, peaking at each group's configured lr (torch's
    defaults: start at max / 25, peak after 30 % of the steps, end at max / 25e4)."""
    module = _module(OptimizerConfig(lr=0.2, scheduler="onecycle"), encoder_lr_multiplier=0.1)
    trainer, steps = _fit(module, epochs=2, batches=5)
    scheduler = trainer.lr_scheduler_configs[0]
    assert type(scheduler.scheduler) is torch.optim.lr_scheduler.OneCycleLR and scheduler.interval == "step"
    assert scheduler.scheduler.total_steps == trainer.estimated_stepping_batches == 10 == len(steps)
    decoder = [step["decoder"] for step in steps]
    assert decoder[0] == pytest.approx(0.2 / 25) and max(decoder) == pytest.approx(0.2)
    assert decoder.index(max(decoder)) == 2  # step 0.3 * 10 - 1: the peak, then annealing
    assert decoder[-1] == pytest.approx(0.2 / 25e4, abs=1e-6)
    assert max(step["encoder"] for step in steps) == pytest.approx(0.02)


@pytest.mark.parametrize("arch", ["unet", "fcn", "segnet"])
def test_channels_last_gives_the_same_logits_and_gradients(arch: str) -> None:
    """A memory-format speed setting must not change what the network computes."""
    torch.manual_seed(0)
    network = create_model(arch, "test_resnet", 3, 2).eval()
    image = torch.randn(2, 3, 32, 32)
    reference = SegmentationModule(network, create_loss("ce", 2), {0: "bg", 1: "fg"}, OptimizerConfig())
    expected = reference(image)
    expected.sum().backward()
    grads = [p.grad.clone() for p in reference.network.parameters()]
    reference.network.zero_grad()
    fast = SegmentationModule(network, create_loss("ce", 2), {0: "bg", 1: "fg"}, OptimizerConfig(),
                              channels_last=True)
    conv = next(m for m in fast.network.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    logits = fast(image)
    logits.sum().backward()
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    for grad, param in zip(grads, fast.network.parameters(), strict=True):
        torch.testing.assert_close(param.grad, grad, atol=1e-3, rtol=1e-3)
