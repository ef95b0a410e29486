"""``medseg predict``: segment new NIfTI volumes, DICOM series and 2D images with trained models.

The input goes through exactly the preprocessing the model was trained with (``preprocess_case`` with the
model's own config), the slices are predicted in batches, re-stacked into the case's canonical voxel grid with
``restore_volume``, and written back in the input's own orientation, affine and header geometry. Outputs are
written to a temporary name and renamed, so an error never leaves a partial file.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medseg_lightning.config.tasks import task_of
from medseg_lightning.data.cache import preprocess_case
from medseg_lightning.data.dataset import stack_context
from medseg_lightning.data.io import DataError, Volume
from medseg_lightning.data.preprocess import restore_volume
from medseg_lightning.inference.bundle import ModelBundle, check_compatible
from medseg_lightning.inference.folding import prepare_for_inference
from medseg_lightning.inference.inputs import PredictInput, check_finite, load_input
from medseg_lightning.inference.outputs import write_continuous_map, write_label_map, write_overlay
from medseg_lightning.inference.postprocess import classes_to_clean, keep_largest_components
from medseg_lightning.inference.scale import check_spacing
from medseg_lightning.inference.uncertainty import MemberSummary, case_uncertainty, summarise_members

FLIP_VIEWS: list[tuple[int, ...]] = [(), (-1,), (-2,)]  # TTA: as is, and flipped along each in-plane axis


class Predictor:
    """One model or an ensemble (probabilities averaged), with optional flip test-time augmentation."""

    def __init__(self, bundles: list[ModelBundle], tta: bool | None = None, largest_component: bool | None = None,
                 batch_size: int | None = None, device: str | None = None, optimize: bool = True,
                 min_score: float | None = None, mc_dropout: int = 0, check_scale: bool = True) -> None:
        """``optimize``: run inference copies of the networks (BatchNorm folded, channels-last memory), which
        compute the same output faster; ``min_score``: instance models keep detections from this score on
        (default: the model's ``score_threshold``); ``mc_dropout``: that many passes per model and view with
        its dropout layers sampling (Monte-Carlo dropout), each pass one member; ``check_scale``: refuse inputs
        whose voxel size the model was not trained on (``scale.check_spacing``)."""
        first = bundles[0].config
        for bundle in bundles[1:]:
            check_compatible(first, bundle.config)
        self.config = first
        self.task = task_of(first)
        self.in_channels = bundles[0].in_channels
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        optimize = optimize and self.task.folds_for_inference
        self.memory_format = torch.channels_last if optimize else torch.contiguous_format
        self.networks = [(prepare_for_inference(bundle.network) if optimize else bundle.network.eval()).to(self.device)
                         for bundle in bundles]
        self.temperatures = [bundle.config.inference.temperature or 1.0 for bundle in bundles]
        self.training_spacing = bundles[0].training_spacing if check_scale else None
        self.tta = first.inference.tta if tta is None else tta
        chosen = first.inference.largest_component if largest_component is None else largest_component
        self.keep_largest = classes_to_clean(chosen, first.data.labels)
        self.batch_size = batch_size or first.trainer.inference_batch_size
        if not self.task.averages_predictions and (len(bundles) > 1 or self.tta):
            raise ValueError(f"{self.task.name} models predict alone: no --tta and no ensemble of several --model")
        if min_score is not None and not self.task.detects_objects:
            raise ValueError("--min-score applies to instance models (Mask R-CNN) only")
        self.min_score = min_score
        if mc_dropout < 0:
            raise ValueError(f"--mc-dropout {mc_dropout}: the number of dropout passes cannot be negative")
        self.mc_dropout = mc_dropout
        if mc_dropout:
            self._sample_dropout(bundles)

    @property
    def members(self) -> int:
        """How many softmax outputs are averaged: models x views (3 with flip TTA)."""
        return len(self.networks) * (len(FLIP_VIEWS) if self.tta else 1) * max(1, self.mc_dropout)

    @property
    def modalities(self) -> int:
        return len(self.config.data.image_columns)

    def segment(self, volume: Volume, name: str) -> np.ndarray:
        """Labels ``(X, Y, Z)`` (uint8) in the volume's canonical voxel grid."""
        slices, meta = self.preprocessed_slices(volume, name)
        prediction = restore_volume(self.labels(slices).numpy(), meta)
        return keep_largest_components(prediction, self.keep_largest)

    def preprocessed_slices(self, volume: Volume, name: str) -> tuple[torch.Tensor, dict]:
        """The case's preprocessed (2.5D) slices, as in training, and the geometry to put predictions back."""
        channels = volume.array.shape[0]
        context = self.config.data.slicing.context
        if channels * (2 * context + 1) != self.in_channels:
            raise DataError(f"{name}: {channels} channel(s); the model takes {self.in_channels // (2 * context + 1)} "
                            f"({', '.join(self.config.data.image_columns)})")
        check_spacing(volume, name, self.config, self.training_spacing)
        slices, _, _, meta = preprocess_case(volume, None, self.config.data)
        stacked = stack_context(slices, np.arange(len(slices)), context)
        return torch.from_numpy(np.ascontiguousarray(stacked, dtype=np.float32)), meta

    @torch.inference_mode()
    def labels(self, slices: torch.Tensor) -> torch.Tensor:
        """Labels ``(S, H, W)`` uint8; one model without TTA takes the argmax of its logits (no softmax needed)."""
        if self.members == 1:
            network = self.networks[0]
            return torch.cat([network(self._batch(slices, start)).argmax(1).to(torch.uint8).cpu()
                              for start in range(0, len(slices), self.batch_size)])
        return self.probabilities(slices).argmax(1).to(torch.uint8)

    @torch.inference_mode()
    def probabilities(self, slices: torch.Tensor) -> torch.Tensor:
        """Softmax ``(S, K, H, W)`` averaged over models (and flips), computed in batches."""
        chunks = []
        with self._seeded():
            for start in range(0, len(slices), self.batch_size):
                members = self._members(self._batch(slices, start))
                total = next(members)
                count = 1
                for probability in members:
                    total, count = total + probability, count + 1
                chunks.append((total / count).cpu())
        return torch.cat(chunks)

    @torch.inference_mode()
    def member_summary(self, slices: torch.Tensor) -> MemberSummary:
        """The averaged probabilities with the members' entropy, mutual information and own labels."""
        with self._seeded():
            parts = [summarise_members(probability.cpu() for probability in self._members(self._batch(slices, start)))
                     for start in range(0, len(slices), self.batch_size)]
        return MemberSummary(torch.cat([part.probabilities for part in parts]),
                             torch.cat([part.entropy for part in parts]),
                             torch.cat([part.mutual_information for part in parts]),
                             torch.cat([part.member_labels for part in parts], dim=1))

    def segment_with_uncertainty(self, volume: Volume, name: str) -> UncertainSegmentation:
        """``segment`` with the uncertainty maps and the members' labels, all in the canonical voxel grid."""
        if not self.task.averages_predictions:
            raise ValueError(f"--uncertainty: {self.task.name} models predict alone (no members to compare); it "
                             "applies to semantic models, from an ensemble (--model repeated) and/or --tta")
        slices, meta = self.preprocessed_slices(volume, name)
        summary = self.member_summary(slices)
        labels = keep_largest_components(restore_volume(summary.probabilities.argmax(1).to(torch.uint8).numpy(),
                                                        meta), self.keep_largest)
        members = (np.stack([restore_volume(member.numpy(), meta) for member in summary.member_labels])
                   if len(summary.member_labels) > 1 else None)
        return UncertainSegmentation(labels, restore_volume(summary.entropy.numpy(), meta, nearest=False),
                                     restore_volume(summary.mutual_information.numpy(), meta, nearest=False), members)

    def _members(self, batch: torch.Tensor) -> Iterator[torch.Tensor]:
        """Each model's softmax on each view (the flips of TTA put back in place), and each dropout sample."""
        views = FLIP_VIEWS if self.tta else [()]
        for network, temperature in zip(self.networks, self.temperatures, strict=True):
            for dims in views:
                flipped = batch.flip(dims) if dims else batch
                for _ in range(max(1, self.mc_dropout)):
                    probability = torch.softmax(network(flipped).float() / temperature, dim=1)
                    yield probability.flip(dims) if dims else probability

    def _sample_dropout(self, bundles: list[ModelBundle]) -> None:
        """Puts the dropout layers (only them) in training mode, so each pass drops other channels.

        Raises:
            ValueError: a model without dropout (every pass would be the same), or a task that predicts alone.
        """
        if not self.task.averages_predictions:
            raise ValueError(f"--mc-dropout: {self.task.name} models predict alone; it applies to semantic models")
        for bundle, network in zip(bundles, self.networks, strict=True):
            layers = [module for module in network.modules() if isinstance(module, nn.modules.dropout._DropoutNd)]
            if not layers:
                raise ValueError(f"--mc-dropout: the model {bundle.config.name} has no dropout layer; train it with "
                                 "model.head_dropout set (e.g. 0.2), or use --tta or an ensemble for members")
            for layer in layers:
                layer.train()

    @contextlib.contextmanager
    def _seeded(self) -> Iterator[None]:
        """Monte-Carlo dropout from a fixed seed: the same input gives the same maps on every run."""
        if not self.mc_dropout:
            yield
            return
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            yield

    def _batch(self, slices: torch.Tensor, start: int) -> torch.Tensor:
        return slices[start : start + self.batch_size].to(self.device).contiguous(memory_format=self.memory_format)


@dataclass
class UncertainSegmentation:
    """A case's labels with its uncertainty, each ``(X, Y, Z)`` in the canonical grid; ``member_labels``
    ``(M, X, Y, Z)`` is None for a single member."""

    labels: np.ndarray
    entropy: np.ndarray
    mutual_information: np.ndarray
    member_labels: np.ndarray | None


@dataclass
class CaseOutput:
    name: str
    mask: Path
    overlay: Path | None
    seconds: float
    slices: int
    uncertainty: dict[str, float] | None = None  # the case's scores (``case_uncertainty``) with --uncertainty
    foreground: float = 0.0  # predicted foreground volume, in ``volume_unit``
    volume_unit: str = "ml"  # "voxels" for images without a spacing


def predict_case(predictor: Predictor, case: PredictInput, out_dir: Path, overlay: bool = False,
                 uncertainty: bool = False) -> CaseOutput:
    """Segments one case and writes its mask (and overlay, and uncertainty maps) atomically."""
    started = time.perf_counter()
    volume, reference = load_input(case)
    check_finite(volume, case)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = None
    if uncertainty:
        result = predictor.segment_with_uncertainty(volume, case.name)
        labels = result.labels
        mask_path = write_label_map(labels, volume, case, reference, predictor.config.data.label_mapping, out_dir)
        for suffix, values in (("entropy", result.entropy), ("mutual_information", result.mutual_information)):
            write_continuous_map(values, volume, case, reference, out_dir, suffix)
        scores = case_uncertainty(labels, result.entropy, result.member_labels)
    else:
        mask_path, labels = predictor.task.write_prediction(predictor, volume, case, reference, out_dir)
    overlay_path = _overlay(volume, labels, predictor, out_dir, case) if overlay else None
    voxels = float((labels > 0).sum())
    foreground, unit = ((voxels * float(np.prod(volume.spacing)) / 1000.0, "ml") if volume.spacing_known
                        else (voxels, "voxels"))
    return CaseOutput(case.name, mask_path, overlay_path, time.perf_counter() - started, int(labels.shape[2]), scores,
                      foreground, unit)


def _overlay(volume: Volume, labels: np.ndarray, predictor: Predictor, out_dir: Path, case: PredictInput) -> Path:
    return write_overlay(volume, labels, predictor.config, out_dir / f"{case.name}_overlay.png")
