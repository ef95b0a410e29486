"""``medseg triage``: which unlabelled cases an annotator should correct first, with draft masks to start from.

Every case is predicted with its uncertainty (``medseg predict --uncertainty``); the worklist ranks the cases by
one of the per-case scores, most uncertain first. Whether that ranking finds the poor segmentations is measured
on validation data by every evaluation (``uncertainty/<score>/spearman`` and ``aurc``): check it there first.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from medseg_lightning.inference.inputs import PredictInput
from medseg_lightning.inference.predict import CaseOutput
from medseg_lightning.utilities.files import atomic_write

# Each score, and whether a higher value means more uncertain (agreement between members means the opposite).
TRIAGE_SCORES = {"entropy_structure": True, "entropy_boundary": True, "uncertain_fraction": True,
                 "member_agreement": False}


@dataclass
class Failed:
    """An input that could not be predicted, and why (listed, never ranked)."""

    name: str
    paths: list[Path]
    reason: str


def rank_cases(outputs: list[CaseOutput], score: str) -> list[CaseOutput]:
    """Most uncertain first; a case whose score is undefined (no structure predicted, so nothing to measure the
    uncertainty of; or one member for ``member_agreement``) comes before all others: a person should look at it."""
    higher_is_uncertain = TRIAGE_SCORES[score]

    def key(output: CaseOutput) -> tuple[int, float]:
        value = (output.uncertainty or {}).get(score, math.nan)
        if not math.isfinite(value):
            return (0, 0.0)
        return (1, -value if higher_is_uncertain else value)

    return sorted(outputs, key=key)


def worklist(ranked: list[CaseOutput], score: str, thumbnails: dict[str, Path], out_dir: Path) -> pd.DataFrame:
    """One row per case in rank order: the score, the other scores, the predicted volume, the draft mask and its
    thumbnail (paths relative to ``out_dir``, so the folder can be moved)."""
    rows: list[dict[str, Any]] = []
    for rank, output in enumerate(ranked, start=1):
        scores = output.uncertainty or {}
        value = scores.get(score, math.nan)
        rows.append({"rank": rank, "case": output.name, "score": score, "value": value,
                     "note": "" if math.isfinite(value) else _undefined(score),
                     f"predicted_volume_{output.volume_unit}": output.foreground,
                     "draft_mask": str(output.mask.relative_to(out_dir)),
                     "thumbnail": str(thumbnails[output.name].relative_to(out_dir)) if output.name in thumbnails
                     else "", **{key: scores.get(key, math.nan) for key in TRIAGE_SCORES if key != score}})
    return pd.DataFrame(rows)


def _undefined(score: str) -> str:
    return "one member: add --tta or more --model" if score == "member_agreement" else "no structure predicted"


def write_table(table: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda temporary: table.to_csv(temporary, index=False, float_format="%.4f"))


def copy_for_annotation(ranked: list[CaseOutput], cases: dict[str, PredictInput], masks: dict[str, list[Path]],
                        top: int, folder: Path) -> list[Path]:
    """The ``top`` cases as ``images/`` (the inputs, copied unchanged) and ``drafts/`` (every draft mask file of
    each), ready to correct and to copy into a dataset. Returns the files written."""
    written = []
    for output in ranked[:top]:
        for path in cases[output.name].paths:
            target = folder / "images" / (path.name if path.is_file() else f"{output.name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                shutil.copytree(path, target, dirs_exist_ok=True)
            else:
                shutil.copy2(path, target)
            written.append(target)
        for mask in masks[output.name]:
            draft = folder / "drafts" / mask.name
            draft.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(mask, draft)
            written.append(draft)
    return written
