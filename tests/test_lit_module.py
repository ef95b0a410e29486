"""The LightningModule's optimisation settings: schedules, warm-up, encoder learning rate, NaN guard."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medseg_lightning.config_schema import OptimizerConfig
from medseg_lightning.lit_module import SegmentationModule, _parameter_groups, _schedule
from medseg_lightning.losses import create_loss
from medseg_lightning.models import create_model


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


def test_sgd_and_adamw(tmp_path) -> None:
    network = create_model("fcn", "test_resnet", 1, 2)
    for name in ("sgd", "adamw"):
        module = SegmentationModule(network, create_loss("ce", 2), {0: "bg", 1: "fg"},
                                    OptimizerConfig(name=name, scheduler="none"))
        optimizer = module.configure_optimizers()["optimizer"]
        assert type(optimizer).__name__ == {"sgd": "SGD", "adamw": "AdamW"}[name]


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
