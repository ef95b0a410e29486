"""Deterministic synthetic segmentation cohorts for tests and fairness experiments.

Real medical data cannot ship with a test suite, so this module fabricates a small MSD-style cohort: MRI-like
NIfTI volumes with an ellipsoidal "organ" (label 1) containing a smaller "lesion" (label 2), plus a manifest CSV
with demographic attributes. One subgroup can be made harder by construction (lower contrast, more noise, a
scanner-like intensity shift and stronger bias field) so fairness metrics have a known gap to detect.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

__all__ = ["HardGroup", "cohort_files", "generate_cohort", "parse_hard_group"]

MANIFEST_COLUMNS = ("case_id", "image", "mask", "subject_id", "sex", "age", "site")
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {"sex": ("F", "M"), "site": ("A", "B", "C")}
AGE_RANGE = (20, 85)
LESION_ABSENT_PROB = 0.1

# Base intensities on an MRI-like 0-1000 scale; the hard group scales these relative to background.
_BACKGROUND = 60.0
_ORGAN = 400.0
_LESION = 700.0
_NOISE_SIGMA = 20.0
_BIAS_AMPLITUDE = 0.05


@dataclass(frozen=True)
class HardGroup:
    """A subgroup made harder to segment by construction, so fairness checks have a known gap to find.

    Attributes:
        attribute: Manifest column defining the group; only ``"sex"`` and ``"site"`` are supported.
        value: Attribute value of the hard group, e.g. ``"F"`` or ``"B"``.
        severity: 0 leaves images unchanged; 1 clearly degrades them (lower contrast, more noise,
            global intensity shift/scale and a stronger bias field). Larger values degrade further.
    """

    attribute: str
    value: str
    severity: float = 1.0

    def __post_init__(self) -> None:
        """Reject groups that could never match a case, so a typo cannot silently disable the injected gap."""
        if self.attribute not in ATTRIBUTE_VALUES:
            raise ValueError(
                f"hard_group attribute must be one of {sorted(ATTRIBUTE_VALUES)}, got {self.attribute!r} "
                "(age is not supported: thresholds such as '60+' are out of scope)"
            )
        allowed = ATTRIBUTE_VALUES[self.attribute]
        if self.value not in allowed:
            raise ValueError(
                f"hard_group value for {self.attribute!r} must be one of {list(allowed)}, got {self.value!r}"
            )
        sev = self.severity
        if isinstance(sev, bool) or not isinstance(sev, (int, float)) or not math.isfinite(sev) or sev < 0:
            raise ValueError(f"hard_group severity must be a finite number >= 0, got {sev!r}")


def parse_hard_group(text: str) -> HardGroup:
    """Parse a CLI-style spec such as ``"sex=F"`` or ``"site=B:0.5"`` into a :class:`HardGroup`.

    The attribute is lower-cased and the value upper-cased so ``"Sex=f"`` works too.

    Raises:
        ValueError: If the text is malformed or names an unsupported attribute/value/severity.
    """
    fmt = "expected 'attribute=value' or 'attribute=value:severity', e.g. 'sex=F' or 'site=B:0.5'"
    if not isinstance(text, str) or text.count("=") != 1:
        raise ValueError(f"invalid hard group {text!r}: {fmt}")
    attribute, rest = (part.strip() for part in text.split("="))
    value, sep, sev_text = rest.partition(":")
    value = value.strip()
    if not attribute or not value or (sep and not sev_text.strip()):
        raise ValueError(f"invalid hard group {text!r}: {fmt}")
    severity = 1.0
    if sep:
        try:
            severity = float(sev_text)
        except ValueError:
            raise ValueError(f"invalid hard group severity {sev_text.strip()!r} in {text!r}: {fmt}") from None
    return HardGroup(attribute=attribute.lower(), value=value.upper(), severity=severity)


def _validate_args(n_cases: int, seed: int, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                   hard_group: HardGroup | None, cases_per_subject: int) -> None:
    """Fail early with clear messages rather than producing a silently odd cohort."""
    def _is_int(x: object) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))

    if not _is_int(n_cases) or n_cases < 1:
        raise ValueError(f"n_cases must be an integer >= 1, got {n_cases!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not _is_int(cases_per_subject) or cases_per_subject < 1:
        raise ValueError(f"cases_per_subject must be an integer >= 1, got {cases_per_subject!r}")
    if len(tuple(shape)) != 3 or not all(_is_int(s) and s > 0 for s in shape):
        raise ValueError(f"shape must be 3 positive integers, got {shape!r}")
    if len(tuple(spacing)) != 3 or not all(
        isinstance(s, (int, float, np.number)) and not isinstance(s, bool) and math.isfinite(s) and s > 0
        for s in spacing
    ):
        raise ValueError(f"spacing must be 3 positive finite numbers, got {spacing!r}")
    if hard_group is not None and not isinstance(hard_group, HardGroup):
        raise TypeError(f"hard_group must be a HardGroup or None, got {type(hard_group).__name__}")


def _draw_attributes(n_cases: int, cases_per_subject: int, seed: int) -> list[dict[str, str | int]]:
    """Draw per-subject demographics from their own stream so they never depend on images or hard_group."""
    rng = np.random.default_rng([seed, 0])
    n_subjects = -(-n_cases // cases_per_subject)
    sexes = rng.permutation(np.arange(n_subjects) % 2)  # exactly balanced up to one subject
    ages = rng.integers(AGE_RANGE[0], AGE_RANGE[1] + 1, size=n_subjects)
    sites = rng.integers(0, len(ATTRIBUTE_VALUES["site"]), size=n_subjects)
    rows: list[dict[str, str | int]] = []
    for i in range(n_cases):
        s = i // cases_per_subject
        rows.append({
            "case_id": f"synth_{i:03d}",
            "subject_id": f"subj_{s:03d}",
            "sex": ATTRIBUTE_VALUES["sex"][int(sexes[s])],
            "age": int(ages[s]),
            "site": ATTRIBUTE_VALUES["site"][int(sites[s])],
        })
    return rows


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix from three Euler angles (radians), used to jitter ellipsoid orientation."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _ellipsoid(coords: np.ndarray, centre: np.ndarray, radii: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """Boolean mask of a rotated ellipsoid; ``coords`` are physical (mm) positions of shape (3, X, Y, Z)."""
    local = np.tensordot(rot.T, coords - centre[:, None, None, None], axes=1)
    return np.sum((local / radii[:, None, None, None]) ** 2, axis=0) <= 1.0


def _draw_labels(rng: np.random.Generator, coords: np.ndarray, extent: np.ndarray) -> np.ndarray:
    """Draw an organ ellipsoid and, in most cases, a lesion inside it; returns a uint8 label map.

    A fixed number of random draws is made whether or not the lesion is present, keeping later draws aligned.
    """
    centre = extent / 2 + rng.uniform(-0.08, 0.08, 3) * extent
    radii = rng.uniform(0.22, 0.32, 3) * extent
    rot = _rotation(rng.uniform(-0.4, 0.4, 3))
    organ = _ellipsoid(coords, centre, radii, rot)

    direction = rng.normal(size=3)
    offset = direction / (np.linalg.norm(direction) + 1e-12) * rng.uniform(0.0, 0.45)
    l_centre = centre + rot @ (offset * radii)
    l_radii = rng.uniform(0.2, 0.35, 3) * radii.min()
    l_rot = _rotation(rng.uniform(-np.pi, np.pi, 3))
    has_lesion = rng.random() >= LESION_ABSENT_PROB

    labels = organ.astype(np.uint8)
    if has_lesion:
        lesion = _ellipsoid(coords, l_centre, l_radii, l_rot) & organ
        if not lesion.any():  # tiny volumes: keep at least the organ voxel nearest the lesion centre
            d2 = np.sum((coords - l_centre[:, None, None, None]) ** 2, axis=0)
            d2[~organ] = np.inf
            if np.isfinite(d2).any():
                lesion.flat[int(np.argmin(d2))] = True
        labels[lesion] = 2
    return labels


def _bias_field(rng: np.random.Generator, norm_coords: np.ndarray, amplitude: float) -> np.ndarray:
    """Smooth multiplicative field (exp of a random quadratic) mimicking MRI coil inhomogeneity."""
    lin = rng.normal(size=3)
    quad = rng.normal(size=3)
    poly = np.tensordot(lin, norm_coords, axes=1) + np.tensordot(quad, norm_coords**2 - 1.0 / 3.0, axes=1)
    return np.exp(amplitude * poly)


def _render_image(rng: np.random.Generator, labels: np.ndarray, norm_coords: np.ndarray,
                  hardness: float) -> np.ndarray:
    """Render an MRI-like float32 image for ``labels``; ``hardness`` (0 = normal) degrades it.

    Random draws are identical for every ``hardness`` so severity 0 reproduces the ordinary image exactly.
    """
    organ_val = _ORGAN * rng.uniform(0.9, 1.1)
    lesion_val = _LESION * rng.uniform(0.9, 1.1)
    gain = rng.uniform(0.9, 1.1)  # ordinary scanner-to-scanner gain jitter
    contrast = 1.0 / (1.0 + hardness)
    lut = np.array([_BACKGROUND, _BACKGROUND + (organ_val - _BACKGROUND) * contrast,
                    _BACKGROUND + (lesion_val - _BACKGROUND) * contrast], dtype=np.float64)
    clean = ndimage.gaussian_filter(lut[labels], sigma=0.7)  # soft partial-volume edges
    bias = _bias_field(rng, norm_coords, _BIAS_AMPLITUDE * (1.0 + 3.0 * hardness))
    noise = rng.standard_normal(labels.shape) * (_NOISE_SIGMA * (1.0 + 1.5 * hardness))
    image = (clean * bias + noise) * gain * (1.0 + 0.25 * hardness) + 60.0 * hardness
    return np.clip(image, 0.0, None).astype(np.float32)


def _affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """Diagonal-spacing affine with the volume centred on the world origin (hence a non-zero offset)."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = -(np.asarray(shape, dtype=float) - 1.0) * np.asarray(spacing, dtype=float) / 2.0
    return affine


