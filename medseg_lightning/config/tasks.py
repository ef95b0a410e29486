"""Tasks (semantic segmentation, instance segmentation, ...): what a kind of model needs at every stage.

A task is one object, chosen once from ``config.task``, that builds its network and LightningModule, predicts
slices, scores cases and writes predictions. The stages call it instead of testing the task's name, so adding a
task is one module (``medseg_lightning/tasks/<name>.py``) and one registry line: a row of ``BUILT_IN`` below, or
an entry point in the ``medseg_lightning.tasks`` group of another package's ``pyproject.toml``::

    [project.entry-points."medseg_lightning.tasks"]
    volumetric = "my_package.volumetric:VolumetricTask"

The implementations live in ``tasks/``, above training, because they compose every stage; the stages below
reach them only through this registry, by name at run time (Python's entry points), never by an import.
"""

from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from medseg_lightning.config.registry import unknown_name_message

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from medseg_lightning.config.schema import ExperimentConfig

GROUP = "medseg_lightning.tasks"
BUILT_IN = {
    "semantic": "medseg_lightning.tasks.semantic:SemanticTask",
    "instance": "medseg_lightning.tasks.instance:InstanceTask",
}


class Task(Protocol):
    """What the stages ask of a task. Arguments typed ``Any`` are objects of higher stages, named in each
    docstring (this module sits below them)."""

    name: str
    averages_predictions: bool  # softmax outputs that ensembles and flip TTA can average
    folds_for_inference: bool  # the folded inference copy (BatchNorm folded, channels-last) computes its outputs
    exports_onnx: bool  # a fixed output shape that ONNX can describe
    detects_objects: bool  # predicts separate objects (scored per object, --min-score applies)

    def prepare(self, config: ExperimentConfig, datamodule: Any) -> ExperimentConfig:
        """The config completed from the training data (``datamodule``: the set-up ``SegmentationDataModule``),
        before the network is built; logged with the model, which is rebuilt from it."""
        ...

    def build_network(self, config: ExperimentConfig, in_channels: int, pretrained: bool) -> nn.Module:
        """The network the config describes for ``in_channels`` inputs (modalities x 2.5D slices)."""
        ...

    def lightning_module(self, config: ExperimentConfig, network: nn.Module) -> pl.LightningModule:
        """The LightningModule that trains ``network`` and scores validation and test cases."""
        ...

    def predict_slices(self, network: nn.Module, config: ExperimentConfig, slices: torch.Tensor) -> np.ndarray:
        """What the logged model returns for preprocessed slices ``(N, C, H, W)``: ``(N, H, W)`` labels."""
        ...

    def evaluate(self, network: nn.Module, cases: Any, split: str, config: ExperimentConfig) -> Any:
        """``medseg evaluate``: every case of ``cases`` (a ``CaseDataset``) scored, then summarised; returns the
        split's ``EvaluationReport``."""
        ...

    def write_prediction(self, predictor: Any, volume: Any, case: Any, reference: Any,
                         out_dir: Path) -> tuple[Path, np.ndarray]:
        """``medseg predict``: segments ``volume`` (a ``Volume`` read from ``case``, a ``PredictInput``) with
        ``predictor`` (a ``Predictor``) and writes it in the input's geometry (``reference``); returns the file
        and the labels in the canonical grid (for the overlay)."""
        ...


def task_names() -> list[str]:
    """The built-in tasks and those that installed packages register."""
    return sorted(set(BUILT_IN) | {entry.name for entry in _plugins()})


def task_of(config: ExperimentConfig | str) -> Task:
    """The task of an experiment (or a task name).

    Raises:
        KeyError: an unknown task, with the valid names.
    """
    name = config if isinstance(config, str) else config.task
    return _load(name)


@functools.cache
def _load(name: str) -> Task:
    plugins = {entry.name: entry for entry in _plugins()}
    if name in BUILT_IN:
        entry = importlib.metadata.EntryPoint(name=name, value=BUILT_IN[name], group=GROUP)
    elif name in plugins:
        entry = plugins[name]
    else:
        raise KeyError(unknown_name_message("task", name, task_names()))
    return entry.load()()


def _plugins() -> list[importlib.metadata.EntryPoint]:
    return [entry for entry in importlib.metadata.entry_points(group=GROUP) if entry.name not in BUILT_IN]
