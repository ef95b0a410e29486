"""What ``medseg predict`` reads: cases found in files and folders (NIfTI, 2D images, DICOM series, slice
folders; nnU-Net's ``_0000`` modality naming), the output names they get and the files each will produce.

Output names come from file and folder names only, never from header fields. Inputs are loaded as canonical
volumes and NaN/Inf voxels are refused before anything is predicted.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np

from medseg_lightning.data.io import (
    IMAGE_2D_SUFFIXES,
    NIFTI_SUFFIXES,
    DataError,
    Volume,
    is_supported,
    nifti_volume,
    read_image,
    strip_suffix,
)

_MODALITY_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<index>\d{4})$")


_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
InputKind = Literal["nifti", "image2d", "dicom", "slices"]  # a file, a 2D image, a DICOM folder, a slice folder


@dataclass
class PredictInput:
    """One case to segment: its output name and its files (one per modality) or DICOM folder."""

    name: str
    paths: list[Path]
    kind: InputKind


def discover_inputs(items: list[Path], modalities: int) -> list[PredictInput]:
    """Cases from files and folders; with several modalities, ``case_0000.nii.gz``, ``case_0001.nii.gz``, ...
    (the nnU-Net naming) form one case, and a single 4D or multi-channel file is one case too.

    Output names come from file and folder names only (never from DICOM header fields); inputs that would share
    one (``a/case.nii.gz`` and ``b/case.nii.gz``, two DICOM folders called ``series``) are told apart by their
    parent folders relative to the folder the clashing inputs share (``a_case``, ``b_case``), else by an index.

    Raises:
        DataError: a missing path, an unsupported file, an empty folder or an incomplete modality set.
    """
    files: list[Path] = []
    cases: list[PredictInput] = []
    seen: set[Path] = set()
    for item in items:
        if item.resolve() in seen:  # the same input twice is one case, not two channels or two outputs
            continue
        seen.add(item.resolve())
        if item.is_dir():
            from medseg_lightning.data.dicom import is_dicom_series

            if is_dicom_series(item):
                cases.append(PredictInput(_absolute(item).name, [item], "dicom"))
                continue
            from medseg_lightning.data.slices import is_slice_folder

            if is_slice_folder(item):
                cases.append(PredictInput(_absolute(item).name, [item], "slices"))
                continue
            found = sorted(p for p in item.iterdir() if p.is_file() and is_supported(p) and p.resolve() not in seen)
            if not found and not any(p.is_file() and is_supported(p) for p in item.iterdir()):
                raise DataError(f"{item}: no NIfTI files, 2D images or DICOM series in this folder")
            seen.update(p.resolve() for p in found)
            files += found
        elif item.is_file():
            if not is_supported(item):
                raise DataError(f"{item}: unsupported file; expected {', '.join(NIFTI_SUFFIXES + IMAGE_2D_SUFFIXES)}"
                                " or a DICOM series folder")
            files.append(item)
        else:
            raise DataError(f"{item}: no such file or folder")
    return _unique_names(cases + _group_modalities(files, modalities))


def _group_modalities(files: list[Path], modalities: int) -> list[PredictInput]:
    groups: dict[tuple[Path, str], list[Path]] = {}
    for path in files:
        stem = strip_suffix(path.name)
        match = _MODALITY_SUFFIX.match(stem)
        if modalities > 1:  # one case = one folder's files of one stem
            groups.setdefault((path.resolve().parent, match.group("case") if match else stem), []).append(path)
        else:  # one file, one case: equal stems (x.nii, x.nii.gz) get distinct names, never one merged case
            groups[(path.resolve(), stem)] = [path]
    cases = []
    for (_, name), paths in groups.items():
        paths = sorted(paths)
        if modalities > 1 and len(paths) not in (1, modalities):
            raise DataError(f"{name}: {len(paths)} modality files ({', '.join(p.name for p in paths)}); "
                            f"the model takes {modalities}")
        kind = "nifti" if paths[0].name.lower().endswith(NIFTI_SUFFIXES) else "image2d"
        cases.append(PredictInput(name, paths, kind))
    return cases


def _unique_names(cases: list[PredictInput]) -> list[PredictInput]:
    """Distinct output names: clashing ones get their parent folders (relative to the folder the clashing inputs
    share, made file-name safe) as a prefix, then an index if they still clash. Case-insensitive, as file systems
    may be."""
    clashes: dict[str, list[PredictInput]] = {}
    for case in cases:
        clashes.setdefault(case.name.casefold(), []).append(case)
    for group in clashes.values():
        if len(group) < 2:
            continue
        parents = [_absolute(case.paths[0]).parent for case in group]
        common = Path(os.path.commonpath(parents))
        for case, parent in zip(group, parents, strict=True):
            prefix = _UNSAFE_NAME.sub("_", "_".join(parent.relative_to(common).parts)).strip("_")
            case.name = f"{prefix}_{case.name}" if prefix else case.name
    taken: set[str] = set()
    for case in cases:
        name, index = case.name, 1
        while name.casefold() in taken:
            index += 1
            name = f"{case.name}_{index}"
        case.name = name
        taken.add(name.casefold())
    return cases


def _absolute(path: Path) -> Path:
    """The path made absolute and normalised (``.`` and ``..`` gone), symlinks kept: names are the user's."""
    return Path(os.path.abspath(path))


