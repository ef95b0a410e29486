"""Subject-level splits: every case of a subject lands in the same split, reproducibly from a seed."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pandas as pd

from medseg_lightning.config.schema import SplitConfig
from medseg_lightning.data.manifest import Case, ManifestError

SPLITS = ("train", "val", "test")


def assign_splits(cases: list[Case], config: SplitConfig) -> dict[str, str]:
    """Maps each case id to ``train``, ``val`` or ``test``.

    Raises:
        ManifestError: a split file that misses subjects or puts one subject in two splits, or an unknown
            stratification column.
    """
    if config.method == "file":
        subject_split = _splits_from_file(cases, config)
    elif config.method == "leave_group_out":
        subject_split = _leave_group_out(cases, config)
    else:
        subject_split = _kfold_splits(cases, config)
    return {case.case_id: subject_split[case.subject_id] for case in cases}


def _leave_group_out(cases: list[Case], config: SplitConfig) -> dict[str, str]:
    """Test = every subject of the held-out group; val = a stratified share of the others; train = the rest.

    This measures generalisation to a group (a site, a scanner) the model never saw in training or selection.
    """
    attribute, group = config.group_attribute or "", config.held_out_group or ""
    groups = subject_strata(cases, attribute)
    held_out = sorted(subject for subject, value in groups.items() if value == group)
    if not held_out:
        present = ", ".join(sorted(set(groups.values())))
        raise ManifestError(f"split.held_out_group: no subject has {attribute} = {group!r}; values: {present}")
    rest = sorted(subject for subject in groups if subject not in set(held_out))
    if not rest:
        raise ManifestError(f"split: every subject has {attribute} = {group!r}; nothing is left to train on")
    strata = subject_strata(cases, config.stratify_by)
    validation = _take_fraction(rest, strata, config.val_fraction, np.random.default_rng(config.seed))
    result = {subject: "val" if subject in validation else "train" for subject in rest}
    result.update(dict.fromkeys(held_out, "test"))
    return result


def subject_strata(cases: list[Case], attribute: str | None) -> dict[str, str]:
    """Each subject's stratum: its value of ``attribute`` (``unknown`` when blank), or one stratum for all."""
    if attribute is not None and cases and attribute not in cases[0].attributes:
        valid = ", ".join(cases[0].attributes) or "(none)"
        raise ManifestError(f"split.stratify_by: no attribute column {attribute!r}; the manifest has: {valid}")
    return {case.subject_id: case.attribute(attribute) if attribute else "all" for case in cases}


def _deal(subjects_by_stratum: dict[str, list[str]], n_parts: int, rng: np.random.Generator) -> list[list[str]]:
    """Shuffles each stratum and deals its subjects round-robin, so parts get near-equal sizes and group shares."""
    parts: list[list[str]] = [[] for _ in range(n_parts)]
    position = 0
    for stratum in sorted(subjects_by_stratum):
        members = sorted(subjects_by_stratum[stratum])
        for index in rng.permutation(len(members)):
            parts[position % n_parts].append(members[index])
            position += 1
    return parts


def _take_fraction(subjects: list[str], strata: dict[str, str], fraction: float, rng: np.random.Generator) -> set[str]:
    """A stratified random share of ``subjects`` (at least one subject when the fraction is positive): each
    stratum gives its share rounded down, and the subjects still missing come from the strata with the largest
    remainders, so every stratum's count is within one of ``fraction`` x its size."""
    if fraction <= 0 or not subjects:
        return set()
    count = max(1, round(fraction * len(subjects)))
    by_stratum = _group(subjects, strata)
    names = sorted(by_stratum)
    quotas = [fraction * len(by_stratum[name]) for name in names]
    taken = [int(quota) for quota in quotas]
    ties = rng.random(len(names))
    by_remainder = sorted(range(len(names)), key=lambda i: (taken[i] - quotas[i], ties[i]))
    for index in by_remainder[: max(0, count - sum(taken))]:
        taken[index] += 1
    chosen: set[str] = set()
    for name, k in zip(names, taken, strict=True):
        members = sorted(by_stratum[name])
        chosen |= {members[i] for i in rng.permutation(len(members))[:k]}
    return chosen


def _group(subjects: list[str], strata: dict[str, str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = defaultdict(list)
    for subject in subjects:
        grouped[strata[subject]].append(subject)
    return grouped


def _kfold_splits(cases: list[Case], config: SplitConfig) -> dict[str, str]:
    strata = subject_strata(cases, config.stratify_by)
    subjects = sorted(strata)
    if len(subjects) < config.n_folds:
        raise ManifestError(f"split: {len(subjects)} subjects cannot be split into {config.n_folds} folds")
    rng = np.random.default_rng(config.seed)
    fixed_test = _take_fraction(subjects, strata, config.test_fraction, rng) if config.holdout == "val" else set()
    pool = [s for s in subjects if s not in fixed_test]
    folds = _deal(_group(pool, strata), config.n_folds, rng)
    held_out = set(folds[config.fold])
    rest = [s for s in pool if s not in held_out]
    result = dict.fromkeys(rest, "train")
    result.update(dict.fromkeys(fixed_test, "test"))
    if config.holdout == "val":
        result.update(dict.fromkeys(held_out, "val"))
    else:
        result.update(dict.fromkeys(held_out, "test"))
        result.update(dict.fromkeys(_take_fraction(rest, strata, config.val_fraction, rng), "val"))
    return result


def _splits_from_file(cases: list[Case], config: SplitConfig) -> dict[str, str]:
    assert config.file is not None
    try:
        table = pd.read_csv(config.file, dtype=str, keep_default_na=False)
    except Exception as error:
        raise ManifestError(f"{config.file}: split file not readable ({error})") from None
    key = "subject_id" if "subject_id" in table.columns else "case_id"
    if key not in table.columns or "split" not in table.columns:
        raise ManifestError(f"{config.file}: needs columns 'split' and 'subject_id' or 'case_id'")
    subject_of = {case.case_id: case.subject_id for case in cases}
    result: dict[str, str] = {}
    problems = []
    for row in table.to_dict("records"):
        split = row["split"].strip()
        if split not in SPLITS:
            problems.append(f"{config.file}: {key} {row[key]}: split {split!r} is not one of {', '.join(SPLITS)}")
            continue
        subject = row[key] if key == "subject_id" else subject_of.get(row[key], row[key])
        if result.setdefault(subject, split) != split:
            problems.append(f"{config.file}: subject {subject} is in two splits ({result[subject]} and {split})")
    missing = sorted({case.subject_id for case in cases} - set(result))
    if missing:
        problems.append(f"{config.file}: no split for subject(s) {', '.join(missing[:10])}")
    if problems:
        raise ManifestError("\n".join(problems))
    return result
