"""Fairness metrics: known answers on the synthetic cohort, hand-checked group numbers, binning, small groups."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from medseg_lightning.config.schema import FairnessConfig
from medseg_lightning.data.synth import HardGroup, generate_cohort
from medseg_lightning.evaluation.fairness import (
    audit,
    fairness_metrics,
    fairness_report,
    group_counts,
    group_labels,
    group_table,
)
from medseg_lightning.evaluation.metrics import case_metrics

AUDIT = FairnessConfig(attributes=["sex", "age", "site"], bins={"age": [0, 40, 60, 120]})


def _segment_cohort(folder: Path, hard_group: HardGroup | None) -> pd.DataFrame:
    """Per-case rows of a fixed, training-free segmenter: each voxel goes to the nearer of the two class means.

    It segments the organ (lesion included) well on ordinary images and worse on the hard group's noisier,
    lower-contrast images, so the cohort has a known gap (or, without a hard group, none).
    """
    manifest = pd.read_csv(generate_cohort(folder, 40, seed=3, shape=(32, 32, 16), hard_group=hard_group))
    rows = []
    for case in manifest.itertuples():
        image = ndimage.median_filter(nib.load(folder / case.image).get_fdata(), 3)
        truth = (np.asarray(nib.load(folder / case.mask).dataobj) > 0).astype(np.uint8)
        means = np.array([image[truth == 0].mean(), image[truth == 1].mean()])
        prediction = np.abs(image[..., None] - means).argmin(-1).astype(np.uint8)
        metrics = case_metrics(prediction, truth, (1.0, 1.0, 1.5), 2)
        rows.append({"case_id": case.case_id, "dice/mean": metrics["dice/1"], "dice/organ": metrics["dice/1"],
                     "hd95/mean": metrics["hd95/mean"], "attr/sex": case.sex, "attr/age": str(case.age),
                     "attr/site": case.site})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def injected(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    return _segment_cohort(tmp_path_factory.mktemp("hard"), HardGroup("sex", "F"))


@pytest.fixture(scope="module")
def balanced(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    return _segment_cohort(tmp_path_factory.mktemp("even"), None)


def test_injected_gap_is_found_and_its_interval_excludes_zero(injected: pd.DataFrame) -> None:
    sex = audit(injected, AUDIT, ["organ"])[0]
    assert sex.available and sex.worst_group == "F" and sex.best_group == "M"
    assert sex.dice_gap is not None and sex.dice_gap.ci_low > 0
    metrics = fairness_metrics([sex], "test")
    assert metrics["test/fairness/sex/dice_worst"] == pytest.approx(sex.dice_worst)
    assert metrics["test/fairness/sex/dice_gap_ci_low"] > 0
    assert metrics["test/fairness/sex/F/dice"] < metrics["test/fairness/sex/M/dice"]


def test_no_injected_difference_gives_an_interval_containing_zero(balanced: pd.DataFrame) -> None:
    for item in audit(balanced, AUDIT, ["organ"]):
        assert item.dice_gap is not None, item.attribute
        assert item.dice_gap.ci_low <= 0 <= item.dice_gap.ci_high, item.attribute


def test_group_numbers_match_a_hand_computation(injected: pd.DataFrame) -> None:
    sex = audit(injected, AUDIT, ["organ"])[0]
    by_hand = {name: rows["dice/mean"].to_numpy() for name, rows in injected.groupby("attr/sex")}
    female = next(group for group in sex.groups if group.group == "F")
    assert female.n == len(by_hand["F"]) == 20
    assert female.dice.mean == pytest.approx(by_hand["F"].mean(), abs=1e-12)
    assert female.dice.ci_low < female.dice.mean < female.dice.ci_high
    assert by_hand["F"].min() <= female.dice.ci_low and female.dice.ci_high <= by_hand["F"].max()
    assert female.hd95 == pytest.approx(injected.loc[injected["attr/sex"] == "F", "hd95/mean"].mean())
    assert sex.dice_gap.mean == pytest.approx(by_hand["M"].mean() - by_hand["F"].mean())
    assert sex.dice_ratio == pytest.approx(by_hand["F"].mean() / by_hand["M"].mean())
    assert female.dice_per_class["organ"].mean == pytest.approx(female.dice.mean)


def test_bootstrap_is_seeded(injected: pd.DataFrame) -> None:
    first = fairness_metrics(audit(injected, AUDIT, ["organ"]), "test")
    assert first == fairness_metrics(audit(injected, AUDIT, ["organ"]), "test")
    reseeded = fairness_metrics(audit(injected, AUDIT.model_copy(update={"seed": 1}), ["organ"]), "test")
    assert reseeded["test/fairness/sex/dice_gap"] == first["test/fairness/sex/dice_gap"]
    assert reseeded["test/fairness/sex/dice_gap_ci_low"] != first["test/fairness/sex/dice_gap_ci_low"]


def test_binning_by_edges_with_unknown_and_out_of_range_values() -> None:
    values = pd.Series(["39", "40", "59.5", "60", "", None, "n/a", "-1", "120", "85"])
    assert group_labels(values, [0, 40, 60, 120]).tolist() == [
        "0-40", "40-60", "40-60", "60-120", "unknown", "unknown", "unknown", "<0", ">=120", "60-120"]
    assert group_labels(pd.Series(["F", " M", ""]), None).tolist() == ["F", "M", "unknown"]


def test_small_groups_are_never_reported_as_numbers() -> None:
    rows = pd.DataFrame({"dice/mean": [0.9] * 12 + [0.5] * 3, "attr/sex": ["M"] * 12 + ["F"] * 3})
    sex = audit(rows, FairnessConfig(attributes=["sex"]), [])[0]
    female = next(group for group in sex.groups if group.group == "F")
    assert not female.measured and female.n is None and female.dice is None
    assert sex.dice_gap is None and "fewer than two groups" in sex.note
    metrics = fairness_metrics([sex], "val")
    assert not any("/F/" in key for key in metrics)
    assert metrics["val/fairness/sex/groups_too_small"] == 1 and "val/fairness/sex/dice_gap" not in metrics
    table = group_table([sex], 10)
    female_row = table[table["group"] == "F"].iloc[0]
    assert female_row["n"] == "<10" and math.isnan(female_row["dice"])
    assert group_counts(rows.assign(case_id=range(15)), FairnessConfig(attributes=["sex"]))["sex"] == {
        "F": None, "M": 12}


def test_unavailable_attributes_are_reported_not_dropped() -> None:
    rows = pd.DataFrame({"dice/mean": [0.9] * 12, "attr/site": [""] * 12})
    missing, blank = audit(rows, FairnessConfig(attributes=["ethnicity", "site"]), [])
    assert not missing.available and "not a column" in missing.note
    assert not blank.available and "missing" in blank.note
    report = fairness_report([missing, blank], FairnessConfig(), "test")
    assert [item["available"] for item in report["attributes"]] == [False, False]


def test_group_names_are_made_safe_for_mlflow_metric_keys() -> None:
    rows = pd.DataFrame({"dice/mean": [0.8] * 10 + [0.7] * 10, "attr/site": ["St. Mary's (A)"] * 10 + ["B+"] * 10})
    metrics = fairness_metrics(audit(rows, FairnessConfig(attributes=["site"]), []), "test")
    assert "test/fairness/site/St. Mary_s _A_/dice" in metrics and "test/fairness/site/B_/n" in metrics
