"""The ``medseg`` verbs that score or calibrate a trained model on a dataset: evaluate, calibrate.

Each verb parses its arguments and calls the library, as in ``cli/main.py``, which registers them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from medseg_lightning.cli.options import add_set as _add_set
from medseg_lightning.config import load_config


def _evaluate(args: argparse.Namespace) -> int:
    from medseg_lightning.cli.summaries import format_evaluation, run_line
    from medseg_lightning.evaluation.evaluate import run_evaluation

    config = load_config(args.data, args.overrides)
    result = run_evaluation(args.model, config, split=args.split, largest_component=args.largest_component,
                            warn=lambda text: print(text, file=sys.stderr))
    print(format_evaluation(result.report))
    if result.test_looks is not None:
        print(result.test_looks.line())
    print(run_line(result))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from medseg_lightning.cli.summaries import format_calibration, run_line
    from medseg_lightning.evaluation.calibrate import run_calibration

    config = load_config(args.data, args.overrides)
    result = run_calibration(args.model, config, out=args.out, warn=lambda text: print(text, file=sys.stderr))
    print(format_calibration(result))
    print(run_line(result))
    return 0


def add_evaluation_commands(verbs: Any) -> None:
    """Registers evaluate and calibrate on the ``medseg`` subcommand parser."""
    evaluate = verbs.add_parser("evaluate", help="evaluate a model on a dataset split: metrics, fairness, model card")
    evaluate.add_argument("--model", required=True,
                          help="runs:/RUN_ID, models:/NAME@ALIAS, models:/NAME/VERSION or a saved model folder")
    evaluate.add_argument("--data", type=Path, required=True, help="experiment YAML whose data (and fairness) to use")
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"], help="the split to evaluate")
    evaluate.add_argument("--largest-component", action=argparse.BooleanOptionalAction,
                          help="keep only the largest connected component per class, or not (default: the model's)")
    _add_set(evaluate, "override a field of the --data experiment (repeatable)")
    evaluate.set_defaults(handler=_evaluate)

    calibrate = verbs.add_parser("calibrate", help="fit the softmax temperature on validation; log a calibrated model",
                                 description="Temperature scaling: one scalar divides the logits, fitted on the "
                                             "validation split (never test); labels of a single model do not "
                                             "change, its confidences do. The calibrated model is logged to a "
                                             "calibration run (runs:/ID) and, with --out, saved to a folder.")
    calibrate.add_argument("--model", required=True,
                           help="runs:/RUN_ID, models:/NAME@ALIAS, models:/NAME/VERSION or a saved model folder")
    calibrate.add_argument("--data", type=Path, required=True,
                           help="experiment YAML whose validation split to fit on (the model's own, usually)")
    calibrate.add_argument("--out", type=Path, help="also save the calibrated model into this new folder")
    _add_set(calibrate, "override a field of the --data experiment (repeatable)")
    calibrate.set_defaults(handler=_calibrate)
