"""The ``medseg`` command: each verb parses its arguments and calls the library; nothing else lives here."""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from medseg_lightning import __version__
from medseg_lightning.cli.evaluation import add_evaluation_commands
from medseg_lightning.cli.inference import add_inference_commands
from medseg_lightning.cli.models import add_model_commands
from medseg_lightning.cli.options import add_set as _add_set
from medseg_lightning.config import ConfigError, config_to_yaml, load_config
from medseg_lightning.data.io import DataError

if TYPE_CHECKING:
    from medseg_lightning.config.schema import ExperimentConfig
    from medseg_lightning.data.check import PreparedDataset

Handler = Callable[[argparse.Namespace], int]
SWEEP_ACTIONS = ("status", "report", "dashboard")


def _add_experiment(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", type=Path, help="experiment YAML, e.g. experiments/quickstart.yaml")
    _add_set(parser, "override a config field, e.g. --set data.loader.batch_size=8 (repeatable)")


def _add_seeds(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, metavar="N",
                        help="repeat with N seeds (the experiment's seed, seed + 1, ...) under one parent run: mean "
                             "and standard deviation over seeds, intervals over cases of the seed-averaged metrics")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="training runs at once (folds, seeds): each gets its own GPU, or a share of the CPU cores")


def _config_show(args: argparse.Namespace) -> int:
    print(config_to_yaml(load_config(args.experiment, args.overrides)), end="")
    return 0


def _data_manifest(args: argparse.Namespace) -> int:
    from medseg_lightning.data.manifest import build_manifest, write_manifest

    out = args.out or args.folder / "manifest.csv"
    if out.exists() and not args.force:
        print(f"error: {out} exists (it may hold attribute columns you added); use --force to replace it",
              file=sys.stderr)
        return 1
    table = build_manifest(args.folder)
    image_columns = [column for column in table.columns if column.startswith("image")]
    root = out.parent.resolve()
    for column in [*image_columns, "mask"]:  # paths are relative to the manifest's own folder
        table[column] = [Path(os.path.relpath((args.folder / p).resolve(), root)).as_posix() for p in table[column]]
    write_manifest(table, out)
    print(f"wrote {out}: {len(table)} cases, image column(s) {', '.join(image_columns)}")
    return 0


def _prepare(args: argparse.Namespace) -> tuple[ExperimentConfig, PreparedDataset]:
    from medseg_lightning.data.check import prepare_dataset

    config = load_config(args.experiment, args.overrides)
    return config, prepare_dataset(config.data)


def _data_check(args: argparse.Namespace) -> int:
    config, dataset = _prepare(args)
    for problem in dataset.problems:
        print(f"ERROR {problem}")
    counts = Counter(dataset.splits.get(item.case.case_id) for item in dataset.cases)
    splits = ", ".join(f"{name} {counts.get(name, 0)}" for name in ("train", "val", "test"))
    status = f"{len(dataset.problems)} problem(s)" if dataset.problems else "OK"
    print(f"{config.name}: {len(dataset.cases)} valid case(s) ({splits}); {status}")
    return 1 if dataset.problems else 0


def _data_prepare(args: argparse.Namespace) -> int:
    from medseg_lightning.data.fingerprint import write_fingerprint

    config, dataset = _prepare(args)
    if dataset.problems:
        for problem in dataset.problems:
            print(f"ERROR {problem}")
        return 1
    out = args.out or Path("data/prepared") / f"{config.name}.fingerprint.json"
    write_fingerprint(dataset.fingerprint, out)
    print(f"prepared {len(dataset.cases)} case(s); fingerprint {dataset.fingerprint['fingerprint'][:12]} -> {out}")
    return 0


