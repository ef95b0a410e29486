"""Dataset manifests: one CSV row per case, paths relative to the manifest, attributes as extra columns.

A manifest is the only description of a dataset the rest of the code reads. ``build_manifest`` writes one for the
common folder layouts so users never have to.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from medseg_lightning.config.registry import Registry
from medseg_lightning.data.io import IMAGE_2D_SUFFIXES, DataError, is_supported, strip_suffix

RESERVED_COLUMNS = ("case_id", "subject_id")
UNKNOWN = "unknown"


class ManifestError(DataError):
    """A manifest that cannot be read or built."""


@dataclass
class Case:
    """One case (a patient's scan): its files, its subject and its attributes (missing values are ``None``)."""

    case_id: str
    image_paths: list[Path]
    mask_path: Path | None
    subject_id: str
    attributes: dict[str, str | None] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # further file columns (instance-label maps)

    def attribute(self, name: str) -> str:
        """The attribute's value, ``unknown`` when blank (missing values form their own group)."""
        value = self.attributes.get(name)
        return UNKNOWN if value is None else value


def read_manifest(path: Path, image_columns: list[str], mask_column: str | None = "mask",
                  file_columns: Sequence[str] = ()) -> list[Case]:
    """Reads a manifest CSV; ``mask_column=None`` reads image-only manifests (prediction)."""
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as error:
        raise ManifestError(f"{path}: not a readable CSV ({error})") from None
    return cases_from_table(table, path.parent, image_columns, mask_column, label=str(path), file_columns=file_columns)


def cases_from_table(
    table: pd.DataFrame, root: Path, image_columns: list[str], mask_column: str | None, label: str,
    file_columns: Sequence[str] = (),
) -> list[Case]:
    """Turns manifest rows into cases, resolving paths against ``root``; ``file_columns`` are further files."""
    required = ["case_id", *image_columns, *([mask_column] if mask_column else []), *file_columns]
    missing = [column for column in required if column not in table.columns]
    if missing:
        raise ManifestError(f"{label}: missing column(s) {missing}; the manifest has {list(table.columns)}")
    used = set(required) | set(RESERVED_COLUMNS)
    attribute_columns = [column for column in table.columns if column not in used]
    cases = []
    for row_number, row in enumerate(table.to_dict("records"), start=2):
        case_id = str(row["case_id"]).strip()
        if not case_id:
            raise ManifestError(f"{label}: line {row_number}: empty case_id")
        subject = str(row.get("subject_id") or "").strip() or case_id
        mask = str(row[mask_column]).strip() if mask_column else ""
        cases.append(
            Case(
                case_id=case_id,
                image_paths=[root / str(row[column]).strip() for column in image_columns],
                mask_path=root / mask if mask else None,
                subject_id=subject,
                attributes={column: (str(row[column]).strip() or None) for column in attribute_columns},
                files={column: root / str(row[column]).strip() for column in file_columns},
            )
        )
    return cases


def load_cases(source: Path, image_columns: list[str], mask_column: str | None = "mask",
               file_columns: Sequence[str] = ()) -> list[Case]:
    """Cases from a manifest CSV, or from a dataset folder whose manifest is built on the fly."""
    if source.is_dir():
        manifest = source / "manifest.csv"
        if manifest.is_file():
            return read_manifest(manifest, image_columns, mask_column, file_columns)
        return cases_from_table(build_manifest(source), source, image_columns, mask_column, label=str(source),
                                file_columns=file_columns)
    return read_manifest(source, image_columns, mask_column, file_columns)


LAYOUTS: Registry[Callable[[Path], pd.DataFrame | None]] = Registry("dataset layout")


def build_manifest(folder: Path) -> pd.DataFrame:
    """Detects the folder's layout and lists its cases (columns ``case_id``, ``image``..., ``mask``)."""
    if not folder.is_dir():
        raise ManifestError(f"{folder}: not a folder")
    for name in LAYOUTS:
        table = LAYOUTS.get(name)(folder)
        if table is not None:
            if table.empty:
                raise ManifestError(f"{folder}: {name} layout found but it holds no cases")
            return table
    raise ManifestError(
        f"{folder}: unknown layout; expected imagesTr/ + labelsTr/ (MSD) or images/ + masks/ (or labels/)"
    )


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_supported(p))


