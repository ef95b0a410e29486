"""Running a sweep: each trial is its own ``medseg train`` process, so a crash, an out-of-memory kill or a DDP
launch in one trial cannot take the sweep down, and GPUs are handed to trials in disjoint sets."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

import optuna

from medseg_lightning.config import ConfigError
from medseg_lightning.config.schema import ExperimentConfig
from medseg_lightning.studies.launch import DevicePool, failure_reason, launch, medseg_command, set_options
from medseg_lightning.sweep.config import SweepConfig, fixed_overrides, override, resource_conflicts
from medseg_lightning.sweep.study import REASON_ATTR, RUN_ATTR, SURPLUS_ATTR, is_surplus, max_epochs, suggest
from medseg_lightning.sweep.trial import TRIAL_ENV, TrialLink


class TrialFailed(Exception):
    """A trial's training process failed; the message is the reason Optuna and MLflow record."""


@dataclass
class SweepContext:
    """What every trial of this worker needs."""

    sweep: SweepConfig
    experiment: ExperimentConfig
    url: str
    study: optuna.Study
    parent_run_id: str
    root: Path  # the project folder: trials run there, so they use the sweep's MLflow store and checkpoints
    log_dir: Path
    pool: DevicePool
    on_trial_end: Any = None  # callable(trial_number, state, run_id, reason): marks the trial's MLflow run


def run_trial(context: SweepContext, trial: optuna.Trial) -> list[float]:
    """The objective: launch ``medseg train`` with the trial's parameters and read back its metrics."""
    sweep, study = context.sweep, context.study
    if is_surplus(study, trial.number, sweep.n_trials):
        study._storage.set_trial_system_attr(trial._trial_id, SURPLUS_ATTR, True)
        study.stop()
        raise optuna.TrialPruned("the study's n_trials were taken by other trials")
    params = suggest(trial, sweep.space)
    result_file = context.log_dir / f"trial_{trial.number:04d}.json"
    log_file = result_file.with_suffix(".log")
    result_file.unlink(missing_ok=True)
    link = TrialLink(storage=context.url, study=sweep.name or "", trial_id=trial._trial_id, number=trial.number,
                     monitor=sweep.objectives[0].metric, result_file=str(result_file),
                     pruner=sweep.pruner.model_dump(), max_epochs=max_epochs(sweep),
                     report=len(sweep.objectives) == 1)
    overrides = trial_overrides(context, trial.number, params)
    command = [*medseg_command(), "train", str(sweep.experiment), *set_options(overrides)]
    started = time.monotonic()
    with context.pool.acquire() as devices:
        code = launch(command, {TRIAL_ENV: json.dumps(asdict(link)), **devices}, log_file, context.root)
    result = json.loads(result_file.read_text()) if result_file.is_file() else None
    if result:
        trial.set_user_attr(RUN_ATTR, result["run_id"])
        trial.set_user_attr("epochs", result["epochs"])
    minutes = (time.monotonic() - started) / 60
    if code != 0 or result is None:
        reason = failure_reason(code, log_file)
        _fail(context, trial, reason, result)
    values = _objective_values(context, trial, result)
    if result["pruned_at"] is not None:
        _end(context, trial.number, "PRUNED", result["run_id"])
        print(f"trial {trial.number}: pruned after epoch {result['pruned_at']} ({minutes:.1f} min)", flush=True)
        raise optuna.TrialPruned(f"pruned after epoch {result['pruned_at']}")
    _end(context, trial.number, "COMPLETE", result["run_id"])
    shown = ", ".join(f"{o.metric}={v:.4f}" for o, v in zip(sweep.objectives, values, strict=True))
    print(f"trial {trial.number}: {shown} ({minutes:.1f} min) {_params_text(params)}", flush=True)
    return values


def trial_overrides(context: SweepContext, number: int, params: dict[str, Any]) -> list[str]:
    """Fixed overrides, the trial's parameters, its resources and the MLflow nesting, as ``--set`` items."""
    conflicts = resource_conflicts(context.sweep)  # load_sweep refuses these; a sweep built otherwise too
    if conflicts:
        raise ConfigError(conflicts[0])
    resources = context.sweep.resources
    # trials are chosen between on validation, so they never look at test (the sweep's overrides may say otherwise)
    items = [override("trainer.evaluate_test", False), *fixed_overrides(context.sweep),
             *(override(name, value) for name, value in params.items())]
    items.append(override("trainer.devices", resources.devices))
    if resources.accelerator:
        items.append(override("trainer.accelerator", resources.accelerator))
    strategy = resources.strategy or ("ddp" if resources.devices > 1 else None)
    if strategy:
        items.append(override("trainer.strategy", strategy))
    tags = {"mlflow.parentRunId": context.parent_run_id, "optuna.study": context.sweep.name,
            "optuna.trial": str(number)}
    items += [override("tracking.tags", tags), override("tracking.run_name", f"trial-{number:04d}")]
    return items


def _objective_values(context: SweepContext, trial: optuna.Trial, result: dict[str, Any]) -> list[float]:
    metrics = result["metrics"]
    missing = [o.metric for o in context.sweep.objectives if o.metric not in metrics]
    if missing:
        import difflib

        hints = {name: difflib.get_close_matches(name, list(metrics), n=3) for name in missing}
        _fail(context, trial, f"objective metric(s) not logged by the run: {hints} (closest logged names)", result)
    return [float(metrics[o.metric]) for o in context.sweep.objectives]


def _fail(context: SweepContext, trial: optuna.Trial, reason: str, result: dict[str, Any] | None) -> NoReturn:
    trial.set_user_attr(REASON_ATTR, reason[:1000])
    _end(context, trial.number, "FAIL", result["run_id"] if result else None, reason)
    print(f"trial {trial.number}: FAILED: {reason}", flush=True)
    raise TrialFailed(reason)


def _end(context: SweepContext, number: int, state: str, run_id: str | None, reason: str | None = None) -> None:
    if context.on_trial_end is not None:
        context.on_trial_end(number, state, run_id, reason)


def _params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
