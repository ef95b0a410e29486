"""What ``medseg predict`` writes: masks in the input's own orientation, affine and header (NIfTI), label PNGs
(2D images, slice folders in the source's mask values) and overlays, each written atomically."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medseg_lightning.config.schema import ExperimentConfig
from medseg_lightning.data.io import Volume
from medseg_lightning.inference.inputs import PredictInput, slice_output_stems
from medseg_lightning.utilities.files import atomic_write


def write_slice_masks(labels: np.ndarray, case: PredictInput, mapping: dict[int, int], out_dir: Path) -> Path:
    """One ``<slice stem>_pred.png`` per input slice, in the source's mask values (the label mapping inverted,
    e.g. label 1 -> 255), so a script that knows nothing of medseg can compare it with the source masks."""
    from medseg_lightning.data.slices import slice_files

    images, _ = slice_files(case.paths[0])
    inverse = np.arange(max(int(labels.max()) + 1, 1), dtype=np.int64)
    for value, label in sorted(mapping.items()):
        if label < len(inverse):
            inverse[label] = value
    stems = slice_output_stems(case, images)
    for index, stem in enumerate(stems):
        atomic_png(inverse[labels[:, :, index]].astype(np.uint8), out_dir / f"{stem}_pred.png")
    return out_dir / f"{stems[0]}_pred.png"


def write_label_map(labels: np.ndarray, volume: Volume, case: PredictInput, reference: nib.Nifti1Image | None,
                    mapping: dict[int, int], out_dir: Path) -> Path:
    """The mask in the input's form: NIfTI with its geometry, a PNG for a 2D image, PNGs for a slice folder."""
    if case.kind == "slices":
        return write_slice_masks(labels, case, mapping, out_dir)
    if reference is None:
        path = out_dir / f"{case.name}.png"
        atomic_png(labels[:, :, 0], path)
        return path
    path = out_dir / f"{case.name}.nii.gz"
    atomic_nifti(to_reference_orientation(labels, volume.affine, reference), reference, path)
    return path


def write_continuous_map(values: np.ndarray, volume: Volume, case: PredictInput,
                         reference: nib.Nifti1Image | None, out_dir: Path, suffix: str) -> Path:
    """A map in ``[0, 1]`` beside the mask (``NAME_<suffix>``): float32 NIfTI with the input's geometry, or 8-bit
    PNGs (0..255) for 2D images and slice folders."""
    if reference is not None:
        path = out_dir / f"{case.name}_{suffix}.nii.gz"
        oriented = to_reference_orientation(values, volume.affine, reference, dtype=np.float32)
        atomic_nifti(oriented, reference, path, dtype=np.float32, label_map=False)
        return path
    scaled = np.round(np.clip(values, 0, 1) * 255).astype(np.uint8)
    if case.kind != "slices":
        path = out_dir / f"{case.name}_{suffix}.png"
        atomic_png(scaled[:, :, 0], path)
        return path
    from medseg_lightning.data.slices import slice_files

    stems = slice_output_stems(case, slice_files(case.paths[0])[0])
    for index, stem in enumerate(stems):
        atomic_png(scaled[:, :, index], out_dir / f"{stem}_{suffix}.png")
    return out_dir / f"{stems[0]}_{suffix}.png"


def to_reference_orientation(labels: np.ndarray, canonical_affine: np.ndarray,
                             reference: nib.Nifti1Image, dtype: type = np.uint8) -> np.ndarray:
    """Labels from the canonical (RAS) voxel order back to the input file's own voxel order."""
    transform = nib.orientations.ornt_transform(nib.io_orientation(canonical_affine),
                                                nib.io_orientation(reference.affine))
    return nib.orientations.apply_orientation(labels, transform).astype(dtype)


def atomic_nifti(labels: np.ndarray, reference: nib.Nifti1Image, path: Path, dtype: type = np.uint8,
                 label_map: bool = True) -> None:
    """``labels`` with the reference image's affine and header (a label-map intent unless ``label_map`` is
    False, for continuous maps), written atomically."""
    header = reference.header.copy() if isinstance(reference, nib.Nifti1Image) else None
    image = nib.Nifti1Image(labels.astype(dtype), reference.affine, header=header)
    image.set_data_dtype(dtype)
    image.header.set_slope_inter(1, 0)
    image.header.set_intent("label" if label_map else "none")  # a label map: viewers show the values as labels
    atomic_write(path, lambda temporary: nib.save(image, str(temporary)))


def atomic_png(labels: np.ndarray, path: Path, dtype: type = np.uint8) -> None:
    """A label PNG (8-bit, or 16-bit for instance ids), written atomically."""
    from PIL import Image

    atomic_write(path, lambda temporary: Image.fromarray(labels.astype(dtype)).save(temporary, format="PNG"))


def write_overlay(volume: Volume, labels: np.ndarray, config: ExperimentConfig, path: Path) -> Path:
    """The slice with the most predicted foreground: image | prediction (no ground truth at inference)."""
    from medseg_lightning.reporting.plots import save_overlay

    axis = config.data.slicing.axis
    foreground = (labels > 0).sum(axis=tuple(a for a in range(3) if a != axis))
    index = int(foreground.argmax())
    image = np.take(volume.array[0], index, axis=axis).astype(np.float32)
    prediction = np.take(labels, index, axis=axis)
    save_overlay(image, None, prediction, config.data.labels, path, title=path.stem)
    return path
