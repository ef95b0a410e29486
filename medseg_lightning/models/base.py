"""What every decoder shares: the registry it is chosen from, its contract and its building blocks.

A decoder is built from the encoder's ``channels`` and ``reductions`` only (never a hard-coded channel list) and
maps the encoder's stage outputs to one feature map with ``out_channels`` channels at ``output_reduction``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medseg_lightning.config.registry import Registry

DEFAULT_DECODER_CHANNELS = (256, 128, 64, 32, 16)


class Decoder(nn.Module):
    """Base class of the registered decoders.

    Subclasses set ``out_channels`` and ``output_reduction`` (stride of their output w.r.t. the input image; the
    model upsamples the logits by it). A decoder that needs less than the stage maps overrides
    ``encode_feature``: the encoder keeps its return value instead of the float map (SegNet keeps pool indices).
    """

    out_channels: int
    output_reduction: int = 1
    encode_feature: Callable[[int, torch.Tensor], Any] | None = None

    def forward(self, features: list[Any]) -> torch.Tensor:
        raise NotImplementedError


DecoderFactory = Callable[[list[int], list[int], Sequence[int] | None], Decoder]
"""``factory(encoder_channels, encoder_reductions, decoder_channels)`` -> decoder."""

ARCHITECTURES: Registry[DecoderFactory] = Registry("architecture")


class ConvBNReLU(nn.Sequential):
    """3x3 conv (no bias: BatchNorm follows) -> BatchNorm -> ReLU, the block of U-Net and SegNet decoders."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two ConvBNReLU blocks, as in each level of U-Net (Ronneberger et al. 2015) and SegNet."""
    return nn.Sequential(ConvBNReLU(in_channels, out_channels), ConvBNReLU(out_channels, out_channels))


def resolve_decoder_channels(arch: str, requested: Sequence[int] | None, n_blocks: int) -> list[int]:
    """The decoder widths: ``requested`` when given (it must have one width per block), else the default truncated.

    Raises:
        ValueError: ``requested`` has the wrong length or non-positive widths.
    """
    if requested is None:
        defaults = list(DEFAULT_DECODER_CHANNELS)
        return (defaults + [defaults[-1]] * n_blocks)[:n_blocks]
    widths = [int(c) for c in requested]
    if len(widths) != n_blocks or any(c < 1 for c in widths):
        raise ValueError(
            f"{arch} decoder on this encoder has {n_blocks} blocks and needs {n_blocks} positive decoder_channels "
            f"(deep to shallow), got {list(requested)}; leave decoder_channels null to derive them"
        )
    return widths


def stage_ratios(reductions: Sequence[int]) -> list[int]:
    """Upsampling factor between consecutive stages (1 where two stages share a resolution).

    Raises:
        ValueError: a stage is coarser than the next one or the ratio is not an integer.
    """
    ratios = []
    for shallow, deep in itertools.pairwise(reductions):
        if deep < shallow or deep % shallow:
            raise ValueError(f"encoder reductions {list(reductions)} are not increasing integer multiples")
        ratios.append(deep // shallow)
    return ratios


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize to ``size`` (H, W); a no-op when it already has that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
