"""Augmentation adapter: the only module that imports albumentations.

albumentations 2.0.8 (MIT) is pinned because it is the last release under that licence; keeping it behind
``build_augmentation`` lets it be swapped (torchvision v2, MONAI) without touching datasets or configs.
Transforms are applied jointly to image and mask (masks with nearest-neighbour interpolation). Intensity
transforms act relative to each channel's range (see ``augment``), since albumentations assumes [0, 1] floats.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network call at import: machines may be offline

import albumentations as A
import cv2
import numpy as np
import torch

from medseg_lightning.config.registry import Registry, unknown_name_message
from medseg_lightning.config.schema import AugmentationConfig

Augment = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
PRESETS: Registry[Callable[[], list[A.BasicTransform]]] = Registry("augmentation preset")
_FILL = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0, "fill_mask": 0}


@PRESETS.register("none")
def _none() -> list[A.BasicTransform]:
    return []


@PRESETS.register("light")
def _light() -> list[A.BasicTransform]:
    """Small rigid/scale jitter and mild intensity changes: safe for most anatomy."""
    return [
        A.Affine(scale=(0.9, 1.1), rotate=(-15, 15), translate_percent=(-0.05, 0.05), p=0.5, **_FILL),
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.3),
    ]


@PRESETS.register("strong")
def _strong() -> list[A.BasicTransform]:
    """Larger geometric and intensity changes, elastic deformation, noise and blur (scanner variation)."""
    return [
        A.Affine(scale=(0.75, 1.3), rotate=(-30, 30), shear=(-8, 8), translate_percent=(-0.1, 0.1), p=0.7, **_FILL),
        A.ElasticTransform(alpha=20, sigma=5, p=0.2, **_FILL),
        A.RandomBrightnessContrast(brightness_limit=0.25, contrast_limit=0.25, p=0.5),
        A.GaussNoise(std_range=(0.02, 0.1), p=0.3),
        A.GaussianBlur(blur_limit=(3, 5), p=0.2),
    ]


@PRESETS.register("intensity")
def _intensity() -> list[A.BasicTransform]:
    """Light geometry with strong intensity changes (brightness, contrast, gamma, noise, blur): a remedy for
    scanner and site differences, which change how tissue looks more than where it is."""
    return [
        A.Affine(scale=(0.9, 1.1), rotate=(-15, 15), translate_percent=(-0.05, 0.05), p=0.5, **_FILL),
        A.RandomBrightnessContrast(brightness_limit=0.3, contrast_limit=0.3, p=0.8),
        A.RandomGamma(gamma_limit=(60, 160), p=0.5),
        A.GaussNoise(std_range=(0.02, 0.08), p=0.3),
        A.GaussianBlur(blur_limit=(3, 5), p=0.2),
    ]


def _is_transform(candidate: object) -> bool:
    return isinstance(candidate, type) and issubclass(candidate, A.BasicTransform)


def _transform_from_spec(spec: dict[str, Any], index: int) -> A.BasicTransform:
    """Builds ``{name: Affine, p: 0.5, ...}``; unknown names and bad arguments name the list entry."""
    spec = dict(spec)
    name = spec.pop("name", None)
    where = f"data.augmentation.transforms.{index}"
    if not isinstance(name, str):
        raise ValueError(f"{where}: each transform needs 'name: <albumentations class>', got {spec}")
    cls = getattr(A, name, None)
    if not _is_transform(cls):
        valid = sorted(n for n in dir(A) if _is_transform(getattr(A, n)))
        raise ValueError(f"{where}: {unknown_name_message('albumentations transform', name, valid)}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            transform = cls(**spec)
    except Exception as error:
        raise ValueError(f"{where}: {name}({spec}) failed: {error}") from None
    invalid = [str(w.message) for w in caught if "not valid" in str(w.message)]
    if invalid:  # albumentations only warns about unknown arguments; a typo must not be silently ignored
        raise ValueError(f"{where}: {name}({spec}) failed: {invalid[0]}")
    return transform


def build_augmentation(config: AugmentationConfig) -> Augment | None:
    """A function ``(image (C,H,W), mask (H,W)) -> (image, mask)``, or None when nothing is configured.

    Raises:
        ValueError: an unknown preset or transform, or invalid transform arguments.
    """
    try:
        transforms = PRESETS.get(config.preset)()
    except KeyError as error:
        raise ValueError(f"data.augmentation.preset: {error.args[0]}") from None
    transforms += [_transform_from_spec(spec, i) for i, spec in enumerate(config.transforms)]
    if not transforms:
        return None
    pipeline = A.Compose(transforms)
    seeded_with: list[int] = []

    def augment(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        seed = torch.initial_seed()  # the run's seed in the main process; per worker and epoch in a DataLoader
        if seeded_with != [seed]:
            seed_pipeline(pipeline, seed)
            seeded_with[:] = [seed]
        # albumentations clips float images to [0, 1]: map each channel's range there and back, so z-scored or
        # Hounsfield intensities survive (and the constant border fill becomes the channel minimum)
        low = image.min(axis=(1, 2), keepdims=True)
        scale = np.maximum(image.max(axis=(1, 2), keepdims=True) - low, 1e-6)
        unit = np.ascontiguousarray(np.moveaxis((image - low) / scale, 0, -1), dtype=np.float32)
        out = pipeline(image=unit, mask=np.ascontiguousarray(mask))
        restored = np.moveaxis(out["image"].reshape(unit.shape), -1, 0) * scale + low
        return restored.astype(np.float32, copy=False), out["mask"]

    return augment


def seed_pipeline(pipeline: A.Compose, seed: int) -> None:
    """Seeds every transform with its own stream derived from ``seed``.

    Unseeded, albumentations 2 draws from OS entropy, so a run's augmentations (and its results) could not be
    repeated; ``Compose.set_random_seed`` alone gives every transform the same stream, so their random choices
    would be correlated.
    """
    pipeline.set_random_seed(seed % 2**32)
    streams = np.random.SeedSequence(seed).generate_state(len(pipeline.transforms))
    for transform, stream in zip(pipeline.transforms, streams, strict=True):
        transform.set_random_seed(int(stream))
