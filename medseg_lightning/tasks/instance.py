"""Instance segmentation: Mask R-CNN on a timm backbone finds separate objects, joined across slices in 3D."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg_lightning.config.schema import ExperimentConfig, MaskRCNNModelConfig
from medseg_lightning.data.datamodule import SegmentationDataModule
from medseg_lightning.data.instances import Objects, box_sides
from medseg_lightning.data.io import Volume
from medseg_lightning.data.preprocess import restore_volume
from medseg_lightning.evaluation.instance_scoring import evaluate_instance_cases, score_instance_case
from medseg_lightning.evaluation.scoring import EvaluationReport
from medseg_lightning.inference.detections import detect_slices, objects_from_detections, paint_slices
from medseg_lightning.inference.inputs import PredictInput
from medseg_lightning.inference.instance_outputs import write_objects
from medseg_lightning.inference.predict import Predictor
from medseg_lightning.models.mask_rcnn import anchor_sizes_for, create_mask_rcnn
from medseg_lightning.training.instance_module import InstanceModule

DEFAULT_IMAGE_SIZE = (64, 64)


def detector_settings(config: ExperimentConfig) -> MaskRCNNModelConfig:
    """The model section of an instance config (the schema pairs ``task: instance`` with ``arch: mask_rcnn``)."""
    if not isinstance(config.model, MaskRCNNModelConfig):
        raise TypeError(f"task 'instance' needs model.arch mask_rcnn, got {config.model.arch!r}")
    return config.model


class InstanceTask:
    """Detections, not logits: a model predicts alone (no ensemble, no TTA), unfolded, served but not exported."""

    name = "instance"
    averages_predictions = False
    folds_for_inference = False  # Mask R-CNN's RoI heads stay as torchvision made them
    exports_onnx = False  # a variable number of detections has no fixed output shape
    detects_objects = True

    def prepare(self, config: ExperimentConfig, datamodule: SegmentationDataModule) -> ExperimentConfig:
        """``model.anchor_sizes`` as configured, else spanning the training objects' sizes (``anchor_sizes_for``)."""
        model = detector_settings(config)
        if model.anchor_sizes:
            return config
        cases = datamodule.dataset.split("train")
        sides = box_sides([case.instances for case in cases if case.instances is not None])
        sizes = anchor_sizes_for(sides, config.data.preprocessing.target_size or DEFAULT_IMAGE_SIZE)
        print(f"anchor sizes from {len(sides)} training objects: {sizes} pixels")
        return config.model_copy(update={"model": model.model_copy(update={"anchor_sizes": sizes})})

    def build_network(self, config: ExperimentConfig, in_channels: int, pretrained: bool) -> nn.Module:
        model = detector_settings(config)
        return create_mask_rcnn(model.encoder, in_channels, config.data.num_classes,
                                config.data.preprocessing.target_size or DEFAULT_IMAGE_SIZE, model.anchor_sizes,
                                pretrained=pretrained, fpn_channels=model.fpn_channels,
                                detections_per_image=model.detections_per_image,
                                score_threshold=model.score_threshold)

    def lightning_module(self, config: ExperimentConfig, network: nn.Module) -> InstanceModule:
        return InstanceModule(network, config.data.labels, config.optimizer,
                              score_threshold=detector_settings(config).score_threshold,
                              encoder_freeze_epochs=config.model.encoder_freeze_epochs,
                              encoder_lr_multiplier=config.model.encoder_lr_multiplier,
                              inference_batch_size=config.trainer.inference_batch_size, fairness=config.fairness)

    def predict_slices(self, network: nn.Module, config: ExperimentConfig, slices: torch.Tensor) -> np.ndarray:
        """An instance-label map per slice (int32, ids unique within the call)."""
        detections = detect_slices(network, slices, max(1, len(slices)))
        return paint_slices(detections, tuple(slices.shape[-2:]), detector_settings(config).score_threshold).ids

    def evaluate(self, network: nn.Module, cases: Any, split: str, config: ExperimentConfig) -> EvaluationReport:
        labels, batch = dict(config.data.labels), config.trainer.inference_batch_size
        threshold = detector_settings(config).score_threshold
        return evaluate_instance_cases(
            cases, split, config, lambda item: score_instance_case(network, item, labels, batch, threshold))

    def write_prediction(self, predictor: Predictor, volume: Volume, case: PredictInput, reference: Any,
                         out_dir: Path) -> tuple[Path, np.ndarray]:
        """The instance map and the object table; the merged label map for the overlay."""
        slices, meta = predictor.preprocessed_slices(volume, case.name)
        min_score = predictor.min_score
        if min_score is None:
            min_score = detector_settings(predictor.config).score_threshold
        network = predictor.networks[0]
        network.detector.roi_heads.score_thresh = min_score  # the detector drops low scores before its mask head
        detections = detect_slices(network, slices, predictor.batch_size)
        found = objects_from_detections(detections, tuple(slices.shape[-2:]), min_score)
        objects = Objects(restore_volume(found.ids, meta), found.classes, found.scores)
        return write_objects(objects, case, volume, reference, predictor.config, out_dir)
