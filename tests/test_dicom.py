"""DICOM series: voxel order, RAS affine from the tags, sorting by position, and one clear error per defect."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGBaseline8Bit, MRImageStorage, generate_uid

from medseg_lightning.data.dicom import is_dicom_series, read_dicom_series
from medseg_lightning.data.io import DataError

COLUMNS, ROWS, SLICES = 5, 4, 3  # all different, so any axis mix-up changes the shape
PIXEL_SPACING = (0.8, 0.6)  # (between rows, between columns), as in the DICOM tag
GAP = 2.5
SLOPE, INTERCEPT = 2.0, -1024.0
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # columns run posterior, rows run inferior (LPS)
_TILT = np.deg2rad(20.0)
OBLIQUE = (1.0, 0.0, 0.0, 0.0, float(np.cos(_TILT)), float(np.sin(_TILT)))  # axial tilted 20 degrees about x


def _stored_volume() -> np.ndarray:
    """Stored (pre-rescale) values indexed ``[column, row, slice]``, with a marked corner voxel."""
    i, j, k = np.meshgrid(np.arange(COLUMNS), np.arange(ROWS), np.arange(SLICES), indexing="ij")
    stored = (i + 10 * j + 100 * k).astype(np.int16)
    stored[COLUMNS - 1, 0, 0] = 999
    return stored


def _geometry(orientation: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    row_cosine, column_cosine = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row_cosine, column_cosine)
    origin = np.array([12.0, -30.5, 41.0])  # LPS position of voxel (0, 0, 0)
    return row_cosine, column_cosine, normal, origin


def _expected_ras(orientation: tuple[float, ...], i: int, j: int, k: int) -> np.ndarray:
    """By hand from the tags: IPP of slice k + i * column spacing * row cosine + j * row spacing * column cosine."""
    row_cosine, column_cosine, normal, origin = _geometry(orientation)
    lps = origin + k * GAP * normal + i * PIXEL_SPACING[1] * row_cosine + j * PIXEL_SPACING[0] * column_cosine
    return RAS_FROM_LPS @ lps


def _slice_dataset(pixels: np.ndarray, position: np.ndarray, orientation: tuple[float, ...], **tags: object) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset("slice", {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "MR"
    dataset.PatientName = "Doe^Jane"
    dataset.PatientID = "SECRET-ID-42"
    dataset.StudyInstanceUID = "1.2.3.4"
    dataset.SeriesInstanceUID = "1.2.3.4.5"
    dataset.SeriesDescription = "T1 SAG"
    dataset.SeriesNumber = 3
    dataset.ImageOrientationPatient = list(orientation)
    dataset.ImagePositionPatient = [float(value) for value in position]
    dataset.PixelSpacing = list(PIXEL_SPACING)
    dataset.SliceThickness = 7.0  # deliberately unlike the gap: spacing must come from positions
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 16, 15
    dataset.PixelRepresentation = 1
    dataset.RescaleSlope, dataset.RescaleIntercept = SLOPE, INTERCEPT
    dataset.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    for name, value in tags.items():
        setattr(dataset, name, value)
    return dataset


def _write_series(
    folder: Path,
    orientation: tuple[float, ...] = SAGITTAL,
    stored: np.ndarray | None = None,
    edit: Callable[[int, Dataset], None] | None = None,
    seed: int = 0,
) -> Path:
    """One file per slice under random names (half with ``.dcm``), written in shuffled order."""
    stored = _stored_volume() if stored is None else stored
    _, _, normal, origin = _geometry(orientation)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in rng.permutation(stored.shape[2]):
        position = origin + k * GAP * normal
        dataset = _slice_dataset(stored[:, :, k].T, position, orientation, InstanceNumber=int(stored.shape[2] - k))
        if edit is not None:
            edit(int(k), dataset)
        suffix = ".dcm" if rng.random() < 0.5 else ""
        dataset.save_as(folder / f"{uuid.UUID(bytes=rng.bytes(16)).hex}{suffix}", enforce_file_format=True)
    return folder


@pytest.mark.parametrize("orientation", [SAGITTAL, OBLIQUE], ids=["sagittal", "oblique"])
def test_voxels_and_affine_follow_the_tags(tmp_path: Path, orientation: tuple[float, ...]) -> None:
    folder = _write_series(tmp_path / "series", orientation)
    image = read_dicom_series(folder)
    data = np.asanyarray(image.dataobj)
    assert data.dtype == np.float32
    assert data.shape == (COLUMNS, ROWS, SLICES)
    np.testing.assert_allclose(data, _stored_volume() * SLOPE + INTERCEPT)
    assert data[COLUMNS - 1, 0, 0] == 999 * SLOPE + INTERCEPT
    for i, j, k in [(0, 0, 0), (COLUMNS - 1, 0, 0), (0, ROWS - 1, 0), (0, 0, SLICES - 1), (3, 2, 1)]:
        np.testing.assert_allclose(image.affine @ [i, j, k, 1], [*_expected_ras(orientation, i, j, k), 1], atol=1e-6)
    np.testing.assert_allclose(image.header.get_zooms(), (PIXEL_SPACING[1], PIXEL_SPACING[0], GAP), atol=1e-5)
    assert int(image.header["sform_code"]) == 1


def test_canonical_reorientation_of_a_sagittal_series(tmp_path: Path) -> None:
    image = read_dicom_series(_write_series(tmp_path / "series", SAGITTAL))
    canonical = nib.as_closest_canonical(image)
    # columns run A->P, rows S->I, slices R->L (normal -x in LPS is +R): RAS order is (slices, columns, rows)
    assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
    assert canonical.shape == (SLICES, COLUMNS, ROWS)
    data = np.asanyarray(canonical.dataobj)
    marked = np.unravel_index(int(np.argmax(data)), data.shape)
    np.testing.assert_allclose(canonical.affine @ [*marked, 1], [*_expected_ras(SAGITTAL, COLUMNS - 1, 0, 0), 1])


def test_single_slice_falls_back_on_nominal_spacing(tmp_path: Path) -> None:
    stored = _stored_volume()[:, :, :1]
    image = read_dicom_series(_write_series(tmp_path / "one", SAGITTAL, stored=stored))
    assert image.shape == (COLUMNS, ROWS, 1)
    assert image.header.get_zooms()[2] == pytest.approx(7.0)


def test_is_dicom_series_checks_the_marker_only(tmp_path: Path) -> None:
    assert is_dicom_series(_write_series(tmp_path / "series"))
    (tmp_path / "empty").mkdir()
    assert not is_dicom_series(tmp_path / "empty")
    assert not is_dicom_series(tmp_path / "missing")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_bytes(b"x" * 200 + b"DICM")
    (other / ".hidden").write_bytes(b"\0" * 128 + b"DICM")
    assert not is_dicom_series(other)


def _raises(folder: Path, *patterns: str) -> str:
    with pytest.raises(DataError, match=re.escape(str(folder))) as info:
        read_dicom_series(folder)
    message = str(info.value)
    assert "\n" not in message
    for pattern in patterns:
        assert re.search(pattern, message), message
    assert "Doe" not in message and "SECRET" not in message  # no patient identifiers
    return message


def test_no_dicom_files(tmp_path: Path) -> None:
    folder = tmp_path / "nothing"
    folder.mkdir()
    (folder / "readme.txt").write_text("not an image")
    _raises(folder, "no DICOM files")


def test_several_series_are_named_with_counts(tmp_path: Path) -> None:
    folder = _write_series(tmp_path / "mixed")

    def localiser(_: int, dataset: Dataset) -> None:
        dataset.SeriesInstanceUID, dataset.SeriesDescription, dataset.SeriesNumber = "9.9.9", "LOCALISER", 1

    _write_series(folder, stored=_stored_volume()[:, :, :2], edit=localiser, seed=1)
    _raises(folder, "2 DICOM series", r"series number 3: 3 files", r"series number 1: 2 files")


def _edit_slice(index: int, change: Callable[[Dataset], None]) -> Callable[[int, Dataset], None]:
    def edit(k: int, dataset: Dataset) -> None:
        if k == index:
            change(dataset)

    return edit


def _set(**tags: object) -> Callable[[Dataset], None]:
    def change(dataset: Dataset) -> None:
        for name, value in tags.items():
            setattr(dataset, name, value)

    return change


@pytest.mark.parametrize(
    ("change", "patterns"),
    [
        (_set(ImageOrientationPatient=[0, 1, 0, 0.2, 0, -0.98]), ["inconsistent ImageOrientationPatient"]),
        (_set(PixelSpacing=[0.8, 0.7]), ["inconsistent PixelSpacing"]),
        (lambda dataset: delattr(dataset, "ImagePositionPatient"), ["lacks the geometry tags ImagePositionPatient"]),
        (lambda dataset: delattr(dataset, "PixelSpacing"), ["lacks the geometry tags PixelSpacing"]),
    ],
    ids=["orientation", "pixel-spacing", "no-position", "no-spacing"],
)
def test_inconsistent_or_missing_geometry(
    tmp_path: Path, change: Callable[[Dataset], None], patterns: list[str]
) -> None:
    folder = _write_series(tmp_path / "bad", edit=_edit_slice(1, change))
    _raises(folder, *patterns)


def test_inconsistent_rows_and_columns(tmp_path: Path) -> None:
    def shrink(dataset: Dataset) -> None:
        pixels = np.zeros((ROWS, COLUMNS - 1), dtype="<i2")
        dataset.Rows, dataset.Columns = pixels.shape
        dataset.PixelData = pixels.tobytes()

    folder = _write_series(tmp_path / "bad", edit=_edit_slice(2, shrink))
    _raises(folder, "inconsistent Rows x Columns", "4x5", "4x4")


def test_duplicate_positions(tmp_path: Path) -> None:
    _, _, normal, origin = _geometry(SAGITTAL)
    duplicate = [float(value) for value in origin + GAP * normal]
    folder = _write_series(tmp_path / "bad", edit=_edit_slice(2, _set(ImagePositionPatient=duplicate)))
    _raises(folder, "1 of 3 slices repeat another slice's position")


def test_non_uniform_spacing_reports_the_gaps(tmp_path: Path) -> None:
    stored = np.concatenate([_stored_volume()] * 2, axis=2)  # 6 slices, then one in the middle removed
    folder = _write_series(tmp_path / "gap", stored=stored)
    by_depth = {float(_position(path) @ [-1, 0, 0]): path for path in folder.iterdir()}  # along the normal
    by_depth[sorted(by_depth)[3]].unlink()
    _raises(folder, "non-uniform slice spacing", "gaps from 2.500 to 5.000 mm")


def _position(path: Path) -> np.ndarray:
    return np.asarray(dcmread(path, stop_before_pixels=True).ImagePositionPatient, dtype=float)


def test_undecodable_compressed_pixel_data(tmp_path: Path) -> None:
    def compress(dataset: Dataset) -> None:
        dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
        dataset.PixelData = encapsulate([b"\xff\xd8 not a jpeg stream \xff\xd9"])
        dataset["PixelData"].VR = "OB"
        dataset["PixelData"].is_undefined_length = True

    folder = _write_series(tmp_path / "jpeg", edit=_edit_slice(0, compress))
    _raises(folder, "cannot decode the pixel data", "JPEG Baseline")


def test_ct_sop_class_reads_too(tmp_path: Path) -> None:
    def ct(_: int, dataset: Dataset) -> None:
        dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID = CTImageStorage
        dataset.Modality = "CT"

    image = read_dicom_series(_write_series(tmp_path / "ct", edit=ct))
    assert image.shape == (COLUMNS, ROWS, SLICES)
