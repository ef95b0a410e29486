"""Reading one DICOM series folder into a NIfTI image in world (RAS) coordinates.

A DICOM series becomes an ordinary ``nibabel.Nifti1Image`` so that everything downstream (canonical reorientation,
preprocessing, writing predicted masks with the series' geometry) has one code path for NIfTI and DICOM.

Axis convention: the voxel array has shape ``(columns, rows, slices)``, i.e.
``data[i, j, k] == pixel_array_of_slice_k[j, i]``, so the fastest-varying index in the file (the column) is the first
NIfTI axis, as in a NIfTI file, and ``x``/``y`` of a slice viewed as an image stay ``i``/``j``:

- ``i`` is the column index, moving along the first ImageOrientationPatient vector by ``PixelSpacing[1]``;
- ``j`` is the row index, moving along the second ImageOrientationPatient vector by ``PixelSpacing[0]``;
- ``k`` orders the slices by increasing position along the slice normal (row cosine x column cosine), never by
  file name or InstanceNumber; its step is taken from the slice positions, not from SliceThickness.

DICOM patient coordinates are LPS; the affine is ``diag(-1, -1, 1, 1) @ affine_lps`` so that it maps voxel indices
to RAS millimetres like a NIfTI affine. Messages never contain patient identifiers: slices are named by file name
and series by number, a file name and file count (never by description or UID).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sized
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset

from medseg_lightning.data.io import DataError

_MAGIC_OFFSET = 128
_MAGIC = b"DICM"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_GEOMETRY_TAGS = ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns")
_TAG_LENGTHS = {"ImageOrientationPatient": 6, "ImagePositionPatient": 3, "PixelSpacing": 2}
_COSINE_TOL = 1e-4  # scanners write direction cosines with ~6 decimals; real tilt changes are far larger
_SPACING_TOL_MM = 1e-3
_GAP_TOL_MM = 0.01  # absolute floor of the slice-gap tolerance (and the distance below which slices coincide)
_GAP_TOL_REL = 0.01  # 1% of the median gap: IPP is rounded by some writers, so gaps jitter slightly


@dataclass(frozen=True)
class _Slice:
    name: str
    dataset: Dataset


@dataclass(frozen=True)
class _Geometry:
    row_cosine: np.ndarray  # LPS direction of increasing column index
    column_cosine: np.ndarray  # LPS direction of increasing row index
    normal: np.ndarray
    pixel_spacing: tuple[float, float]  # (between rows, between columns) as in the DICOM tag
    rows: int
    columns: int


def _has_dicom_magic(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            handle.seek(_MAGIC_OFFSET)
            return handle.read(len(_MAGIC)) == _MAGIC
    except OSError:
        return False


def _candidate_files(folder: Path) -> list[Path]:
    """Plain files directly in ``folder``; hidden files (``.DS_Store``) and DICOMDIR indexes are never slices."""
    if not folder.is_dir():
        return []
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.name.upper() != "DICOMDIR"
    )


def is_dicom_series(folder: Path) -> bool:
    """True when ``folder`` directly holds at least one DICOM file (``DICM`` at byte 128; nothing is parsed)."""
    return any(_has_dicom_magic(path) for path in _candidate_files(Path(folder)))


def read_dicom_series(folder: Path) -> nib.Nifti1Image:
    """Reads the single DICOM series in ``folder`` as a float32 ``(columns, rows, slices)`` image with a RAS affine.

    Voxel values are rescaled (``stored * RescaleSlope + RescaleIntercept``, per slice) so CT is in Hounsfield units.
    Non-DICOM files, hidden files, DICOMDIR and DICOM objects without pixel data are ignored.

    Raises:
        DataError: no DICOM image, several series, inconsistent or missing geometry, duplicate positions,
            non-uniform slice spacing, unsupported (multi-frame, colour) or undecodable pixel data.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    slices = _read_slices(folder)
    _check_single_series(folder, slices)
    geometry = _common_geometry(folder, slices)
    ordered, positions = _sort_slices(folder, slices, geometry)
    step = _slice_step(folder, ordered, positions, geometry)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = geometry.row_cosine * geometry.pixel_spacing[1]
    affine_lps[:3, 1] = geometry.column_cosine * geometry.pixel_spacing[0]
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = positions[0]
    affine = _LPS_TO_RAS @ affine_lps
    image = nib.Nifti1Image(_stack_pixels(folder, ordered, geometry), affine)
    image.set_sform(affine, code=1)  # scanner-anatomical coordinates, as the series defines them
    image.set_qform(affine, code=1)  # nearest rigid approximation when a gantry tilt shears the affine
    image.header.set_xyzt_units("mm")
    return image


