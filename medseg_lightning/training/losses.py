"""Segmentation losses chosen by name: ``ce``, ``dice``, ``dice_ce``, ``focal``, ``tversky``.

Every loss takes logits ``(B, C, H, W)`` and an integer target ``(B, H, W)`` and returns a scalar. Losses are
computed in float32 with autocast disabled, because soft Dice sums over millions of pixels and overflows or loses
precision in float16. Overlap losses follow nnU-Net: per class, summed over the whole batch ("batch dice"), with a
small smoothing term, background excluded by default, and ``dice_ce`` (nnU-Net's default) adds cross-entropy.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from medseg_lightning.config.registry import Registry

LossFactory = Callable[..., nn.Module]
LOSSES: Registry[LossFactory] = Registry("loss")


def create_loss(
    name: str,
    num_classes: int,
    *,
    class_weights: list[float] | None = None,
    include_background: bool = False,
    **params: object,
) -> nn.Module:
    """Builds the loss registered as ``name``.

    Args:
        name: registered loss name; unknown names raise a KeyError listing the valid ones.
        num_classes: number of classes, background (index 0) included.
        class_weights: one weight per class, background included. Cross-entropy and focal use them per pixel
            (focal's alpha); overlap losses use them to weight the per-class terms.
        include_background: whether overlap losses (dice, tversky) score class 0 too. Cross-entropy and focal
            always classify every pixel, background included.
        **params: loss-specific settings (``gamma``, ``alpha``, ``smooth``, ...); unknown ones raise a TypeError.
    """
    factory = LOSSES.get(name)
    valid = [p.name for p in inspect.signature(factory).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise TypeError(
            f"loss {name!r} got unknown params: {', '.join(unknown)}. Valid params: {', '.join(valid) or '(none)'}"
        )
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 (background + one class), got {num_classes}")
    weights = _weights_tensor(class_weights, num_classes)
    return factory(num_classes, weights, include_background, **params)


def _weights_tensor(class_weights: list[float] | None, num_classes: int) -> torch.Tensor | None:
    if class_weights is None:
        return None
    if len(class_weights) != num_classes:
        raise ValueError(
            f"class_weights has {len(class_weights)} entries but there are {num_classes} classes "
            "(give one weight per class, background included)"
        )
    weights = torch.tensor(class_weights, dtype=torch.float32)
    if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"class_weights must be finite, non-negative and not all zero, got {class_weights}")
    return weights


class _FloatLoss(nn.Module):
    """Checks shapes and evaluates ``_compute`` in float32 with autocast off (AMP-safe)."""

    def __init__(self, num_classes: int, weights: torch.Tensor | None) -> None:
        super().__init__()
        self.num_classes = num_classes
        # a buffer, so the weights follow the module to the GPU; not persistent: they come from the config
        self.register_buffer("weights", weights, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.ndim < 3 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must be (B, {self.num_classes}, H, W), got {tuple(logits.shape)}")
        if target.shape != logits.shape[:1] + logits.shape[2:]:
            raise ValueError(f"target must be {tuple(logits.shape[:1] + logits.shape[2:])}, got {tuple(target.shape)}")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return self._compute(logits.float(), target.long())

    def _compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class CrossEntropyLoss(_FloatLoss):
    """Pixel-wise cross-entropy, optionally class-weighted (PyTorch normalises by the summed target weights)."""

    def __init__(self, num_classes: int, weights: torch.Tensor | None, label_smoothing: float = 0.0) -> None:
        super().__init__(num_classes, weights)
        self.label_smoothing = label_smoothing

    def _compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, weight=self.weights, label_smoothing=self.label_smoothing)


class FocalLoss(_FloatLoss):
    """Multi-class focal loss ``-alpha_t (1 - p_t)^gamma log p_t``, averaged over pixels; alpha = class weights."""

    def __init__(self, num_classes: int, weights: torch.Tensor | None, gamma: float = 2.0) -> None:
        super().__init__(num_classes, weights)
        self.gamma = gamma

    def _compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
        # clamp: 1 - exp(log_p) can be a hair below 0 and a fractional gamma would give NaN
        loss = -((1 - log_p.exp()).clamp_min(0) ** self.gamma) * log_p
        if self.weights is not None:
            loss = loss * self.weights[target]
        return loss.mean()


class TverskyLoss(_FloatLoss):
    """``1 - `` the weighted mean over classes of the soft Tversky index on softmax probabilities.

    The index is written as ``(2 tp + smooth) / (2 tp + 2 alpha fp + 2 beta fn + smooth)`` so that
    ``alpha = beta = 0.5`` is exactly soft Dice with the same smoothing term; ``alpha`` weighs false positives and
    ``beta`` false negatives. With ``batch_dice`` the sums run over the whole batch (nnU-Net), otherwise per sample
    and the per-sample losses are averaged.
    """

    def __init__(
        self,
        num_classes: int,
        weights: torch.Tensor | None,
        include_background: bool,
        alpha: float,
        beta: float,
        smooth: float = 1e-5,
        batch_dice: bool = True,
    ) -> None:
        super().__init__(num_classes, weights)
        if min(alpha, beta, smooth) < 0:
            raise ValueError(f"alpha, beta and smooth must be non-negative, got {alpha}, {beta}, {smooth}")
        first = 0 if include_background else 1
        if weights is not None and weights[first:].sum() <= 0:
            raise ValueError("class_weights of the scored classes are all zero")
        self.first, self.alpha, self.beta, self.smooth, self.batch_dice = first, alpha, beta, smooth, batch_dice

    def _compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits, dim=1)
        onehot = torch.zeros_like(probs).scatter_(1, target.unsqueeze(1), 1.0)
        probs, onehot = probs[:, self.first :], onehot[:, self.first :]
        dims = (0, *range(2, probs.ndim)) if self.batch_dice else tuple(range(2, probs.ndim))
        tp = (probs * onehot).sum(dims)
        fp = (probs * (1 - onehot)).sum(dims)
        fn = ((1 - probs) * onehot).sum(dims)
        denominator = 2 * tp + 2 * self.alpha * fp + 2 * self.beta * fn + self.smooth
        index = (2 * tp + self.smooth) / denominator.clamp_min(1e-8)
        loss = 1 - index  # (K,) or (B, K)
        if self.weights is None:
            return loss.mean()
        weights = self.weights[self.first :]
        return (loss * weights).sum(-1).mean() / weights.sum()


class DiceCELoss(nn.Module):
    """``weight_dice * dice + weight_ce * cross-entropy``, nnU-Net's default loss."""

    def __init__(self, dice: nn.Module, ce: nn.Module, weight_dice: float, weight_ce: float) -> None:
        super().__init__()
        self.dice, self.ce = dice, ce
        self.weight_dice, self.weight_ce = weight_dice, weight_ce

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.weight_dice * self.dice(logits, target) + self.weight_ce * self.ce(logits, target)


# --- registered factories: keyword-only parameters are the loss's ``params`` ------------------------------------
@LOSSES.register("ce")
def _ce(
    num_classes: int, weights: torch.Tensor | None, include_background: bool, *, label_smoothing: float = 0.0
) -> nn.Module:
    return CrossEntropyLoss(num_classes, weights, label_smoothing)


@LOSSES.register("dice")
def _dice(
    num_classes: int,
    weights: torch.Tensor | None,
    include_background: bool,
    *,
    smooth: float = 1e-5,
    batch_dice: bool = True,
) -> nn.Module:
    return TverskyLoss(num_classes, weights, include_background, 0.5, 0.5, smooth, batch_dice)


@LOSSES.register("dice_ce")
def _dice_ce(
    num_classes: int,
    weights: torch.Tensor | None,
    include_background: bool,
    *,
    smooth: float = 1e-5,
    batch_dice: bool = True,
    label_smoothing: float = 0.0,
    weight_dice: float = 1.0,
    weight_ce: float = 1.0,
) -> nn.Module:
    dice = TverskyLoss(num_classes, weights, include_background, 0.5, 0.5, smooth, batch_dice)
    return DiceCELoss(dice, CrossEntropyLoss(num_classes, weights, label_smoothing), weight_dice, weight_ce)


@LOSSES.register("focal")
def _focal(
    num_classes: int, weights: torch.Tensor | None, include_background: bool, *, gamma: float = 2.0
) -> nn.Module:
    if gamma < 0:
        raise ValueError(f"focal gamma must be non-negative, got {gamma}")
    return FocalLoss(num_classes, weights, gamma)


@LOSSES.register("tversky")
def _tversky(
    num_classes: int,
    weights: torch.Tensor | None,
    include_background: bool,
    *,
    alpha: float = 0.3,
    beta: float = 0.7,
    smooth: float = 1e-5,
    batch_dice: bool = True,
) -> nn.Module:
    return TverskyLoss(num_classes, weights, include_background, alpha, beta, smooth, batch_dice)
