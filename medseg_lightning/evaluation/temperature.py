"""Temperature scaling (Guo et al., 2017): one scalar T that divides the logits, fitted on validation.

A network trained with cross-entropy and Dice is usually over-confident: its softmax says 0.95 where it is right
eight times in ten. Dividing the logits by T > 1 softens every probability alike, so the argmax, and with it the
segmentation of a single model, is unchanged while the confidences (the uncertainty maps, the calibration error)
come closer to the truth. T is fitted by minimising the negative log-likelihood of the voxels that the calibration
error is measured on (those the prediction or the reference calls foreground, ``calibration.py``): over the whole
image the easy background would choose T. The fit reads validation cases only; the test split reports its effect.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MAX_VOXELS = 2_000_000  # a random sample of this many region voxels is plenty to fit one scalar
BOUNDS = (0.05, 20.0)  # the temperatures searched; the fit says so when it lands on one of them


@dataclass
class RegionLogits:
    """The logits ``(N, K)`` and reference labels ``(N,)`` of the foreground-region voxels of some cases."""

    logits: torch.Tensor
    target: torch.Tensor
    cases: int


@dataclass
class TemperatureFit:
    """The fitted temperature with the validation negative log-likelihood before (T = 1) and after."""

    temperature: float
    nll_before: float
    nll_after: float
    voxels: int
    cases: int
    at_bound: bool

    def record(self) -> dict[str, Any]:
        """What a calibrated model keeps in its ``model.yaml`` about where its temperature came from."""
        return {"method": "temperature scaling", "temperature": self.temperature, "fitted_on": "val",
                "cases": self.cases, "voxels": self.voxels, "nll_before": self.nll_before,
                "nll_after": self.nll_after}


@torch.no_grad()
def region_logits(network: nn.Module, items: Iterable[dict[str, Any]], batch_size: int,
                  max_voxels: int = MAX_VOXELS, seed: int = 0) -> RegionLogits:
    """The logits of every case's region voxels, in the model's slice grid, sampled down to ``max_voxels``.

    Raises:
        ValueError: a case without labels, or no foreground voxel in any case (nothing to calibrate on).
    """
    device = next(network.parameters()).device
    logits, targets, cases = [], [], 0
    for item in items:
        if "mask" not in item:
            raise ValueError(f"case {item['case_id']}: no labels; calibration needs labelled validation cases")
        mask = item["mask"]
        for start in range(0, len(item["image"]), batch_size):
            output = network(item["image"][start : start + batch_size].to(device)).float().cpu()
            target = mask[start : start + batch_size]
            region = (output.argmax(1) > 0) | (target > 0)
            logits.append(output.permute(0, 2, 3, 1)[region])
            targets.append(target[region])
        cases += 1
    found = torch.cat(logits) if logits else torch.empty(0)
    if found.numel() == 0:
        raise ValueError("no foreground voxel (predicted or labelled) in the calibration cases: nothing to fit T on")
    target = torch.cat(targets)
    if len(target) > max_voxels:
        keep = torch.randperm(len(target), generator=torch.Generator().manual_seed(seed))[:max_voxels]
        found, target = found[keep], target[keep]
    return RegionLogits(found.double(), target.long(), cases)


def fit_temperature(region: RegionLogits, current: float = 1.0) -> TemperatureFit:
    """The T in ``BOUNDS`` minimising the region's mean negative log-likelihood (a bounded scalar search on log T,
    by scipy: the objective is convex in 1/T, so the search finds its minimum); ``nll_before`` is at ``current``,
    the temperature the model had (a model calibrated again is refitted from its raw logits)."""
    from scipy.optimize import minimize_scalar

    def nll(log_temperature: float) -> float:
        return float(F.cross_entropy(region.logits / math.exp(log_temperature), region.target))

    low, high = (math.log(bound) for bound in BOUNDS)
    result = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    temperature = float(math.exp(result.x))
    at_bound = min(abs(result.x - low), abs(result.x - high)) < 1e-3
    return TemperatureFit(temperature, nll(math.log(current)), float(result.fun), len(region.target), region.cases,
                          at_bound)
