"""The ``medseg`` command line: ``main`` parses and dispatches (``cli.main``), model commands (``cli.models``) and
the console summaries each command prints (``cli.summaries``)."""

from medseg_lightning.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
