"""Segmentation networks: any timm encoder (``features_only``) with a registered decoder and a 1x1 head."""

from __future__ import annotations

from medseg_lightning.models.base import ARCHITECTURES, Decoder
from medseg_lightning.models.encoder import TimmEncoder
from medseg_lightning.models.pretrained import LoadReport, load_encoder_weights
from medseg_lightning.models.segmentation import SegmentationModel, create_model

__all__ = [
    "ARCHITECTURES",
    "Decoder",
    "LoadReport",
    "SegmentationModel",
    "TimmEncoder",
    "create_model",
    "load_encoder_weights",
]
