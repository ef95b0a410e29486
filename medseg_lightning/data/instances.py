"""Objects for instance segmentation: instance-label maps (0 = no object, 1..N = the objects) and their classes.

Objects come either from the connected components of each class of the label map (a lesion map whose lesions
never touch), or from a manifest column of instance-label maps, one integer per object, when touching objects
must stay apart (nuclei, nodules); the object's class is then the mask's label under it (its majority).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medseg_lightning.config.schema import InstancesConfig
from medseg_lightning.data.io import DataError, read_mask
from medseg_lightning.data.manifest import Case
from medseg_lightning.data.validate import Problem

MAX_OBJECTS = np.iinfo(np.uint16).max


def instance_map(case: Case, labels: np.ndarray, config: InstancesConfig) -> tuple[np.ndarray | None, list[Problem]]:
    """The case's instance-label map (uint16, the shape of ``labels``), or problems naming the file."""
    if config.source == "components":
        instances = components(labels, config.connectivity)
        file = str(case.mask_path)
    else:
        path = case.files[config.column]
        file = str(path)
        try:
            raw = np.asarray(read_mask(path).array)
        except DataError as error:
            return None, [Problem(str(error), case.case_id)]
        if raw.shape != labels.shape:
            return None, [Problem(f"instance map shape {raw.shape} != mask shape {labels.shape}", case.case_id, file)]
        if raw.min() < 0 or not np.all(np.equal(np.mod(raw, 1), 0)):
            return None, [Problem("instance map values must be non-negative integers (0 = no object)", case.case_id,
                                  file)]
        instances = raw.astype(np.int64)
        background = _objects_on_background(instances, labels)
        if background:
            return None, [Problem(f"object(s) {background[:5]} lie on background in the mask: every object needs a "
                                  "class", case.case_id, file)]
    instances = drop_small(instances, config.min_size)
    count = int(instances.max()) if instances.size else 0
    if count > MAX_OBJECTS:
        return None, [Problem(f"{count} objects; at most {MAX_OBJECTS} per case", case.case_id, file)]
    return instances.astype(np.uint16), []


def components(labels: np.ndarray, connectivity: int) -> np.ndarray:
    """One object per connected component of each foreground class, numbered 1..N class by class."""
    structure = ndimage.generate_binary_structure(labels.ndim, connectivity)
    instances = np.zeros(labels.shape, np.int64)
    offset = 0
    for label in np.unique(labels):
        if label == 0:
            continue
        parts, count = ndimage.label(labels == label, structure=structure)
        instances[parts > 0] = parts[parts > 0] + offset
        offset += count
    return instances


def drop_small(instances: np.ndarray, min_size: int) -> np.ndarray:
    """Objects of fewer than ``min_size`` voxels removed, the rest renumbered 1..N in order."""
    ids, inverse, sizes = np.unique(instances, return_inverse=True, return_counts=True)
    keep = (ids > 0) & (sizes >= min_size)
    new_ids = np.zeros(len(ids), np.int64)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1)
    return new_ids[inverse].reshape(instances.shape)


def object_classes(instances: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Class of every object id (index = id; 0 for id 0): the majority label under the object."""
    count = int(instances.max()) if instances.size else 0
    classes = np.zeros(count + 1, np.int64)
    if count == 0:
        return classes
    n_labels = int(labels.max()) + 1
    votes = np.bincount(instances.ravel().astype(np.int64) * n_labels + labels.ravel().astype(np.int64),
                        minlength=(count + 1) * n_labels).reshape(count + 1, n_labels)
    votes[:, 0] = 0  # background votes only win where nothing else is under the object
    classes[1:] = votes[1:].argmax(1)
    return classes


def _objects_on_background(instances: np.ndarray, labels: np.ndarray) -> list[int]:
    classes = object_classes(instances, labels)
    present = np.unique(instances)
    return [int(i) for i in present if i > 0 and classes[i] == 0]


def box_sides(instance_slices: list[np.ndarray]) -> list[float]:
    """Square root of the box area of every object on every slice ``(S, H, W)``: the sizes anchors must cover."""
    sides: list[float] = []
    for slices in instance_slices:
        for plane in slices:
            if not plane.any():
                continue
            for box in ndimage.find_objects(np.asarray(plane, dtype=np.int32)):
                if box is not None:
                    sides.append(float(np.sqrt((box[0].stop - box[0].start) * (box[1].stop - box[1].start))))
    return sides


@dataclass
class Objects:
    """An instance-label map (0 = nothing) and, indexed by id, each object's class and score."""

    ids: np.ndarray
    classes: np.ndarray
    scores: np.ndarray | None = None
    areas: np.ndarray | None = None  # voxels per id, where known (weights when joining detections)

    @property
    def count(self) -> int:
        return len(self.classes) - 1


def iou_matrix(pred: np.ndarray, true: np.ndarray, n_pred: int, n_true: int) -> np.ndarray:
    """IoU of every predicted object (rows) with every true object (columns)."""
    if n_pred == 0 or n_true == 0:
        return np.zeros((n_pred, n_true))
    joint = np.bincount(pred.ravel().astype(np.int64) * (n_true + 1) + true.ravel().astype(np.int64),
                        minlength=(n_pred + 1) * (n_true + 1)).reshape(n_pred + 1, n_true + 1)
    intersection = joint[1:, 1:].astype(np.float64)
    union = joint[1:].sum(1)[:, None] + joint[:, 1:].sum(0)[None, :] - intersection
    return intersection / np.maximum(union, 1)
