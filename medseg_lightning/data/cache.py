"""Preprocessing cache: each case decoded, checked and preprocessed once, then memory-mapped.

An entry is keyed by the content digest of the case's files and by the preprocessing settings, so a changed
file or setting simply misses the cache; entries are written to a temporary folder and renamed into place, so a
crash or two processes preparing at once never leave a half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg_lightning.config.schema import DataConfig
from medseg_lightning.data.instances import instance_map
from medseg_lightning.data.io import DataError, is_supported, read_image, read_mask
from medseg_lightning.data.manifest import Case
from medseg_lightning.data.preprocess import (
    InPlaneGeometry,
    fit_in_plane,
    fit_labels_in_plane,
    normalize_intensity,
    to_slices,
)
from medseg_lightning.data.validate import Problem, check_image, check_mask, map_labels

CACHE_VERSION = 2
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def default_cache_dir(config: DataConfig) -> Path:
    """``data.cache_dir``, else ``$MEDSEG_CACHE_DIR``, else ``./.medseg_cache``."""
    if config.cache_dir is not None:
        return config.cache_dir
    return Path(os.environ.get("MEDSEG_CACHE_DIR", ".medseg_cache"))


def settings_digest(config: DataConfig) -> str:
    """Hash of every setting that changes the cached arrays."""
    relevant = {
        "version": CACHE_VERSION,
        "preprocessing": config.preprocessing.model_dump(mode="json"),
        "axis": config.slicing.axis,
        "labels": {str(k): v for k, v in config.labels.items()},
        "label_mapping": {str(k): v for k, v in config.label_mapping.items()},
        **({"instances": config.instances.model_dump(mode="json")} if config.instances is not None else {}),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


@dataclass
class PreparedCase:
    """A preprocessed case: slices along the configured axis, memory-mapped from the cache.

    Attributes:
        image: ``(S, C, H, W)`` float32.
        mask: ``(S, H, W)`` uint8 labels, or None for image-only cases.
        meta: geometry (``shape``, ``affine``, ``spacing``, ``axis``, ``in_plane``) and statistics.
        native_mask: ``(X, Y, Z)`` uint8 labels in the original (canonical) voxel grid: the ground truth that
            case-level metrics compare re-stacked predictions with, untouched by resizing or cropping.
        instances, native_instances: the same for object ids (uint16), for instance segmentation.
    """

    case: Case
    image: np.ndarray
    mask: np.ndarray | None
    meta: dict[str, Any]
    native_mask: np.ndarray | None = None
    instances: np.ndarray | None = None
    native_instances: np.ndarray | None = None

    @property
    def in_plane(self) -> InPlaneGeometry:
        return InPlaneGeometry.from_dict(self.meta["in_plane"])

    @property
    def foreground_slices(self) -> np.ndarray:
        return np.asarray(self.meta["foreground_slices"], dtype=bool)


class FileDigests:
    """Content digests of files, remembered by (size, mtime) so unchanged files are not read again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._known: dict[str, list[Any]] = {}
        if path.is_file():
            try:
                self._known = json.loads(path.read_text())
            except (OSError, ValueError):
                self._known = {}  # a damaged memo only costs re-hashing

    def digest(self, file: Path) -> str:
        stat = file.stat()
        key = os.path.abspath(file)
        with self._lock:
            known = self._known.get(key)
        if known and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
            return str(known[2])
        hasher = hashlib.blake2b(digest_size=20)
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                hasher.update(block)
        value = hasher.hexdigest()
        with self._lock:
            self._known[key] = [stat.st_size, stat.st_mtime_ns, value]
        return value

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            text = json.dumps(self._known)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, self.path)


class PreprocessCache:
    """Prepares cases into ``root`` and loads them back memory-mapped."""

    def __init__(self, root: Path, config: DataConfig) -> None:
        self.root = root
        self.config = config
        self.settings = settings_digest(config)
        self.digests = FileDigests(root / "file_digests.json")

    def case_key(self, case: Case) -> str:
        """Digest of the settings and the content of the case's files."""
        return hashlib.sha256("|".join([self.settings, *self._content_parts(case)]).encode()).hexdigest()

    def content_key(self, case: Case) -> str:
        """Digest of the content of the case's files only: the same patient whatever the settings."""
        return hashlib.sha256("|".join(self._content_parts(case)).encode()).hexdigest()

    def _content_parts(self, case: Case) -> list[str]:
        paths = [*case.image_paths, *([case.mask_path] if case.mask_path else []), *case.files.values()]
        missing = [str(path) for path in paths if not path.is_file() and not path.is_dir()]
        if missing:
            raise DataError(f"{missing[0]}: file not found")
        parts = []
        for path in paths:  # a slice folder contributes its slices' names too: they give the slice order
            parts += ([f"{f.name}:{self.digests.digest(f)}" for f in _content_files(path)] if path.is_dir()
                      else [self.digests.digest(path)])
        return parts

    def entry_dir(self, case: Case, key: str) -> Path:
        return self.root / "cases" / f"{_UNSAFE.sub('_', case.case_id)}-{key[:20]}"

    def lookup(self, case: Case) -> tuple[PreparedCase | None, list[Problem]]:
        """The cached case, or (None, []) on a miss, or (None, problems) when its files are missing."""
        try:
            entry = self.entry_dir(case, self.case_key(case))
        except (DataError, OSError) as error:
            return None, [Problem(str(error), case.case_id)]
        return (load_entry(case, entry) if (entry / "meta.json").is_file() else None), []

    def prepare(self, case: Case) -> tuple[PreparedCase | None, list[Problem]]:
        """Loads a cached case, or reads, checks and preprocesses it; problems instead of a case when invalid."""
        cached, problems = self.lookup(case)
        if cached is not None or problems:
            return cached, problems
        key = self.case_key(case)
        entry = self.entry_dir(case, key)
        try:
            image = read_image(case.image_paths)
            mask = read_mask(case.mask_path) if case.mask_path else None
        except DataError as error:
            return None, [Problem(str(error), case.case_id)]
        problems = check_image(case, image, self.config)
        if mask is not None:
            problems += check_mask(case, image, mask, self.config)
        if problems:
            return None, problems
        image_slices, mask_slices, native, meta = preprocess_case(image, mask, self.config)
        objects: dict[str, np.ndarray] = {}
        if self.config.instances is not None and native is not None:
            native_instances, problems = instance_map(case, native, self.config.instances)
            if native_instances is None:
                return None, problems
            slices = to_slices(native_instances, self.config.slicing.axis, channels_first=False)
            objects = {"instances": fit_labels_in_plane(slices, InPlaneGeometry.from_dict(meta["in_plane"])),
                       "native_instances": native_instances}
            meta["objects"] = int(native_instances.max())
        meta.update(case_id=case.case_id, key=key)
        _write_entry(entry, image_slices, mask_slices, native, meta, objects)
        return load_entry(case, entry), []


