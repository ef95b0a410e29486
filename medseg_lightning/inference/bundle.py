"""Saving and rebuilding trained networks without pickles: weights in safetensors, the rest as YAML.

A saved model is a folder with ``weights.safetensors`` and ``model.yaml`` (the resolved experiment config plus
the input channel count). Loading rebuilds the network from the config and loads the tensors, so no code is
ever unpickled, and a model trained today loads with tomorrow's code as long as the config still validates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from medseg_lightning.config.schema import ExperimentConfig
from medseg_lightning.config.tasks import task_of

FORMAT_VERSION = 1  # of model.yaml; a newer one was written by a newer medseg and may not load right here
WEIGHTS_FILE = "weights.safetensors"
SPEC_FILE = "model.yaml"
ENSEMBLE_FILE = "ensemble.yaml"


class EnsembleNetwork(nn.Module):
    """Several networks as one: the log of their mean softmax, so ``argmax`` and ``softmax`` of the output are those
    of the averaged probabilities (nnU-Net's fold ensemble) and every caller of a plain network can use it."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.stack([torch.softmax(member(x).float(), dim=1) for member in self.members]).mean(0)
        return torch.log(mean.clamp_min(torch.finfo(mean.dtype).tiny))


@dataclass
class ModelBundle:
    """A rebuilt network with what is needed to feed it: the experiment config and the input channel count."""

    network: nn.Module
    config: ExperimentConfig
    in_channels: int
    seen_cases: frozenset[str] = frozenset()  # content digests of the cases that trained or selected the model
    training_spacing: tuple[float, float, float] | None = None  # median voxel size (mm) of its training cases


def build_network(config: ExperimentConfig, in_channels: int, pretrained: bool = False) -> nn.Module:
    """The network an experiment describes, for ``in_channels`` inputs (modalities x 2.5D slices)."""
    return task_of(config).build_network(config, in_channels, pretrained)


def predict_slices(network: nn.Module, config: ExperimentConfig, slices: torch.Tensor) -> np.ndarray:
    """What the logged model returns for preprocessed slices ``(N, C, H, W)``: labels ``(N, H, W)`` uint8, or for
    instance models an instance-label map per slice (int32, ids unique within the call)."""
    return task_of(config).predict_slices(network, config, slices)


def save_bundle(network: nn.Module, config: ExperimentConfig, in_channels: int, folder: Path,
                seen_cases: list[str] | None = None,
                training_spacing: tuple[float, float, float] | None = None) -> Path:
    """Writes ``weights.safetensors`` and ``model.yaml`` into ``folder``; returns the folder.

    Args:
        seen_cases: content digests of the training and validation cases (see ``seen_digest``), so an evaluation
            on cases the model has seen can be refused; no case id is stored.
        training_spacing: the median voxel size (mm, canonical X, Y, Z) of the training cases when they had one,
            so prediction can refuse an input at a scale the model never saw (``check_spacing``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    state = {key: tensor.detach().cpu().contiguous() for key, tensor in network.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    from medseg_lightning import __version__

    settings = config.model_dump(mode="json")
    settings["data"]["source"] = portable_source(config.data.source)
    spec = {"format": FORMAT_VERSION, "medseg_version": __version__, "in_channels": in_channels,
            "config": settings,
            **({"seen_cases": sorted(seen_digest(key) for key in seen_cases)} if seen_cases else {}),
            **({"training_spacing": [float(value) for value in training_spacing]} if training_spacing else {})}
    (folder / SPEC_FILE).write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder


def portable_source(source: Path | str) -> str:
    """The training data's location as a model may carry it beyond this machine: relative to the working folder
    when it lies inside it, else only its name. An absolute path names this machine's folders and users; the
    model never reads its data source (evaluation takes the data from the experiment given to it)."""
    path = Path(source)
    if not path.is_absolute():
        return str(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return path.name


def save_ensemble(members: list[Path], folder: Path) -> Path:
    """Copies saved model folders into ``folder`` as one ensemble (``ensemble.yaml`` lists them); returns it.

    Raises:
        ValueError: the members do not share preprocessing, slicing, labels and modalities.
    """
    import shutil

    bundles = [load_bundle(member) for member in members]
    for bundle in bundles[1:]:
        check_compatible(bundles[0].config, bundle.config)
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"member-{index}" for index in range(len(members))]
    for name, member in zip(names, members, strict=True):
        shutil.copytree(member, folder / name, dirs_exist_ok=True)
    (folder / ENSEMBLE_FILE).write_text(yaml.safe_dump({"members": names, "combine": "mean of softmax"}))
    return folder


def check_compatible(first: ExperimentConfig, other: ExperimentConfig) -> None:
    """Models averaged together must see the same input and predict the same classes.

    Raises:
        ValueError: naming the model that differs.
    """
    a, b = first.data, other.data
    if (a.preprocessing, a.slicing, a.labels, a.image_columns) != (b.preprocessing, b.slicing, b.labels,
                                                                 b.image_columns):
        raise ValueError("ensemble models must share preprocessing, slicing, labels and input modalities; "
                         f"{other.name} differs from {first.name}")
    for config in (first, other):
        if not task_of(config).averages_predictions:
            raise ValueError(f"{config.task} models predict alone: {config.name} cannot be averaged into an ensemble")


def load_bundle(folder: Path) -> ModelBundle:
    """Rebuilds the network from ``model.yaml`` and loads ``weights.safetensors`` (strict: every key must match);
    an ensemble folder (``ensemble.yaml``) becomes one :class:`EnsembleNetwork` with the first member's config.

    Raises:
        ValueError: files missing, or weights that do not fit the config (names the differing keys).
    """
    if (folder / ENSEMBLE_FILE).is_file():
        names = yaml.safe_load((folder / ENSEMBLE_FILE).read_text()).get("members") or []
        if not names:
            raise ValueError(f"{folder / ENSEMBLE_FILE}: lists no members")
        members = [load_bundle(folder / name) for name in names]
        for member in members[1:]:
            check_compatible(members[0].config, member.config)
        seen = frozenset().union(*(member.seen_cases for member in members))
        return ModelBundle(EnsembleNetwork([member.network for member in members]).eval(), members[0].config,
                           members[0].in_channels, seen, members[0].training_spacing)
    weights, spec_path = folder / WEIGHTS_FILE, folder / SPEC_FILE
    for path in (weights, spec_path):
        if not path.is_file():
            raise ValueError(f"{path}: missing; a medseg model folder holds {WEIGHTS_FILE} and {SPEC_FILE}")
    spec = yaml.safe_load(spec_path.read_text())
    made = int(spec.get("format", 0))
    if made > FORMAT_VERSION:
        raise ValueError(f"{spec_path}: saved by medseg {spec.get('medseg_version', '?')} in model format {made}; this "
                         f"medseg reads formats up to {FORMAT_VERSION}: upgrade medseg-lightning to load it")
    config = ExperimentConfig.model_validate(spec["config"])
    network = build_network(config, int(spec["in_channels"]))
    state = load_file(str(weights))
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"{weights}: weights do not match {config.model.arch}/{config.model.encoder} from {spec_path}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
        )
    network.load_state_dict(state)
    network.eval()
    spacing = spec.get("training_spacing")
    return ModelBundle(network=network, config=config, in_channels=int(spec["in_channels"]),
                       seen_cases=frozenset(spec.get("seen_cases") or []),
                       training_spacing=tuple(float(value) for value in spacing) if spacing else None)


def seen_digest(content_key: str) -> str:
    """The short form of a case's content digest kept in a saved model (enough to recognise the case)."""
    return content_key[:16]
