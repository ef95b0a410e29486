"""From Mask R-CNN detections on slices to objects in the volume.

Each slice's detections above the score threshold are painted into an instance-label map, highest score first,
so a voxel claimed by two overlapping detections belongs to the more confident one; a detection of which less
than half is still unclaimed duplicates more confident ones and is dropped (the merging heuristic of Panoptic
FPN, Kirillov et al. 2019) rather than leaving a sliver of a few pixels as an object of its own (on the
touching-objects cohort this raised one network's test PQ from 0.09 to 0.29, see the README). In a volume, an
object spans several slices: detections of the same class on neighbouring slices whose masks overlap
(IoU >= 0.25) are joined into one object (union-find), whose score is the mean of its detections' scores
weighted by area.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from medseg_lightning.data.instances import Objects, iou_matrix

LINK_IOU = 0.25
MIN_VISIBLE = 0.5  # the share of a detection's mask that must be unclaimed by more confident ones
OBJECT_COLUMNS = ("object", "class", "score", "voxels", "volume_ml", "centroid_x", "centroid_y", "centroid_z",
                  "bbox_x", "bbox_y", "bbox_z")


@torch.inference_mode()
def detect_slices(network: nn.Module, slices: torch.Tensor, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Mask R-CNN's detections per slice (``masks`` as probabilities), in batches."""
    network.eval()
    device = next(network.parameters()).device
    detections: list[dict[str, np.ndarray]] = []
    for start in range(0, len(slices), batch_size):
        for output in network(slices[start : start + batch_size].to(device)):
            detections.append({key: value.detach().cpu().numpy() for key, value in output.items()})
    return detections


def paint_slices(detections: list[dict[str, np.ndarray]], shape: tuple[int, int], threshold: float) -> Objects:
    """Per-slice instance maps ``(S, H, W)`` with globally unique ids; classes and scores by id."""
    ids = np.zeros((len(detections), *shape), np.int32)
    classes, scores, areas = [0], [0.0], [0]
    for index, detection in enumerate(detections):
        keep = np.flatnonzero(detection["scores"] >= threshold)
        for k in keep[np.argsort(-detection["scores"][keep], kind="stable")]:
            mask = detection["masks"][k, 0] > 0.5
            free = mask & (ids[index] == 0)
            if free.any() and free.sum() >= MIN_VISIBLE * mask.sum():
                ids[index][free] = len(classes)
                classes.append(int(detection["labels"][k]))
                scores.append(float(detection["scores"][k]))
                areas.append(int(free.sum()))
    return Objects(ids, np.asarray(classes, np.int64), np.asarray(scores), np.asarray(areas))


def link_slices(objects: Objects) -> Objects:
    """Joins same-class detections that overlap on neighbouring slices into 3D objects, renumbered 1..N."""
    parent = np.arange(objects.count + 1)

    def find(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = int(parent[node])
        return node

    top = objects.count
    for z in range(len(objects.ids) - 1):
        a, b = objects.ids[z], objects.ids[z + 1]
        if not a.any() or not b.any():
            continue
        iou = iou_matrix(a, b, top, top)
        for i, j in zip(*np.nonzero(iou >= LINK_IOU), strict=True):
            if objects.classes[i + 1] == objects.classes[j + 1]:
                parent[find(j + 1)] = find(i + 1)
    roots = np.array([find(node) for node in range(top + 1)])
    unique, new_ids = np.unique(roots, return_inverse=True)  # root 0 (background) comes first
    areas = objects.areas if objects.areas is not None else np.ones(top + 1)
    scores = np.zeros(len(unique))
    np.add.at(scores, new_ids, np.asarray(objects.scores) * areas)
    weight = np.zeros(len(unique))
    np.add.at(weight, new_ids, areas)
    classes = np.zeros(len(unique), np.int64)
    classes[new_ids] = objects.classes
    return Objects(new_ids[objects.ids], classes, np.where(weight > 0, scores / np.maximum(weight, 1), 0.0))


def objects_from_detections(detections: list[dict[str, np.ndarray]], shape: tuple[int, int],
                            threshold: float) -> Objects:
    """The case's objects: painted per slice, linked across slices when there are several."""
    painted = paint_slices(detections, shape, threshold)
    return link_slices(painted) if len(detections) > 1 else Objects(painted.ids, painted.classes, painted.scores)


def semantic_labels(objects: Objects) -> np.ndarray:
    """The merged label map: every object's voxels get its class."""
    return objects.classes[objects.ids].astype(np.uint8)


def object_table(objects: Objects, spacing: tuple[float, ...], spacing_known: bool,
                 class_names: dict[int, str]) -> list[dict[str, Any]]:
    """One row per object: class, score, size in voxels (and ml), centroid and bounding box in voxel indices."""
    from scipy import ndimage

    rows = []
    boxes = ndimage.find_objects(objects.ids.astype(np.int32))
    voxel_ml = float(np.prod(spacing)) / 1000.0
    for index, box in enumerate(boxes, start=1):
        if box is None:
            continue
        voxels = int((objects.ids[box] == index).sum())
        centroid = ndimage.center_of_mass(objects.ids == index)
        row: dict[str, Any] = {"object": index, "class": class_names.get(int(objects.classes[index]), "?"),
                               "score": round(float(objects.scores[index]) if objects.scores is not None else 1.0, 4),
                               "voxels": voxels}
        if spacing_known:
            row["volume_ml"] = round(voxels * voxel_ml, 4)
        row |= {f"centroid_{axis}": round(float(value), 2) for axis, value in zip("xyz", centroid, strict=False)}
        row |= {f"bbox_{axis}": f"{part.start}-{part.stop - 1}" for axis, part in zip("xyz", box, strict=False)}
        rows.append(row)
    return rows
