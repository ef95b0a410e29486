"""Transfer learning: where ``model.pretrained`` takes the encoder weights from.

``none`` trains from scratch; ``timm`` is handled when the encoder is created (hub or local Hugging Face cache);
a ``.safetensors``/``.pth`` file or an earlier medseg model (``runs:/ID``, ``models:/NAME/VERSION``) provides the
encoder part of a state dict, with missing and unexpected keys reported.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from medseg_lightning.models.pretrained import load_encoder_weights

MLFLOW_SCHEMES = ("runs:/", "models:/")


def load_pretrained(network: nn.Module, spec: str, root: Path) -> str | None:
    """Loads encoder weights named by ``spec`` into ``network``; returns a one-line report (None if nothing to do).

    Raises:
        ValueError: a weights file that does not exist, or weights that do not fit the encoder at all.
    """
    if spec in ("none", "timm"):
        return None
    if spec.startswith(MLFLOW_SCHEMES):
        from medseg_lightning import tracking

        bundle = tracking.load_logged_bundle(spec, root)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "weights.safetensors"
            save_file({k: v.contiguous() for k, v in bundle.network.state_dict().items()}, str(path))
            report = load_encoder_weights(network, path)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ValueError(
                f"model.pretrained: {path} not found; use none, timm, a .safetensors/.pth file, runs:/<run id> "
                "or models:/<name>/<version>"
            )
        report = load_encoder_weights(network, path)
    return f"pretrained encoder weights from {spec}: {report.summary()}"
