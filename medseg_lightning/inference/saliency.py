"""Saliency: which pixels drove the network to segment a structure, by captum's Grad-CAM and integrated gradients.

A segmentation network has no single output to explain, so the explained quantity is one scalar per slice: the
mean logit over a fixed region of the class it was predicted as (the predicted structure by default, as in
Vinogradova et al.'s Seg-Grad-CAM). Grad-CAM weighs an encoder stage's feature maps by that scalar's gradient
(coarse, class discriminative); integrated gradients sums the gradient along a straight path from a zero image (the mean
intensity after z-scoring) to the slice (fine, pixel-level). captum implements both, with the input batching
done right, so none of it is written here; captum rather than pytorch-grad-cam because it also has integrated
gradients and occlusion behind one interface and needs nothing beyond torch.

Slices without any region pixel get a zero map. Each map is scaled to ``[0, 1]`` per case (its 99.5th
percentile is 1), so maps of one case compare across slices but not across cases.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

METHODS = ("gradcam", "integrated_gradients")
IG_STEPS = 32  # the integral's steps; captum's default is 50, 32 keeps its approximation error small here too


class RegionLogit(nn.Module):
    """``network`` reduced to one scalar per slice: the mean, over the region's pixels, of the logit of the class
    the region gives each pixel (``region`` holds class ids, 0 outside), so a two-class structure is explained
    as a whole and one class alone by a region of that class only."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        logits = self.network(image).gather(1, region.long()[:, None])[:, 0]
        weight = (region > 0).to(logits.dtype)
        return (logits * weight).sum((1, 2)) / weight.sum((1, 2)).clamp_min(1)


@dataclass
class SaliencyMaps:
    """A case's maps ``(S, H, W)`` in ``[0, 1]`` per method, for the explained ``region`` ``(S, H, W)``."""

    maps: dict[str, np.ndarray]
    region: np.ndarray


def default_stage(reductions: list[int]) -> int:
    """The encoder stage Grad-CAM reads: the deepest one at most 8x coarser than the input (deep enough to mean
    something, fine enough for a structure a few pixels wide); the deepest stage is 32x coarser."""
    fine = [index for index, reduction in enumerate(reductions) if reduction <= 8]
    return fine[-1] if fine else len(reductions) - 1


def stage_module(network: nn.Module, stage: int) -> nn.Module:
    """The encoder's module that outputs ``stage`` (timm's ``feature_info`` names it).

    Raises:
        ValueError: the network has no timm encoder, or no such stage.
    """
    encoder = getattr(network, "encoder", None)
    info = getattr(getattr(encoder, "model", None), "feature_info", None)
    if info is None:
        raise ValueError("saliency needs a network with a timm encoder (model.arch unet, fcn, segnet, ...)")
    names = info.module_name()
    if not -len(names) <= stage < len(names):
        raise ValueError(f"--stage {stage}: the encoder has stages 0..{len(names) - 1} (reductions "
                         f"{encoder.reductions})")
    name = names[stage]
    for candidate in (name, name.replace(".", "_")):  # timm's feature nets flatten dotted names
        try:
            return encoder.model.get_submodule(candidate)
        except AttributeError:
            continue
    raise ValueError(f"encoder stage {stage} ({name}) is not a module of {encoder.name}")


def saliency_maps(network: nn.Module, slices: torch.Tensor, region: np.ndarray,
                  methods: tuple[str, ...] = METHODS, stage: int | None = None, batch_size: int = 8,
                  steps: int = IG_STEPS) -> SaliencyMaps:
    """Maps of ``network`` on preprocessed ``slices`` ``(S, C, H, W)`` for ``region`` ``(S, H, W)`` (class ids).

    Raises:
        ValueError: an unknown method or stage.
    """
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam

    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown saliency method(s) {unknown}; choose from {', '.join(METHODS)}")
    network = network.eval()
    scalar = RegionLogit(network)
    chosen = default_stage(network.encoder.reductions) if stage is None else stage
    explainers = {"gradcam": LayerGradCam(scalar, stage_module(network, chosen)),
                  "integrated_gradients": IntegratedGradients(scalar)}
    device = next(network.parameters()).device
    mask = torch.from_numpy(np.ascontiguousarray(region, dtype=np.int64))
    wanted = np.flatnonzero((region > 0).reshape(len(region), -1).any(1))
    maps = {method: np.zeros(region.shape, np.float32) for method in methods}
    with torch.enable_grad():
        for start in range(0, len(wanted), batch_size):
            index = wanted[start : start + batch_size]
            image = slices[index].to(device).requires_grad_(True)
            where = mask[index].to(device)
            for method in methods:
                if method == "gradcam":
                    coarse = explainers[method].attribute(image, additional_forward_args=(where,),
                                                          relu_attributions=True)
                    found = LayerAttribution.interpolate(coarse, tuple(image.shape[-2:]), "bilinear")[:, 0]
                else:
                    found = explainers[method].attribute(image, baselines=torch.zeros_like(image),
                                                         additional_forward_args=(where,), n_steps=steps,
                                                         internal_batch_size=batch_size * 4).abs().sum(1)
                maps[method][index] = found.detach().float().cpu().numpy()
    return SaliencyMaps({method: _unit_scale(values) for method, values in maps.items()}, region)


def _unit_scale(values: np.ndarray) -> np.ndarray:
    top = float(np.percentile(values[values > 0], 99.5)) if (values > 0).any() else 0.0
    return np.clip(values / top, 0, 1).astype(np.float32) if top > 0 else values


def rank_similarity(first: np.ndarray, second: np.ndarray, region: np.ndarray | None = None) -> float:
    """Spearman correlation of two maps (inside ``region`` when given): Adebayo et al.'s measure of whether a map
    still depends on what the model learnt (high for the same model, low against randomised weights)."""
    from scipy.stats import spearmanr

    a, b = (first[region], second[region]) if region is not None else (first.ravel(), second.ravel())
    return float(spearmanr(a, b).statistic)
