"""The ``medseg`` verbs for trained models: predict, promote, models list, export.

Each verb parses its arguments and calls the library, as in ``cli.py``, which registers them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from medseg_lightning.data.io import DataError


def _predict(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from medseg_lightning import tracking
    from medseg_lightning.evaluation.evaluate import load_model
    from medseg_lightning.inference.inputs import discover_inputs, output_paths
    from medseg_lightning.inference.predict import Predictor, predict_case

    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out}: exists and is not a folder; give a folder for the masks")
    root = tracking.project_root(Path.cwd())
    predictor = Predictor([load_model(spec, root) for spec in args.model], tta=args.tta or None,
                          largest_component=args.largest_component, batch_size=args.batch_size,
                          device=args.device, min_score=args.min_score)
    if args.uncertainty and not predictor.task.averages_predictions:
        raise ValueError(f"--uncertainty: {predictor.task.name} models predict alone, with no members to compare; "
                         "it applies to semantic models")
    cases = discover_inputs(args.inputs, predictor.modalities)
    planned = [path for case in cases
               for path in output_paths(case, args.out, overlay=args.overlay, instance=predictor.task.detects_objects,
                                        uncertainty=args.uncertainty)]
    scores_table = args.out / "uncertainty.csv"
    if args.uncertainty:
        planned.append(scores_table)
    if _refuse_existing(planned, args.force):
        return 1
    if args.uncertainty:
        print(f"uncertainty from {predictor.members} member(s) ({len(predictor.networks)} model(s) x "
              f"{predictor.members // len(predictor.networks)} view(s))"
              + ("; one member gives entropy only: add --tta or more --model for mutual information and agreement"
                 if predictor.members == 1 else ""))
    failed, rows = 0, []
    for case in tqdm(cases, desc="segmenting", unit="case", disable=len(cases) < 2):
        try:
            output = predict_case(predictor, case, args.out, overlay=args.overlay, uncertainty=args.uncertainty)
        except DataError as error:
            failed += 1
            tqdm.write(f"error: {error}", file=sys.stderr)
            continue
        line = f"{case.name}: {output.slices} slice(s) in {output.seconds:.2f} s -> {output.mask}"
        if output.uncertainty is not None:
            rows.append({"case": case.name, **output.uncertainty})
            line += "  " + "  ".join(f"{key}={value:.3f}" for key, value in output.uncertainty.items())
        tqdm.write(line)
    if rows:
        _write_scores(rows, scores_table)
        print(f"uncertainty scores per case: {scores_table}")
    print(f"{len(cases) - failed} of {len(cases)} case(s) segmented into {args.out}")
    return 1 if failed else 0


def _refuse_existing(planned: list[Path], force: bool) -> bool:
    """Says so and returns True when outputs exist and ``--force`` was not given: checked before anything is
    written, so a user's files are never replaced unasked."""
    existing = [path for path in planned if path.exists() or path.is_symlink()]
    if not existing or force:
        return False
    what = (f"{existing[0]} and {len(existing) - 1} more output(s) of this command exist" if len(existing) > 1
            else f"{existing[0]} exists")
    print(f"error: {what}; use --force to replace {'them' if len(existing) > 1 else 'it'}, or choose another --out",
          file=sys.stderr)
    return True


def _triage(args: argparse.Namespace) -> int:
    import pandas as pd
    from tqdm.auto import tqdm

    from medseg_lightning import tracking
    from medseg_lightning.evaluation.evaluate import load_model
    from medseg_lightning.inference import triage
    from medseg_lightning.inference.inputs import discover_inputs, output_paths
    from medseg_lightning.inference.predict import Predictor, predict_case

    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out}: exists and is not a folder; give a folder for the worklist")
    root = tracking.project_root(Path.cwd())
    predictor = Predictor([load_model(spec, root) for spec in args.model], tta=args.tta or None,
                          batch_size=args.batch_size, device=args.device)
    if not predictor.task.averages_predictions:
        raise ValueError(f"triage: {predictor.task.name} models predict alone, with no uncertainty to rank by; it "
                         "applies to semantic models")
    if args.score == "member_agreement" and predictor.members == 1:
        raise ValueError("--score member_agreement needs several members: add --tta or more --model")
    cases = discover_inputs(args.inputs, predictor.modalities)
    drafts, annotate = args.out / "drafts", args.out / "to_annotate"
    masks = {case.name: output_paths(case, drafts) for case in cases}
    planned = [path for case in cases for path in output_paths(case, drafts, overlay=True, uncertainty=True)]
    planned += [args.out / "worklist.csv", args.out / "failed.csv"] + ([annotate] if args.top else [])
    if _refuse_existing(planned, args.force):
        return 1
    outputs, failed = [], []
    for case in tqdm(cases, desc="predicting", unit="case", disable=len(cases) < 2):
        try:
            outputs.append(predict_case(predictor, case, drafts, overlay=True, uncertainty=True))
        except DataError as error:
            failed.append({"case": case.name, "inputs": ";".join(str(path) for path in case.paths),
                           "reason": str(error)})
            tqdm.write(f"error: {error}", file=sys.stderr)
    ranked = triage.rank_cases(outputs, args.score)
    thumbnails = {output.name: output.overlay for output in outputs if output.overlay is not None}
    table = triage.worklist(ranked, args.score, thumbnails, args.out)
    triage.write_table(table, args.out / "worklist.csv")
    if failed:
        triage.write_table(pd.DataFrame(failed), args.out / "failed.csv")
    else:
        (args.out / "failed.csv").unlink(missing_ok=True)  # a --force rerun: the earlier list no longer holds
    print(f"{len(ranked)} case(s) ranked by {args.score}, most uncertain first: {args.out / 'worklist.csv'}")
    for row in table.head(5).itertuples():
        print(f"  {row.rank}. {row.case}: {row.value:.3f} {row.note}".rstrip())
    if failed:
        print(f"{len(failed)} input(s) could not be read, listed in {args.out / 'failed.csv'}", file=sys.stderr)
    if args.top and ranked:
        by_name = {case.name: case for case in cases}
        triage.copy_for_annotation(ranked, by_name, masks, args.top, annotate)
        print(f"the {min(args.top, len(ranked))} most uncertain case(s), images and draft masks: {annotate}")
    return 1 if failed else 0


