"""Inference-only copies of a network: BatchNorm folded into the convolution before it, channels-last memory.

In eval mode a BatchNorm after a convolution is an affine map per channel, so it can be folded into that
convolution's weights and bias: one pass over the feature map instead of two. Channels-last memory lets oneDNN
(CPU) and cuDNN (GPU) pick faster convolution kernels. Neither changes what the network computes (tested to
1e-4 for every architecture); together they make ``medseg predict`` about 1.8x faster on a 2-core CPU (see the
inference benchmark). Only plain ``nn.BatchNorm2d`` layers are folded: timm's norm+activation layers
(``BatchNormAct2d``) are left as they are, so any encoder stays correct.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def prepare_for_inference(network: nn.Module, channels_last: bool = True) -> nn.Module:
    """An eval-mode copy with BatchNorm folded into convolutions (and channels-last memory); the input is untouched."""
    folded = copy.deepcopy(network).eval()
    for parent in list(folded.modules()):
        for conv_name, norm_name in _conv_norm_pairs(parent):
            conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, norm))
            setattr(parent, norm_name, nn.Identity())
    return folded.to(memory_format=torch.channels_last) if channels_last else folded


def _conv_norm_pairs(parent: nn.Module) -> list[tuple[str, str]]:
    """Children ``(conv, norm)`` where the norm is applied right after the conv: consecutive in an
    ``nn.Sequential``, or named ``convN``/``bnN`` in a residual block (ResNet, timm's and torchvision's)."""
    children = dict(parent.named_children())
    pairs: list[tuple[str, str]] = []
    if isinstance(parent, nn.Sequential):
        names = list(children)
        pairs += [(a, b) for a, b in itertools.pairwise(names) if _foldable(children[a], children[b])]
    else:
        for name, child in children.items():
            norm = f"bn{name[4:]}" if name.startswith("conv") else None
            if norm in children and _foldable(child, children[norm]):
                pairs.append((name, norm))
    return pairs


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and type(norm) is nn.BatchNorm2d and norm.track_running_stats
            and norm.running_mean is not None and conv.out_channels == norm.num_features)
