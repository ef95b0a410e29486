"""Reading images and masks into one channels-first, canonically oriented representation.

Every case, NIfTI volume or 2D image, becomes ``(C, X, Y, Z)`` (masks ``(X, Y, Z)``) so that slicing, caching and
metrics have a single code path; a 2D image is a volume of depth 1 along axis 2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg_lightning.data.slices import is_slice_folder, read_slice_stack
from medseg_lightning.data.volume import (  # re-exported: every reader's shared names
    IMAGE_2D_SUFFIXES,
    NIFTI_SUFFIXES,
    DataError,
    Volume,
    check_affine,
    is_supported,
    nifti_volume,
    read_file,
    strip_suffix,
)

__all__ = ["IMAGE_2D_SUFFIXES", "NIFTI_SUFFIXES", "DataError", "Volume", "check_affine", "is_supported",
           "nifti_volume", "read_file", "read_image", "read_mask", "read_volume", "strip_suffix"]


def read_volume(path: Path) -> Volume:
    """Reads a NIfTI file, a 2D image or a slice folder; spatial axes first, channels (if any) last as stored.

    Raises:
        DataError: the file is missing, of an unknown type or cannot be decoded.
    """
    if path.is_dir():
        if is_slice_folder(path):
            return _slice_volume(read_slice_stack(path))
        raise DataError(f"{path}: a folder, but not a slice folder (<folder name>_<number>.tif files)")
    return read_file(path)


def read_image(paths: list[Path]) -> Volume:
    """Reads one case's image as ``(C, X, Y, Z)``: one file per modality, or one 4D / multi-channel file."""
    volumes = [read_volume(path) for path in paths]
    channels = []
    for path, volume in zip(paths, volumes, strict=True):
        array = volume.array
        array = array[None] if array.ndim == 3 else np.moveaxis(array, -1, 0)
        if channels and array.shape[1:] != channels[0].shape[1:]:
            raise DataError(f"{path}: shape {array.shape[1:]} differs from {paths[0].name} {channels[0].shape[1:]}")
        channels.append(array)
    stacked = np.concatenate(channels, axis=0) if len(channels) > 1 else channels[0]
    first = volumes[0]
    return Volume(array=stacked, affine=first.affine, spacing=first.spacing, spacing_known=first.spacing_known)


def _slice_volume(array: np.ndarray) -> Volume:
    """Stacked 2D slices: rows, cols, slice number as X, Y, Z; no physical spacing."""
    return Volume(array=array, affine=np.eye(4), spacing=(1.0, 1.0, 1.0), spacing_known=False)


def read_mask(path: Path) -> Volume:
    """Reads a label map as ``(X, Y, Z)``; a colour PNG mask with equal channels is reduced to one.

    A slice folder's mask is the stack of its ``<case>_<n>_mask`` files.
    """
    volume = _slice_volume(read_slice_stack(path, masks=True)) if path.is_dir() else read_volume(path)
    array = volume.array
    if array.ndim == 4:
        if array.shape[-1] == 1 or all(np.array_equal(array[..., 0], array[..., c]) for c in range(array.shape[-1])):
            array = array[..., 0]
        else:
            raise DataError(f"{path}: a mask must have one channel, got {array.shape[-1]} differing channels")
    volume.array = array
    return volume