def _data_synth(args: argparse.Namespace) -> int:
    from medseg_lightning.data.synth import cohort_files, generate_cohort, parse_hard_group

    hard = parse_hard_group(args.hard_group) if args.hard_group else None
    existing = [path for path in cohort_files(args.out, args.cases, args.instances) if path.exists()]
    if existing and not args.force:  # a manifest may hold the user's own columns, the images their own data
        what = (f"{existing[0]} and {len(existing) - 1} more file(s) this command writes exist" if len(existing) > 1
                else f"{existing[0]} exists")
        print(f"error: {args.out} already holds a dataset ({what}); use --force to replace "
              f"{'them' if len(existing) > 1 else 'it'}, or choose another --out", file=sys.stderr)
        return 1
    if args.instances:
        from medseg_lightning.data.synth_instances import generate_instance_cohort

        shape = tuple(args.shape) if args.shape else (64, 64, 6)
        manifest = generate_instance_cohort(args.out, args.cases, seed=args.seed, shape=shape)
        print(f"wrote {args.cases} synthetic case(s) of touching objects and {manifest}")
        return 0
    manifest = generate_cohort(args.out, args.cases, seed=args.seed, shape=tuple(args.shape or (48, 48, 32)),
                               hard_group=hard, cases_per_subject=args.cases_per_subject)
    print(f"wrote {args.cases} synthetic case(s) and {manifest}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from medseg_lightning import tracking
    from medseg_lightning.cli.summaries import format_summary
    from medseg_lightning.training.train import run

    config = load_config(args.experiment, args.overrides)
    if args.force and not args.resume:
        raise ValueError("--force applies to --resume RUN_ID only (to resume a FINISHED run)")
    if args.seeds is not None and args.seeds > 1:
        if args.resume:
            raise ValueError("--seeds and --resume: rerun the same --seeds command to continue the repeats (finished "
                             "seeds are reused, an interrupted one resumes)")
        from medseg_lightning.cli.summaries import format_repeats
        from medseg_lightning.studies.repeats import run_repeats

        return _study(lambda: format_repeats(run_repeats(config, args.seeds, jobs=args.jobs)))
    from medseg_lightning.sweep.trial import trial_hooks  # an Optuna sweep launched this process

    result = run(config, resume=args.resume, resume_finished=args.force, hooks=trial_hooks())
    if tracking.is_global_zero():
        print(format_summary(result))
    return 0


def _crossval(args: argparse.Namespace) -> int:
    from medseg_lightning.cli.summaries import format_crossval
    from medseg_lightning.studies.crossval import run_crossval

    config = load_config(args.experiment, args.overrides)
    return _study(lambda: format_crossval(run_crossval(config, n_seeds=args.seeds or 1, jobs=args.jobs)))


def _crosssite(args: argparse.Namespace) -> int:
    from medseg_lightning.cli.summaries import format_crosssite
    from medseg_lightning.studies.crosssite import run_crosssite

    config = load_config(args.experiment, args.overrides)
    return _study(lambda: format_crosssite(run_crosssite(config, args.attribute, seen_from=args.seen_from)))


def _study(run: Callable[[], str]) -> int:
    """Runs a study of several training runs: a failed run exits 1, Ctrl-C 130; a rerun continues either way."""
    from medseg_lightning.studies.children import StudyError
    from medseg_lightning.studies.launch import terminate_children

    try:
        print(run())
    except StudyError as error:
        print(f"error: {error}\nfinished runs are kept: fix the problem and rerun the same command to continue",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        terminate_children()
        print("interrupted: rerun the same command to continue (finished runs are reused, an interrupted one "
              "resumes from its last checkpoint)", file=sys.stderr)
        return 130
    return 0


def _sweep(args: argparse.Namespace) -> int:
    action, path = (args.target[0], args.target[1:]) if args.target[0] in SWEEP_ACTIONS else ("run", args.target)
    if len(path) != 1:
        print("error: usage: medseg sweep [status|report|dashboard] SWEEP.yaml", file=sys.stderr)
        return 2
    sweep_file = Path(path[0])
    if action == "dashboard":
        from medseg_lightning.sweep.dashboard import dashboard

        server = dashboard(sweep_file, args.overrides, port=args.port)
        return _serve(server.command, f"optuna-dashboard on {server.storage}", server.url)
    if action == "status":
        from medseg_lightning.sweep.session import sweep_status

        print(sweep_status(sweep_file, args.overrides))
        return 0
    from medseg_lightning.sweep.session import refresh_report, run_sweep, sweep_status

    if action == "report":
        print(f"results logged to MLflow run {refresh_report(sweep_file, args.overrides)}")
        return 0
    outcome = run_sweep(sweep_file, args.overrides, jobs=args.jobs)
    print(sweep_status(sweep_file, args.overrides))
    if outcome.interrupted:
        print(f"interrupted: rerun 'medseg sweep {sweep_file}' to continue the study", file=sys.stderr)
        return 130
    return 0


def _results(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from medseg_lightning import tracking
    from medseg_lightning.reporting.results import build_table, insert_between_markers, to_csv, to_markdown
    from medseg_lightning.tracking.results import find_runs

    client = MlflowClient(tracking.resolve_store_from_env(tracking.project_root(Path.cwd()))[0])
    records = find_runs(client, args.experiment, args.run, args.parent, args.kind, args.filter)
    if not records:
        print("error: no finished run matches; check --experiment, --parent, --kind and --filter", file=sys.stderr)
        return 1
    if all(record.kind == "cross-site" for record in records):
        from medseg_lightning.reporting.results import crosssite_markdown

        markdown, table = crosssite_markdown(records), None
    elif args.table == "uncertainty":
        from medseg_lightning.reporting.results import uncertainty_markdown

        markdown, table = uncertainty_markdown(records, args.split), None
    elif all(record.kind == "calibration" for record in records):
        from medseg_lightning.reporting.results import calibration_markdown
        from medseg_lightning.tracking.results import calibration_links

        markdown, table = calibration_markdown(records, calibration_links(client, records)), None
    else:
        table = build_table(records, args.split)
        markdown = to_markdown(table)
    if args.csv and table is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        args.csv.write_text(to_csv(table))
    if args.into:
        file, _, block = args.into.partition(":")
        insert_between_markers(Path(file), block, markdown)
        print(f"{file}: block {block!r} now holds the table of {len(records)} run(s)")
    else:
        print(markdown, end="")
    return 0


def _gc(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from medseg_lightning import tracking
    from medseg_lightning.tracking.cleanup import collect

    root = tracking.project_root(Path.cwd())
    result = collect(MlflowClient(tracking.resolve_store_from_env(root)[0]), root, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for path, size in result.removed:
        print(f"{verb} {path} ({size / 2**20:.1f} MiB)")
    for path, reason in result.kept:
        print(f"kept {path} ({reason})")
    print(f"{verb} {len(result.removed)} checkpoint folder(s), {result.bytes / 2**20:.1f} MiB; kept {len(result.kept)}")
    return 0


def _ui(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from medseg_lightning import tracking
    from medseg_lightning.tracking.experiments import experiment_id_of, runs_table_url

    store, artifacts = tracking.resolve_store_from_env(tracking.project_root(Path.cwd()))
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", args.host,
               "--port", str(args.port)]
    if artifacts:
        command += ["--default-artifact-root", artifacts]
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    if args.experiment:
        url = runs_table_url(url, experiment_id_of(MlflowClient(store), args.experiment, required=True))
    print(" ".join(command))
    return _serve(command, "MLflow UI", url)


def _serve(command: list[str], what: str, url: str) -> int:
    """Runs a server until Ctrl-C: in a process group of its own, which is stopped as a whole (MLflow's and
    optuna-dashboard's servers start worker processes that would otherwise stay behind, holding the port)."""
    from medseg_lightning.studies.launch import run_process_group

    print(f"{what}: open {url}   (Ctrl-C stops it)", flush=True)
    return run_process_group(command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medseg", description="Medical image segmentation experiments.")
    parser.add_argument("--version", action="version", version=f"medseg-lightning {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")

    config = verbs.add_parser("config", help="inspect experiment configs").add_subparsers(dest="action", required=True)
    show = config.add_parser("show", help="print the resolved config (base, overrides and defaults applied)")
    _add_experiment(show)
    show.set_defaults(handler=_config_show)

    train = verbs.add_parser("train", help="train, validate and test an experiment, tracked in MLflow")
    _add_experiment(train)
    train.add_argument("--resume", metavar="RUN_ID", help="continue this MLflow run from its last checkpoint")
    train.add_argument("--force", action="store_true",
                       help="with --resume: resume a FINISHED run too (it is evaluated again and logs a second model)")
    _add_seeds(train)
    train.set_defaults(handler=_train)

    crossval = verbs.add_parser("crossval", help="train every fold; pool the test predictions into one audit and card")
    _add_experiment(crossval)
    _add_seeds(crossval)
    crossval.set_defaults(handler=_crossval)

    crosssite = verbs.add_parser("crosssite", help="hold out each site in turn: Dice seen vs unseen in training")
    _add_experiment(crosssite)
    crosssite.add_argument("--attribute", default="site", help="the attribute whose groups are held out (site)")
    crosssite.add_argument("--seen-from", metavar="RUN_ID",
                           help="take the seen-in-training Dice from this cross-validation (or cross-site) run "
                                "instead of cross-validating this config (e.g. a remedy against the baseline)")
    crosssite.set_defaults(handler=_crosssite)

    add_evaluation_commands(verbs)
    add_inference_commands(verbs)
    add_model_commands(verbs)

    sweep = verbs.add_parser("sweep", help="run or resume an Optuna study (status, report, dashboard: inspect it)",
                             description="medseg sweep SWEEP.yaml | medseg sweep status SWEEP.yaml | "
                                         "medseg sweep report SWEEP.yaml | medseg sweep dashboard SWEEP.yaml")
    sweep.add_argument("target", nargs="+", metavar="[status|report|dashboard] SWEEP.yaml",
                       help="a sweep file (run or resume the study); status: the trials table; report: refresh the "
                            "results on the study's MLflow run; dashboard: optuna-dashboard on the study's storage "
                            "(history, parallel coordinates, parameter importances, live), on 127.0.0.1 until Ctrl-C")
    sweep.add_argument("--jobs", type=int, help="trials at once on this machine (default: the sweep's jobs)")
    sweep.add_argument("--port", type=int, default=8080, help="dashboard: the port it listens on (on 127.0.0.1)")
    _add_set(sweep, "override a field of the sweep file, e.g. --set n_trials=10 (repeatable)")
    sweep.set_defaults(handler=_sweep)

    results = verbs.add_parser("results", help="results tables (Markdown, CSV) from the MLflow runs",
                               description="One row per finished run: per-class and mean Dice with intervals, folds "
                                           "and seeds aggregated, and the command, configuration hash, git commit "
                                           "and data fingerprint that reproduce it.")
    results.add_argument("--experiment", action="append", default=[], help="MLflow experiment name (repeatable)")
    results.add_argument("--run", action="append", default=[], metavar="RUN_ID", help="these runs only (repeatable)")
    results.add_argument("--parent", metavar="RUN_ID", help="the child runs of this study or sweep run")
    results.add_argument("--kind", action="append", default=[],
                         choices=["training", "evaluation", "cross-validation", "repeats", "cross-site", "calibration"],
                         help="run kinds to include (repeatable; default: all but calibration)")
    results.add_argument("--filter", help="MLflow search filter, e.g. \"params.`data.slicing.context` = '1'\"")
    results.add_argument("--split", default="test", choices=["test", "val"], help="the split whose metrics to show")
    results.add_argument("--table", choices=["dice", "uncertainty"], default="dice",
                         help="dice: Dice and distances with intervals (default); uncertainty: how well each "
                              "uncertainty score ranks the cases by their Dice")
    results.add_argument("--csv", type=Path, help="also write every value as CSV to this file")
    results.add_argument("--into", metavar="FILE:BLOCK",
                         help="write the table between <!-- medseg-results BLOCK --> and <!-- /medseg-results --> "
                              "in FILE instead of printing it")
    results.set_defaults(handler=_results)

    gc = verbs.add_parser("gc", help="remove the local checkpoints of finished and deleted runs (never resumable ones)")
    gc.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    gc.set_defaults(handler=_gc)

    ui = verbs.add_parser("ui", help="start the MLflow UI on the project's store (mlruns/)")
    ui.add_argument("--host", default="127.0.0.1", help="address the UI listens on")
    ui.add_argument("--port", type=int, default=5000, help="port the UI listens on")
    ui.add_argument("--experiment", metavar="NAME",
                    help="print the URL of this MLflow experiment's runs table (an experiment file's name)")
    ui.set_defaults(handler=_ui)

    data = verbs.add_parser("data", help="build manifests, check and prepare data, make synthetic cohorts")
    actions = data.add_subparsers(dest="action", required=True)
    manifest = actions.add_parser("manifest", help="write manifest.csv for an MSD or images/masks folder")
    manifest.add_argument("folder", type=Path, help="dataset folder: imagesTr/ + labelsTr/, images/ + masks/, or "
                          "slice folders")
    manifest.add_argument("--out", type=Path, help="manifest path (default: FOLDER/manifest.csv)")
    manifest.add_argument("--force", action="store_true", help="replace an existing manifest")
    manifest.set_defaults(handler=_data_manifest)
    check = actions.add_parser("check", help="validate every case; one line per problem, exit 1 if any")
    _add_experiment(check)
    check.set_defaults(handler=_data_check)
    prepare = actions.add_parser("prepare", help="check, fill the preprocessing cache, write the fingerprint")
    _add_experiment(prepare)
    prepare.add_argument("--out", type=Path, help="fingerprint JSON (default: data/prepared/NAME.fingerprint.json)")
    prepare.set_defaults(handler=_data_prepare)
    synth = actions.add_parser("synth", help="write a synthetic NIfTI cohort with demographic attributes")
    synth.add_argument("--out", type=Path, required=True, help="folder to write the cohort to")
    synth.add_argument("--cases", type=int, default=40, help="number of cases")
    synth.add_argument("--seed", type=int, default=0, help="the same seed gives byte-identical files")
    synth.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"),
                       help="volume shape (default 48 48 32; with --instances 64 64 6)")
    synth.add_argument("--instances", action="store_true",
                       help="touching objects with instance ids (instancesTr/, manifest column 'instances')")
    synth.add_argument("--hard-group", help="make one group harder, e.g. sex=F or site=B:0.5 (severity)")
    synth.add_argument("--cases-per-subject", type=int, default=1, help="scans per synthetic patient")
    synth.add_argument("--force", action="store_true", help="replace the files of an existing cohort in --out")
    synth.set_defaults(handler=_data_synth)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from medseg_lightning.tracking.provenance import set_command

    args = build_parser().parse_args(argv)
    set_command(sys.argv[1:] if argv is None else list(argv))
    handler: Handler = args.handler
    try:
        return handler(args)
    except (ConfigError, DataError, ValueError) as error:
        from medseg_lightning.data.check import DataCheckError

        print(f"error: {error}", file=sys.stderr)
        return 1 if isinstance(error, DataCheckError) else 2  # the README's codes: 1 data problems, 2 config/arguments
