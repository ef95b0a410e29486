"""The segmentation network: timm encoder -> registered decoder -> 1x1 head, logits at the input size.

It is a plain ``nn.Module`` that knows nothing about training; ``create_model`` builds it from registered names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# Importing the decoder modules registers them in ARCHITECTURES.
from medseg_lightning.models import fcn, segnet, unet  # noqa: F401
from medseg_lightning.models.base import ARCHITECTURES, Decoder, resize_to
from medseg_lightning.models.encoder import TimmEncoder

SizeMismatch = Literal["pad", "error"]
PadMode = Literal["constant", "reflect", "replicate"]


class SegmentationModel(nn.Module):
    """Encoder -> decoder -> 1x1 head; maps (B, C, H, W) images to (B, num_classes, H, W) logits.

    Args:
        encoder: the timm feature encoder.
        decoder: a decoder built for ``encoder``'s channels and reductions.
        num_classes: logit channels (background included).
        size_mismatch: what to do with H or W not divisible by the encoder's output stride: ``"pad"`` the input
            to the next multiple and crop the logits back, or raise (``"error"``).
        pad_mode: ``F.pad`` mode for ``"pad"``; zeros by default (background after most normalisations), where
            reflection would mirror anatomy into the border and fails on inputs smaller than the padding.
        head_dropout: ``Dropout2d`` rate before the head (0: none); it has no weights, so a model saved with any
            rate loads into a network built with another, and Monte-Carlo dropout samples it at inference.
    """

    def __init__(
        self,
        encoder: TimmEncoder,
        decoder: Decoder,
        num_classes: int,
        size_mismatch: SizeMismatch = "pad",
        pad_mode: PadMode = "constant",
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if size_mismatch not in ("pad", "error"):
            raise ValueError(f"size_mismatch must be 'pad' or 'error', got {size_mismatch!r}")
        self.encoder = encoder
        self.decoder = decoder
        self.dropout = nn.Dropout2d(head_dropout) if head_dropout else nn.Identity()
        self.head = nn.Conv2d(decoder.out_channels, num_classes, kernel_size=1)
        self.num_classes = num_classes
        self.size_mismatch = size_mismatch
        self.pad_mode = pad_mode

    @property
    def output_stride(self) -> int:
        """H and W of the input must be multiples of this (or are padded to one)."""
        return self.encoder.output_stride

    def check_input_shape(self, x: torch.Tensor) -> tuple[int, int]:
        """The bottom and right padding that makes ``x`` divisible by the output stride.

        Raises:
            ValueError: ``size_mismatch="error"`` and padding is needed; names the nearest valid sizes.
        """
        height, width = x.shape[-2:]
        stride = self.output_stride
        pad_h, pad_w = (-height) % stride, (-width) % stride
        if (pad_h or pad_w) and self.size_mismatch == "error":
            lower = (max(stride, height // stride * stride), max(stride, width // stride * stride))
            upper = (math.ceil(height / stride) * stride, math.ceil(width / stride) * stride)
            raise ValueError(
                f"input size (H={height}, W={width}) is not divisible by the encoder's output stride {stride} "
                f"({self.encoder.name}); nearest valid sizes: {lower} or {upper}. "
                "Resize or crop the images, or use size_mismatch='pad' to pad and crop back automatically."
            )
        return pad_h, pad_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        pad_h, pad_w = self.check_input_shape(x)
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=self.pad_mode)
        features = self.encoder(x, self.decoder.encode_feature)
        logits = self.head(self.dropout(self.decoder(features)))
        logits = resize_to(logits, x.shape[-2:])
        return logits[..., :height, :width]


def create_model(
    arch: str,
    encoder: str,
    in_channels: int,
    num_classes: int,
    *,
    pretrained: bool = False,
    decoder_channels: Sequence[int] | None = None,
    size_mismatch: SizeMismatch = "pad",
    encoder_depth: int | None = None,
    pad_mode: PadMode = "constant",
    head_dropout: float = 0.0,
) -> SegmentationModel:
    """Builds a registered architecture on a timm encoder.

    Args:
        arch: registered decoder name (``ARCHITECTURES.names()``: fcn, segnet, unet).
        encoder: any timm model name that supports ``features_only``.
        in_channels: input channels (modalities x 2.5D slices).
        num_classes: logit channels (background included).
        pretrained: load timm's pretrained encoder weights (hub or local HF cache); local files go through
            ``load_encoder_weights``.
        decoder_channels: decoder widths, deep to shallow; ``None`` derives them from the encoder.
        size_mismatch: ``"pad"`` or ``"error"`` for inputs not divisible by the output stride.
        encoder_depth: keep only the first ``encoder_depth`` stages (a shallower, cheaper encoder).
        pad_mode: ``F.pad`` mode used by ``size_mismatch="pad"``.
        head_dropout: ``Dropout2d`` rate before the 1x1 head (0: none).

    Raises:
        KeyError: unknown architecture (lists the valid names).
        ValueError: unknown encoder (with the closest timm names) or invalid sizes.
    """
    factory = ARCHITECTURES.get(arch)
    if encoder_depth is not None and encoder_depth < 1:
        raise ValueError(f"encoder_depth must be >= 1, got {encoder_depth}")
    out_indices = None if encoder_depth is None else tuple(range(encoder_depth))
    timm_encoder = TimmEncoder(encoder, in_channels, pretrained=pretrained, out_indices=out_indices)
    decoder = factory(timm_encoder.channels, timm_encoder.reductions, decoder_channels)
    return SegmentationModel(timm_encoder, decoder, num_classes, size_mismatch=size_mismatch, pad_mode=pad_mode,
                             head_dropout=head_dropout)