def _read_slices(folder: Path) -> list[_Slice]:
    candidates = [path for path in _candidate_files(folder) if _has_dicom_magic(path)]
    if not candidates:
        raise DataError(f"{folder}: no DICOM files (none with the DICM marker at byte 128)")
    slices = []
    for path in candidates:
        try:
            dataset = pydicom.dcmread(path)
        except Exception as error:  # pydicom raises many types for truncated or malformed files
            raise DataError(f"{folder}: {path.name} is an unreadable DICOM file ({type(error).__name__})") from None
        if "PixelData" in dataset:  # skips structured reports, presentation states and other non-images
            slices.append(_Slice(path.name, dataset))
    if not slices:
        raise DataError(f"{folder}: no DICOM image files among {len(candidates)} DICOM files (none has pixel data)")
    return slices


def _check_single_series(folder: Path, slices: list[_Slice]) -> None:
    counts = Counter(str(item.dataset.get("SeriesInstanceUID", "")) for item in slices)
    if len(counts) == 1:
        return
    labels = []
    for uid, count in counts.most_common():
        first = next(item for item in slices if str(item.dataset.get("SeriesInstanceUID", "")) == uid)
        labels.append(f"{_series_label(first)}: {count} files, e.g. {first.name}")
    raise DataError(f"{folder}: holds {len(counts)} DICOM series, expected one ({'; '.join(labels)})")


def _series_label(item: _Slice) -> str:
    """The series number, never its description or UIDs: free-text descriptions often
    carry names or dates, and de-identification profiles remove both (DICOM PS3.15, Annex E)."""
    number = item.dataset.get("SeriesNumber")
    return "unnumbered series" if _is_empty(number) else f"series number {number}"


def _common_geometry(folder: Path, slices: list[_Slice]) -> _Geometry:
    for item in slices:
        _check_geometry_tags(folder, item)
    first = slices[0]
    orientation = np.asarray(first.dataset.ImageOrientationPatient, dtype=float)
    spacing = np.asarray(first.dataset.PixelSpacing, dtype=float)
    size = (int(first.dataset.Rows), int(first.dataset.Columns))
    for item in slices[1:]:
        other = np.asarray(item.dataset.ImageOrientationPatient, dtype=float)
        if not np.allclose(other, orientation, atol=_COSINE_TOL):
            raise DataError(
                f"{folder}: inconsistent ImageOrientationPatient between slices "
                f"({first.name}: {_fmt(orientation)}, {item.name}: {_fmt(other)})"
            )
        other = np.asarray(item.dataset.PixelSpacing, dtype=float)
        if not np.allclose(other, spacing, atol=_SPACING_TOL_MM):
            raise DataError(
                f"{folder}: inconsistent PixelSpacing between slices ({first.name}: {_fmt(spacing)}, "
                f"{item.name}: {_fmt(other)})"
            )
        other_size = (int(item.dataset.Rows), int(item.dataset.Columns))
        if other_size != size:
            raise DataError(
                f"{folder}: inconsistent Rows x Columns between slices ({first.name}: {size[0]}x{size[1]}, "
                f"{item.name}: {other_size[0]}x{other_size[1]})"
            )
    row_cosine, column_cosine = orientation[:3], orientation[3:]
    normal = np.cross(row_cosine, column_cosine)
    if min(np.linalg.norm(row_cosine), np.linalg.norm(column_cosine), np.linalg.norm(normal)) < 0.5:
        raise DataError(f"{folder}: degenerate ImageOrientationPatient {_fmt(orientation)} in {first.name}")
    if min(spacing) <= 0:
        raise DataError(f"{folder}: non-positive PixelSpacing {_fmt(spacing)} in {first.name}")
    return _Geometry(
        row_cosine=row_cosine / np.linalg.norm(row_cosine),
        column_cosine=column_cosine / np.linalg.norm(column_cosine),
        normal=normal / np.linalg.norm(normal),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        rows=size[0],
        columns=size[1],
    )


