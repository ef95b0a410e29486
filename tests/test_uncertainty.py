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


def test_ranking_quality_tells_a_useful_score_from_a_useless_one() -> None:
    from medseg_lightning.evaluation.uncertainty_ranking import ranking_quality

    dice = np.linspace(0.3, 0.95, 12)
    rows = [{"case_id": f"c{i}", "dice/mean": d, "uncertainty/perfect": 1 - d, "uncertainty/backwards": d,
             "uncertainty/sometimes": (1 - d) if i % 3 else math.nan} for i, d in enumerate(dice)]
    figures = ranking_quality(rows)
    assert figures["uncertainty/perfect/spearman"] == pytest.approx(-1.0)
    assert figures["uncertainty/perfect/aurc"] == pytest.approx(figures["uncertainty/perfect/aurc_oracle"])
    assert figures["uncertainty/perfect/aurc"] < figures["uncertainty/perfect/aurc_random"] == pytest.approx(
        1 - dice.mean())
    assert figures["uncertainty/backwards/spearman"] == pytest.approx(1.0)
    assert figures["uncertainty/backwards/aurc"] > figures["uncertainty/backwards/aurc_random"]
    assert figures["uncertainty/sometimes/n"] == 8  # undefined scores are left out, and counted
    assert "uncertainty/perfect/spearman" not in ranking_quality(rows[:2])  # too few cases to rank


def test_evaluation_rows_carry_uncertainty_and_the_report_plots_its_ranking(tmp_path) -> None:
    """Validation and test reports score each case's entropy, rank the cases by it, and plot the ranking."""
    from medseg_lightning.config.schema import FairnessConfig
    from medseg_lightning.evaluation.scoring import SlicePrediction, report_files, score_case, summarize

    rng = np.random.default_rng(0)
    rows = []
    for index in range(6):
        target = np.zeros((8, 8, 4), np.uint8)
        target[2:6, 2:6] = 1
        labels = np.moveaxis(np.roll(target, index % 3, axis=0), 2, 0)  # (S, H, W), some shifted: lower Dice
        entropy = rng.random(labels.shape).astype(np.float32) * (0.2 + 0.1 * index)
        item = {"case_id": f"c{index}", "target": target, "attributes": {"sex": "FM"[index % 2]},
                "meta": {"in_plane": {"mode": "none", "source": [8, 8], "target": [8, 8]}, "axis": 2,
                         "spacing": [1.0, 1.0, 1.0], "spacing_known": True}}
        rows.append(score_case(item, SlicePrediction(labels, entropy, 1 - entropy / 2), {0: "bg", 1: "organ"}))
    assert {"uncertainty/entropy_structure", "uncertainty/entropy_boundary", "uncertainty/uncertain_fraction"} <= set(
        rows[0])
    fairness = FairnessConfig(attributes=["sex"], min_group_size=3)
    report = summarize(rows, "val", fairness, ["organ"])
    metrics = report.metrics()
    assert metrics["val/uncertainty/entropy_structure/n"] == 6
    assert "val/uncertainty/entropy_structure/spearman" in metrics
    assert 0 < metrics["val/calibration/ece"] < 1 and "val/calibration/sex/F/ece" in metrics
    assert metrics["val/calibration/sex/ece_gap"] == pytest.approx(
        abs(metrics["val/calibration/sex/F/ece"] - metrics["val/calibration/sex/M/ece"]))
    written = report_files(report, fairness, tmp_path)
    for name in ("val_uncertainty_ranking.png", "val_reliability.png"):
        assert tmp_path / name in written and (tmp_path / name).stat().st_size > 0
    assert "_calibration" not in (tmp_path / "val_cases.csv").read_text()  # the histogram stays out of the table


def test_expected_calibration_error_pools_voxels_of_the_foreground_region() -> None:
    from medseg_lightning.evaluation.calibration import case_histogram, expected_calibration_error

    target = np.zeros((10, 10, 2), np.uint8)
    target[:5] = 1
    prediction = target.copy()
    prediction[:1] = 0  # 10 of the 50 foreground voxels missed: 80% right in the region
    assert expected_calibration_error(case_histogram(np.full(target.shape, 0.8), prediction, target)) == (
        pytest.approx(0.0))  # says 0.8, is right 80% of the time
    assert expected_calibration_error(case_histogram(np.full(target.shape, 0.99), prediction, target)) == (
        pytest.approx(0.19))  # overconfident
    background_only = case_histogram(np.full(target.shape, 0.5), np.zeros_like(target), np.zeros_like(target))
    assert math.isnan(expected_calibration_error(background_only))  # no region: nothing to calibrate


def _dropout_bundle(rate: float | None) -> ModelBundle:
    from medseg_lightning.inference.bundle import build_network

    config = ExperimentConfig(name="mc", data={"source": "unused", "labels": {0: "bg", 1: "organ"}},
                              model={"encoder": "test_resnet", "head_dropout": rate})
    torch.manual_seed(0)
    network = build_network(config, 1).eval()
    with torch.no_grad():
        network.head.weight.mul_(30)  # an untrained head is near zero: logits large enough for passes to differ
    return ModelBundle(network, config, in_channels=1)


def test_monte_carlo_dropout_samples_members_reproducibly(tmp_path) -> None:
    """Each pass drops other channels (members disagree: mutual information), the same input gives the same maps
    on every run, and the dropout layer has no weights, so the saved model loads with or without it."""
    from medseg_lightning.inference.bundle import load_bundle, save_bundle

    bundle = _dropout_bundle(0.5)
    slices = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    predictor = Predictor([bundle], mc_dropout=4, batch_size=2, device="cpu")
    summary = predictor.member_summary(slices)
    assert predictor.members == 4 and summary.member_labels.shape == (4, 2, 32, 32)
    assert summary.mutual_information.max() > 1e-3  # the passes differ
    torch.testing.assert_close(predictor.member_summary(slices).probabilities, summary.probabilities)
    torch.testing.assert_close(predictor.probabilities(slices), summary.probabilities, atol=1e-6, rtol=1e-5)
    deterministic = Predictor([bundle], batch_size=2, device="cpu").member_summary(slices)
    assert deterministic.member_labels.shape[0] == 1  # without --mc-dropout the dropout layer is off
    folder = save_bundle(bundle.network, bundle.config, 1, tmp_path / "m")
    assert load_bundle(folder).config.model.head_dropout == 0.5
    plain = _dropout_bundle(None)
    assert set(plain.network.state_dict()) == set(bundle.network.state_dict())


def test_monte_carlo_dropout_refuses_a_model_without_dropout() -> None:
    with pytest.raises(ValueError, match=r"has no dropout layer.*model\.head_dropout"):
        Predictor([_dropout_bundle(None)], mc_dropout=3, device="cpu")
    with pytest.raises(ValueError, match="cannot be negative"):
        Predictor([_dropout_bundle(0.2)], mc_dropout=-1, device="cpu")
