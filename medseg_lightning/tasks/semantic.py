"""Semantic segmentation: a class label per pixel from a timm encoder and a registered decoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg_lightning.config.schema import DecoderModelConfig, ExperimentConfig
from medseg_lightning.data.datamodule import SegmentationDataModule
from medseg_lightning.data.io import Volume
from medseg_lightning.evaluation.instance_scoring import evaluate_instance_cases, score_components_case
from medseg_lightning.evaluation.scoring import EvaluationReport, evaluate_cases
from medseg_lightning.inference.folding import prepare_for_inference
from medseg_lightning.inference.inputs import PredictInput
from medseg_lightning.inference.outputs import write_label_map
from medseg_lightning.inference.postprocess import classes_to_clean
from medseg_lightning.inference.predict import Predictor
from medseg_lightning.models.segmentation import create_model
from medseg_lightning.training.losses import create_loss
from medseg_lightning.training.segmentation_module import SegmentationModule


class SemanticTask:
    """Logits ``(N, K, H, W)``: averaged by ensembles and TTA, folded for inference, exported to ONNX."""

    name = "semantic"
    averages_predictions = True
    folds_for_inference = True
    exports_onnx = True
    detects_objects = False

    def prepare(self, config: ExperimentConfig, datamodule: SegmentationDataModule) -> ExperimentConfig:
        return config

    def build_network(self, config: ExperimentConfig, in_channels: int, pretrained: bool) -> nn.Module:
        model = config.model
        if not isinstance(model, DecoderModelConfig):
            raise TypeError(f"task 'semantic' needs a decoder architecture, got model.arch {model.arch!r}")
        return create_model(model.arch, model.encoder, in_channels, config.data.num_classes, pretrained=pretrained,
                            decoder_channels=model.decoder_channels, size_mismatch=model.size_mismatch,
                            head_dropout=model.head_dropout or 0.0)

    def lightning_module(self, config: ExperimentConfig, network: nn.Module) -> SegmentationModule:
        loss = create_loss(config.loss.name, config.data.num_classes, class_weights=config.loss.class_weights,
                           **config.loss.params)
        return SegmentationModule(
            network, loss, config.data.labels, config.optimizer, fairness=config.fairness,
            encoder_freeze_epochs=config.model.encoder_freeze_epochs,
            encoder_lr_multiplier=config.model.encoder_lr_multiplier,
            inference_batch_size=config.trainer.inference_batch_size, overlay_cases=config.tracking.log_overlays,
            channels_last=config.trainer.channels_last,
            keep_largest=classes_to_clean(config.inference.largest_component, config.data.labels),
            compile_network=config.trainer.compile)

    def predict_slices(self, network: nn.Module, config: ExperimentConfig, slices: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return network(slices).argmax(1).to(torch.uint8).numpy()

    def evaluate(self, network: nn.Module, cases: Any, split: str, config: ExperimentConfig) -> EvaluationReport:
        """On instance data (``data.instances``) its objects are the connected components of its labels, so it
        can be compared with an instance model on the same objects."""
        if config.data.instances is not None:
            connectivity = config.data.instances.connectivity
            return evaluate_instance_cases(
                cases, split, config,
                lambda item: score_components_case(network, item, dict(config.data.labels),
                                                   config.trainer.inference_batch_size, connectivity))
        return evaluate_cases(prepare_for_inference(network), cases, split, config)  # same logits, faster

    def write_prediction(self, predictor: Predictor, volume: Volume, case: PredictInput, reference: Any,
                         out_dir: Path) -> tuple[Path, np.ndarray]:
        labels = predictor.segment(volume, case.name)
        return write_label_map(labels, volume, case, reference, predictor.config.data.label_mapping, out_dir), labels
