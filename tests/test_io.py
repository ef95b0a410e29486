"""Readers: canonical orientation with spacing kept, 2D images as depth-1 volumes, clear errors."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image

from medseg_lightning.data.io import DataError, read_image, read_mask, read_volume


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def test_nifti_is_reoriented_to_ras_with_spacing_kept(tmp_path: Path) -> None:
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    las = np.diag([-2.0, 1.0, 3.0, 1.0])  # x axis pointing left
    volume = read_volume(_save(data, las, tmp_path / "las.nii.gz"))
    assert volume.spacing == (2.0, 1.0, 3.0)
    np.testing.assert_array_equal(volume.array, data[::-1])  # flipped along x into RAS
    assert volume.affine[0, 0] > 0


def test_multi_modal_columns_and_4d_files_become_channels(tmp_path: Path) -> None:
    t1 = np.random.default_rng(0).random((6, 7, 5)).astype(np.float32)
    flair = t1 * 2
    paths = [_save(t1, np.eye(4), tmp_path / "t1.nii.gz"), _save(flair, np.eye(4), tmp_path / "flair.nii.gz")]
    image = read_image(paths)
    assert image.array.shape == (2, 6, 7, 5)
    four_d = read_image([_save(np.stack([t1, flair], -1), np.eye(4), tmp_path / "both.nii.gz")])
    np.testing.assert_array_equal(four_d.array, image.array)


def test_2d_png_and_tiff(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "slice.png")
    tifffile.imwrite(tmp_path / "slice.tif", rgb, compression="zlib")
    for name in ("slice.png", "slice.tif"):
        image = read_image([tmp_path / name])
        assert image.array.shape == (3, 20, 30, 1)
        assert image.spacing_known is False
        np.testing.assert_array_equal(image.array[:, :, :, 0], np.moveaxis(rgb, -1, 0))
    mask = np.where(rgb[..., 0] > 128, 255, 0).astype(np.uint8)
    Image.fromarray(np.stack([mask] * 3, -1)).save(tmp_path / "mask.png")
    assert read_mask(tmp_path / "mask.png").array.shape == (20, 30, 1)


def test_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing\.nii\.gz: file not found"):
        read_volume(tmp_path / "missing.nii.gz")
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match=r"corrupt\.nii\.gz: unreadable or corrupt"):
        read_volume(corrupt)
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        read_volume(other)
    a = _save(np.zeros((4, 4, 4), np.float32), np.eye(4), tmp_path / "a.nii.gz")
    b = _save(np.zeros((4, 4, 5), np.float32), np.eye(4), tmp_path / "b.nii.gz")
    with pytest.raises(DataError, match=r"b.nii.gz: shape \(4, 4, 5\) differs"):
        read_image([a, b])
