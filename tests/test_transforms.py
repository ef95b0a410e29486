"""Augmentation: presets by name, user-listed transforms, image and mask kept aligned."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg_lightning.config.schema import AugmentationConfig
from medseg_lightning.data.transforms import PRESETS, build_augmentation


def _pair(labels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A mask of 8-pixel blocks with three labels (or two: 0 and 2), and a two-channel image that encodes it."""
    blocks = np.add.outer(np.arange(8), np.arange(8)) % labels * (2 // (labels - 1))
    mask = np.kron(blocks, np.ones((8, 8), int)).astype(np.uint8)
    image = np.stack([mask * 10.0, mask * -5.0]).astype(np.float32)
    return image, mask


GEOMETRIC = [
    {"name": "Affine", "rotate": [-30, 30], "scale": [0.8, 1.2], "shear": [-8, 8], "translate_px": [-5, 5], "p": 1.0},
    {"name": "ElasticTransform", "alpha": 20, "sigma": 5, "p": 0.5},
    {"name": "HorizontalFlip", "p": 0.5},
]


@pytest.mark.parametrize(
    ("config", "labels"),
    # the intensity preset's gamma and noise can bring a middle intensity level within noise of a neighbour, so
    # decoding the image would fail without any misalignment: it is checked on two levels, which gamma keeps apart
    [(AugmentationConfig(preset="light"), 3), (AugmentationConfig(preset="intensity"), 2),
     (AugmentationConfig(preset="none", transforms=GEOMETRIC), 3)],
    ids=["light", "intensity", "geometric"],
)
def test_geometric_augmentation_keeps_image_and_mask_aligned(config: AugmentationConfig, labels: int) -> None:
    augment = build_augmentation(config)
    assert augment is not None
    image, mask = _pair(labels)
    moved = 0
    for _ in range(30):
        out_image, out_mask = augment(image, mask)
        assert out_image.shape == image.shape and out_mask.shape == mask.shape and out_mask.dtype == mask.dtype
        assert set(np.unique(out_mask)) <= {0, 1, 2}  # nearest neighbour for labels
        moved += not np.array_equal(out_mask, mask)
        agreement = _agreement(out_image[0], out_mask)
        assert agreement > 0.97, f"image and mask drifted apart: {agreement:.3f}"
    assert moved > 5  # the transforms really move things


def _agreement(channel: np.ndarray, mask: np.ndarray) -> float:
    """Share of interior pixels whose intensity is nearest to their own label's median intensity.

    Medians per label absorb brightness/contrast changes; only pixels 1+ px inside a region count, since
    interpolation legitimately mixes labels at edges. Geometric drift between image and mask lowers it.
    """
    centres = np.array([np.median(channel[mask == k]) if (mask == k).any() else np.inf for k in range(3)])
    interior = ndimage.minimum_filter(mask, size=3) == ndimage.maximum_filter(mask, size=3)
    decoded = np.abs(channel[None] - centres[:, None, None]).argmin(0)
    return float((decoded == mask)[interior].mean())


def test_misalignment_would_be_caught() -> None:
    image, mask = _pair()
    assert _agreement(image[0], mask) == 1.0
    assert _agreement(image[0], np.roll(mask, 2, axis=0)) < 0.9  # a 2-pixel drift is caught


def test_user_listed_transforms_and_errors() -> None:
    augment = build_augmentation(AugmentationConfig(preset="none", transforms=[{"name": "HorizontalFlip", "p": 1.0}]))
    image, mask = _pair()
    out_image, out_mask = augment(image, mask)
    np.testing.assert_array_equal(out_mask, mask[:, ::-1])
    np.testing.assert_array_equal(out_image, image[:, :, ::-1])
    assert build_augmentation(AugmentationConfig(preset="none")) is None
    with pytest.raises(ValueError, match=r"transforms\.0: unknown albumentations transform 'HorizontalFlp'.*"
                                         r"Did you mean 'HorizontalFlip'"):
        build_augmentation(AugmentationConfig(preset="none", transforms=[{"name": "HorizontalFlp"}]))
    with pytest.raises(ValueError, match=r"transforms\.0: GaussNoise\(.*\) failed"):
        build_augmentation(AugmentationConfig(preset="none", transforms=[{"name": "GaussNoise", "nonsense": 1}]))
    with pytest.raises(ValueError, match="unknown augmentation preset 'heavy'"):
        build_augmentation(AugmentationConfig(preset="heavy"))
    assert PRESETS.names() == ["intensity", "light", "none", "strong"]


def test_intensity_augmentation_keeps_unbounded_intensities() -> None:
    """z-scored MRI and Hounsfield units must not be clipped to [0, 1] (albumentations' float convention)."""
    augment = build_augmentation(AugmentationConfig(preset="strong"))
    image = np.broadcast_to(np.linspace(-1000, 1000, 64, dtype=np.float32), (1, 64, 64)).copy()
    mask = np.zeros((64, 64), np.uint8)
    for _ in range(10):
        out, _ = augment(image, mask)
        assert out.min() < -500 and out.max() - out.min() > 1000  # not squeezed into [0, 1]


def test_the_intensity_preset_changes_contrast_and_gamma_more_than_light() -> None:
    """The site-shift remedy: intensity relations between tissues change a lot, far more than with 'light'."""
    image, mask = _pair()

    def spread(preset: str) -> float:
        augment = build_augmentation(AugmentationConfig(preset=preset))
        rng_ratios = []
        for seed in range(40):
            np.random.seed(seed)
            out, out_mask = augment(image, mask)
            low, high = (np.median(out[0][out_mask == k]) for k in (1, 2))
            rng_ratios.append((low - out[0].min()) / max(high - out[0].min(), 1e-6))  # 0.5 without changes
        return float(np.std(rng_ratios))

    assert spread("intensity") > 2 * spread("light")


class _Augmented(torch.utils.data.Dataset):
    """The same image and mask, augmented on every read (as the training dataset does)."""

    def __init__(self) -> None:
        self.augment = build_augmentation(AugmentationConfig(preset="light", transforms=GEOMETRIC))
        self.image, self.mask = _pair()

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.augment(self.image, self.mask)[0])


def _epochs(loader_seed: int, epochs: int = 2, workers: int = 2) -> list[torch.Tensor]:
    torch.manual_seed(loader_seed)  # what seed_everything does for a run
    loader = torch.utils.data.DataLoader(_Augmented(), batch_size=None, num_workers=workers)
    return [torch.stack(list(loader)) for _ in range(epochs)]


@pytest.mark.parametrize("workers", [0, 2])
def test_augmentation_is_repeatable_with_the_run_seed_and_varies_between_epochs(workers: int) -> None:
    first, again, other = _epochs(0, workers=workers), _epochs(0, workers=workers), _epochs(1, workers=workers)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))  # a rerun augments identically
    assert not torch.equal(first[0], first[1])  # a new epoch draws new augmentations
    assert not torch.equal(first[0], other[0])  # another seed, other augmentations
    assert len({tuple(sample.flatten()[::97].tolist()) for sample in first[0]}) == 4  # no two reads alike
