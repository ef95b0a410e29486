"""How well an uncertainty score ranks cases by their true Dice: Spearman correlation and risk-coverage.

A score is worth using for triage or for a "refer to a human" rule only if the cases it calls uncertain are the
ones the model got wrong, on the user's own data. Two figures say so per score:

- ``spearman``: rank correlation between the score and the case's mean Dice (good scores are clearly negative);
- ``aurc``: area under the risk-coverage curve (Geifman and El-Yaniv), the mean over k of ``1 - mean Dice`` of the
  k most certain cases: lower is better, between ``aurc_oracle`` (cases ranked by their true Dice, the best any
  score can do) and ``aurc_random`` (``1 - mean Dice``, what a score that knows nothing gets on average).

Cases whose score is undefined (no predicted structure: nothing to be unsure about inside it) are left out of
that score's figures, and ``n`` says how many cases each figure rests on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

PREFIX = "uncertainty/"
DICE = "dice/mean"


def score_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The per-case uncertainty scores present in ``rows`` (columns ``uncertainty/<score>``)."""
    return sorted({key[len(PREFIX):] for row in rows for key in row if key.startswith(PREFIX)})


def risk_coverage(scores: np.ndarray, dice: np.ndarray) -> np.ndarray:
    """``1 - mean Dice`` of the k most certain cases (lowest score first), for k = 1..n."""
    order = np.argsort(scores, kind="stable")
    kept = np.cumsum(dice[order]) / np.arange(1, len(dice) + 1)
    return 1.0 - kept


MIN_CASES = 3  # fewer cases than this: no ranking figure means anything


def scored_pairs(rows: Sequence[dict[str, Any]], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(score, mean Dice) of the cases where both are defined."""
    pairs = np.asarray([(row[PREFIX + name], row[DICE]) for row in rows
                        if _finite(row.get(PREFIX + name)) and _finite(row.get(DICE))], dtype=np.float64)
    return (pairs[:, 0], pairs[:, 1]) if len(pairs) else (np.empty(0), np.empty(0))


def ranking_quality(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``uncertainty/<score>/spearman``, ``.../aurc``, ``.../aurc_oracle``, ``.../aurc_random`` and ``.../n``."""
    out: dict[str, float] = {}
    for name in score_names(rows):
        scores, dice = scored_pairs(rows, name)
        key = f"{PREFIX}{name}"
        out[f"{key}/n"] = float(len(scores))
        if len(scores) < MIN_CASES:
            continue
        correlation = stats.spearmanr(scores, dice).statistic if np.ptp(scores) > 0 and np.ptp(dice) > 0 else math.nan
        out |= {f"{key}/spearman": float(correlation),
                f"{key}/aurc": float(risk_coverage(scores, dice).mean()),
                f"{key}/aurc_oracle": float(risk_coverage(-dice, dice).mean()),
                f"{key}/aurc_random": float(1.0 - dice.mean())}
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
