"""Attributes from a clinical table (codes translated, blanks unknown, unknown codes refused) and from case ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from medseg_lightning.config.schema import AttributesConfig
from medseg_lightning.data.attributes import apply_attributes
from medseg_lightning.data.manifest import Case


def _cases(*ids: str) -> list[Case]:
    return [Case(case_id, [Path("x")], None, case_id) for case_id in ids]


@pytest.fixture
def table(tmp_path: Path) -> Path:
    path = tmp_path / "data.csv"
    path.write_text("Patient,gender,age_at_initial_pathologic\nTCGA_CS_4941,2.0,67.0\nTCGA_CS_4942,1.0,44.0\n"
                    "TCGA_DU_5849,,\nTCGA_HT_7616,3.0,50.0\n")
    return path


def _config(table: Path) -> AttributesConfig:
    return AttributesConfig(table=table, key_column="Patient", case_key=r"^(TCGA_[A-Z0-9]{2}_[A-Z0-9]{4})",
                            columns={"sex": {"column": "gender", "codes": {1: "F", 2: "M"}},
                                     "age": {"column": "age_at_initial_pathologic"}},
                            from_case_id={"site": r"^TCGA_([A-Z0-9]{2})_"})


def test_codes_blanks_and_case_id_attributes(table: Path) -> None:
    cases = _cases("TCGA_CS_4941_19960909", "TCGA_CS_4942_19970222", "TCGA_DU_5849_19990101")
    assert apply_attributes(cases, _config(table)) == []
    assert [c.attributes for c in cases] == [
        {"site": "CS", "sex": "M", "age": "67.0"}, {"site": "CS", "sex": "F", "age": "44.0"},
        {"site": "DU", "sex": None, "age": None}]
    assert cases[2].attribute("sex") == "unknown"


def test_unknown_codes_and_unmatched_ids_are_problems_naming_the_case(table: Path) -> None:
    cases = _cases("TCGA_HT_7616_20000101", "other_case")
    problems = [str(p) for p in apply_attributes(cases, _config(table))]
    assert len(problems) == 2
    assert "TCGA_HT_7616_20000101" in problems[0] and "code '3.0' in column 'gender'" in problems[0]
    assert "other_case" in problems[1] and "does not match data.attributes.case_key" in problems[1]
    assert cases[1].attributes == {"site": None, "sex": None, "age": None}


def test_a_missing_column_is_named(table: Path) -> None:
    config = AttributesConfig(table=table, key_column="Patient", columns={"sex": {"column": "sex"}})
    problems = [str(p) for p in apply_attributes(_cases("TCGA_CS_4941_1"), config)]
    assert len(problems) == 1 and "no column(s) ['sex']" in problems[0]


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="need 'table' and 'key_column'"):
        AttributesConfig(columns={"sex": {"column": "gender"}})
    with pytest.raises(ValueError, match="needs a group"):
        AttributesConfig(from_case_id={"site": "^TCGA_"})
