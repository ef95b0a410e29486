"""Names made safe for MLflow metric keys, which allow letters, digits and ``_ - . space /`` only: a group such as
``age 40+`` or a site ``A/B`` becomes part of a key (``test/fairness/age/40_/dice``), so every writer and every
reader of those keys (fairness audits, cross-site studies, promotion gates) must spell it the same way."""

from __future__ import annotations

import re

_UNSAFE_NAME = re.compile(r"[^\w.\- ]")


def metric_name(text: str) -> str:
    """A group or attribute name made safe for MLflow metric keys (letters, digits, ``_ - . space``)."""
    return _UNSAFE_NAME.sub("_", text)
