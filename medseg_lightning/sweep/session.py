"""``medseg sweep``: open or resume the study and its MLflow parent run, run trials, report the results."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from medseg_lightning.studies.launch import terminate_children
from medseg_lightning.sweep.config import SweepConfig, load_sweep
from medseg_lightning.sweep.report import write_report
from medseg_lightning.sweep.runner import DevicePool, SweepContext, TrialFailed, run_trial
from medseg_lightning.sweep.study import (
    REASON_ATTR,
    RUN_ATTR,
    best_trials,
    budget_reached,
    existing_study,
    finished_count,
    open_study,
    redact,
    storage_url,
    trials_table,
)

PARENT_ATTR = "mlflow_parent_run_id"


@dataclass
class SweepOutcome:
    study: optuna.Study
    sweep: SweepConfig
    parent_run_id: str
    interrupted: bool = False


def run_sweep(path: Path, overrides: list[str] | None = None, jobs: int | None = None,
              root: Path | None = None) -> SweepOutcome:
    """Runs trials until the study's ``n_trials`` are done (all workers together) or this worker's timeout."""
    from medseg_lightning import tracking

    sweep, experiment = load_sweep(path, overrides)
    root = root or tracking.project_root(Path.cwd())
    url = storage_url(sweep, path)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(sweep, url)
    client, parent = _parent_run(study, sweep, experiment, root, url)
    print(f"study {sweep.name!r} in {redact(url)}: {finished_count(study)}/{sweep.n_trials or '∞'} trials done; "
          f"MLflow parent run {parent}", flush=True)
    outcome = SweepOutcome(study=study, sweep=sweep, parent_run_id=parent)
    jobs = jobs or sweep.jobs
    log_dir = root / "mlruns" / "sweeps" / (sweep.name or "sweep")
    log_dir.mkdir(parents=True, exist_ok=True)
    accelerator = sweep.resources.accelerator or experiment.trainer.accelerator
    context = SweepContext(sweep=sweep, experiment=experiment, url=url, study=study, parent_run_id=parent,
                           root=root, log_dir=log_dir, pool=DevicePool(jobs, sweep.resources.devices, accelerator),
                           on_trial_end=lambda *args: _mark_run(client, parent, *args))
    if not budget_reached(study, sweep.n_trials):
        failures = _FailureGuard(sweep.max_failures)
        try:
            study.optimize(lambda trial: run_trial(context, trial), timeout=sweep.timeout, n_jobs=jobs,
                           catch=(TrialFailed,), callbacks=[_stop_at_budget(sweep), failures],
                           gc_after_trial=False)
        except KeyboardInterrupt:
            terminate_children()
            outcome.interrupted = True
    _reconcile_runs(study, client, parent)
    status = "killed" if outcome.interrupted else ("finished" if budget_reached(study, sweep.n_trials) else None)
    publish_report(study, sweep, client, parent, status)
    return outcome


def _parent_run(study: optuna.Study, sweep: SweepConfig, experiment: Any, root: Path, url: str,
                reopen: bool = True) -> tuple[Any, str]:
    """The study's MLflow parent run; when two workers start at once, the first recorded one wins."""
    from medseg_lightning.tracking import sweep as sweep_tracking

    params = {"sweep.name": sweep.name or "", "sweep.experiment": str(sweep.experiment),
              "sweep.sampler": sweep.sampler.name, "sweep.pruner": sweep.pruner.name,
              "sweep.objectives": json.dumps([o.model_dump() for o in sweep.objectives]),
              "sweep.n_trials": str(sweep.n_trials), "sweep.space": json.dumps(
                  {k: v.model_dump() for k, v in sweep.space.items()}),
              "sweep.overrides": json.dumps(sweep.overrides, default=str)}
    client, run_id, new = sweep_tracking.open_parent_run(
        experiment, root, sweep.name or "", study.user_attrs.get(PARENT_ATTR), params,
        {"optuna.storage": redact(url)}, reopen=reopen)
    if not new:
        return client, run_id
    if study.user_attrs.get(PARENT_ATTR) is None:
        study.set_user_attr(PARENT_ATTR, run_id)
        time.sleep(0.2)  # let a concurrent worker's write land before reading the winner back
    winner = study.user_attrs.get(PARENT_ATTR)
    if winner != run_id:
        sweep_tracking.drop_run(client, run_id)
    return client, winner


def _mark_run(client: Any, parent: str, number: int, state: str, run_id: str | None, reason: str | None) -> None:
    from medseg_lightning.tracking import sweep as sweep_tracking

    try:
        run = client.get_run(run_id) if run_id else sweep_tracking.trial_runs(client, parent).get(number)
        if run is not None:
            sweep_tracking.mark_trial_run(client, run, state, reason)
    except Exception as error:  # MLflow unreachable for a moment: the study keeps the state, report it and go on
        print(f"trial {number}: could not record {state} on its MLflow run {run_id}: {error}", flush=True)


