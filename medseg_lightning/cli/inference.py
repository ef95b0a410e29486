"""The ``medseg`` verbs that run a trained model on new cases: predict, triage, explain.

Each verb parses its arguments and calls the library, as in ``cli/main.py``, which registers them; none writes
a file before it has checked that none of its outputs exists (``--force`` replaces them).
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
                          device=args.device, min_score=args.min_score, mc_dropout=args.mc_dropout,
                          check_scale=not args.ignore_spacing)
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
        samples = max(1, predictor.mc_dropout)
        print(f"uncertainty from {predictor.members} member(s) ({len(predictor.networks)} model(s) x "
              f"{predictor.members // len(predictor.networks) // samples} view(s)"
              + (f" x {samples} dropout sample(s))" if predictor.mc_dropout else ")")
              + ("; one member gives entropy only: add --tta, --mc-dropout or more --model for mutual information "
                 "and agreement" if predictor.members == 1 else ""))
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
                          batch_size=args.batch_size, device=args.device, mc_dropout=args.mc_dropout,
                          check_scale=not args.ignore_spacing)
    if not predictor.task.averages_predictions:
        raise ValueError(f"triage: {predictor.task.name} models predict alone, with no uncertainty to rank by; it "
                         "applies to semantic models")
    if args.score == "member_agreement" and predictor.members == 1:
        raise ValueError("--score member_agreement needs several members: add --tta, --mc-dropout or more --model")
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


def _explain(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from medseg_lightning import tracking
    from medseg_lightning.evaluation.evaluate import load_model
    from medseg_lightning.inference.explain import SALIENCY_PLOT, explain_case
    from medseg_lightning.inference.inputs import discover_inputs, output_paths
    from medseg_lightning.inference.predict import Predictor

    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out}: exists and is not a folder; give a folder for the maps")
    root = tracking.project_root(Path.cwd())
    predictor = Predictor([load_model(args.model, root)], tta=False, batch_size=args.batch_size, device=args.device,
                          check_scale=not args.ignore_spacing)
    if not predictor.task.averages_predictions:
        raise ValueError(f"explain: {predictor.task.name} models are not supported; it explains semantic models")
    class_id = None
    if args.class_name is not None:
        names = {name: key for key, name in predictor.config.data.labels.items() if key > 0}
        if args.class_name not in names:
            raise ValueError(f"--class {args.class_name}: the model's classes are {', '.join(names)}")
        class_id = names[args.class_name]
    methods = tuple(args.method or ("gradcam", "integrated_gradients"))
    cases = discover_inputs(args.inputs, predictor.modalities)
    planned = [path for case in cases for path in output_paths(case, args.out, maps=methods)]
    planned += [args.out / f"{case.name}_{SALIENCY_PLOT}.png" for case in cases]
    if _refuse_existing(planned, args.force):
        return 1
    failed = 0
    for case in tqdm(cases, desc="explaining", unit="case", disable=len(cases) < 2):
        try:
            output = explain_case(predictor, case, args.out, class_id, methods, args.stage)
        except DataError as error:
            failed += 1
            tqdm.write(f"error: {error}", file=sys.stderr)
            continue
        what = (f"{output.region_pixels} region pixel(s) explained -> {output.plot}" if output.region_pixels
                else "nothing predicted, so nothing to explain (the maps are zero)")
        tqdm.write(f"{case.name}: {what} in {output.seconds:.1f} s")
    print(f"{len(cases) - failed} of {len(cases)} case(s) explained into {args.out} ({', '.join(methods)})")
    return 1 if failed else 0


def _write_scores(rows: list[dict[str, Any]], path: Path) -> None:
    import pandas as pd

    from medseg_lightning.utilities.files import atomic_write

    table = pd.DataFrame(rows)
    atomic_write(path, lambda temporary: table.to_csv(temporary, index=False, float_format="%.4f"))


def _add_run_options(parser: argparse.ArgumentParser, ignore_spacing_help: str) -> None:
    """``--ignore-spacing``, ``--force``, ``--batch-size`` and ``--device``, as triage and explain take them."""
    parser.add_argument("--ignore-spacing", action="store_true", help=ignore_spacing_help)
    parser.add_argument("--force", action="store_true", help="replace files in --out that this command writes")
    parser.add_argument("--batch-size", type=int, help="slices per forward pass (default: the model's)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: a GPU when present)")


def add_inference_commands(verbs: Any) -> None:
    """Registers predict, triage and explain on the ``medseg`` subcommand parser."""
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
    predict.add_argument("--mc-dropout", type=int, default=0, metavar="N",
                         help="Monte-Carlo dropout: N passes per model and view with dropout on, each a member "
                              "(models trained with model.head_dropout); their mean is the mask")
    predict.add_argument("--ignore-spacing", action="store_true",
                         help="predict inputs whose voxel size differs from the training scans' (or is unknown), "
                              "which are refused by default for models that do not resample")
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
    triage.add_argument("--mc-dropout", type=int, default=0, metavar="N",
                        help="members from N Monte-Carlo dropout passes per model and view (model.head_dropout)")
    _add_run_options(triage, "rank inputs whose voxel size differs from the training scans' (else listed as failed)")
    triage.set_defaults(handler=_triage)

    from medseg_lightning.inference.saliency import METHODS

    explain = verbs.add_parser("explain", help="saliency maps (Grad-CAM, integrated gradients) of a segmentation",
                               description="Which pixels drove the segmentation of a structure: for each input, "
                                           "the mask, one map per method in the input's geometry, and a PNG of the "
                                           "slice with the largest region. Computed by captum.")
    explain.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                         help="NIfTI files, folders of them, 2D images, DICOM series or slice folders")
    explain.add_argument("--model", required=True, help="models:/NAME@ALIAS, runs:/RUN_ID or a saved model folder")
    explain.add_argument("--out", type=Path, required=True,
                         help="output folder: NAME mask, NAME_<method> maps (0..1), NAME_saliency.png")
    explain.add_argument("--class", dest="class_name", metavar="NAME",
                         help="explain the pixels predicted as this class (default: the whole predicted structure)")
    explain.add_argument("--method", action="append", choices=METHODS,
                         help="saliency method (repeatable; default: both)")
    explain.add_argument("--stage", type=int,
                         help="encoder stage Grad-CAM reads (default: the deepest at most 8x coarser than the input)")
    _add_run_options(explain, "explain inputs whose voxel size differs from the training scans'")
    explain.set_defaults(handler=_explain)
