"""Patient attributes from a clinical table joined on a key in the case id, and from the case id itself.

Clinical tables store attributes as codes (``gender`` 1/2). The label a code gets is the user's statement about
their data, so it is written in the experiment file, and a code the mapping does not name is an error rather
than a silent new group. Blank values are the group ``unknown``, as everywhere else.
"""

from __future__ import annotations

import re

import pandas as pd

from medseg_lightning.config.schema import AttributesConfig
from medseg_lightning.data.manifest import Case
from medseg_lightning.data.validate import Problem


def apply_attributes(cases: list[Case], config: AttributesConfig) -> list[Problem]:
    """Sets each case's configured attributes in place; returns one problem per unusable value."""
    problems: list[Problem] = []
    rows = _table_rows(config, problems) if config.columns else {}
    key_pattern = re.compile(config.case_key)
    for case in cases:
        for name, pattern in config.from_case_id.items():
            match = re.search(pattern, case.case_id)
            case.attributes[name] = match.group(1) if match else None
        if not config.columns:
            continue
        match = key_pattern.search(case.case_id)
        row = rows.get(match.group(1)) if match else None
        if match is None:
            problems.append(Problem(f"case id does not match data.attributes.case_key {config.case_key!r}",
                                    case.case_id))
        for name, column in config.columns.items():
            value = _blank_to_none(row.get(column.column)) if row else None
            case.attributes[name] = value if value is None or column.codes is None else _decode(
                value, column.codes, name, column.column, case, config, problems)
    return problems


def _table_rows(config: AttributesConfig, problems: list[Problem]) -> dict[str, dict[str, str]]:
    assert config.table is not None and config.key_column is not None
    try:
        table = pd.read_csv(config.table, dtype=str, keep_default_na=False)
    except Exception as error:
        problems.append(Problem(f"{config.table}: attribute table not readable ({error})"))
        return {}
    missing = [c for c in [config.key_column, *(col.column for col in config.columns.values())]
               if c not in table.columns]
    if missing:
        problems.append(Problem(f"{config.table}: no column(s) {missing}; it has {list(table.columns)}"))
        return {}
    return {str(row[config.key_column]).strip(): row for row in table.to_dict("records")}


def _blank_to_none(value: object) -> str | None:
    text = "" if value is None else str(value).strip()
    return text or None


def _decode(value: str, codes: dict[int | str, str], name: str, column: str, case: Case, config: AttributesConfig,
            problems: list[Problem]) -> str | None:
    """The label of a code; ``1.0`` and ``1`` are the same code (tables often store codes as floats)."""
    normalised = {_code(key): label for key, label in codes.items()}
    label = normalised.get(_code(value))
    if label is None:
        problems.append(Problem(f"{name}: code {value!r} in column {column!r} of {config.table} is not in the "
                                f"mapping {dict(codes)}", case.case_id))
    return label


def _code(value: int | str) -> str:
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text
