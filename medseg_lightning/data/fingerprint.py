"""Dataset fingerprint: one hash for "exactly these files with exactly these settings", plus the statistics a
reader of a run needs to judge the data (as nnU-Net's dataset fingerprint). No patient identifiers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from medseg_lightning.config.schema import DataConfig
from medseg_lightning.data.cache import CACHE_VERSION, PreparedCase


def dataset_fingerprint(cases: list[PreparedCase], settings: str, config: DataConfig) -> dict[str, Any]:
    """Hash over the sorted case digests and settings, with spacing, shape, intensity and label statistics."""
    channels = sorted({int(case.image.shape[1]) for case in cases})
    if len(channels) > 1:  # per-channel statistics would pair unrelated channels
        raise ValueError(f"cannot fingerprint cases with different channel counts {channels}; run medseg data check")
    keys = sorted(case.meta["key"] for case in cases)
    digest = hashlib.sha256("|".join([settings, *keys]).encode()).hexdigest()
    spacings = np.array([case.meta["spacing"] for case in cases], dtype=float)
    shapes = np.array([case.meta["shape"][1:] for case in cases], dtype=float)
    return {
        "fingerprint": digest,
        "cache_version": CACHE_VERSION,
        "n_cases": len(cases),
        "n_subjects": len({case.case.subject_id for case in cases}),
        "n_channels": int(cases[0].image.shape[1]),
        "spacing_known": all(case.meta["spacing_known"] for case in cases),
        "spacing_mm": _summary(spacings),
        "shape_voxels": _summary(shapes),
        "intensity": _intensity(cases),
        "labels": _labels(cases, config),
        "settings": {
            "preprocessing": config.preprocessing.model_dump(mode="json"),
            "slicing_axis": config.slicing.axis,
            "label_mapping": {str(k): v for k, v in config.label_mapping.items()},
        },
    }


def _summary(values: np.ndarray) -> dict[str, list[float]]:
    """Per-axis min, median and max."""
    return {
        "min": np.round(values.min(0), 4).tolist(),
        "median": np.round(np.median(values, 0), 4).tolist(),
        "max": np.round(values.max(0), 4).tolist(),
    }


def _intensity(cases: list[PreparedCase]) -> list[dict[str, float]]:
    """Per channel: medians over cases of the foreground mean, std and 0.5/99.5 percentiles (raw values)."""
    per_channel = zip(*(case.meta["intensity"] for case in cases), strict=True)
    return [
        {name: round(float(np.median([stat[name] for stat in stats])), 4) for name in stats[0]}
        for stats in map(list, per_channel)
    ]


def _labels(cases: list[PreparedCase], config: DataConfig) -> dict[str, dict[str, float]]:
    """Per class: share of all voxels and number of cases that contain it."""
    total = sum(sum(case.meta["label_voxels"].values()) for case in cases) or 1
    result = {}
    for label, name in sorted(config.labels.items()):
        voxels = [case.meta["label_voxels"].get(str(label), 0) for case in cases]
        result[name] = {"voxel_fraction": round(sum(voxels) / total, 6), "cases": sum(v > 0 for v in voxels)}
    return result


def write_fingerprint(fingerprint: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fingerprint, indent=2) + "\n")
