"""The one encoder interface: any timm model built with ``features_only=True``, described by ``feature_info``.

Decoders only ever see ``channels`` and ``reductions`` per stage, so any timm name works as an encoder and no
decoder hard-codes a channel list.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Any

import timm
import torch
from timm.models import FeatureDictNet
from torch import nn

FeatureTransform = Callable[[int, torch.Tensor], Any]
"""Called as ``transform(stage_index, feature_map)`` right after a stage is produced; its result is kept instead."""


class TimmEncoder(nn.Module):
    """A timm ``features_only`` model that reports its stages' channels and reductions.

    Args:
        name: any timm model name (``timm.list_models()``), optionally with a pretrained tag (``resnet18.a1_in1k``).
        in_channels: input channels; timm adapts the first convolution (and its pretrained weights) to it.
        pretrained: load timm's pretrained weights (Hugging Face hub or its local cache).
        out_indices: which stages to return; ``None`` keeps timm's default for the model.

    Raises:
        ValueError: unknown model name (with the closest timm names) or stages the model does not have.
        RuntimeError: ``pretrained=True`` but the weights cannot be fetched (offline, not in the cache).
    """

    def __init__(
        self, name: str, in_channels: int = 3, pretrained: bool = False, out_indices: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        _check_model_name(name)
        self.name = name
        self.in_channels = in_channels
        self.model = _create_features_model(name, in_channels, pretrained, out_indices)
        info = self.model.feature_info
        self.channels: list[int] = [int(c) for c in info.channels()]
        self.reductions: list[int] = [int(r) for r in info.reduction()]
        self.output_stride: int = max(self.reductions)

    @property
    def first_conv(self) -> list[str]:
        """Names of the input convolution(s) in the original (non-features) timm model, for weight adaptation."""
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        traits = getattr(self.model, "_traits", None) or {}
        names = traits.get("first_conv") or cfg.get("first_conv") or []
        return [names] if isinstance(names, str) else list(names)

    @property
    def streams_stages(self) -> bool:
        """Whether ``forward`` runs the stages one by one, so a transform can free each map before the next stage.

        timm's ``FeatureListNet``/``FeatureDictNet`` are ordered module dicts and can be walked stage by stage.
        Other feature classes (EfficientNet/MobileNet feature nets, hook- and getter-based wrappers) only hand out
        all maps together at the end of their own forward; so does timm's gradient checkpointing, when enabled.
        """
        return isinstance(self.model, FeatureDictNet) and not self.model.grad_checkpointing

    def forward(self, x: torch.Tensor, transform: FeatureTransform | None = None) -> list[Any]:
        """Stage outputs, shallow to deep, each passed through ``transform`` when one is given.

        With a transform, only its results are kept: on stage-walkable models the float map is released as soon
        as the next stage has consumed it (unless autograd saved it for backward); on the others it is released
        when timm's forward returns.
        """
        if transform is None:
            return list(self.model(x))
        if not self.streams_stages:
            features = list(self.model(x))
            return [transform(i, features.pop(0)) for i in range(len(self.channels))]
        return self._forward_streaming(x, transform)

    def _forward_streaming(self, x: torch.Tensor, transform: FeatureTransform) -> list[Any]:
        # Walks the stages as timm's FeatureDictNet does internally (its private _collect, without gradient
        # checkpointing), keeping transform results only: pinned by test_stage_by_stage_forward_matches_timm, which
        # fails on a timm upgrade that changes the walk.
        model = self.model
        kept: list[Any] = []
        for name, module in model.items():
            x = module(x)
            if name in model.return_layers:
                feature = x
                if isinstance(feature, tuple | list):
                    feature = torch.cat(feature, 1) if model.concat else feature[0]
                kept.append(transform(len(kept), feature))
                del feature
        return kept


def _check_model_name(name: str) -> None:
    if ":" in name:  # hf-hub:org/model or local-dir:/path; timm resolves (and validates) those itself
        return
    if timm.is_model(name):
        return
    base = name.split(".", 1)[0]
    close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.5)
    hint = f" Closest timm names: {', '.join(close)}." if close else ""
    raise ValueError(
        f"unknown timm encoder {name!r}.{hint} List candidates with timm.list_models('*resnet*') "
        "(any timm model that supports features_only works)."
    )


def _create_features_model(
    name: str, in_channels: int, pretrained: bool, out_indices: Sequence[int] | None
) -> nn.Module:
    kwargs: dict[str, Any] = {"features_only": True, "in_chans": in_channels, "pretrained": pretrained}
    if out_indices is not None:
        kwargs["out_indices"] = tuple(out_indices)
    try:
        return timm.create_model(name, **kwargs)
    except (IndexError, AssertionError) as error:
        if out_indices is None:
            raise
        stages = len(timm.create_model(name, features_only=True, pretrained=False).feature_info)
        raise ValueError(
            f"encoder {name!r} has {stages} feature stages (indices 0..{stages - 1}); "
            f"out_indices {tuple(out_indices)} asks for others"
        ) from error
    except OSError as error:  # huggingface_hub's offline / HTTP errors are OSErrors
        if not pretrained:
            raise
        raise RuntimeError(
            f"could not load timm's pretrained weights for encoder {name!r}: this machine looks offline and the "
            "weights are not in the local Hugging Face cache (HF_HOME / HF_HUB_CACHE). Use `model.pretrained: none` "
            "to start from random weights, point `model.pretrained` at a local .safetensors/.pth file, or download "
            "the weights once on a connected machine into the cache (HF_HUB_OFFLINE=1 makes this fail fast). "
            f"Cause: {type(error).__name__}: {error}"
        ) from error
    except RuntimeError as error:
        if pretrained and "No pretrained weights exist" in str(error):
            raise RuntimeError(
                f"timm knows no pretrained weights for encoder {name!r}; use `model.pretrained: none` or a local file"
            ) from error
        if "Invalid pretrained tag" in str(error):
            pattern = name.split(".", 1)[0] + "*"
            raise ValueError(f"encoder {name!r}: {error} See timm.list_pretrained({pattern!r}).") from error
        raise