def _check_geometry_tags(folder: Path, item: _Slice) -> None:
    dataset = item.dataset
    missing = [tag for tag in _GEOMETRY_TAGS if _is_empty(dataset.get(tag))]
    if missing:
        raise DataError(
            f"{folder}: {item.name} lacks the geometry tags {', '.join(missing)}; cannot place the series in space"
        )
    for tag, length in _TAG_LENGTHS.items():
        if len(dataset[tag].value) != length:
            raise DataError(f"{folder}: {item.name} has a malformed {tag} (expected {length} values)")
    if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
        raise DataError(f"{folder}: {item.name} is a multi-frame (enhanced) DICOM image, which is not supported")
    if int(dataset.get("SamplesPerPixel", 1) or 1) != 1:
        raise DataError(f"{folder}: {item.name} is a colour image; only greyscale CT/MR series are supported")


def _sort_slices(folder: Path, slices: list[_Slice], geometry: _Geometry) -> tuple[list[_Slice], np.ndarray]:
    """Orders slices along the normal; returns them with their LPS positions."""
    positions = np.array([np.asarray(item.dataset.ImagePositionPatient, dtype=float) for item in slices])
    distances = positions @ geometry.normal
    order = np.argsort(distances, kind="stable")
    ordered = [slices[index] for index in order]
    distances = distances[order]
    gaps = np.diff(distances)
    duplicates = np.flatnonzero(gaps < _GAP_TOL_MM)
    if duplicates.size:
        first = duplicates[0]
        raise DataError(
            f"{folder}: {duplicates.size} of {len(ordered)} slices repeat another slice's position along the normal "
            f"(e.g. {ordered[first].name} and {ordered[first + 1].name} at {distances[first]:.3f} mm); "
            "multi-echo, multi-phase or repeated acquisitions must be split into one folder each"
        )
    return ordered, positions[order]


def _slice_step(folder: Path, ordered: list[_Slice], positions: np.ndarray, geometry: _Geometry) -> np.ndarray:
    """The LPS vector between neighbouring slices, from positions; with a gantry tilt it is not along the normal."""
    if len(ordered) == 1:  # no second position: fall back on the nominal spacing along the normal
        dataset = ordered[0].dataset
        thickness = float(dataset.get("SpacingBetweenSlices") or dataset.get("SliceThickness") or 1.0)
        return geometry.normal * thickness
    gaps = np.diff(positions @ geometry.normal)
    tolerance = max(_GAP_TOL_MM, _GAP_TOL_REL * float(np.median(gaps)))
    if gaps.max() - gaps.min() > tolerance:
        raise DataError(
            f"{folder}: non-uniform slice spacing along the slice normal: gaps from {gaps.min():.3f} to "
            f"{gaps.max():.3f} mm (missing or overlapping slices?)"
        )
    step = (positions[-1] - positions[0]) / (len(ordered) - 1)
    expected = positions[0] + np.arange(len(ordered))[:, None] * step
    drift = float(np.linalg.norm(positions - expected, axis=1).max())
    if drift > tolerance:
        raise DataError(f"{folder}: slice positions do not lie on a straight line (off by up to {drift:.3f} mm)")
    return step


def _stack_pixels(folder: Path, ordered: list[_Slice], geometry: _Geometry) -> np.ndarray:
    data = np.empty((geometry.columns, geometry.rows, len(ordered)), dtype=np.float32)
    for index, item in enumerate(ordered):
        dataset = item.dataset
        try:
            pixels = dataset.pixel_array
        except Exception as error:  # missing decoder plugins and corrupt streams raise many types
            syntax = dataset.file_meta.get("TransferSyntaxUID") if hasattr(dataset, "file_meta") else None
            name = getattr(syntax, "name", None) or "unknown transfer syntax"
            raise DataError(
                f"{folder}: cannot decode the pixel data of {item.name} ({name}; {type(error).__name__}: "
                f"{_one_line(error)}); a compressed series may need pylibjpeg or python-gdcm"
            ) from None
        if pixels.shape != (geometry.rows, geometry.columns):
            raise DataError(f"{folder}: {item.name} decodes to shape {pixels.shape}, expected Rows x Columns")
        slope = float(dataset.get("RescaleSlope") or 1.0)
        intercept = float(dataset.get("RescaleIntercept") or 0.0)
        data[:, :, index] = (pixels.astype(np.float64) * slope + intercept).T  # (rows, columns) -> (i, j)
    return data


def _is_empty(value: object) -> bool:
    """Missing or present without a value (type 2 elements may be written empty)."""
    if value is None:
        return True
    return isinstance(value, Sized) and len(value) == 0


def _fmt(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{value:.4g}" for value in values) + "]"


def _one_line(error: Exception) -> str:
    """Decoder errors list one line per plugin; one line keeps log records and CLI errors readable."""
    text = " ".join(str(error).split())
    return text[:300] if text else "no detail"
