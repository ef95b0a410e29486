"""The ``medseg`` verbs for the model registry and deployment: promote, models list, export.

Each verb parses its arguments and calls the library, as in ``cli.py``, which registers them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _promote(args: argparse.Namespace) -> int:
    from medseg_lightning import tracking
    from medseg_lightning.sweep.session import best_run_id
    from medseg_lightning.tracking.promotion import promote_run

    run_id = args.run or best_run_id(args.sweep)  # one objective; with several, choose from the Pareto front
    overrides = {"min_dice": args.min_dice, "min_class_dice": _pairs(args.min_class_dice, "--min-class-dice"),
                 "max_fairness_gap": _pairs(args.max_gap, "--max-gap"), "min_cases": args.min_cases,
                 "require_all_groups_measured": args.require_all_groups_measured}
    if args.split:
        overrides["split"] = args.split
    result = promote_run(run_id, args.name, args.alias, overrides, args.force,
                         tracking.project_root(Path.cwd()))
    print(f"run {run_id}: {len(result.gates)} gate(s)")
    for gate in result.gates:
        print(f"  {gate.line()}")
    if not result.scored_test and any(gate.gate.startswith("test/") for gate in result.gates):
        print("note: gates on test metrics the run did not log: a run trained with trainer.evaluate_test: false "
              "(every sweep trial is) never looked at test. Train the chosen configuration once with medseg train "
              "(a sweep's best_config.yaml artifact) and promote that run, or gate on --split val", file=sys.stderr)
    if result.version is None and result.no_gates:
        print("error: promotion refused: no gate was set (the run's config has no promotion: gates and none were "
              "given); add gates such as --min-dice 0.8 --min-cases 30, or register unchecked with --force REASON",
              file=sys.stderr)
        return 1
    if result.version is None:
        print(f"error: promotion refused: {sum(not g.passed for g in result.gates)} gate(s) failed; fix the model, "
              "or override with --force REASON", file=sys.stderr)
        return 1
    alias = f" as @{args.alias}" if args.alias else ""
    moved = f"; version {result.moved_from} is now @{_previous(args.alias)}" if result.moved_from else ""
    why = "no gate was set" if result.no_gates else "gates failed"
    forced = f" (FORCED: {why}; reason recorded)" if result.forced else ""
    print(f"registered {args.name} version {result.version}{alias}{forced}{moved}: models:/{args.name}/"
          f"{result.version}")
    return 0


def _previous(alias: str) -> str:
    from medseg_lightning.tracking.registry import previous_alias

    return previous_alias(alias)


def _pairs(items: list[str], option: str) -> dict[str, float]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            pairs[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise ValueError(f"{option} {item!r}: expected NAME=NUMBER, e.g. {option} anterior=0.8")
    return pairs


def _models_list(args: argparse.Namespace) -> int:
    from medseg_lightning import tracking
    from medseg_lightning.tracking import registry

    rows = registry.list_versions(registry.client_for(tracking.project_root(Path.cwd())), args.name)
    print(f"{'version':>7}  {'aliases':<20} {'test/dice':>9}  {'gates':<28} run")
    for row in rows:
        gates = row["gates"]
        verdict = (f"{sum(g['passed'] for g in gates)}/{len(gates)} passed" if gates else "none") + (
            " FORCED" if row["forced"] else "")
        dice = f"{row['test/dice']:.4f}" if row["test/dice"] is not None else "n/a"
        print(f"{row['version']:>7}  {row['aliases']:<20} {dice:>9}  {verdict:<28} {row['run_id']}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from medseg_lightning import tracking
    from medseg_lightning.evaluation.evaluate import load_model
    from medseg_lightning.inference.export import export_onnx

    if args.out.is_dir():
        raise ValueError(f"--out {args.out}: is a folder; give the .onnx file to write")
    if (args.out.exists() or args.out.is_symlink()) and not args.force:
        print(f"error: {args.out} exists; use --force to replace it", file=sys.stderr)
        return 1
    bundle = load_model(args.model, tracking.project_root(Path.cwd()))
    size = tuple(args.image_size) if args.image_size else None
    path = export_onnx(bundle, args.out, opset=args.opset, image_size=size)
    print(f"wrote {path} ({bundle.config.model.arch}/{bundle.config.model.encoder}, input 'image' "
          f"(batch, {bundle.in_channels}, H, W), output 'logits')")
    return 0


def add_model_commands(verbs: Any) -> None:
    """Registers promote, models and export on the ``medseg`` subcommand parser."""
    promote = verbs.add_parser("promote", help="register a run's model in the MLflow Model Registry, behind gates")
    source = promote.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="the MLflow run whose logged model to register")
    source.add_argument("--sweep", type=Path, help="a sweep file: register its best trial's model")
    promote.add_argument("--name", required=True, help="registered model name")
    promote.add_argument("--alias", default="champion", help="alias for the new version (default: champion)")
    promote.add_argument("--split", choices=["test", "val"], help="split the gates read (default: the config's)")
    promote.add_argument("--min-dice", type=float, help="gate: minimum mean case Dice")
    promote.add_argument("--min-class-dice", action="append", default=[], metavar="CLASS=DICE",
                         help="gate: minimum Dice of a class, e.g. anterior=0.8 (repeatable)")
    promote.add_argument("--max-gap", action="append", default=[], metavar="ATTRIBUTE=GAP",
                         help="gate: maximum fairness Dice gap of an audited attribute")
    promote.add_argument("--min-cases", type=int, help="gate: minimum number of evaluated cases")
    promote.add_argument("--require-all-groups-measured", action="store_true",
                         help="gate: no audited group may be too small to measure")
    promote.add_argument("--force", metavar="REASON", help="register although gates fail; the reason is recorded")
    promote.set_defaults(handler=_promote)

    models = verbs.add_parser("models", help="registered models").add_subparsers(dest="action", required=True)
    listing = models.add_parser("list", help="versions, aliases, test Dice and gate results of a model")
    listing.add_argument("name", help="registered model name")
    listing.set_defaults(handler=_models_list)

    export = verbs.add_parser("export", help="export a model to ONNX (weights, labels and preprocessing inside)")
    export.add_argument("--model", required=True, help="models:/NAME@ALIAS, runs:/RUN_ID or a saved model folder")
    export.add_argument("--format", choices=["onnx"], default="onnx", help="export format")
    export.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    export.add_argument("--force", action="store_true", help="replace an existing --out file")
    export.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    export.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                        help="input height and width (default: the model's target size, else 64 64)")
    export.set_defaults(handler=_export)
