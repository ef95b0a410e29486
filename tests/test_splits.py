"""Subject-level splits: no subject in two splits, reproducible, stratified."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from medseg_lightning.config.schema import SplitConfig
from medseg_lightning.data.manifest import Case, ManifestError
from medseg_lightning.data.splits import assign_splits


def _cases(n_subjects: int, per_subject: int = 2) -> list[Case]:
    return [
        Case(f"s{s}_c{c}", [Path("x")], None, f"s{s}", {"site": "AB"[s % 2] if s % 7 else None})
        for s in range(n_subjects) for c in range(per_subject)
    ]


def _subject_splits(cases: list[Case], splits: dict[str, str]) -> dict[str, set[str]]:
    result: dict[str, set[str]] = {}
    for case in cases:
        result.setdefault(case.subject_id, set()).add(splits[case.case_id])
    return result


@pytest.mark.parametrize("config", [
    SplitConfig(n_folds=5, fold=2),
    SplitConfig(n_folds=4, fold=0, test_fraction=0.2),
    SplitConfig(n_folds=5, fold=4, holdout="test", val_fraction=0.25, stratify_by="site"),
])
def test_no_subject_in_two_splits(config: SplitConfig) -> None:
    cases = _cases(30)
    splits = assign_splits(cases, config)
    assert all(len(s) == 1 for s in _subject_splits(cases, splits).values())
    assert set(splits.values()) <= {"train", "val", "test"}


def test_folds_partition_subjects_and_are_reproducible() -> None:
    cases = _cases(23)
    held_out = [
        {c.subject_id for c in cases if assign_splits(cases, SplitConfig(n_folds=5, fold=f))[c.case_id] == "val"}
        for f in range(5)
    ]
    assert sorted(len(h) for h in held_out) == [4, 4, 5, 5, 5]
    assert set().union(*held_out) == {c.subject_id for c in cases}  # every subject held out exactly once
    assert assign_splits(cases, SplitConfig(seed=3)) == assign_splits(cases, SplitConfig(seed=3))
    assert assign_splits(cases, SplitConfig(seed=3)) != assign_splits(cases, SplitConfig(seed=4))


def test_stratification_spreads_groups_over_folds() -> None:
    cases = _cases(40, per_subject=1)
    config = SplitConfig(n_folds=4, fold=0, stratify_by="site")
    splits = assign_splits(cases, config)
    val_sites = Counter(c.attribute("site") for c in cases if splits[c.case_id] == "val")
    all_sites = Counter(c.attribute("site") for c in cases)
    for site, count in all_sites.items():
        assert abs(val_sites[site] - count / 4) <= 1


@pytest.mark.parametrize(("holdout", "fraction"), [("test", "val_fraction"), ("val", "test_fraction")])
def test_a_carved_share_is_stratified_too(holdout: str, fraction: str) -> None:
    """The validation share of holdout=test (and the fixed test share of holdout=val) spreads every group
    alike: a share drawn from the first group only would validate on one site."""
    cases = _cases(60, per_subject=1)
    splits = assign_splits(cases, SplitConfig(n_folds=5, holdout=holdout, stratify_by="site", **{fraction: 0.3}))
    carved = "val" if holdout == "test" else "test"
    pool = [c for c in cases if splits[c.case_id] in ("train", carved)] if holdout == "test" else cases
    share = Counter(c.attribute("site") for c in pool if splits[c.case_id] == carved)
    for site, count in Counter(c.attribute("site") for c in pool).items():
        assert abs(share[site] - 0.3 * count) <= 1, (site, share, count)


def test_holdout_test_carves_validation_from_the_rest() -> None:
    counts = Counter(assign_splits(_cases(20, 1), SplitConfig(n_folds=4, holdout="test", val_fraction=0.2)).values())
    assert counts == {"test": 5, "val": 3, "train": 12}


def test_unknown_stratification_column() -> None:
    with pytest.raises(ManifestError, match="no attribute column 'sex'; the manifest has: site"):
        assign_splits(_cases(10), SplitConfig(stratify_by="sex"))


def test_split_file_conflicts_and_gaps(tmp_path: Path) -> None:
    cases = _cases(3)
    good = tmp_path / "good.csv"
    good.write_text("subject_id,split\ns0,train\ns1,val\ns2,test\n")
    assert assign_splits(cases, SplitConfig(method="file", file=good))["s2_c1"] == "test"
    bad = tmp_path / "bad.csv"
    bad.write_text("case_id,split\ns0_c0,train\ns0_c1,test\ns1_c0,val\n")
    with pytest.raises(ManifestError) as error:
        assign_splits(cases, SplitConfig(method="file", file=bad))
    assert "subject s0 is in two splits (train and test)" in str(error.value)
    assert "no split for subject(s) s2" in str(error.value)


def test_leave_group_out_tests_on_a_group_never_seen_in_training_or_validation() -> None:
    cases = _cases(30)
    config = SplitConfig(method="leave_group_out", group_attribute="site", held_out_group="B", val_fraction=0.2)
    splits = assign_splits(cases, config)
    for case in cases:
        held_out = case.attribute("site") == "B"
        assert (splits[case.case_id] == "test") == held_out, case.case_id
    subjects = _subject_splits(cases, splits)
    assert all(len(s) == 1 for s in subjects.values())
    counts = Counter(next(iter(s)) for s in subjects.values())
    assert counts["val"] >= 1 and counts["train"] > counts["val"]
    assert splits == assign_splits(cases, config)  # reproducible


def test_leave_group_out_names_a_group_that_does_not_exist() -> None:
    config = SplitConfig(method="leave_group_out", group_attribute="site", held_out_group="Z")
    with pytest.raises(ManifestError, match="no subject has site = 'Z'; values: A, B, unknown"):
        assign_splits(_cases(30), config)
    with pytest.raises(ValueError, match="needs 'group_attribute' and 'held_out_group'"):
        SplitConfig(method="leave_group_out", group_attribute="site")
