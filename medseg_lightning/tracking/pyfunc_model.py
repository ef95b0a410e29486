"""The MLflow pyfunc model, logged "from code": MLflow stores this file, not a pickled object.

``load_context`` rebuilds the network from the logged bundle (config YAML + safetensors weights), so loading a
model never unpickles code. ``predict`` takes preprocessed slices ``(N, C, H, W)`` float32 and returns labels
``(N, H, W)`` uint8; with ``params={"output": "probabilities"}`` it returns ``(N, K, H, W)`` float32. Instance
models (Mask R-CNN) return an instance-label map per slice, ``(N, H, W)`` int32 (0 = no object).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel

# MLflow advises type hints on predict(); they would describe lists, not tensors (see the signature instead)
warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method.*")


class SegmentationPyfunc(PythonModel):
    """Slices in, labels (or probabilities) out."""

    # predict() has no type hints on purpose: MLflow would turn them into a (wrong) schema; the logged
    # signature, inferred from a real input example, describes the tensors instead.
    def load_context(self, context: Any) -> None:
        from medseg_lightning.inference.bundle import load_bundle

        self.bundle = load_bundle(Path(context.artifacts["bundle"]))

    def predict(self, context, model_input, params=None):
        batch = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        from medseg_lightning.config.tasks import task_of

        task = task_of(self.bundle.config)
        if not task.averages_predictions:  # no probabilities to return: an instance-label map per slice
            return task.predict_slices(self.bundle.network, self.bundle.config, batch)
        with torch.no_grad():
            probabilities = torch.softmax(self.bundle.network(batch), dim=1)
        if (params or {}).get("output") == "probabilities":
            return probabilities.numpy()
        return probabilities.argmax(1).to(torch.uint8).numpy()


mlflow.models.set_model(SegmentationPyfunc())
