"""Losses: every registered loss trains (finite scalar, gradients), and each one's defining property holds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medseg_lightning.training.losses import LOSSES, create_loss


def _batch(num_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, num_classes, 8, 8, generator=generator)
    target = torch.randint(0, num_classes, (2, 8, 8), generator=generator)
    return logits, target


def _perfect_logits(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    return 30.0 * F.one_hot(target, num_classes).movedim(-1, 1).float()


@pytest.mark.parametrize("num_classes", [2, 4])
@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_is_a_finite_scalar_with_gradients(name: str, num_classes: int) -> None:
    logits, target = _batch(num_classes)
    logits.requires_grad_(True)
    loss = create_loss(name, num_classes)(logits, target)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", LOSSES.names())
def test_perfect_prediction_is_near_zero(name: str) -> None:
    _, target = _batch(3)
    assert create_loss(name, 3)(_perfect_logits(target, 3), target).item() == pytest.approx(0.0, abs=1e-4)


def test_registry_holds_the_documented_losses() -> None:
    assert LOSSES.names() == ["ce", "dice", "dice_ce", "focal", "tversky"]


def test_dice_matches_the_hand_formula() -> None:
    logits, target = _batch(3)
    probs = logits.softmax(1)
    onehot = F.one_hot(target, 3).movedim(-1, 1).float()
    dims = (0, 2, 3)  # batch dice: sums over the batch and the pixels, per class
    tp, p_sum, t_sum = (probs * onehot).sum(dims), probs.sum(dims), onehot.sum(dims)
    dice = (2 * tp + 1e-5) / (p_sum + t_sum + 1e-5)
    expected = 1 - dice[1:].mean()  # background excluded by default
    assert create_loss("dice", 3)(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    with_background = create_loss("dice", 3, include_background=True)(logits, target)
    assert with_background.item() == pytest.approx((1 - dice.mean()).item(), rel=1e-6)


def test_tversky_with_equal_alpha_beta_is_dice() -> None:
    logits, target = _batch(4)
    dice = create_loss("dice", 4)(logits, target)
    tversky = create_loss("tversky", 4, alpha=0.5, beta=0.5)(logits, target)
    assert tversky.item() == pytest.approx(dice.item(), rel=1e-6)
    assert create_loss("tversky", 4)(logits, target).item() != pytest.approx(dice.item(), rel=1e-3)


def test_dice_ce_is_the_sum_of_its_parts() -> None:
    logits, target = _batch(3)
    parts = create_loss("dice", 3)(logits, target) + create_loss("ce", 3)(logits, target)
    assert create_loss("dice_ce", 3)(logits, target).item() == pytest.approx(parts.item(), rel=1e-6)


def test_focal_with_gamma_zero_is_cross_entropy() -> None:
    logits, target = _batch(3)
    focal = create_loss("focal", 3, gamma=0.0)(logits, target)
    assert focal.item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-6)


@pytest.mark.parametrize("name", LOSSES.names())
def test_class_weights_change_the_value(name: str) -> None:
    logits, target = _batch(3)
    plain = create_loss(name, 3)(logits, target)
    weighted = create_loss(name, 3, class_weights=[1.0, 5.0, 0.5])(logits, target)
    assert weighted.item() != pytest.approx(plain.item(), rel=1e-4)


def test_batch_dice_differs_from_per_sample_dice() -> None:
    logits, target = _batch(3)
    batch = create_loss("dice", 3)(logits, target)
    per_sample = create_loss("dice", 3, batch_dice=False)(logits, target)
    assert batch.item() != pytest.approx(per_sample.item(), rel=1e-4)


@pytest.mark.parametrize("name", LOSSES.names())
def test_losses_compute_in_float32_under_autocast(name: str) -> None:
    logits, target = _batch(3)
    expected = create_loss(name, 3)(logits, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = create_loss(name, 3)(logits.bfloat16(), target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=2e-2)


def test_unknown_loss_lists_the_valid_names() -> None:
    with pytest.raises(KeyError, match=r"Did you mean 'dice'.*Valid: ce, dice, dice_ce, focal, tversky"):
        create_loss("dise", 3)


def test_unknown_param_names_the_loss_and_its_params() -> None:
    with pytest.raises(TypeError, match=r"loss 'focal' got unknown params: alpha\. Valid params: gamma"):
        create_loss("focal", 3, alpha=0.25)


def test_class_weights_must_have_one_weight_per_class() -> None:
    with pytest.raises(ValueError, match="class_weights has 2 entries but there are 3 classes"):
        create_loss("ce", 3, class_weights=[1.0, 2.0])


def test_shape_errors_are_explained() -> None:
    logits, target = _batch(3)
    with pytest.raises(ValueError, match=r"logits must be \(B, 4, H, W\)"):
        create_loss("dice", 4)(logits, target)
    with pytest.raises(ValueError, match="target must be"):
        create_loss("dice", 3)(logits, target[:, :4])
