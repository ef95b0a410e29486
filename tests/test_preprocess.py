"""Array preprocessing: intensity methods, in-plane fitting and its exact inverse, 2.5D stacking."""

from __future__ import annotations

import numpy as np
import pytest

from medseg_lightning.config.schema import IntensityConfig
from medseg_lightning.data.dataset import stack_context
from medseg_lightning.data.preprocess import fit_in_plane, normalize_intensity, restore_in_plane, to_slices


def test_intensity_methods() -> None:
    rng = np.random.default_rng(0)
    image = np.stack([rng.normal(300, 50, (8, 8, 4)), rng.normal(-500, 400, (8, 8, 4))]).astype(np.float32)
    out = normalize_intensity(image, [IntensityConfig(method="zscore"), IntensityConfig(method="ct_window",
                                                                                        window=(-1000, 0))])
    assert out.dtype == np.float32
    assert abs(out[0].mean()) < 1e-4 and abs(out[0].std() - 1) < 1e-3
    assert out[1].min() >= 0 and out[1].max() <= 1
    np.testing.assert_allclose(out[1], np.clip((image[1] + 1000) / 1000, 0, 1), atol=1e-6)
    pct = normalize_intensity(image[:1], [IntensityConfig(method="percentile", percentiles=(1, 99))])
    assert pct.min() == 0 and pct.max() == 1


def test_zscore_nonzero_only_ignores_background() -> None:
    image = np.zeros((1, 10, 10, 1), np.float32)
    image[0, :5] = 100
    image[0, :2] = 120
    out = normalize_intensity(image, [IntensityConfig(nonzero_only=True)])
    values = out[0, :5]
    assert abs(values.mean()) < 1e-4  # statistics from the non-zero voxels only


@pytest.mark.parametrize("mode", ["pad_crop", "resize"])
@pytest.mark.parametrize("source", [(20, 40), (50, 33), (32, 32)])
def test_in_plane_fit_and_restore(mode: str, source: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    image = rng.random((3, 2, *source)).astype(np.float32)
    mask = np.zeros((3, *source), np.uint8)
    mask[:, source[0] // 4: source[0] // 2, source[1] // 4: source[1] // 2] = 2
    fitted_image, fitted_mask, geometry = fit_in_plane(image, mask, (32, 32), mode)
    assert fitted_image.shape == (3, 2, 32, 32) and fitted_mask.shape == (3, 32, 32)
    assert set(np.unique(fitted_mask)) <= {0, 2}  # nearest neighbour: no new label values
    restored = restore_in_plane(fitted_mask, geometry)
    assert restored.shape == mask.shape
    if mode == "pad_crop" and source[0] <= 32 and source[1] <= 32:
        np.testing.assert_array_equal(restored, mask)  # padding is undone exactly
    else:
        assert (restored == mask).mean() > 0.9


def test_to_slices_moves_axis_first() -> None:
    image = np.zeros((2, 5, 6, 7), np.float32)
    assert to_slices(image, 0, channels_first=True).shape == (5, 2, 6, 7)
    assert to_slices(image, 2, channels_first=True).shape == (7, 2, 5, 6)
    assert to_slices(image[0], 1, channels_first=False).shape == (6, 5, 7)


def test_context_stacking_repeats_edges() -> None:
    image = np.arange(4, dtype=np.float32)[:, None, None, None] * np.ones((4, 2, 3, 3), np.float32)
    image[:, 1] += 100  # second modality
    stacked = stack_context(image, np.array([0, 3]), context=1)
    assert stacked.shape == (2, 6, 3, 3)
    np.testing.assert_array_equal(stacked[0, :, 0, 0], [0, 100, 0, 100, 1, 101])  # slice -1 repeats slice 0
    np.testing.assert_array_equal(stacked[1, :, 0, 0], [2, 102, 3, 103, 3, 103])
