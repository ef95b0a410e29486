"""Datasets over prepared cases, returning dict batches with fixed keys.

Training samples single (2.5D) slices; validation, test and prediction take whole cases, so predictions can be
re-stacked into the volume and case-level metrics computed in physical space.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from medseg_lightning.data.cache import PreparedCase
from medseg_lightning.data.transforms import Augment


def stack_context(image: np.ndarray, slices: np.ndarray, context: int) -> np.ndarray:
    """``(S, C, H, W)`` -> ``(len(slices), (2k+1)*C, H, W)``: each slice with ``k`` neighbours per side.

    Neighbours beyond the volume repeat the edge slice (nnU-Net-style 2.5D input); channels are ordered
    neighbour-major, so channel ``j*C + c`` is modality ``c`` of neighbour ``j``.
    """
    offsets = np.arange(-context, context + 1)
    index = np.clip(slices[:, None] + offsets[None, :], 0, image.shape[0] - 1)
    stacked = image[index.ravel()]
    return stacked.reshape(len(slices), len(offsets) * image.shape[1], *image.shape[2:])


def _attributes(case: PreparedCase, names: list[str]) -> dict[str, str]:
    return {name: case.case.attribute(name) for name in names}


class SliceDataset(Dataset):
    """One item per slice of every case: ``image (C', H, W)``, ``mask (H, W)``, ``case_id``, ``slice_index``."""

    def __init__(
        self, cases: list[PreparedCase], context: int = 0, augment: Augment | None = None,
        attribute_names: list[str] | None = None,
    ) -> None:
        self.cases = cases
        self.context = context
        self.augment = augment
        self.attribute_names = attribute_names if attribute_names is not None else _common_attributes(cases)
        self.index = np.array([(c, s) for c, case in enumerate(cases) for s in range(case.image.shape[0])],
                              dtype=np.int64).reshape(-1, 2)
        self.foreground = np.concatenate([case.foreground_slices for case in cases]) if cases else np.zeros(0, bool)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict[str, object]:
        case_number, slice_index = (int(v) for v in self.index[item])
        case = self.cases[case_number]
        if self.context:
            image = stack_context(case.image, np.array([slice_index]), self.context)[0]
        else:
            image = case.image[slice_index]
        mask = np.asarray(case.mask[slice_index]) if case.mask is not None else np.zeros(image.shape[1:], np.uint8)
        instances = None if case.instances is None else np.asarray(case.instances[slice_index])
        if self.augment is not None and instances is not None:  # one transform moves labels and objects alike
            image, both = self.augment(image, np.stack([mask, instances], axis=-1).astype(np.uint16))
            mask, instances = both[..., 0], both[..., 1]
        elif self.augment is not None:
            image, mask = self.augment(image, mask)
        item = {
            "image": torch.from_numpy(np.array(image, dtype=np.float32)),  # a copy: cache maps are read-only
            "mask": torch.from_numpy(np.asarray(mask).astype(np.int64)),
            "case_id": case.case.case_id,
            "slice_index": slice_index,
            "attributes": _attributes(case, self.attribute_names),
        }
        if instances is not None:
            item["instances"] = torch.from_numpy(np.asarray(instances).astype(np.int64))
        return item


class CaseDataset(Dataset):
    """One item per case: ``image (S, C', H, W)``, ``mask (S, H, W)``, ``case_id``, ``meta`` for re-stacking, and
    ``target (X, Y, Z)``, the labels in the original voxel grid that re-stacked predictions are scored against."""

    def __init__(self, cases: list[PreparedCase], context: int = 0, attribute_names: list[str] | None = None) -> None:
        self.cases = cases
        self.context = context
        self.attribute_names = attribute_names if attribute_names is not None else _common_attributes(cases)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, item: int) -> dict[str, object]:
        case = self.cases[item]
        image = stack_context(case.image, np.arange(case.image.shape[0]), self.context)
        result: dict[str, object] = {
            "image": torch.from_numpy(np.array(image, dtype=np.float32)),
            "case_id": case.case.case_id,
            "meta": case.meta,
            "attributes": _attributes(case, self.attribute_names),
        }
        if case.mask is not None and case.native_mask is not None:
            result["mask"] = torch.from_numpy(np.asarray(case.mask).astype(np.int64))
            result["target"] = torch.from_numpy(np.array(case.native_mask))  # (X, Y, Z) original grid
        if case.native_instances is not None:
            result["target_instances"] = np.array(case.native_instances)  # (X, Y, Z) object ids, original grid
        return result


def collate_cases(items: list[dict[str, object]]) -> list[dict[str, object]]:
    """Cases differ in slice count, so a case batch is a plain list."""
    return items


def _common_attributes(cases: list[PreparedCase]) -> list[str]:
    return sorted(cases[0].case.attributes) if cases else []


class ForegroundBalancedSampler(Sampler[int]):
    """Draws all foreground slices and a fresh random share of background-only slices every epoch.

    Background-only slices dominate many volumes; undersampling them speeds up epochs without discarding them,
    since a different subset is drawn each epoch (Lightning calls ``set_epoch``).
    """

    def __init__(self, foreground: np.ndarray, background_fraction: float, seed: int = 0) -> None:
        self.foreground = np.flatnonzero(foreground)
        self.background = np.flatnonzero(~foreground)
        self.count = round(background_fraction * len(self.background))
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.foreground) + self.count

    def __iter__(self) -> Iterator[int]:
        # advance by itself too: under DDP Lightning wraps this sampler and only the wrapper gets set_epoch
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        chosen = rng.choice(self.background, size=self.count, replace=False) if self.count else self.background[:0]
        order = np.concatenate([self.foreground, chosen])
        return iter(rng.permutation(order).tolist())
