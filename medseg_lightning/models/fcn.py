"""FCN decoder (Long et al. 2015): per-stage 1x1 score maps fused coarse to fine, FCN-8s style."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medseg_lightning.models.base import ARCHITECTURES, Decoder, resize_to, resolve_decoder_channels

FUSED_STAGES = 3


@ARCHITECTURES.register("fcn")
class FCNDecoder(Decoder):
    """FCN-8s fusion over the deepest three stages (fewer when the encoder has fewer); no skip decoder.

    Each used stage gets a linear 1x1 "score" projection to a common width; the deepest score map is upsampled
    bilinearly to the next stage's size and summed with its score map, down to the shallowest used stage (stride
    8 for the usual 5-stage encoders). The model's 1x1 head then maps the fused width to class logits (a factorised
    version of the paper's per-stage class scores, so the decoder stays independent of ``num_classes``) and the
    logits are upsampled bilinearly to the input size. Fixed bilinear upsampling replaces the paper's learned
    deconvolutions, which it initialises to bilinear anyway.

    Args:
        encoder_channels: channels per encoder stage, shallow to deep.
        encoder_reductions: stride per encoder stage, shallow to deep.
        decoder_channels: one width for the score maps; ``None`` uses 256.
    """

    def __init__(
        self, encoder_channels: list[int], encoder_reductions: list[int], decoder_channels: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        (width,) = resolve_decoder_channels("fcn", decoder_channels, 1)
        self.n_fused = min(FUSED_STAGES, len(encoder_channels))
        self.first_fused = len(encoder_channels) - self.n_fused
        used = encoder_channels[-self.n_fused :]
        self.scores = nn.ModuleList(nn.Conv2d(c, width, kernel_size=1) for c in used)
        self.out_channels = width
        self.output_reduction = encoder_reductions[-self.n_fused]

    def encode_feature(self, index: int, feature: torch.Tensor) -> torch.Tensor | None:
        """Keeps only the fused stages, so the encoder can release the shallow maps straight away."""
        return feature if index >= self.first_fused else None

    def forward(self, features: list[torch.Tensor | None]) -> torch.Tensor:
        used = features[-self.n_fused :]
        x = self.scores[-1](used[-1])
        for score, feature in zip(self.scores[-2::-1], used[-2::-1], strict=True):
            x = resize_to(x, feature.shape[-2:]) + score(feature)
        return x
