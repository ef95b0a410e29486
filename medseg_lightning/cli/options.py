"""Options several ``medseg`` verbs share."""

from __future__ import annotations

import argparse


def add_set(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--set KEY=VALUE``, the one override option of every command that reads a YAML file."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text)
