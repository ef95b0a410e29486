"""Mask R-CNN (He et al. 2017) on any timm encoder: the encoder's last four stages feed a feature pyramid
(Lin et al. 2017) whose maps go to torchvision's region proposal network and box and mask heads.

Semantic decoders label pixels; Mask R-CNN finds separate objects (lesions, nodules, nuclei), so two touching
objects of one class stay two. The encoder is the same ``TimmEncoder`` as the semantic models, so transfer
weights load the same way (``network.encoder``). Inputs arrive already normalised by the data pipeline, so
torchvision's own normalisation is the identity and its resizing is fixed to the training size (scale 1).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from medseg_lightning.models.encoder import TimmEncoder

PYRAMID_STAGES = 4  # encoder stages fed to the pyramid; with the extra max-pooled level, 5 anchor levels
ASPECT_RATIOS = (0.5, 1.0, 2.0)


class TimmFeaturePyramid(nn.Module):
    """The encoder's deepest ``PYRAMID_STAGES`` maps through a feature pyramid, as torchvision's heads expect."""

    def __init__(self, encoder: TimmEncoder, out_channels: int) -> None:
        super().__init__()
        if len(encoder.channels) < PYRAMID_STAGES:
            raise ValueError(f"encoder {encoder.name!r} has {len(encoder.channels)} stages; Mask R-CNN's feature "
                             f"pyramid needs {PYRAMID_STAGES}")
        self.encoder = encoder
        self.fpn = FeaturePyramidNetwork(encoder.channels[-PYRAMID_STAGES:], out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.encoder(x)[-PYRAMID_STAGES:]
        return self.fpn(OrderedDict((str(i), feature) for i, feature in enumerate(features)))


class InstanceSegmentationModel(nn.Module):
    """Mask R-CNN with a timm encoder. ``forward(images, targets)`` returns the loss dict when training and, in
    eval mode, one dict per image: ``boxes`` (N, 4), ``labels`` (N,), ``scores`` (N,), ``masks`` (N, 1, H, W)."""

    def __init__(self, encoder: TimmEncoder, num_classes: int, image_size: Sequence[int],
                 anchor_sizes: Sequence[int], fpn_channels: int = 256, detections_per_image: int = 100,
                 score_threshold: float = 0.05) -> None:
        super().__init__()
        if len(anchor_sizes) != PYRAMID_STAGES + 1:
            raise ValueError(f"model.anchor_sizes: {len(anchor_sizes)} value(s); Mask R-CNN's pyramid has "
                             f"{PYRAMID_STAGES + 1} levels, one anchor size each")
        anchors = AnchorGenerator(sizes=tuple((int(size),) for size in anchor_sizes),
                                  aspect_ratios=(ASPECT_RATIOS,) * len(anchor_sizes))
        channels = encoder.in_channels
        self.detector = MaskRCNN(
            TimmFeaturePyramid(encoder, fpn_channels), num_classes=None, min_size=min(image_size),
            max_size=max(image_size), image_mean=[0.0] * channels, image_std=[1.0] * channels,
            rpn_anchor_generator=anchors, box_detections_per_img=detections_per_image,
            box_batch_size_per_image=64, box_score_thresh=score_threshold, **roi_heads(fpn_channels, num_classes))
        self.num_classes = num_classes

    @property
    def encoder(self) -> TimmEncoder:
        """The timm encoder (not a second registered module: its weights live once, under the detector)."""
        return self.detector.backbone.encoder

    def forward(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        return self.detector(list(images), targets)


def roi_heads(width: int, num_classes: int) -> dict[str, nn.Module]:
    """Box and mask heads as wide as the pyramid. torchvision fixes them at 256 channels (mask convolutions) and
    1024 features (box MLP) whatever the pyramid's width; at ``width`` 256 these are exactly its heads, and a
    narrower pyramid for small slices gets proportionally narrower heads, where the mask head's four 3x3
    convolutions over every positive region dominate a CPU training step."""
    representation = 4 * width
    return {"box_head": TwoMLPHead(width * 7 * 7, representation),
            "box_predictor": FastRCNNPredictor(representation, num_classes),
            "mask_head": MaskRCNNHeads(width, (width,) * 4, 1),
            "mask_predictor": MaskRCNNPredictor(width, width, num_classes)}


def create_mask_rcnn(encoder: str, in_channels: int, num_classes: int, image_size: Sequence[int],
                     anchor_sizes: Sequence[int] | None, pretrained: bool = False, fpn_channels: int = 256,
                     detections_per_image: int = 100, score_threshold: float = 0.05) -> InstanceSegmentationModel:
    """Mask R-CNN for ``num_classes`` classes (background included) on ``image_size`` slices; detections below
    ``score_threshold`` are dropped before the mask head runs (faster inference)."""
    sizes = list(anchor_sizes) if anchor_sizes else default_anchor_sizes(image_size)
    return InstanceSegmentationModel(TimmEncoder(encoder, in_channels, pretrained), num_classes, image_size, sizes,
                                     fpn_channels, detections_per_image, score_threshold)


def default_anchor_sizes(image_size: Sequence[int]) -> list[int]:
    """Without training objects to go by: from 1/16 of the image side, doubling per level (at least 4 px)."""
    side = min(image_size)
    return [max(4, round(side / 16 * 2**level)) for level in range(PYRAMID_STAGES + 1)]


def anchor_sizes_for(object_sizes: Sequence[float], image_size: Sequence[int]) -> list[int]:
    """Anchor sizes spanning the training objects: a geometric series from their 5th percentile to their largest
    box side (the square root of the box area), one per pyramid level, so every object has an anchor near its
    size; torchvision's defaults (32 to 512 pixels) would miss the small objects of medical slices."""
    if not len(object_sizes):
        return default_anchor_sizes(image_size)
    values = sorted(float(size) for size in object_sizes)
    low = max(4.0, values[int(0.05 * (len(values) - 1))])
    high = max(low * 2, values[-1])
    high = min(high, float(max(image_size)))
    ratio = (high / low) ** (1 / PYRAMID_STAGES)
    sizes: list[int] = []
    for level in range(PYRAMID_STAGES + 1):  # strictly increasing, one size per level
        sizes.append(max(round(low * ratio**level), sizes[-1] + 1 if sizes else 4))
    return sizes


def object_box_side(mask: torch.Tensor) -> float:
    """Square root of the box area of one object mask ``(H, W)``."""
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return math.sqrt(float((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)))
