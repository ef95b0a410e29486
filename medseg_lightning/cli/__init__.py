"""The ``medseg`` command line: ``main`` parses and dispatches (``cli.main``); the verbs that run a model on new
cases (``cli.inference``), score or calibrate it (``cli.evaluation``) and register or export it (``cli.models``);
the console summaries each command prints (``cli.summaries``)."""

from medseg_lightning.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