def _write_scores(rows: list[dict[str, Any]], path: Path) -> None:
    import pandas as pd

    from medseg_lightning.utilities.files import atomic_write

    table = pd.DataFrame(rows)
    atomic_write(path, lambda temporary: table.to_csv(temporary, index=False, float_format="%.4f"))


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
    """Registers predict, promote, models and export on the ``medseg`` subcommand parser."""
    predict = verbs.add_parser("predict", help="segment NIfTI files, DICOM series folders and 2D images")
    predict.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                         help="NIfTI files, folders of them, 2D images, DICOM series folders")
    predict.add_argument("--model", action="append", required=True,
                         help="models:/NAME@ALIAS, runs:/RUN_ID or a saved model folder; repeat for an ensemble")
    predict.add_argument("--out", type=Path, required=True, help="output folder (masks: NAME.nii.gz or NAME.png)")
    predict.add_argument("--tta", action="store_true", help="average over flips (default: the model's setting)")
    predict.add_argument("--largest-component", action=argparse.BooleanOptionalAction,
                         help="keep only the largest connected component per class, or not (default: the model's)")
    predict.add_argument("--overlay", action="store_true", help="also write NAME_overlay.png")
    predict.add_argument("--force", action="store_true",
                         help="replace files in --out that this command writes (other files are never touched)")
    predict.add_argument("--batch-size", type=int, help="slices per forward pass (default: the model's)")
    predict.add_argument("--device", help="cpu, cuda, cuda:1 (default: a GPU when present)")
    predict.add_argument("--uncertainty", action="store_true",
                         help="also write NAME_entropy and NAME_mutual_information maps (0..1) and uncertainty.csv "
                              "(scores per case); from the members: every --model x every --tta view")
    predict.add_argument("--min-score", type=float,
                         help="instance models: keep objects from this detection score on (default: the model's)")
    predict.set_defaults(handler=_predict)

    from medseg_lightning.inference.triage import TRIAGE_SCORES

    triage = verbs.add_parser("triage", help="rank unlabelled cases by uncertainty for annotation, with draft masks")
    triage.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                        help="unlabelled NIfTI files, folders of them, 2D images, DICOM series or slice folders")
    triage.add_argument("--model", action="append", required=True,
                        help="models:/NAME@ALIAS, runs:/RUN_ID or a saved model folder; repeat for an ensemble")
    triage.add_argument("--out", type=Path, required=True,
                        help="output folder: worklist.csv, failed.csv, drafts/ (masks, uncertainty maps, overlays)")
    triage.add_argument("--score", choices=sorted(TRIAGE_SCORES), default="entropy_structure",
                        help="the per-case score to rank by (default: entropy_structure; see medseg predict "
                             "--uncertainty)")
    triage.add_argument("--top", type=int, default=0,
                        help="also copy the K most uncertain cases (inputs and draft masks) into to_annotate/")
    triage.add_argument("--tta", action="store_true", help="members from the flips too (default: the model's)")
    triage.add_argument("--force", action="store_true", help="replace files in --out that this command writes")
    triage.add_argument("--batch-size", type=int, help="slices per forward pass (default: the model's)")
    triage.add_argument("--device", help="cpu, cuda, cuda:1 (default: a GPU when present)")
    triage.set_defaults(handler=_triage)

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
