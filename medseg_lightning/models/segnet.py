"""SegNet decoder (Badrinarayanan et al. 2017): upsampling by max-unpooling with the encoder's pooling indices.

SegNet's point is memory: the decoder keeps the *positions* of the encoder's maxima, not the encoder's float
maps (U-Net keeps those for its skip connections). timm encoders do not max-pool between stages (most use strided
convolutions) and expose no pooling indices, so the indices are made here: right after stage ``i`` is produced,
the encoder calls :meth:`SegNetDecoder.encode_feature`, which takes the argmax of a ``k x k`` max-pool of that map
(``k`` = the stride ratio to stage ``i + 1``, 2 in the usual case) and stores it compactly as the position inside
the window (``uint8``, 1 byte per pooled element, 1/16 of the float32 map, 1/8 of PyTorch's int64 indices). Only
the deepest float map is kept.

Whether the float maps are really freed depends on the encoder (see ``TimmEncoder.streams_stages``):
``FeatureListNet`` encoders (ResNet, ConvNeXt, RegNet, ...) are walked stage by stage, so without autograd each map
is released once the next stage has consumed it; other timm feature classes (EfficientNet/MobileNet feature nets,
hook/getter wrappers) return all maps at once, so the floats live until the encoder returns and are dropped
before the decoder runs. When training, autograd saves each encoder map for the next stage's backward anyway, so
the saving comes from the decoder side (no concatenated skip tensors). ``benchmarks/segnet_memory.py`` measures it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medseg_lightning.models.base import (
    ARCHITECTURES,
    Decoder,
    double_conv,
    resize_to,
    resolve_decoder_channels,
    stage_ratios,
)


@dataclass
class PoolCode:
    """Max-pooling argmax of one encoder map, stored as the position inside each ``kernel x kernel`` window.

    Attributes:
        code: (B, C, h, w) window positions ``row * kernel + col``, uint8 when the window has <= 256 positions.
        kernel: window size and stride of the pooling.
        size: (H, W) of the pooled map, the size max-unpooling restores.
    """

    code: torch.Tensor
    kernel: int
    size: tuple[int, int]

    @classmethod
    def from_feature(cls, feature: torch.Tensor, kernel: int) -> PoolCode:
        """Pools ``feature`` (no autograd: only positions are kept) and compresses PyTorch's flat int64 indices."""
        height, width = feature.shape[-2:]
        with torch.no_grad():
            _, flat = F.max_pool2d(feature, kernel, stride=kernel, ceil_mode=True, return_indices=True)
            rows, cols = _window_origins(flat, kernel)
            flat_rows = torch.div(flat, width, rounding_mode="floor")
            code = (flat_rows - rows) * kernel + (flat - flat_rows * width - cols)
        dtype = torch.uint8 if kernel * kernel <= 256 else torch.int32
        return cls(code=code.to(dtype), kernel=kernel, size=(int(height), int(width)))

    def indices(self) -> torch.Tensor:
        """The flat int64 indices ``F.max_unpool2d`` expects (built on demand, freed after use)."""
        code = self.code.long()
        rows, cols = _window_origins(code, self.kernel)
        return (rows + code // self.kernel) * self.size[1] + cols + code % self.kernel

    def unpool(self, x: torch.Tensor) -> torch.Tensor:
        """Max-unpools ``x`` (same shape as ``code``) to ``size``: each value goes back to its argmax position."""
        return F.max_unpool2d(x, self.indices(), self.kernel, stride=self.kernel, output_size=self.size)


def _window_origins(pooled: torch.Tensor, kernel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left row and column of each pooling window, shaped to broadcast over ``pooled`` (..., h, w)."""
    h, w = pooled.shape[-2:]
    rows = torch.arange(h, device=pooled.device).mul_(kernel).view(h, 1)
    cols = torch.arange(w, device=pooled.device).mul_(kernel).view(1, w)
    return rows, cols


@ARCHITECTURES.register("segnet")
class SegNetDecoder(Decoder):
    """SegNet decoder over any timm encoder: unpool with stored indices, then two conv-BN-ReLU, per level.

    The decoder starts at the deepest encoder map. At level ``i`` (deep to shallow) a 1x1 conv projects the
    decoder map to stage ``i``'s channel count when they differ (indices are per channel of stage ``i``), then
    ``max_unpool2d`` restores stage ``i``'s resolution, then two conv-BN-ReLU set the level's width. Where two
    stages share a resolution there is nothing to unpool and the level is just the convs. When the shallowest
    stage is downsampled, a last block upsamples (bilinear, no indices exist for the input) to full resolution,
    matching the U-Net decoder so the two compare like for like.

    Args:
        encoder_channels: channels per encoder stage, shallow to deep.
        encoder_reductions: stride per encoder stage, shallow to deep.
        decoder_channels: width of each block, deep to shallow; ``None`` derives (256, 128, 64, 32, 16)[:blocks].
    """

    def __init__(
        self, encoder_channels: list[int], encoder_reductions: list[int], decoder_channels: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        self.ratios = stage_ratios(encoder_reductions)
        self.final_scale = encoder_reductions[0]
        n_levels = len(encoder_channels) - 1
        widths = resolve_decoder_channels("segnet", decoder_channels, n_levels + (self.final_scale > 1))
        self.projections = nn.ModuleList()
        self.blocks = nn.ModuleList()
        c_in = encoder_channels[-1]
        for level, stage in enumerate(range(n_levels - 1, -1, -1)):
            unpools = self.ratios[stage] > 1
            target = encoder_channels[stage] if unpools else c_in
            self.projections.append(nn.Conv2d(c_in, target, 1) if target != c_in else nn.Identity())
            self.blocks.append(double_conv(target, widths[level]))
            c_in = widths[level]
        self.final = double_conv(c_in, widths[-1]) if self.final_scale > 1 else None
        self.out_channels = widths[-1]
        self.output_reduction = 1

    def encode_feature(self, index: int, feature: torch.Tensor) -> torch.Tensor | PoolCode | None:
        """What the encoder keeps of stage ``index``: the deepest map itself, otherwise only pooling positions."""
        if index == len(self.ratios):
            return feature
        if self.ratios[index] == 1:
            return None
        return PoolCode.from_feature(feature, self.ratios[index])

    def forward(self, features: list[torch.Tensor | PoolCode | None]) -> torch.Tensor:
        """Decodes what ``encode_feature`` kept; plain stage maps are accepted too (pooled here, nothing saved)."""
        x = features[-1]
        assert isinstance(x, torch.Tensor), "the deepest stage must be a feature map"
        n_levels = len(self.ratios)
        for level, (projection, block) in enumerate(zip(self.projections, self.blocks, strict=True)):
            stage = n_levels - 1 - level
            kept = features[stage]
            if isinstance(kept, torch.Tensor):
                kept = self.encode_feature(stage, kept)
            x = projection(x)
            if isinstance(kept, PoolCode):
                x = kept.unpool(resize_to(x, kept.code.shape[-2:]))
            x = block(x)
        if self.final is not None:
            x = self.final(F.interpolate(x, scale_factor=self.final_scale, mode="bilinear", align_corners=False))
        return x