def _reconcile_runs(study: optuna.Study, client: Any, parent: str) -> None:
    """Runs of trials that failed without the sweep recording it (Ctrl-C, a killed worker) get the FAIL state,
    and FAILED status if the dead process left them running."""
    from medseg_lightning.tracking import sweep as sweep_tracking

    runs = sweep_tracking.trial_runs(client, parent)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run = runs.get(trial.number)
        if run is not None and (run.info.status == "RUNNING" or "optuna.state" not in run.data.tags):
            reason = trial.user_attrs.get(REASON_ATTR) or "stopped before it finished (interrupted, or its worker died)"
            sweep_tracking.mark_trial_run(client, run, "FAIL", reason)


def publish_report(study: optuna.Study, sweep: SweepConfig, client: Any, parent: str, status: str | None) -> None:
    """Writes the results to the parent run (on demand too: ``medseg sweep report``)."""
    from medseg_lightning.tracking import sweep as sweep_tracking

    with tempfile.TemporaryDirectory() as tmp:
        files, metrics, tags = write_report(study, sweep, Path(tmp),
                                            lambda run_id, folder: sweep_tracking.download_config(client, run_id,
                                                                                                  folder))
        sweep_tracking.log_summary(client, parent, metrics, tags, files, status)


def _stop_at_budget(sweep: SweepConfig) -> Any:
    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        if budget_reached(study, sweep.n_trials):
            study.stop()

    return callback


class _FailureGuard:
    """Stops this worker after ``limit`` failed trials in a row: a broken setting should not burn a night."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_a_row = limit, 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.in_a_row = self.in_a_row + 1 if trial.state == TrialState.FAIL else 0
        if self.in_a_row >= self.limit:
            print(f"stopping: {self.in_a_row} trials failed in a row (sweep max_failures); last: "
                  f"{trial.user_attrs.get(REASON_ATTR, '')}", flush=True)
            study.stop()


def refresh_report(path: Path, overrides: list[str] | None = None, root: Path | None = None) -> str:
    """Publishes the current results to the study's parent run; returns its id."""
    from medseg_lightning import tracking

    sweep, experiment = load_sweep(path, overrides)
    study = _load_study(sweep, path)
    root = root or tracking.project_root(Path.cwd())
    client, parent = _parent_run(study, sweep, experiment, root, storage_url(sweep, path), reopen=False)
    _reconcile_runs(study, client, parent)
    publish_report(study, sweep, client, parent, None)
    return parent


def _load_study(sweep: SweepConfig, path: Path) -> optuna.Study:
    storage, _ = existing_study(storage_url(sweep, path), sweep.name or "", path)
    return optuna.load_study(study_name=sweep.name, storage=storage)


def sweep_status(path: Path, overrides: list[str] | None = None) -> str:
    """The trials table and the best trial(s), as text."""
    sweep, _ = load_sweep(path, overrides)
    url = storage_url(sweep, path)
    study = _load_study(sweep, path)
    table = trials_table(study, sweep)
    lines = [f"study {sweep.name!r} ({redact(url)}): {finished_count(study)}/{sweep.n_trials or '∞'} trials done",
             table.to_string(index=False, max_colwidth=40) if not table.empty else "(no trials yet)"]
    for trial in best_trials(study):
        values = ", ".join(f"{o.metric}={v:.4f}" for o, v in zip(sweep.objectives, trial.values, strict=True))
        run = trial.user_attrs.get(RUN_ATTR)
        lines.append(f"best: trial {trial.number}: {values}; params {trial.params}; MLflow run {run}")
    return "\n".join(lines)


def best_run_id(path: Path, overrides: list[str] | None = None) -> str:
    """The MLflow run of the study's best trial.

    Raises:
        ValueError: no completed trial yet, or several objectives (then name a run of the Pareto front).
    """
    sweep, _ = load_sweep(path, overrides)
    study = _load_study(sweep, path)
    best = best_trials(study)
    if not best:
        raise ValueError(f"study {sweep.name!r} has no completed trial yet")
    if len(best) > 1:
        front = ", ".join(f"trial {t.number}: run {t.user_attrs.get(RUN_ATTR)}" for t in best)
        raise ValueError(f"study {sweep.name!r} has several objectives; promote one run of its Pareto front with "
                         f"--run ({front})")
    run_id = best[0].user_attrs.get(RUN_ATTR)
    if not run_id:
        raise ValueError(f"the best trial {best[0].number} of {sweep.name!r} has no MLflow run recorded")
    return run_id
