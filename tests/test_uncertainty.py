"""Uncertainty from the members of a prediction: entropy and mutual information maps, per-case scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medseg_lightning.config.schema import ExperimentConfig
from medseg_lightning.inference.bundle import ModelBundle
from medseg_lightning.inference.predict import Predictor
from medseg_lightning.inference.uncertainty import case_uncertainty, summarise_members

from .test_predict import _Ramps


def _softmax(seed: int, shape: tuple[int, ...] = (2, 3, 4, 5)) -> torch.Tensor:
    return torch.softmax(torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3, dim=1)


def test_entropy_and_mutual_information_follow_their_definitions() -> None:
    members = [_softmax(seed) for seed in range(4)]
    summary = summarise_members(iter(members))
    stacked = torch.stack(members).double()
    mean = stacked.mean(0)
    entropy = -(mean * mean.log()).sum(1)
    expected_entropy = entropy / math.log(3)
    expected_information = (entropy - (-(stacked * stacked.log()).sum(2)).mean(0)) / math.log(3)
    torch.testing.assert_close(summary.probabilities.double(), mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(summary.entropy.double(), expected_entropy, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(summary.mutual_information.double(), expected_information, atol=1e-5, rtol=1e-4)
    assert torch.equal(summary.member_labels, torch.stack([m.argmax(1) for m in members]).to(torch.uint8))
    assert summary.mutual_information.min() >= 0 and summary.entropy.max() <= 1 + 1e-6


def test_members_that_agree_have_no_mutual_information_and_confident_opposites_have_all() -> None:
    one = _softmax(7)
    agreeing = summarise_members(iter([one, one.clone()]))
    assert agreeing.mutual_information.abs().max() < 1e-5
    torch.testing.assert_close(agreeing.entropy, summarise_members(iter([one])).entropy)
    left, right = torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1, 1)
    left[:, 0], right[:, 1] = 1.0, 1.0  # each member sure, of the other class
    opposite = summarise_members(iter([left, right]))
    assert opposite.entropy.item() == pytest.approx(1.0) and opposite.mutual_information.item() == pytest.approx(1.0)


def test_case_scores_see_the_boundary_the_region_and_the_members() -> None:
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[3:9, 3:9, 3:9] = 1
    inside = labels.astype(bool)
    from scipy import ndimage

    band = ndimage.binary_dilation(inside) & ~ndimage.binary_erosion(inside)
    entropy = np.full(labels.shape, 0.05, np.float32)
    entropy[band] = 0.9  # unsure at the edge only
    same = np.stack([labels, labels])
    scores = case_uncertainty(labels, entropy, same)
    assert scores["entropy_boundary"] == pytest.approx(0.9)
    assert 0.05 < scores["entropy_structure"] < scores["entropy_boundary"]
    assert scores["uncertain_fraction"] == pytest.approx((band & inside).sum() / inside.sum())  # region: the mask
    assert scores["member_agreement"] == 1.0
    shifted = np.roll(labels, 3, axis=0)
    assert case_uncertainty(labels, entropy, np.stack([labels, shifted]))["member_agreement"] == pytest.approx(0.5)
    single = case_uncertainty(labels, entropy, None)
    assert math.isnan(single["member_agreement"])
    empty = case_uncertainty(np.zeros_like(labels), entropy, None)
    assert math.isnan(empty["entropy_structure"]) and empty["uncertain_fraction"] == 0.0


def test_the_predictor_summary_averages_what_probabilities_average() -> None:
    """The mask of ``--uncertainty`` is the argmax of the same average as without it, over all members."""
    config = ExperimentConfig(name="members", data={"source": "unused", "labels": {0: "bg", 1: "left", 2: "low"}})
    bundles = [ModelBundle(_Ramps(*net), config, in_channels=1) for net in [(0.7, 0.4, 1.5), (-0.3, 0.9, -0.8)]]
    slices = torch.randn(3, 1, 6, 8, generator=torch.Generator().manual_seed(1))
    predictor = Predictor(bundles, tta=True, batch_size=2, device="cpu")
    summary = predictor.member_summary(slices)
    assert predictor.members == 6 and summary.member_labels.shape == (6, 3, 6, 8)
    torch.testing.assert_close(summary.probabilities, predictor.probabilities(slices), atol=1e-6, rtol=1e-5)
    assert summary.mutual_information.max() > 0.01  # two different networks and their flips disagree somewhere
