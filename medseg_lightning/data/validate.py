"""Checks on one case's arrays: everything that would silently ruin training if it went unnoticed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medseg_lightning.config.schema import DataConfig
from medseg_lightning.data.io import Volume
from medseg_lightning.data.manifest import Case

AFFINE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Problem:
    """One problem with the data, naming the case and the file it concerns."""

    message: str
    case_id: str | None = None
    file: str | None = None

    def __str__(self) -> str:
        where = [part for part in (f"case {self.case_id}" if self.case_id else None, self.file) if part]
        return f"{': '.join(where)}: {self.message}" if where else self.message


def map_labels(mask: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """Applies ``label_mapping`` (source value -> label); values it does not name are kept as they are."""
    if not mapping:
        return mask
    result = mask.copy()
    for source, label in mapping.items():
        result[mask == source] = label
    return result


def check_image(case: Case, image: Volume, config: DataConfig) -> list[Problem]:
    """NaN/Inf voxels, empty or constant channels, a 2D image sliced along the wrong axis."""
    file = str(case.image_paths[0])
    array = image.array
    if array.size == 0:
        return [Problem("image is empty (0 voxels)", case.case_id, file)]
    problems = []
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            problems.append(Problem(f"image has {bad} NaN/Inf voxel(s)", case.case_id, file))
    for channel in range(array.shape[0]):
        values = array[channel]
        finite = values[np.isfinite(values)] if np.issubdtype(values.dtype, np.floating) else values
        if finite.size and finite.min() == finite.max():
            problems.append(Problem(f"channel {channel} is constant ({finite.flat[0]})", case.case_id, file))
    if array.shape[-1] == 1 and config.slicing.axis != 2:
        problems.append(Problem("2D image: set slicing.axis to 2 (the depth-1 axis)", case.case_id, file))
    expected = config.preprocessing.intensity
    if isinstance(expected, list) and len(expected) != array.shape[0]:
        problems.append(
            Problem(f"image has {array.shape[0]} channel(s); preprocessing.intensity lists {len(expected)}",
                    case.case_id, file)
        )
    return problems


def check_mask(case: Case, image: Volume, mask: Volume, config: DataConfig) -> list[Problem]:
    """Shape and affine agreement with the image, integer labels within the configured classes."""
    file = str(case.mask_path)
    problems = []
    if mask.array.shape != image.array.shape[1:]:
        problems.append(
            Problem(f"mask shape {mask.array.shape} != image shape {image.array.shape[1:]}", case.case_id, file)
        )
    elif image.spacing_known and not np.allclose(mask.affine, image.affine, atol=AFFINE_TOLERANCE):
        difference = float(np.abs(mask.affine - image.affine).max())
        problems.append(Problem(f"mask affine differs from the image affine (max difference {difference:.4g})",
                                case.case_id, file))
    values = np.unique(mask.array)
    if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values) & (values == np.round(values))):
        shown = values[~(np.isfinite(values) & (values == np.round(values)))][:5].tolist()
        return [*problems, Problem(f"mask has non-integer values {shown}", case.case_id, file)]
    labels = np.unique(map_labels(values.astype(np.int64), config.label_mapping))
    outside = sorted(set(labels.tolist()) - set(config.labels))
    if outside:
        valid = ", ".join(f"{k}={v}" for k, v in sorted(config.labels.items()))
        hint = " (after label_mapping)" if config.label_mapping else ""
        problems.append(Problem(f"label values {outside[:10]} outside the configured classes{hint}: {valid}",
                                case.case_id, file))
    return problems