def _save_nifti(array: np.ndarray, affine: np.ndarray, spacing: tuple[float, float, float], path: Path) -> None:
    """Write a NIfTI with consistent qform/sform/zooms so every reader agrees on geometry."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(array.dtype)
    img.header.set_zooms(tuple(float(s) for s in spacing))
    img.header.set_xyzt_units(xyz="mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _write_manifest(path: Path, rows: list[dict[str, str | int]]) -> Path:
    """Write the manifest with a fixed column order and Unix newlines so it is byte-stable across platforms."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


def cohort_files(out_dir: Path, n_cases: int, instances: bool = False) -> list[Path]:
    """Every file ``generate_cohort`` (``instances``: ``generate_instance_cohort``) writes into ``out_dir``, so a
    caller can refuse to replace a user's dataset before anything is written."""
    folders = ("imagesTr", "labelsTr", *(("instancesTr",) if instances else ()))
    return [Path(out_dir) / "manifest.csv",
            *(Path(out_dir) / folder / f"synth_{i:03d}.nii.gz" for folder in folders for i in range(n_cases))]


def generate_cohort(out_dir: Path, n_cases: int, *, seed: int = 0, shape: tuple[int, int, int] = (48, 48, 32),
                    spacing: tuple[float, float, float] = (1.0, 1.0, 1.5), hard_group: HardGroup | None = None,
                    cases_per_subject: int = 1) -> Path:
    """Write a deterministic MSD-style synthetic cohort, so tests and fairness work need no real data.

    Layout: ``imagesTr/<case_id>.nii.gz`` (float32), ``labelsTr/<case_id>.nii.gz`` (uint8; 0 background,
    1 organ, 2 lesion, the lesion absent in ~10% of cases) and ``manifest.csv`` with columns
    ``case_id,image,mask,subject_id,sex,age,site`` (paths relative to ``out_dir``). Attributes are drawn before
    and independently of images, so they do not depend on ``hard_group``; consecutive ``cases_per_subject`` cases
    share a subject and its attributes.

    Args:
        out_dir: Destination directory (created if missing; existing files of the same names are overwritten).
        n_cases: Number of cases, >= 1.
        seed: Non-negative seed; the same seed gives byte-identical arrays.
        shape: Volume shape (x, y, z) in voxels.
        spacing: Voxel spacing in mm, stored in the NIfTI affine/header.
        hard_group: Optional subgroup to degrade by construction.
        cases_per_subject: Number of consecutive cases sharing one subject, >= 1.

    Returns:
        Path of the written ``manifest.csv``.
    """
    _validate_args(n_cases, seed, shape, spacing, hard_group, cases_per_subject)
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    out_dir = Path(out_dir)
    (out_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out_dir / "labelsTr").mkdir(parents=True, exist_ok=True)

    rows = _draw_attributes(n_cases, cases_per_subject, seed)
    idx = np.indices(shape, dtype=np.float64)
    coords = idx * np.asarray(spacing)[:, None, None, None]
    norm_coords = 2.0 * idx / np.maximum(np.asarray(shape) - 1, 1)[:, None, None, None] - 1.0
    extent = np.asarray(shape) * np.asarray(spacing)
    affine = _affine(shape, spacing)

    for i, row in enumerate(rows):
        rng = np.random.default_rng([seed, 1, i])
        labels = _draw_labels(rng, coords, extent)
        in_hard = hard_group is not None and str(row[hard_group.attribute]) == hard_group.value
        hardness = float(hard_group.severity) if in_hard else 0.0
        image = _render_image(rng, labels, norm_coords, hardness)
        row["image"] = f"imagesTr/{row['case_id']}.nii.gz"
        row["mask"] = f"labelsTr/{row['case_id']}.nii.gz"
        _save_nifti(image, affine, spacing, out_dir / row["image"])
        _save_nifti(labels, affine, spacing, out_dir / row["mask"])

    return _write_manifest(out_dir / "manifest.csv", rows)