_MODALITY_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _pair_folders(folder: Path, images: Path, masks: Path, mask_suffixes: tuple[str, ...]) -> pd.DataFrame:
    """Matches image files to mask files by name; nnU-Net ``_0000`` files become one column per modality."""
    masks_by_case = {}
    for mask in _image_files(masks):
        stem = strip_suffix(mask.name)
        for suffix in mask_suffixes:
            if suffix and stem.endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        masks_by_case[stem] = mask
    images_by_case: dict[str, dict[str, Path]] = {}
    for image in _image_files(images):
        stem = strip_suffix(image.name)
        match = _MODALITY_SUFFIX.match(stem)
        case, column = (match["case"], f"image_{match['channel']}") if match else (stem, "image")
        images_by_case.setdefault(case, {})[column] = image
    unmatched = sorted(set(images_by_case) ^ set(masks_by_case))
    if unmatched:
        shown = ", ".join(unmatched[:10]) + (" ..." if len(unmatched) > 10 else "")
        raise ManifestError(f"{folder}: {len(unmatched)} case(s) have an image without a mask or the reverse: {shown}")
    rows = []
    for case in sorted(images_by_case):
        row = {"case_id": case}
        row.update({col: path.relative_to(folder).as_posix() for col, path in sorted(images_by_case[case].items())})
        row["mask"] = masks_by_case[case].relative_to(folder).as_posix()
        rows.append(row)
    table = pd.DataFrame(rows)
    image_columns = [c for c in table.columns if c.startswith("image")]
    if table[image_columns].isna().any().any():
        raise ManifestError(f"{folder}: cases differ in their modality files ({', '.join(image_columns)})")
    return table


@LAYOUTS.register("msd")
def _msd_layout(folder: Path) -> pd.DataFrame | None:
    """Medical Segmentation Decathlon / nnU-Net raw: ``imagesTr/`` and ``labelsTr/`` with equal file names."""
    if (folder / "imagesTr").is_dir() and (folder / "labelsTr").is_dir():
        return _pair_folders(folder, folder / "imagesTr", folder / "labelsTr", ())
    return None


@LAYOUTS.register("pair")
def _pair_layout(folder: Path) -> pd.DataFrame | None:
    """``images/`` and ``masks/`` (or ``labels/``); mask names may end in ``_mask``, ``_seg`` or ``_label``."""
    masks = next((folder / name for name in ("masks", "labels") if (folder / name).is_dir()), None)
    if (folder / "images").is_dir() and masks is not None:
        return _pair_folders(folder, folder / "images", masks, ("_mask", "_seg", "_label"))
    return None


@LAYOUTS.register("slices")
def _slice_folders_layout(folder: Path) -> pd.DataFrame | None:
    """One folder per case of numbered 2D slices, ``<case>/<case>_<n>.tif`` and ``<case>/<case>_<n>_mask.tif``
    (the LGG "kaggle_3m" layout); the case's image and mask columns both name its folder."""
    from medseg_lightning.data.slices import is_slice_folder

    cases = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and is_slice_folder(p))
    if not cases:
        return None
    rows = []
    for case in cases:
        has_masks = any(p.name.endswith(tuple(f"_mask{s}" for s in IMAGE_2D_SUFFIXES)) for p in case.iterdir())
        rows.append({"case_id": case.name, "image": case.name, "mask": case.name if has_masks else ""})
    return pd.DataFrame(rows)


def write_manifest(table: pd.DataFrame, path: Path) -> None:
    """Writes a manifest CSV atomically, so an interrupted write never leaves half a manifest."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    table.to_csv(tmp, index=False)
    tmp.replace(path)
