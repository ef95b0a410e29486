"""Tests for the deterministic synthetic cohort generator."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg_lightning.data.synth import HardGroup, generate_cohort, parse_hard_group

SMALL = (24, 24, 16)


def _read_manifest(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _load(root: Path, rel: str) -> np.ndarray:
    return np.asarray(nib.load(root / rel).dataobj)


def _organ_cnr(root: Path, row: dict[str, str]) -> float:
    image, labels = _load(root, row["image"]), _load(root, row["mask"])
    background = image[labels == 0]
    return float((image[labels == 1].mean() - background.mean()) / background.std())


def test_files_and_manifest_layout(tmp_path: Path) -> None:
    manifest = generate_cohort(tmp_path, 5, shape=SMALL)
    assert manifest == tmp_path / "manifest.csv"
    columns, rows = _read_manifest(manifest)
    assert columns == ["case_id", "image", "mask", "subject_id", "sex", "age", "site"]
    assert [r["case_id"] for r in rows] == [f"synth_{i:03d}" for i in range(5)]
    assert [r["subject_id"] for r in rows] == [f"subj_{i:03d}" for i in range(5)]
    for row in rows:
        assert row["image"] == f"imagesTr/{row['case_id']}.nii.gz"
        assert row["mask"] == f"labelsTr/{row['case_id']}.nii.gz"
        assert row["sex"] in {"F", "M"} and row["site"] in {"A", "B", "C"}
        assert 20 <= int(row["age"]) <= 85
        image, labels = nib.load(tmp_path / row["image"]), nib.load(tmp_path / row["mask"])
        assert image.get_data_dtype() == np.float32 and labels.get_data_dtype() == np.uint8
        assert image.shape == labels.shape == SMALL
    assert {r["sex"] for r in rows} == {"F", "M"}


def test_determinism(tmp_path: Path) -> None:
    m1 = generate_cohort(tmp_path / "a", 3, seed=7, shape=SMALL)
    m2 = generate_cohort(tmp_path / "b", 3, seed=7, shape=SMALL)
    generate_cohort(tmp_path / "c", 3, seed=8, shape=SMALL)
    assert m1.read_text() == m2.read_text()
    rows = _read_manifest(m1)[1]
    for row in rows:
        for key in ("image", "mask"):
            a, b = _load(tmp_path / "a", row[key]), _load(tmp_path / "b", row[key])
            assert a.tobytes() == b.tobytes()
    assert not np.array_equal(_load(tmp_path / "a", rows[0]["image"]), _load(tmp_path / "c", rows[0]["image"]))


def test_labels_and_spacing(tmp_path: Path) -> None:
    spacing = (0.8, 1.2, 2.0)
    manifest = generate_cohort(tmp_path, 30, seed=3, shape=SMALL, spacing=spacing)
    rows = _read_manifest(manifest)[1]
    with_organ = with_lesion = 0
    for row in rows:
        labels = _load(tmp_path, row["mask"])
        assert set(np.unique(labels).tolist()) <= {0, 1, 2}
        with_organ += int((labels == 1).any())
        with_lesion += int((labels == 2).any())
        for key in ("image", "mask"):
            img = nib.load(tmp_path / row[key])
            np.testing.assert_allclose(img.header.get_zooms(), spacing, rtol=1e-6)
            np.testing.assert_allclose(np.diag(img.affine)[:3], spacing, rtol=1e-6)
            assert np.any(img.affine[:3, 3] != 0)
    assert with_organ == len(rows)
    assert 0.7 * len(rows) <= with_lesion < len(rows)  # mostly present, but empty-class cases exist


def test_subject_grouping(tmp_path: Path) -> None:
    rows = _read_manifest(generate_cohort(tmp_path, 7, shape=SMALL, cases_per_subject=2))[1]
    assert [r["subject_id"] for r in rows] == ["subj_000", "subj_000", "subj_001", "subj_001", "subj_002",
                                              "subj_002", "subj_003"]
    for first, second in zip(rows[0:6:2], rows[1:6:2], strict=True):
        assert {k: first[k] for k in ("sex", "age", "site")} == {k: second[k] for k in ("sex", "age", "site")}
        assert first["image"] != second["image"]


def test_hard_group_is_harder(tmp_path: Path) -> None:
    group = HardGroup("sex", "F", 1.0)
    manifest = generate_cohort(tmp_path, 12, seed=1, shape=SMALL, hard_group=group)
    rows = _read_manifest(manifest)[1]
    hard = [_organ_cnr(tmp_path, r) for r in rows if r["sex"] == "F"]
    easy = [_organ_cnr(tmp_path, r) for r in rows if r["sex"] != "F"]
    assert hard and easy
    assert max(hard) < min(easy)
    assert np.median(hard) < 0.6 * np.median(easy)


def test_attributes_independent_of_hard_group_and_severity_zero_is_noop(tmp_path: Path) -> None:
    base = generate_cohort(tmp_path / "base", 8, seed=2, shape=SMALL)
    zero = generate_cohort(tmp_path / "zero", 8, seed=2, shape=SMALL, hard_group=HardGroup("site", "A", 0.0))
    hard = generate_cohort(tmp_path / "hard", 8, seed=2, shape=SMALL, hard_group=HardGroup("site", "A", 1.0))
    assert base.read_text() == zero.read_text() == hard.read_text()
    rows = _read_manifest(base)[1]
    for row in rows:
        base_cnr, zero_cnr = _organ_cnr(tmp_path / "base", row), _organ_cnr(tmp_path / "zero", row)
        assert zero_cnr == pytest.approx(base_cnr)
        np.testing.assert_array_equal(_load(tmp_path / "base", row["mask"]), _load(tmp_path / "hard", row["mask"]))


def test_default_cohort_writes_every_case(tmp_path: Path) -> None:
    """The default call (the one benchmarks/synth_speed.py times against writing the same files) writes every
    case at the default shape and spacing, each with an organ."""
    rows = _read_manifest(generate_cohort(tmp_path, 20))[1]
    assert [r["case_id"] for r in rows] == [f"synth_{i:03d}" for i in range(20)]
    for row in rows:
        image, labels = nib.load(tmp_path / row["image"]), nib.load(tmp_path / row["mask"])
        assert image.shape == labels.shape == (48, 48, 32)
        np.testing.assert_allclose(labels.header.get_zooms(), (1.0, 1.0, 1.5))
        assert (np.asarray(labels.dataobj) == 1).any()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sex=F", HardGroup("sex", "F", 1.0)),
        ("sex=F:0.5", HardGroup("sex", "F", 0.5)),
        (" site = b : 2 ", HardGroup("site", "B", 2.0)),
        ("Sex=m:0", HardGroup("sex", "M", 0.0)),
    ],
)
def test_parse_hard_group_good(text: str, expected: HardGroup) -> None:
    assert parse_hard_group(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "sex", "sex=", "=F", "sex=F:", "sex=F:abc", "sex=F:-1", "sex=F:nan", "age=60+", "sex=X", "site=D",
     "sex=F=M", "height=F"],
)
def test_parse_hard_group_bad(text: str) -> None:
    with pytest.raises(ValueError):
        parse_hard_group(text)


def test_age_error_message_is_clear() -> None:
    with pytest.raises(ValueError, match="age is not supported"):
        HardGroup("age", "60")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_cases": 0},
        {"n_cases": 2, "shape": (8, 8)},
        {"n_cases": 2, "shape": (8, 0, 8)},
        {"n_cases": 2, "shape": (8, 8.5, 8)},
        {"n_cases": 2, "spacing": (1.0, -1.0, 1.0)},
        {"n_cases": 2, "cases_per_subject": 0},
        {"n_cases": 2, "seed": -1},
    ],
)
def test_generate_cohort_rejects_bad_args(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        generate_cohort(tmp_path, **kwargs)
