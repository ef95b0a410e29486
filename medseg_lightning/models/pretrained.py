"""Loading encoder weights from a local file: timm checkpoints, our own models, Lightning checkpoints.

Offline machines cannot use ``pretrained=True``; a ``.safetensors``/``.pth`` file on disk is the way in. The file
may hold a plain timm model (classifier included), a whole ``SegmentationModel``, an encoder alone, or a
Lightning checkpoint; prefixes are found automatically, the first convolution is adapted to the model's input
channels as timm does it, and every key that did not load is reported, never dropped silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from timm.models import adapt_input_conv

from medseg_lightning.models.segmentation import SegmentationModel

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
NESTED_KEYS = ("state_dict", "model", "model_state_dict", "network", "net", "module")
MAX_PREFIX_DEPTH = 5


@dataclass
class LoadReport:
    """What ``load_encoder_weights`` did: keys are the encoder's (timm features model's) names.

    Attributes:
        path: the file read.
        prefix: prefix stripped from the file's keys (``""`` for a plain timm state dict).
        loaded: encoder keys that received a tensor.
        missing: encoder keys the file lacks (they keep their current values).
        unexpected: file keys under ``prefix`` that match no encoder key (a timm classifier head, for example).
        adapted: first-convolution keys whose input channels were adapted (timm's ``adapt_input_conv``).
        ignored: number of file keys outside ``prefix`` (decoder and head of a whole model, optimiser state).
    """

    path: Path
    prefix: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    ignored: int = 0

    def summary(self) -> str:
        """One line for logs."""
        total = len(self.loaded) + len(self.missing)
        parts = [f"{self.path.name}: loaded {len(self.loaded)}/{total} encoder tensors"]
        if self.prefix:
            parts.append(f"prefix {self.prefix!r} stripped")
        if self.adapted:
            parts.append(f"input channels adapted for {', '.join(self.adapted)}")
        parts.append(f"{len(self.missing)} missing{_examples(self.missing)}")
        parts.append(f"{len(self.unexpected)} unexpected{_examples(self.unexpected)}")
        if self.ignored:
            parts.append(f"{self.ignored} keys outside the encoder ignored")
        return "; ".join(parts)


def load_encoder_weights(model: SegmentationModel, path: Path) -> LoadReport:
    """Loads the encoder part of a local weights file into ``model.encoder``; the decoder and head are untouched.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown file type, no key matches the encoder (another architecture), or tensor shapes differ
            beyond the first convolution's input channels (each offending key is named with both shapes).
    """
    path = Path(path)
    source = read_state_dict(path)
    target = model.encoder.model.state_dict()
    aliases = _target_aliases(model, list(target))
    prefix, matches = _best_prefix(source, aliases)
    if not matches:
        raise ValueError(
            f"{path}: no tensor matches encoder {model.encoder.name!r} (wrong architecture?). "
            f"First keys in the file: {list(source)[:5]}; first encoder keys: {list(target)[:5]}"
        )
    first_convs = _first_conv_keys(model, aliases)
    state: dict[str, torch.Tensor] = {}
    adapted, errors = [], []
    for source_key, target_key in matches.items():
        tensor, expected = source[source_key], target[target_key]
        if tensor.shape != expected.shape and target_key in first_convs:
            tensor = _adapt_first_conv(tensor, expected)
            if tensor.shape == expected.shape:
                adapted.append(target_key)
        if tensor.shape != expected.shape:
            errors.append(f"{source_key}: file {tuple(tensor.shape)} vs model {tuple(expected.shape)}")
            continue
        state[target_key] = tensor
    if errors:
        raise ValueError(f"{path}: tensor shapes do not fit encoder {model.encoder.name!r}: " + "; ".join(errors))
    model.encoder.model.load_state_dict(state, strict=False)
    under_prefix = [k for k in source if k.startswith(prefix)]
    return LoadReport(
        path=path,
        prefix=prefix,
        loaded=sorted(state),
        missing=sorted(set(target) - set(state)),
        unexpected=sorted(k[len(prefix) :] for k in under_prefix if k not in matches),
        adapted=adapted,
        ignored=len(source) - len(under_prefix),
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or torch file, unwrapped from ``state_dict``/``model`` nesting.

    torch files are read with ``weights_only=True``, so no code is unpickled.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"{path}: unknown weights format; expected .safetensors or one of {', '.join(TORCH_SUFFIXES)}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle and unpickling-policy errors come in many types
        raise ValueError(f"{path}: cannot be read as a weights-only torch file: {error}") from error
    return _unwrap(loaded, path)


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
        nested = next((obj[k] for k in NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = nested
    raise ValueError(f"{path}: holds no state dict (looked for tensors at the top and under {', '.join(NESTED_KEYS)})")


def _target_aliases(model: SegmentationModel, keys: list[str]) -> dict[str, str]:
    """Names a file may use for each encoder key -> that key.

    timm's ``FeatureListNet`` flattens top-level ``nn.Sequential`` children (``stem.0`` -> ``stem_0``) and
    ``FeatureGetterNet`` nests the model under ``model.``; a plain timm state dict uses the original names.
    """
    aliases = {key: key for key in keys}  # exact names first, so an alternative spelling never shadows one
    getter = type(model.encoder.model).__name__ == "FeatureGetterNet"  # timm does not export the class
    for key in keys:
        head, _, rest = key.partition(".")
        names = [f"{head[:i]}.{head[i + 1 :]}.{rest}" for i, char in enumerate(head) if char == "_"]
        if getter and head == "model" and rest:
            names.append(rest)
        for name in names:
            aliases.setdefault(name, key)
    return aliases


def _best_prefix(source: dict[str, torch.Tensor], aliases: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The prefix whose stripped keys match the most encoder keys (the shortest on ties), and that match.

    Returns:
        The prefix and the match ``file key -> encoder key``.
    """
    counts: dict[str, int] = {}
    for key in source:
        parts = key.split(".")
        for i in range(min(len(parts), MAX_PREFIX_DEPTH + 1)):
            if ".".join(parts[i:]) in aliases:
                prefix = "".join(f"{part}." for part in parts[:i])
                counts[prefix] = counts.get(prefix, 0) + 1
    if not counts:
        return "", {}
    prefix = min(counts, key=lambda p: (-counts[p], len(p)))
    matches: dict[str, str] = {}
    taken: set[str] = set()
    for key in source:
        target = aliases.get(key[len(prefix) :]) if key.startswith(prefix) else None
        if target is not None and target not in taken:
            matches[key] = target
            taken.add(target)
    return prefix, matches


def _first_conv_keys(model: SegmentationModel, aliases: dict[str, str]) -> set[str]:
    """Encoder keys of the input convolution weights, from timm's ``first_conv`` (original names)."""
    return {aliases[f"{name}.weight"] for name in model.encoder.first_conv if f"{name}.weight" in aliases}


def _adapt_first_conv(weight: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Adapts a conv weight's input channels the way timm adapts pretrained weights to ``in_chans``."""
    if weight.ndim != 4 or weight.shape[:1] + weight.shape[2:] != expected.shape[:1] + expected.shape[2:]:
        return weight  # not just the input channels: reported as a shape error
    return adapt_input_conv(int(expected.shape[1]), weight, base_chans=int(weight.shape[1]))


def _examples(keys: list[str], n: int = 3) -> str:
    if not keys:
        return ""
    more = ", ..." if len(keys) > n else ""
    return f" ({', '.join(keys[:n])}{more})"
