"""ONNX export: ONNX Runtime matches PyTorch for every architecture, metadata round-trips, failures leave no file.

Each architecture is exported on a different tiny timm encoder, so the three encoder kinds are covered too
(``test_convnext`` is the one whose batch axis the exporter specialises when the example batch is 1).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from medseg_lightning import __version__
from medseg_lightning.config.schema import ExperimentConfig
from medseg_lightning.inference.bundle import ModelBundle
from medseg_lightning.inference.export import export_onnx, read_onnx_metadata
from medseg_lightning.models import ARCHITECTURES, create_model

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

CASES = [("unet", "test_convnext"), ("fcn", "test_efficientnet"), ("segnet", "test_resnet")]
LABELS = {0: "background", 1: "organ", 2: "lesion"}


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


def make_bundle(tmp_path: Path, arch: str, encoder: str, in_channels: int = 2, **data: Any) -> ModelBundle:
    config = ExperimentConfig(
        name="export-test",
        data={"source": str(tmp_path), "labels": LABELS, **data},
        model={"arch": arch, "encoder": encoder},
    )
    network = create_model(arch, encoder, in_channels, config.data.num_classes)  # left in training mode on purpose
    return ModelBundle(network=network, config=config, in_channels=in_channels)


def session(path: Path) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the test machines' cores are shared
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_every_architecture_is_covered() -> None:
    assert sorted(arch for arch, _ in CASES) == sorted(ARCHITECTURES.names())


@pytest.mark.parametrize(("arch", "encoder"), CASES)
def test_onnx_runtime_matches_pytorch_with_dynamic_batch(tmp_path: Path, arch: str, encoder: str) -> None:
    bundle = make_bundle(tmp_path, arch, encoder)  # target_size null: exported at the default 64 x 64
    path = export_onnx(bundle, tmp_path / "out" / "model.onnx")
    assert path == tmp_path / "out" / "model.onnx"
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # no temporary left behind
    assert bundle.network.training, "export must restore the caller's training mode"

    runtime = session(path)
    (graph_input,), (graph_output,) = runtime.get_inputs(), runtime.get_outputs()
    assert (graph_input.name, graph_output.name) == ("image", "logits")
    assert graph_input.shape == ["batch", 2, 64, 64]
    network = bundle.network.eval()
    for batch in (1, 3):
        image = torch.randn(batch, 2, 64, 64)
        with torch.no_grad():
            expected = network(image).numpy()
        (logits,) = runtime.run(["logits"], {"image": image.numpy()})
        assert logits.shape == (batch, 3, 64, 64)
        assert np.abs(logits - expected).max() < 1e-4
    with pytest.raises(
        ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="invalid dimensions"
    ):  # H/W are pinned: other sizes are refused, not mis-served
        runtime.run(["logits"], {"image": np.zeros((1, 2, 32, 32), np.float32)})


def test_metadata_round_trips_and_target_size_is_used(tmp_path: Path) -> None:
    preprocessing = {"target_size": [32, 64], "intensity": {"method": "ct_window", "window": [-100, 400]}}
    bundle = make_bundle(
        tmp_path, "fcn", "test_resnet", in_channels=3, preprocessing=preprocessing, slicing={"context": 1}
    )
    path = export_onnx(bundle, tmp_path / "model.onnx", opset=18)

    config = bundle.config
    assert read_onnx_metadata(path) == {
        "version": __version__,
        "experiment": "export-test",
        "arch": "fcn",
        "encoder": "test_resnet",
        "in_channels": 3,
        "num_classes": 3,
        "labels": LABELS,
        "image_columns": ["image"],
        "input_size": [32, 64],
        "preprocessing": config.data.preprocessing.model_dump(mode="json"),
        "slicing": config.data.slicing.model_dump(mode="json"),
        "inference": config.inference.model_dump(mode="json"),
    }
    import onnx

    model = onnx.load(str(path))
    assert {entry.domain: entry.version for entry in model.opset_import}[""] == 18
    runtime = session(path)
    assert runtime.get_inputs()[0].shape == ["batch", 3, 32, 64]
    (logits,) = runtime.run(None, {"image": np.zeros((2, 3, 32, 64), np.float32)})
    assert logits.shape == (2, 3, 32, 64)


class DataDependent(nn.Module):
    """Branches on a tensor value, which ``torch.export`` cannot capture: a genuinely failing export."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if x.sum() > 0 else -self.conv(x)


def test_failing_export_raises_one_line_and_leaves_no_file(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, "segnet", "test_resnet")
    bundle.network = DataDependent()
    previous = tmp_path / "model.onnx"
    previous.write_bytes(b"previous export")
    with pytest.raises(ValueError, match=r"^cannot export segnet/test_resnet to ONNX at 64x64: \S") as error:
        export_onnx(bundle, previous)
    assert "\n" not in str(error.value)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    assert previous.read_bytes() == b"previous export"


def test_failure_while_writing_removes_the_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def save_half(destination: Path, **_: object) -> None:
        Path(destination).write_bytes(b"half a model")
        raise OSError("No space left on device")

    program = SimpleNamespace(model=SimpleNamespace(opset_imports={"": 20}, metadata_props={}), save=save_half)
    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: program)
    bundle = make_bundle(tmp_path, "unet", "test_resnet")
    with pytest.raises(ValueError, match=r"unet/test_resnet.*OSError: No space left on device"):
        export_onnx(bundle, tmp_path / "exports" / "model.onnx")
    assert list((tmp_path / "exports").iterdir()) == []


def test_opset_the_exporter_could_not_reach_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch falls back to opset 18 (logging, not raising) when converting down fails; that must not pass silently.
    program = SimpleNamespace(model=SimpleNamespace(opset_imports={"": 18}, metadata_props={}), save=None)
    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: program)
    with pytest.raises(ValueError, match=r"unet/test_resnet to ONNX opset 11: .*only produced opset 18"):
        export_onnx(make_bundle(tmp_path, "unet", "test_resnet"), tmp_path / "model.onnx", opset=11)
    assert list(tmp_path.iterdir()) == []


def test_missing_exporter_package_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real_find_spec(name, *a)
    )
    with pytest.raises(ValueError, match=r"fcn/test_resnet.*\['onnxscript'\].*pip install onnx onnxscript"):
        export_onnx(make_bundle(tmp_path, "fcn", "test_resnet"), tmp_path / "model.onnx")
