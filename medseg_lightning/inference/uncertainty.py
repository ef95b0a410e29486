"""Per-voxel uncertainty from the members of a prediction (ensemble models x flip views) and per-case scores.

The members are the softmax outputs that ``Predictor`` averages. From them come the two maps of Gal's and
Depeweg's decomposition: predictive entropy ``H[mean_m p_m]`` (all uncertainty) and mutual information
``H[mean_m p_m] - mean_m H[p_m]`` (the part the members disagree on, epistemic). Both are divided by ``ln K`` so
that they lie in ``[0, 1]`` for any number of classes ``K``; one member gives entropy only (its mutual information
is zero by construction, and its member agreement is undefined).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

UNCERTAIN_ABOVE = 0.5  # normalised entropy above which a voxel counts as uncertain (half the maximum)


@dataclass
class MemberSummary:
    """What the members of one batch of slices say together."""

    probabilities: torch.Tensor  # (S, K, H, W): the mean over members, what the mask is the argmax of
    entropy: torch.Tensor  # (S, H, W), normalised to [0, 1]
    mutual_information: torch.Tensor  # (S, H, W), normalised to [0, 1]
    member_labels: torch.Tensor  # (M, S, H, W) uint8: each member's own argmax


def summarise_members(members: Iterable[torch.Tensor]) -> MemberSummary:
    """Mean probabilities, normalised entropy and mutual information of softmax tensors ``(S, K, H, W)``,
    accumulated member by member (memory for two tensors, not for all members)."""
    total, member_entropy, labels = None, None, []
    for probability in members:
        entropy = _entropy(probability)
        total = probability if total is None else total + probability  # never in place: members stay intact
        member_entropy = entropy if member_entropy is None else member_entropy + entropy
        labels.append(probability.argmax(1).to(torch.uint8))
    if total is None or member_entropy is None:
        raise ValueError("no member predictions to summarise")
    count, classes = len(labels), total.shape[1]
    mean = total / count
    predictive = member_entropy if count == 1 else _entropy(mean)  # one member (every validation epoch): once
    scale = math.log(classes)
    return MemberSummary(mean, predictive / scale, (predictive - member_entropy / count).clamp(min=0) / scale,
                         torch.stack(labels))


def _entropy(probability: torch.Tensor) -> torch.Tensor:
    """Shannon entropy over the class axis (nats); ``0 log 0 = 0``."""
    return -(probability * torch.log(probability.clamp(min=1e-12))).sum(1)


def case_uncertainty(labels: np.ndarray, entropy: np.ndarray, member_labels: np.ndarray | None,
                     uncertain_above: float = UNCERTAIN_ABOVE) -> dict[str, float]:
    """Scores of one case (its volumes in one voxel grid) that a user can rank cases by.

    - ``entropy_structure``: mean normalised entropy inside the predicted structure (all foreground classes);
    - ``entropy_boundary``: the same on the structure's boundary band (one voxel inside and one outside), where
      segmentations disagree first;
    - ``uncertain_fraction``: of the voxels that the mask or any member calls foreground, the fraction whose
      entropy exceeds ``uncertain_above``;
    - ``member_agreement``: mean Dice of the foreground between every two members (NaN with one member).

    A case with no predicted structure has NaN for the first two: there is nothing to be unsure about inside it.
    """
    foreground = labels > 0
    band = ndimage.binary_dilation(foreground) & ~ndimage.binary_erosion(foreground)
    region = foreground.copy()
    if member_labels is not None:
        region |= (member_labels > 0).any(axis=0)
    return {
        "entropy_structure": _mean(entropy, foreground),
        "entropy_boundary": _mean(entropy, band),
        "uncertain_fraction": float((entropy[region] > uncertain_above).mean()) if region.any() else 0.0,
        "member_agreement": _agreement(member_labels),
    }


def _mean(values: np.ndarray, where: np.ndarray) -> float:
    return float(values[where].mean()) if where.any() else math.nan


def _agreement(member_labels: np.ndarray | None) -> float:
    if member_labels is None or len(member_labels) < 2:
        return math.nan
    dices = []
    for first, second in itertools.combinations(member_labels > 0, 2):
        total = first.sum() + second.sum()
        dices.append(1.0 if total == 0 else 2.0 * (first & second).sum() / total)
    return float(np.mean(dices))
