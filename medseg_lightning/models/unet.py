"""U-Net decoder (Ronneberger et al. 2015): upsample, concatenate the encoder map of that resolution, two convs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg_lightning.models.base import ARCHITECTURES, Decoder, double_conv, resolve_decoder_channels


@ARCHITECTURES.register("unet")
class UNetDecoder(Decoder):
    """U-Net decoder over any number of encoder stages.

    One block per skip level (deep to shallow): nearest upsampling to the skip's size, concatenation, two
    conv-BN-ReLU. When the shallowest stage is already downsampled (reduction > 1, as for most timm encoders) one
    more block without skip upsamples to the input resolution, so the output is full resolution (as in
    segmentation_models_pytorch). Nearest upsampling instead of the paper's 2x2 up-convolution avoids
    checkerboard artefacts and works for any stage ratio.

    Args:
        encoder_channels: channels per encoder stage, shallow to deep.
        encoder_reductions: stride per encoder stage, shallow to deep.
        decoder_channels: width of each block, deep to shallow; ``None`` derives (256, 128, 64, 32, 16)[:blocks].
    """

    def __init__(
        self, encoder_channels: list[int], encoder_reductions: list[int], decoder_channels: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        self.final_scale = encoder_reductions[0]
        n_blocks = len(encoder_channels) - 1 + (self.final_scale > 1)
        widths = resolve_decoder_channels("unet", decoder_channels, n_blocks)
        skips = encoder_channels[-2::-1]  # deep to shallow, the deepest map is the decoder's input
        in_channels = [encoder_channels[-1], *widths[:-1]]
        self.blocks = nn.ModuleList(
            double_conv(c_in + c_skip, c_out) for c_in, c_skip, c_out in zip(in_channels, skips, widths, strict=False)
        )
        self.final = double_conv(in_channels[-1], widths[-1]) if self.final_scale > 1 else None
        self.out_channels = widths[-1]
        self.output_reduction = 1

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for block, skip in zip(self.blocks, features[-2::-1], strict=True):
            if x.shape[-2:] != skip.shape[-2:]:
                x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = block(torch.cat([x, skip], dim=1))
        if self.final is not None:
            x = self.final(F.interpolate(x, scale_factor=self.final_scale, mode="nearest"))
        return x
