"""One image file (NIfTI or a 2D image) read into a canonically oriented :class:`Volume`, and the errors and file
name rules every reader shares. Slice folders and multi-file cases build on this (``data.slices``, ``data.io``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class DataError(ValueError):
    """A file that cannot be used; the message names the file."""


@dataclass
class Volume:
    """An image or mask in canonical (RAS+) voxel order.

    Attributes:
        array: ``(C, X, Y, Z)`` for images, ``(X, Y, Z)`` for masks.
        affine: voxel -> world (mm) matrix of ``array``.
        spacing: voxel size in mm along X, Y, Z.
        spacing_known: False for 2D image formats, which carry no physical spacing (distances are then pixels).
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    spacing_known: bool = True


def is_supported(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(NIFTI_SUFFIXES) or name.endswith(IMAGE_2D_SUFFIXES)


def strip_suffix(name: str) -> str:
    """File name without its image suffix (``case.nii.gz`` -> ``case``)."""
    lower = name.lower()
    for suffix in NIFTI_SUFFIXES + IMAGE_2D_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_file(path: Path) -> Volume:
    """Reads one NIfTI file or 2D image; spatial axes first, channels (if any) last as stored.

    Raises:
        DataError: the file is missing, of an unknown type or cannot be decoded.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    name = path.name.lower()
    try:
        if name.endswith(NIFTI_SUFFIXES):
            return _read_nifti(path)
        if name.endswith(IMAGE_2D_SUFFIXES):
            return _read_2d(path)
    except DataError:
        raise
    except Exception as error:  # nibabel, zlib, PIL and tifffile raise many types for corrupt files
        raise DataError(f"{path}: unreadable or corrupt file ({type(error).__name__}: {error})") from None
    raise DataError(f"{path}: unsupported file type; expected one of {', '.join(NIFTI_SUFFIXES + IMAGE_2D_SUFFIXES)}")


def _read_nifti(path: Path) -> Volume:
    return nifti_volume(nib.load(str(path)), str(path))


def nifti_volume(image: nib.Nifti1Image, label: str) -> Volume:
    """A nibabel image (a NIfTI file, or a converted DICOM series) as a canonically oriented volume."""
    if len(image.shape) not in (3, 4):
        raise DataError(f"{label}: expected a 3D or 4D NIfTI volume, got shape {image.shape}")
    check_affine(image.affine, label)
    image = nib.as_closest_canonical(image)
    array = np.asanyarray(image.dataobj)
    zooms = image.header.get_zooms()[:3]
    return Volume(array=array, affine=image.affine.copy(), spacing=tuple(float(z) for z in zooms))


def check_affine(affine: np.ndarray, label: str) -> None:
    """A voxel-to-world matrix that cannot be inverted places voxels on a plane or line: reorientation, spacing
    and every distance in mm would be meaningless, so it is refused with a line that says so.

    Raises:
        DataError: the affine has non-finite entries or no inverse.
    """
    linear = np.asarray(affine, dtype=float)[:3, :3]
    if not np.all(np.isfinite(affine)):
        raise DataError(f"{label}: the affine (voxel-to-world matrix) has NaN/Inf entries; fix the header's "
                        "sform/qform")
    scale = float(np.abs(linear).max())
    if scale == 0 or abs(float(np.linalg.det(linear))) <= 1e-12 * scale**3:
        zooms = ", ".join(f"{value:.4g}" for value in np.linalg.norm(linear, axis=0))
        raise DataError(f"{label}: the affine (voxel-to-world matrix) is not invertible (determinant 0, column "
                        f"lengths {zooms}); fix the header's sform/qform")


def _read_2d(path: Path) -> Volume:
    if path.name.lower().endswith((".tif", ".tiff")):
        import tifffile

        array = tifffile.imread(str(path))
    else:
        from PIL import Image

        with Image.open(path) as handle:
            array = np.asarray(handle)
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
        array = np.moveaxis(array, 0, -1)  # planar TIFF (C, H, W) -> (H, W, C)
    if array.ndim not in (2, 3):
        raise DataError(f"{path}: expected a 2D image (H, W) or (H, W, C), got shape {array.shape}")
    # rows, cols -> X, Y with a depth-1 Z axis; channels stay last like a 4D NIfTI
    array = array[:, :, None] if array.ndim == 2 else array[:, :, None, :]
    return Volume(array=array, affine=np.eye(4), spacing=(1.0, 1.0, 1.0), spacing_known=False)
