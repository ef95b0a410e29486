"""Case metrics against hand-computed geometry and MONAI; aggregation, naming and the training-slice metrics."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg_lightning.evaluation.metrics import SliceMetrics, aggregate, case_metrics, name_metrics

ANISOTROPIC = (1.0, 1.0, 3.0)


def _offset_cubes(shift_axis: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """A 4x4x4 target cube and the same cube shifted by one voxel along ``shift_axis``."""
    target = np.zeros((10, 10, 10), np.uint8)
    target[2:6, 2:6, 2:6] = 1
    return np.roll(target, 1, axis=shift_axis), target


def test_offset_cubes_by_hand() -> None:
    pred, target = _offset_cubes()
    metrics = case_metrics(pred, target, ANISOTROPIC, num_classes=2)
    # overlap 4*4*3 = 48 voxels of 64 each
    assert metrics["dice/1"] == pytest.approx(2 * 48 / 128)
    assert metrics["iou/1"] == pytest.approx(48 / 80)
    # each cube has 56 surface voxels (64 minus a 2x2x2 interior). Of pred's, the 16 on its far z face are one
    # slice (3 mm) from the target's surface, the 4 centre voxels of its near z face are 1 mm (in-plane) from it
    # and the other 36 lie on it; the target's are symmetric. The 95th percentile (index 52.25 of 56) is 3 mm.
    assert metrics["hd95/1"] == pytest.approx(3.0)
    assert metrics["assd/1"] == pytest.approx(2 * (16 * 3 + 4 * 1) / 112)
    assert metrics["vol_true_ml/1"] == pytest.approx(64 * 3 / 1000)
    assert metrics["vol_pred_ml/1"] == pytest.approx(64 * 3 / 1000)
    assert metrics["dice/mean"] == metrics["dice/1"] and metrics["hd95/mean"] == metrics["hd95/1"]


def test_distances_follow_the_spacing() -> None:
    pred, target = _offset_cubes()
    assert case_metrics(pred, target, (1.0, 1.0, 6.0), 2)["hd95/1"] == pytest.approx(6.0)  # the shifted axis
    in_plane = case_metrics(pred, target, (2.0, 2.0, 3.0), 2)  # the 1 mm in-plane distances become 2 mm
    assert in_plane["hd95/1"] == pytest.approx(3.0)
    assert in_plane["assd/1"] == pytest.approx(2 * (16 * 3 + 4 * 2) / 112)
    shifted_in_plane = case_metrics(*_offset_cubes(shift_axis=0), ANISOTROPIC, 2)
    assert shifted_in_plane["hd95/1"] == pytest.approx(1.0)
    assert shifted_in_plane["dice/1"] == pytest.approx(0.75)  # Dice ignores spacing


def test_empty_conventions() -> None:
    empty = np.zeros((10, 10, 5), np.uint8)
    blob = empty.copy()
    blob[3:6, 3:6, 1:3] = 1
    diagonal = math.sqrt(10**2 + 10**2 + 15**2)  # shape * spacing
    both = case_metrics(empty, empty, ANISOTROPIC, 2)
    assert (both["dice/1"], both["iou/1"], both["hd95/1"], both["assd/1"]) == (1.0, 1.0, 0.0, 0.0)
    for pred, target in ((empty, blob), (blob, empty)):
        one = case_metrics(pred, target, ANISOTROPIC, 2)
        assert (one["dice/1"], one["iou/1"]) == (0.0, 0.0)
        assert one["hd95/1"] == pytest.approx(diagonal) and one["assd/1"] == pytest.approx(diagonal)


def test_classes_are_scored_separately_and_averaged() -> None:
    pred, target = _offset_cubes()
    target[7:9, 7:9, 7:9] = 2
    pred[7:9, 7:9, 7:9] = 2  # class 2 perfect, class 3 absent from both
    metrics = case_metrics(pred, target, ANISOTROPIC, num_classes=4)
    assert metrics["dice/2"] == 1.0 and metrics["hd95/2"] == 0.0 and metrics["dice/3"] == 1.0
    assert metrics["dice/mean"] == pytest.approx((0.75 + 1 + 1) / 3)
    assert metrics["hd95/mean"] == pytest.approx(3.0 / 3)
    assert "dice/0" not in metrics


def test_pixel_mode_never_claims_millimetres() -> None:
    target = np.zeros((12, 12), np.uint8)
    target[2:8, 2:8] = 1
    pred = np.roll(target, 2, axis=1)
    pixels = case_metrics(pred, target, (0.5, 0.5), 2, spacing_known=False)
    assert not any(key.startswith(("hd95/", "assd/", "vol_pred_ml", "vol_true_ml")) for key in pixels)
    unit = case_metrics(pred, target, (1.0, 1.0), 2)
    assert pixels["hd95_px/1"] == pytest.approx(unit["hd95/1"]) and pixels["hd95_px/1"] == pytest.approx(2.0)
    assert pixels["assd_px/1"] == pytest.approx(unit["assd/1"])
    assert pixels["vol_pred_vox/1"] == 36 and pixels["vol_true_vox/1"] == 36
    assert "hd95_px/mean" in pixels


def test_bounding_box_crop_changes_nothing() -> None:
    """A structure scored inside a big empty volume gives the same numbers as scored on a tight crop."""
    pred, target = _offset_cubes()
    big_pred, big_target = (np.pad(a, ((30, 5), (0, 40), (7, 7))) for a in (pred, target))
    assert case_metrics(big_pred, big_target, ANISOTROPIC, 2)["hd95/1"] == pytest.approx(3.0)


def test_invalid_inputs_are_explained() -> None:
    labels = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="shapes differ"):
        case_metrics(labels, labels[:3], ANISOTROPIC, 2)
    with pytest.raises(ValueError, match="spacing must hold 3"):
        case_metrics(labels, labels, (1.0, 1.0), 2)
    with pytest.raises(TypeError, match="integer class labels"):
        case_metrics(labels.astype(np.float32), labels, ANISOTROPIC, 2)


def test_name_metrics_and_aggregate() -> None:
    named = name_metrics({"dice/1": 0.5, "hd95/2": 3.0, "dice/mean": 0.7}, {0: "background", 1: "anterior", 2: "p"})
    assert named == {"dice/anterior": 0.5, "hd95/p": 3.0, "dice/mean": 0.7}
    summary = aggregate([{"dice/1": 0.2}, {"dice/1": math.nan}, {"dice/1": 0.6}, {"dice/1": 1.0, "only": 4.0}])
    assert summary["dice/1"] == pytest.approx(0.6) and summary["dice/1_median"] == pytest.approx(0.6)
    assert summary["dice/1_std"] == pytest.approx(0.4)  # sample standard deviation of 0.2, 0.6, 1.0
    assert (summary["only"], summary["only_std"]) == (4.0, 0.0)
    assert math.isnan(aggregate([{"x": math.nan}])["x"])


def test_slice_metrics_on_a_known_batch() -> None:
    metrics = SliceMetrics(3)
    target = torch.tensor([[[0, 1, 1, 2], [0, 1, 1, 2]]])
    preds = torch.tensor([[[0, 1, 0, 2], [0, 1, 1, 1]]])
    metrics.update(preds, target)
    values = metrics.compute()
    # class 1: tp 3, fp 1, fn 1; class 2: tp 1, fp 0, fn 1
    assert values["dice/1"].item() == pytest.approx(6 / 8) and values["iou/1"].item() == pytest.approx(3 / 5)
    assert values["dice/2"].item() == pytest.approx(2 / 3) and values["iou/2"].item() == pytest.approx(1 / 2)
    assert values["dice/mean"].item() == pytest.approx((6 / 8 + 2 / 3) / 2)
    assert "dice/0" not in values
    metrics.update(preds, target)  # pooled over the epoch: a repeat changes nothing
    assert metrics.compute()["dice/1"].item() == pytest.approx(6 / 8)
    metrics.reset()
    metrics.update(target, target)
    assert metrics.compute()["iou/1"].item() == 1.0


def test_slice_metrics_of_a_binary_task() -> None:
    metrics = SliceMetrics(2)
    metrics.update(torch.tensor([[[0, 1, 1, 0]]]), torch.tensor([[[0, 1, 0, 0]]]))
    values = metrics.compute()
    assert values["dice/1"].item() == pytest.approx(2 / 3) and values["iou/1"].item() == pytest.approx(1 / 2)
    assert values["dice/mean"].item() == pytest.approx(2 / 3)


# --- cross-check against MONAI (test-only dependency) ---------------------------------------------------------------
def _blobs(shape: tuple[int, ...], seed: int, num_classes: int) -> np.ndarray:
    """Smooth random label blobs, some touching the image border."""
    field = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), 2.0)
    labels = np.zeros(shape, np.uint8)
    for c, level in enumerate(np.linspace(0.04, 0.2, num_classes - 1), start=1):
        labels[field > level] = c
    return labels


def _monai(pred: np.ndarray, target: np.ndarray, spacing: tuple[float, ...], num_classes: int) -> dict[str, np.ndarray]:
    metrics = pytest.importorskip("monai.metrics")

    def onehot(labels: np.ndarray) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.from_numpy(labels).long(), num_classes).movedim(-1, 0)[None]

    y_pred, y = onehot(pred), onehot(target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "dice": metrics.compute_dice(y_pred, y, include_background=False)[0].numpy(),
            "hd95": metrics.compute_hausdorff_distance(y_pred, y, percentile=95, spacing=spacing)[0].numpy(),
            "assd": metrics.compute_average_surface_distance(y_pred, y, symmetric=True, spacing=spacing)[0].numpy(),
        }


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [((40, 36, 14), (0.8, 1.1, 3.0)), ((30, 30, 20), (1.5, 0.6, 2.2)), ((48, 40), (0.7, 1.3))],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_monai_on_random_blobs(shape: tuple[int, ...], spacing: tuple[float, ...], seed: int) -> None:
    pytest.importorskip("monai")
    target = _blobs(shape, seed, 4)
    pred = _blobs(shape, seed + 100, 4)
    pred[target == 1] = np.where(np.random.default_rng(seed).random(shape) < 0.7, 1, pred)[target == 1]
    ours = case_metrics(pred, target, spacing, num_classes=4)
    reference = _monai(pred, target, spacing, 4)
    for c in range(1, 4):
        assert ours[f"dice/{c}"] == pytest.approx(reference["dice"][c - 1], abs=1e-4)
        assert ours[f"hd95/{c}"] == pytest.approx(reference["hd95"][c - 1], abs=1e-4)
        assert ours[f"assd/{c}"] == pytest.approx(reference["assd"][c - 1], abs=1e-4)
