"""ONNX export of a trained network, self-describing, so it can be served without Python, PyTorch or medseg.

The exporter is PyTorch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``: ``torch.export``, then
onnxscript), not the TorchScript one (``dynamo=False``): the TorchScript exporter has no symbolic for
``aten::max_unpool2d`` and cannot export SegNet, while the dynamo exporter maps it to ONNX ``MaxUnpool`` and exports
every registered architecture. It also verifies the dynamic batch axis instead of silently tracing constants.

The batch axis is dynamic; height and width are fixed. ``SegmentationModel`` decides in Python, from the input
size, whether to pad to a multiple of the encoder's output stride, and SegNet's unpooling output sizes are Python
ints; an exporter resolves both once, for the example size. With H/W declared dynamic, U-Net and FCN run at every
multiple of the stride but return wrong logits, without an error, at other sizes (the padding is not in the graph),
and SegNet fails at any size but the example. A pinned size makes ONNX Runtime reject other sizes outright.

Needs the packages ``onnx`` and ``onnxscript`` (``onnxruntime`` only to run the file).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import torch

from medseg_lightning import __version__
from medseg_lightning.config.tasks import task_of
from medseg_lightning.inference.bundle import ModelBundle
from medseg_lightning.utilities.files import atomic_write

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
DEFAULT_SIZE = (64, 64)
METADATA_PREFIX = "medseg."
# Metadata values that are plain text; every other medseg.* value is JSON.
_TEXT_KEYS = frozenset({"version", "arch", "encoder", "experiment"})
# The exporter specialises a dimension whose example size is 0 or 1 to a constant, so the example batch is 2.
_EXAMPLE_BATCH = 2
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def export_onnx(
    bundle: ModelBundle, path: Path, opset: int | None = None, *, image_size: tuple[int, int] | None = None
) -> Path:
    """Writes ``bundle``'s network in eval mode as an ONNX file with medseg metadata; returns ``path``.

    The graph takes ``image`` (batch, in_channels, H, W) float32 and returns ``logits`` (batch, num_classes, H, W).
    Batch is dynamic; H and W are fixed to ``image_size``, else the config's
    ``data.preprocessing.target_size``, else 64 x 64 (see the module docstring for why they cannot be dynamic).
    The file is written to a temporary name in the same folder and renamed, so a failure leaves no partial file
    (and an existing file at ``path`` untouched).

    Args:
        bundle: the network with its experiment config and input channel count.
        path: the ``.onnx`` file to write; its folder is created.
        opset: ONNX opset (default: the exporter's recommended one). Below 18 the exporter converts down, and
            raises here if the conversion fails rather than silently keeping a newer opset.
        image_size: (rows, cols) of the exported input, overriding the config (for ``target_size: null``).

    Raises:
        ValueError: missing packages, or the export failed; one line naming the architecture/encoder and cause.
    """
    model = bundle.config.model
    name = f"{model.arch}/{model.encoder}"
    if not task_of(bundle.config).exports_onnx:
        raise ValueError(f"cannot export {name} to ONNX: {bundle.config.task} models are not exported (their output, "
                         "a variable number of detections, has no fixed shape); serve it with mlflow models serve")
    rows, cols = image_size or bundle.config.data.preprocessing.target_size or DEFAULT_SIZE
    size = (int(rows), int(cols))
    missing = [package for package in ("onnx", "onnxscript") if importlib.util.find_spec(package) is None]
    if missing:
        raise ValueError(f"cannot export {name} to ONNX: missing packages {missing}; pip install onnx onnxscript")
    try:
        program = _export_program(bundle.network, bundle.in_channels, size, opset)
    except Exception as exc:  # exporter errors come in many types; the caller gets one ValueError line
        raise ValueError(f"cannot export {name} to ONNX at {size[0]}x{size[1]}: {_cause_line(exc)}") from exc
    produced = program.model.opset_imports.get("")
    if opset is not None and produced != opset:
        raise ValueError(f"cannot export {name} to ONNX opset {opset}: the exporter only produced opset {produced}")
    program.model.metadata_props.update(onnx_metadata(bundle, size))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _write_atomically(program, path)
    except Exception as exc:
        raise ValueError(f"cannot write the ONNX export of {name} to {path}: {_cause_line(exc)}") from exc
    return path


def onnx_metadata(bundle: ModelBundle, image_size: tuple[int, int]) -> dict[str, str]:
    """The ``metadata_props`` that make the file self-describing: what to feed it and what its outputs mean.

    Keys are prefixed ``medseg.``; ``version``, ``arch``, ``encoder`` and ``experiment`` are plain text, the
    others JSON. Data paths are left out on purpose: the file may travel to machines where they mean nothing.
    """
    config = bundle.config
    values: dict[str, Any] = {
        "version": __version__,
        "experiment": config.name,
        "arch": config.model.arch,
        "encoder": config.model.encoder,
        "in_channels": bundle.in_channels,
        "num_classes": config.data.num_classes,
        "labels": {str(index): label for index, label in sorted(config.data.labels.items())},
        "image_columns": list(config.data.image_columns),
        "input_size": list(image_size),
        "preprocessing": config.data.preprocessing.model_dump(mode="json"),
        "slicing": config.data.slicing.model_dump(mode="json"),
        "inference": config.inference.model_dump(mode="json"),
    }
    return {
        METADATA_PREFIX + key: value if key in _TEXT_KEYS else json.dumps(value, sort_keys=True)
        for key, value in values.items()
    }


def read_onnx_metadata(path: Path) -> dict[str, Any]:
    """The medseg metadata of an exported file, decoded (prefix dropped, JSON parsed, label keys as ints)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    decoded: dict[str, Any] = {}
    for entry in proto.metadata_props:
        if not entry.key.startswith(METADATA_PREFIX):
            continue
        key = entry.key.removeprefix(METADATA_PREFIX)
        decoded[key] = entry.value if key in _TEXT_KEYS else json.loads(entry.value)
    if "labels" in decoded:
        decoded["labels"] = {int(index): label for index, label in decoded["labels"].items()}
    return decoded


def _export_program(
    network: torch.nn.Module, in_channels: int, size: tuple[int, int], opset: int | None
) -> torch.onnx.ONNXProgram:
    """Runs the dynamo exporter in eval mode (restoring the caller's mode), batch axis dynamic."""
    parameter = next(network.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    example = torch.zeros(_EXAMPLE_BATCH, in_channels, *size, device=device)
    was_training = network.training
    network.eval()
    try:
        program = torch.onnx.export(
            network,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    finally:
        network.train(was_training)
    if program is None:  # only the TorchScript path returns None
        raise RuntimeError("torch.onnx.export returned no program")
    return program


def _write_atomically(program: torch.onnx.ONNXProgram, path: Path) -> None:
    """Saves through a hidden temporary file next to ``path``. Weights stay inside the file (no external data),
    because external data would be named after the temporary file; ONNX caps such files at 2 GB, far above these
    networks."""
    atomic_write(path, lambda temporary: program.save(temporary, external_data=False))


def _cause_line(exc: BaseException) -> str:
    """One readable line: the exporter wraps the real cause (unsupported op, shape guard) in a generic error."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    lines = [line.strip() for line in _ANSI.sub("", str(cause)).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    text = f"{type(cause).__name__}: {text}" if text else type(cause).__name__
    return text if len(text) <= 300 else text[:297] + "..."
