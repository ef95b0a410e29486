"""A task is chosen once from the config and asked, not tested by name: a new one is a module and a registry line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from medseg_lightning.config import ConfigError, load_config
from medseg_lightning.config import tasks as task_registry
from medseg_lightning.inference.bundle import build_network, load_bundle, predict_slices, save_bundle
from medseg_lightning.tasks.semantic import SemanticTask


class _Constant(nn.Module):
    """Predicts class 1 everywhere: easy to tell from any real network."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), 2, *x.shape[-2:])
        logits[:, 1] = 1.0
        return logits + self.weight


class ConstantTask(SemanticTask):
    """A third task, as another package would add it: only the network differs."""

    name = "constant"

    def build_network(self, config, in_channels: int, pretrained: bool) -> nn.Module:
        return _Constant()


def _experiment(tmp_path: Path, task: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "task": task, "data": {"source": str(tmp_path)},
                                    "model": {"encoder": "test_resnet"}}))
    return path


def test_a_registered_task_is_accepted_built_saved_and_loaded(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(task_registry.BUILT_IN, "constant", f"{__name__}:ConstantTask")
    task_registry._load.cache_clear()
    config = load_config(_experiment(tmp_path, "constant"))
    network = build_network(config, 1)
    assert isinstance(network, _Constant)
    labels = predict_slices(network, config, torch.zeros(2, 1, 8, 8))
    assert np.array_equal(labels, np.ones((2, 8, 8), np.uint8))
    bundle = load_bundle(save_bundle(network, config, 1, tmp_path / "model"))  # rebuilt through the task
    assert isinstance(bundle.network, _Constant)
    task_registry._load.cache_clear()


def test_an_unknown_task_is_refused_with_the_valid_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(_experiment(tmp_path, "instanse"))
    assert "unknown task 'instanse'" in str(error.value) and "'instance'" in str(error.value)
    assert "semantic" in str(error.value)


def test_the_built_in_tasks_say_what_they_support() -> None:
    semantic, instance = task_registry.task_of("semantic"), task_registry.task_of("instance")
    assert semantic.averages_predictions and semantic.exports_onnx and not semantic.detects_objects
    assert instance.detects_objects and not instance.averages_predictions and not instance.exports_onnx
