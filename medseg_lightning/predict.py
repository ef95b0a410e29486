"""``medseg predict``: segment new NIfTI volumes, DICOM series and 2D images with trained models.

The input goes through exactly the preprocessing the model was trained with (``preprocess_case`` with the
model's own config), the slices are predicted in batches, re-stacked into the case's canonical voxel grid with
``restore_volume``, and written back in the input's own orientation, affine and header geometry. Outputs are
written to a temporary name and renamed, so an error never leaves a partial file.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medseg_lightning.data.cache import preprocess_case
from medseg_lightning.data.dataset import stack_context
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
from medseg_lightning.data.preprocess import restore_volume
from medseg_lightning.instance_metrics import Objects
from medseg_lightning.model_io import ModelBundle, check_compatible
from medseg_lightning.models.inference import prepare_for_inference
from medseg_lightning.postprocess import classes_to_clean, keep_largest_components

_MODALITY_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<index>\d{4})$")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class PredictInput:
    """One case to segment: its output name and its files (one per modality) or DICOM folder."""

    name: str
    paths: list[Path]
    kind: str  # "nifti", "image2d" or "dicom"


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


def output_paths(case: PredictInput, out_dir: Path, overlay: bool = False, instance: bool = False) -> list[Path]:
    """Every file ``predict_case`` writes for ``case``, so existing files can be protected before anything runs."""
    if case.kind == "slices":
        from medseg_lightning.data.slices import slice_files

        try:
            slices = slice_files(case.paths[0])[0]
        except DataError:
            slices = {}  # the case fails on its own later, with its own error line
        suffix = "_instances.png" if instance else "_pred.png"
        paths = [out_dir / f"{stem}{suffix}" for stem in slice_output_stems(case, slices)]
    else:
        paths = [out_dir / f"{case.name}{'.png' if case.kind == 'image2d' else '.nii.gz'}"]
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


class Predictor:
    """One model or an ensemble (probabilities averaged), with optional flip test-time augmentation."""

    def __init__(self, bundles: list[ModelBundle], tta: bool | None = None, largest_component: bool | None = None,
                 batch_size: int | None = None, device: str | None = None, optimize: bool = True,
                 min_score: float | None = None) -> None:
        """``optimize``: run inference copies of the networks (BatchNorm folded, channels-last memory), which
        compute the same output faster; ``min_score``: instance models keep detections from this score on
        (default: the model's ``score_threshold``)."""
        first = bundles[0].config
        for bundle in bundles[1:]:
            check_compatible(first, bundle.config)
        self.config = first
        self.in_channels = bundles[0].in_channels
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        optimize = optimize and first.task == "semantic"  # Mask R-CNN's RoI heads stay as torchvision made them
        self.memory_format = torch.channels_last if optimize else torch.contiguous_format
        self.networks = [(prepare_for_inference(bundle.network) if optimize else bundle.network.eval()).to(self.device)
                         for bundle in bundles]
        self.tta = first.inference.tta if tta is None else tta
        chosen = first.inference.largest_component if largest_component is None else largest_component
        self.keep_largest = classes_to_clean(chosen, first.data.labels)
        self.batch_size = batch_size or first.trainer.inference_batch_size
        self.instance = first.task == "instance"
        if self.instance and (len(bundles) > 1 or self.tta):
            raise ValueError("instance models (Mask R-CNN) predict alone: no --tta and no ensemble of several --model")
        if min_score is not None and not self.instance:
            raise ValueError("--min-score applies to instance models (Mask R-CNN) only")
        self.min_score = first.model.score_threshold if min_score is None else min_score
        if self.instance and min_score is not None:  # the detector drops low scores before its mask head
            self.networks[0].detector.roi_heads.score_thresh = min_score

    @property
    def modalities(self) -> int:
        return len(self.config.data.image_columns)

    def segment(self, volume: Volume, name: str) -> np.ndarray:
        """Labels ``(X, Y, Z)`` (uint8) in the volume's canonical voxel grid."""
        slices, meta = self._slices(volume, name)
        prediction = restore_volume(self.labels(slices).numpy(), meta)
        return keep_largest_components(prediction, self.keep_largest)

    def objects(self, volume: Volume, name: str) -> Objects:
        """Instance models: the objects in the volume's canonical voxel grid (ids, classes, scores)."""
        from medseg_lightning.instance_inference import detect_slices, objects_from_detections

        slices, meta = self._slices(volume, name)
        detections = detect_slices(self.networks[0], slices.contiguous(memory_format=self.memory_format),
                                   self.batch_size)
        found = objects_from_detections(detections, tuple(slices.shape[-2:]), self.min_score)
        return Objects(restore_volume(found.ids, meta), found.classes, found.scores)

    def _slices(self, volume: Volume, name: str) -> tuple[torch.Tensor, dict]:
        """The case's preprocessed (2.5D) slices, as in training, and the geometry to put predictions back."""
        channels = volume.array.shape[0]
        context = self.config.data.slicing.context
        if channels * (2 * context + 1) != self.in_channels:
            raise DataError(f"{name}: {channels} channel(s); the model takes {self.in_channels // (2 * context + 1)} "
                            f"({', '.join(self.config.data.image_columns)})")
        slices, _, _, meta = preprocess_case(volume, None, self.config.data)
        stacked = stack_context(slices, np.arange(len(slices)), context)
        return torch.from_numpy(np.ascontiguousarray(stacked, dtype=np.float32)), meta

    @torch.inference_mode()
    def labels(self, slices: torch.Tensor) -> torch.Tensor:
        """Labels ``(S, H, W)`` uint8; one model without TTA takes the argmax of its logits (no softmax needed)."""
        if len(self.networks) == 1 and not self.tta:
            network = self.networks[0]
            return torch.cat([network(self._batch(slices, start)).argmax(1).to(torch.uint8).cpu()
                              for start in range(0, len(slices), self.batch_size)])
        return self.probabilities(slices).argmax(1).to(torch.uint8)

    @torch.inference_mode()
    def probabilities(self, slices: torch.Tensor) -> torch.Tensor:
        """Softmax ``(S, K, H, W)`` averaged over models (and flips), computed in batches."""
        chunks = []
        for start in range(0, len(slices), self.batch_size):
            batch = self._batch(slices, start)
            views = [(), (-1,), (-2,)] if self.tta else [()]
            total = None
            for network in self.networks:
                for dims in views:
                    flipped = batch.flip(dims) if dims else batch
                    probability = torch.softmax(network(flipped).float(), dim=1)
                    probability = probability.flip(dims) if dims else probability
                    total = probability if total is None else total + probability
            chunks.append((total / (len(self.networks) * len(views))).cpu())
        return torch.cat(chunks)

    def _batch(self, slices: torch.Tensor, start: int) -> torch.Tensor:
        return slices[start : start + self.batch_size].to(self.device).contiguous(memory_format=self.memory_format)


@dataclass
class CaseOutput:
    name: str
    mask: Path
    overlay: Path | None
    seconds: float
    slices: int


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


def predict_case(predictor: Predictor, case: PredictInput, out_dir: Path, overlay: bool = False) -> CaseOutput:
    """Segments one case and writes its mask (and overlay) atomically."""
    started = time.perf_counter()
    volume, reference = load_input(case)
    check_finite(volume, case)
    out_dir.mkdir(parents=True, exist_ok=True)
    if predictor.instance:
        from medseg_lightning.predict_instances import write_objects

        objects = predictor.objects(volume, case.name)
        mask_path, labels = write_objects(objects, case, volume, reference, predictor.config, out_dir)
        overlay_path = _write_overlay(volume, labels, predictor, out_dir / f"{case.name}_overlay.png") if overlay \
            else None
        return CaseOutput(case.name, mask_path, overlay_path, time.perf_counter() - started, int(labels.shape[2]))
    labels = predictor.segment(volume, case.name)
    if case.kind == "slices":
        mask_path = _write_slice_masks(labels, case, predictor.config.data.label_mapping, out_dir)
    elif reference is None:
        mask_path = out_dir / f"{case.name}.png"
        atomic_png(labels[:, :, 0], mask_path)
    else:
        mask_path = out_dir / f"{case.name}.nii.gz"
        atomic_nifti(to_reference_orientation(labels, volume.affine, reference), reference, mask_path)
    overlay_path = _write_overlay(volume, labels, predictor, out_dir / f"{case.name}_overlay.png") if overlay else None
    return CaseOutput(case.name, mask_path, overlay_path, time.perf_counter() - started, int(labels.shape[2]))


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


def _write_slice_masks(labels: np.ndarray, case: PredictInput, mapping: dict[int, int], out_dir: Path) -> Path:
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


def to_reference_orientation(labels: np.ndarray, canonical_affine: np.ndarray,
                             reference: nib.Nifti1Image, dtype: type = np.uint8) -> np.ndarray:
    """Labels from the canonical (RAS) voxel order back to the input file's own voxel order."""
    transform = nib.orientations.ornt_transform(nib.io_orientation(canonical_affine),
                                                nib.io_orientation(reference.affine))
    return nib.orientations.apply_orientation(labels, transform).astype(dtype)


def atomic_nifti(labels: np.ndarray, reference: nib.Nifti1Image, path: Path, dtype: type = np.uint8) -> None:
    """``labels`` with the reference image's affine and header (a label-map intent), written atomically."""
    header = reference.header.copy() if isinstance(reference, nib.Nifti1Image) else None
    image = nib.Nifti1Image(labels.astype(dtype), reference.affine, header=header)
    image.set_data_dtype(dtype)
    image.header.set_slope_inter(1, 0)
    image.header.set_intent("label")  # viewers then show the values as a label map
    atomic_write(path, lambda temporary: nib.save(image, str(temporary)))


def atomic_png(labels: np.ndarray, path: Path, dtype: type = np.uint8) -> None:
    """A label PNG (8-bit, or 16-bit for instance ids), written atomically."""
    from PIL import Image

    atomic_write(path, lambda temporary: Image.fromarray(labels.astype(dtype)).save(temporary, format="PNG"))


def atomic_write(path: Path, write: object) -> None:
    """Writes through a temporary file in the same folder, then renames: readers never see half a file."""
    suffix = "".join(path.suffixes)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)  # mkstemp makes owner-only files; masks are ordinary outputs
    try:
        write(Path(name))  # type: ignore[operator]
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def _write_overlay(volume: Volume, labels: np.ndarray, predictor: Predictor, path: Path) -> Path:
    """The slice with the most predicted foreground: image | prediction (no ground truth at inference)."""
    from medseg_lightning.visualize import save_overlay

    axis = predictor.config.data.slicing.axis
    foreground = (labels > 0).sum(axis=tuple(a for a in range(3) if a != axis))
    index = int(foreground.argmax())
    image = np.take(volume.array[0], index, axis=axis).astype(np.float32)
    prediction = np.take(labels, index, axis=axis)
    save_overlay(image, None, prediction, predictor.config.data.labels, path, title=path.stem)
    return path