UNCERTAINTY_MAPS = ("entropy", "mutual_information")


def output_paths(case: PredictInput, out_dir: Path, overlay: bool = False, instance: bool = False,
                 uncertainty: bool = False, maps: Sequence[str] = ()) -> list[Path]:
    """Every file ``predict_case`` (or ``explain_case``, whose ``maps`` are its methods) writes for ``case``, so
    existing files can be protected before anything runs."""
    maps = (*(UNCERTAINTY_MAPS if uncertainty else ()), *maps)
    if case.kind == "slices":
        from medseg_lightning.data.slices import slice_files

        try:
            slices = slice_files(case.paths[0])[0]
        except DataError:
            slices = {}  # the case fails on its own later, with its own error line
        stems = slice_output_stems(case, slices)
        suffix = "_instances.png" if instance else "_pred.png"
        paths = [out_dir / f"{stem}{suffix}" for stem in stems]
        paths += [out_dir / f"{stem}_{name}.png" for name in maps for stem in stems]
    else:
        extension = ".png" if case.kind == "image2d" else ".nii.gz"
        paths = [out_dir / f"{case.name}{extension}"]
        paths += [out_dir / f"{case.name}_{name}{extension}" for name in maps]
    if instance:
        paths.append(out_dir / f"{case.name}_objects.csv")
    if overlay:
        paths.append(out_dir / f"{case.name}_overlay.png")
    return paths


def slice_output_stems(case: PredictInput, images: dict[int, Path]) -> list[str]:
    """Per slice, in slice order: its stem (``<folder>_<n>``) with the folder name replaced by the case's output
    name, which is the folder name unless two inputs shared it."""
    folder = _absolute(case.paths[0]).name
    stems = [strip_suffix(images[number].name) for number in sorted(images)]
    return [case.name + stem[len(folder):] if stem.startswith(folder) else stem for stem in stems]


def load_input(case: PredictInput) -> tuple[Volume, nib.Nifti1Image | None]:
    """The case as a canonical volume, and the image whose geometry the mask must carry (None for 2D)."""
    if case.kind == "dicom":
        from medseg_lightning.data.dicom import read_dicom_series

        reference = read_dicom_series(case.paths[0])
        volume = nifti_volume(reference, str(case.paths[0]))
        volume.array = volume.array[None]  # one channel: (C, X, Y, Z) as read_image gives
        return volume, reference
    volume = read_image(case.paths)
    reference = nib.load(str(case.paths[0])) if case.kind == "nifti" else None
    return volume, reference


def check_finite(volume: Volume, case: PredictInput) -> None:
    """Refuses NaN/Inf voxels: normalisation turns one into a slice (or a case) of NaN, which the network maps to
    background, so the mask would look valid while being empty. As in ``medseg data check``, nothing is guessed.

    Raises:
        DataError: naming the file (the modality's file when there is one per channel) and the count.
    """
    array = volume.array
    if not np.issubdtype(array.dtype, np.floating):
        return
    bad = [int(np.count_nonzero(~np.isfinite(channel))) for channel in array]
    if not any(bad):
        return
    if len(case.paths) == len(bad):  # one file per modality: name the file that holds them
        index = next(i for i, count in enumerate(bad) if count)
        file, count = case.paths[index], bad[index]
    else:
        file, count = case.paths[0], sum(bad)
    raise DataError(f"{file}: {count} NaN/Inf voxel(s); not segmented (the mask would be silently wrong); "
                    "replace them, e.g. with the background value, and predict again")