def preprocess_case(
    image: Any, mask: Any, config: DataConfig
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, dict]:
    """Normalises, slices and resizes one case.

    Returns:
        image slices, mask slices, the mapped labels in the original grid, and geometry/statistics.
    """
    axis = config.slicing.axis
    settings = config.preprocessing.intensity_for(image.array.shape[0])
    labels = None if mask is None else map_labels(np.asarray(mask.array).astype(np.int64), config.label_mapping)
    stats = _intensity_stats(np.asarray(image.array, dtype=np.float32), labels)
    image_slices = to_slices(normalize_intensity(np.asarray(image.array), settings), axis, channels_first=True)
    mask_slices = None if labels is None else to_slices(labels.astype(np.uint8), axis, channels_first=False)
    image_slices, mask_slices, geometry = fit_in_plane(
        image_slices, mask_slices, config.preprocessing.target_size, config.preprocessing.resize_mode
    )
    meta = {
        "shape": list(image.array.shape),
        "affine": np.asarray(image.affine).tolist(),
        "spacing": list(image.spacing),
        "spacing_known": image.spacing_known,
        "axis": axis,
        "in_plane": geometry.to_dict(),
        "intensity": stats,
        "label_voxels": {} if labels is None else _label_counts(labels, len(config.labels)),
        "foreground_slices": [] if mask_slices is None else mask_slices.reshape(len(mask_slices), -1).any(1).tolist(),
    }
    return image_slices, mask_slices, None if labels is None else labels.astype(np.uint8), meta


def _intensity_stats(image: np.ndarray, labels: np.ndarray | None) -> list[dict[str, float]]:
    """Raw intensity statistics per channel inside the foreground (whole image when there is none)."""
    region = None if labels is None or not labels.any() else labels > 0
    stats = []
    for channel in image:
        values = channel[region] if region is not None else channel.ravel()
        p01, p99 = np.percentile(values, [0.5, 99.5])
        stats.append({"mean": float(values.mean()), "std": float(values.std()), "p00_5": float(p01),
                      "p99_5": float(p99)})
    return stats


def _label_counts(labels: np.ndarray, n_classes: int) -> dict[str, int]:
    counts = np.bincount(labels.ravel(), minlength=n_classes)
    return {str(label): int(count) for label, count in enumerate(counts)}


def _write_entry(
    entry: Path, image: np.ndarray, mask: np.ndarray | None, native_mask: np.ndarray | None, meta: dict[str, Any],
    objects: dict[str, np.ndarray] | None = None,
) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}."))
    try:
        np.save(tmp / "image.npy", np.ascontiguousarray(image, dtype=np.float32))
        if mask is not None and native_mask is not None:
            np.save(tmp / "mask.npy", np.ascontiguousarray(mask, dtype=np.uint8))
            np.save(tmp / "native_mask.npy", np.ascontiguousarray(native_mask, dtype=np.uint8))
        for name, array in (objects or {}).items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(array, dtype=np.uint16))
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.replace(tmp, entry)
    except OSError:
        if not (entry / "meta.json").is_file():
            raise
        # another process finished the same entry first; theirs is identical
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _content_files(path: Path) -> list[Path]:
    """The files whose content defines a case: the file itself, or every slice image of a slice folder."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and is_supported(p))
    return [path]


# np.load parses .npy headers with ast.literal_eval, which CPython 3.11 cannot run in two threads at once
# ("SystemError: AST constructor recursion depth mismatch"); opening a memory map is cheap, so serialise it.
_NPY_OPEN_LOCK = threading.Lock()


def _open_map(path: Path) -> np.ndarray:
    """A read-only memory map of a cached array, as a plain ndarray view (indexing a np.memmap costs more)."""
    with _NPY_OPEN_LOCK:
        return np.asarray(np.load(path, mmap_mode="r"))


def load_entry(case: Case, entry: Path) -> PreparedCase:
    meta = json.loads((entry / "meta.json").read_text())
    image = _open_map(entry / "image.npy")
    mask, native = None, None
    if (entry / "mask.npy").is_file():
        mask = _open_map(entry / "mask.npy")
        native = _open_map(entry / "native_mask.npy")
    objects = {name: _open_map(entry / f"{name}.npy") for name in ("instances", "native_instances")
               if (entry / f"{name}.npy").is_file()}
    return PreparedCase(case=case, image=image, mask=mask, meta=meta, native_mask=native, **objects)
