"""Slice folders: one folder per patient holding ``<case>_<n>.tif`` images and ``<case>_<n>_mask.tif`` masks.

Many 2D datasets (the LGG brain MRI "kaggle_3m" layout among them) store a patient as numbered slices. Stacking
them into one volume per patient, ordered by the slice number as a number (``_10`` after ``_9``), makes every
split, cache entry, metric and prediction per patient, exactly as for NIfTI volumes. These images carry no pixel
spacing, so distances stay in pixels.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from medseg_lightning.data.volume import IMAGE_2D_SUFFIXES, DataError, read_file, strip_suffix

_SLICE = re.compile(r"^(?P<case>.+)_(?P<number>\d+)(?P<mask>_mask)?$")


def slice_files(folder: Path) -> tuple[dict[int, Path], dict[int, Path]]:
    """Image and mask files of a slice folder by slice number.

    Raises:
        DataError: naming the file, for a slice without its mask (or the reverse), a gap in the slice numbers,
            a file named for another case, or a folder without slices.
    """
    images: dict[int, Path] = {}
    masks: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or not path.name.lower().endswith(IMAGE_2D_SUFFIXES) or path.name.startswith("."):
            continue
        match = _SLICE.match(strip_suffix(path.name))
        if match is None:
            raise DataError(f"{path}: not named <case>_<number>.tif or <case>_<number>_mask.tif")
        if match["case"] != folder.name:
            raise DataError(f"{path}: named for case {match['case']!r} but lies in the folder of {folder.name!r}")
        (masks if match["mask"] else images)[int(match["number"])] = path
    if not images:
        raise DataError(f"{folder}: no slice images (<case>_<number>.tif)")
    for number in sorted(set(images) - set(masks)):
        if masks:
            raise DataError(f"{images[number]}: slice {number} has no mask ({folder.name}_{number}_mask.tif)")
    for number in sorted(set(masks) - set(images)):
        raise DataError(f"{masks[number]}: mask of slice {number} has no image ({folder.name}_{number}.tif)")
    numbers = sorted(images)
    missing = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
    if missing:
        raise DataError(f"{folder}: slice number(s) {missing[:10]} missing between {numbers[0]} and {numbers[-1]}")
    return images, masks


def read_slice_stack(folder: Path, masks: bool = False) -> np.ndarray:
    """The slices stacked along the third axis: ``(rows, cols, slices)`` plus a channel axis for images.

    Raises:
        DataError: a missing, unreadable or differently sized slice, naming the file.
    """
    images, mask_files = slice_files(folder)
    files = mask_files if masks else images
    if masks and not mask_files:
        raise DataError(f"{folder}: no mask slices (<case>_<number>_mask.tif)")
    arrays = []
    for number in sorted(files):
        array = read_file(files[number]).array  # (rows, cols, 1[, channels])
        if arrays and array.shape != arrays[0].shape:
            raise DataError(f"{files[number]}: shape {array.shape[:2]} (channels {array.shape[3:] or (1,)}) differs "
                            f"from slice {min(files)}'s {arrays[0].shape[:2]}")
        arrays.append(array)
    return np.concatenate(arrays, axis=2)


def is_slice_folder(folder: Path) -> bool:
    """Whether a folder holds ``<folder name>_<n>`` slice images (checked on names only, cheap)."""
    prefix = f"{folder.name}_"
    return folder.is_dir() and any(p.name.startswith(prefix) and p.name.lower().endswith(IMAGE_2D_SUFFIXES)
                                   for p in folder.iterdir())
