"""Post-processing of predicted label maps, shared by ``medseg predict`` and the evaluation of validation and test
cases, so the reported metrics are those of what ``medseg predict`` writes.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def classes_to_clean(setting: bool | list[str], labels: dict[int, str]) -> list[int]:
    """The labels ``inference.largest_component`` names: every foreground class for ``true``, none for ``false``."""
    if setting is True:
        return [label for label in labels if label > 0]
    if not setting:
        return []
    by_name = {name: label for label, name in labels.items()}
    unknown = [name for name in setting if name not in by_name]
    if unknown:
        raise ValueError(f"inference.largest_component: unknown class(es) {unknown}; classes are {list(by_name)}")
    return [by_name[name] for name in setting]


def keep_largest_components(labels: np.ndarray, classes: list[int]) -> np.ndarray:
    """Removes every connected component (26-connected in 3D) of the given classes but the largest."""
    if not classes:
        return labels
    labels = labels.copy()
    structure = np.ones((3,) * labels.ndim, dtype=bool)
    for label in classes:
        components, count = ndimage.label(labels == label, structure=structure)
        if count > 1:
            sizes = np.bincount(components.ravel())[1:]
            labels[(components > 0) & (components != int(sizes.argmax()) + 1)] = 0
    return labels
