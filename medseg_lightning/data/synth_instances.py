"""A synthetic cohort of touching objects with known instance ids, for instance segmentation.

Each case holds 3-6 ellipsoidal "cells" (label 1); most are placed against an earlier one so that they touch or
overlap a little (the shared voxels go to the object whose centre is nearer in its own shape's units). A semantic
label map cannot tell touching objects apart, so a U-Net followed by connected components merges them, while an
instance model can separate them: the images carry what a microscope or a scanner would show, a slightly darker
seam where two objects meet and a little intensity difference between objects. The layout is MSD-style
(``imagesTr/``, ``labelsTr/`` semantic maps, ``instancesTr/`` instance maps) with a manifest that has an
``instances`` column and the demographic attributes of ``synth.generate_cohort``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg_lightning.data.synth import _affine, _draw_attributes, _save_nifti

COLUMNS = ("case_id", "image", "mask", "instances", "subject_id", "sex", "age", "site")
_BACKGROUND, _OBJECT, _NOISE = 80.0, 420.0, 25.0


def _place(rng: np.random.Generator, placed: list[tuple[np.ndarray, np.ndarray]], shape: np.ndarray,
           touching: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre and radii (voxels) of the next object: against an earlier one with probability ``touching``."""
    radii = np.array([rng.uniform(5, 9), rng.uniform(5, 9), rng.uniform(1.2, 2.2)])
    if placed and rng.random() < touching:
        centre, other = placed[int(rng.integers(len(placed)))]
        angle = rng.uniform(0, 2 * np.pi)
        distance = (radii[0] + other[0]) / 2 + (radii[1] + other[1]) / 2
        step = np.array([np.cos(angle), np.sin(angle), 0.0]) * distance * rng.uniform(0.42, 0.48)
        return centre + step + np.array([0.0, 0.0, rng.uniform(-0.5, 0.5)]), radii
    margin = np.minimum(radii + 1, (shape - 1) / 2)
    return rng.uniform(margin, shape - 1 - margin), radii


def _draw_objects(rng: np.random.Generator, shape: tuple[int, int, int], touching: float) -> np.ndarray:
    """Instance map (uint16): each voxel belongs to the object with the smallest normalised distance under 1."""
    grid = np.indices(shape, dtype=np.float64)
    count = int(rng.integers(3, 7))
    placed: list[tuple[np.ndarray, np.ndarray]] = []
    for _ in range(count):
        placed.append(_place(rng, placed, np.asarray(shape, dtype=float), touching))
    distances = np.stack([np.sqrt(np.sum(((grid - c[:, None, None, None]) / r[:, None, None, None]) ** 2, axis=0))
                          for c, r in placed])
    nearest = distances.argmin(0)
    inside = distances.min(0) <= 1.0
    instances = np.where(inside, nearest + 1, 0)
    return _renumber(instances).astype(np.uint16)


def _renumber(instances: np.ndarray) -> np.ndarray:
    """Ids 1..N in order of appearance; objects that ended up with no voxel are gone."""
    ids, inverse = np.unique(instances, return_inverse=True)
    order = np.zeros(len(ids), np.int64)
    order[ids > 0] = np.arange(1, int((ids > 0).sum()) + 1)
    return order[inverse].reshape(instances.shape)


def _render(rng: np.random.Generator, instances: np.ndarray) -> np.ndarray:
    """Bright objects with their own brightness, a darker seam where two objects meet, blur and noise."""
    brightness = np.concatenate([[_BACKGROUND], _OBJECT * rng.uniform(0.85, 1.15, int(instances.max()))])
    image = brightness[instances]
    grown = ndimage.grey_dilation(instances, size=(3, 3, 1))
    shrunk = np.where(instances > 0, ndimage.grey_erosion(np.where(instances > 0, instances, 65535), size=(3, 3, 1)),
                      0)
    seam = (instances > 0) & ((grown != instances) | (shrunk != instances)) & (grown > 0) & (shrunk > 0)
    image = np.where(seam, image * 0.7, image)
    image = ndimage.gaussian_filter(image, sigma=(0.6, 0.6, 0.3)) + rng.standard_normal(instances.shape) * _NOISE
    return np.clip(image, 0, None).astype(np.float32)


def generate_instance_cohort(out_dir: Path, n_cases: int, *, seed: int = 0, shape: tuple[int, int, int] = (64, 64, 6),
                             spacing: tuple[float, float, float] = (1.0, 1.0, 2.0), touching: float = 0.7) -> Path:
    """Writes the cohort and its ``manifest.csv``; the same seed gives the same files. Returns the manifest."""
    if n_cases < 1 or min(shape) < 1 or not 0 <= touching <= 1:
        raise ValueError(f"need n_cases >= 1, a positive shape and 0 <= touching <= 1; got {n_cases}, {shape}, "
                         f"{touching}")
    out_dir = Path(out_dir)
    for folder in ("imagesTr", "labelsTr", "instancesTr"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    affine = _affine(shape, spacing)
    rows = _draw_attributes(n_cases, 1, seed)
    for i, row in enumerate(rows):
        rng = np.random.default_rng([seed, 7, i])
        instances = _draw_objects(rng, tuple(shape), touching)
        image = _render(rng, instances)
        name = row["case_id"]
        row.update(image=f"imagesTr/{name}.nii.gz", mask=f"labelsTr/{name}.nii.gz",
                   instances=f"instancesTr/{name}.nii.gz")
        _save_nifti(image, affine, spacing, out_dir / row["image"])
        _save_nifti((instances > 0).astype(np.uint8), affine, spacing, out_dir / row["mask"])
        _save_nifti(instances, affine, spacing, out_dir / row["instances"])
    manifest = out_dir / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def touching_pairs(instances: np.ndarray) -> int:
    """Pairs of distinct objects that share a face: what connected components of the label map would merge."""
    pairs: set[tuple[int, int]] = set()
    for axis in range(instances.ndim):
        a = np.moveaxis(instances, axis, 0)[:-1].ravel()
        b = np.moveaxis(instances, axis, 0)[1:].ravel()
        touching = (a > 0) & (b > 0) & (a != b)
        pairs |= {(int(min(x, y)), int(max(x, y))) for x, y in zip(a[touching], b[touching], strict=True)}
    return len(pairs)
