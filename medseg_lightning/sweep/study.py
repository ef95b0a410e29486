"""The Optuna study of a sweep file: storage with heartbeats, sampler, pruner, parameters and the trial budget."""

from __future__ import annotations

import datetime as dt
import re
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import sqlalchemy.exc
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from medseg_lightning.sweep.config import CategoricalParam, FloatParam, PrunerConfig, SamplerConfig, SweepConfig

SURPLUS_ATTR = "medseg:surplus"
RUN_ATTR = "mlflow_run_id"
REASON_ATTR = "fail_reason"
_FINISHED_OR_ACTIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def storage_url(sweep: SweepConfig, sweep_path: Path) -> str:
    """The study's storage: the sweep's URL, else an SQLite file beside the sweep file (git-ignored ``*.db``)."""
    if sweep.storage:
        return sweep.storage
    return f"sqlite:///{(sweep_path.parent / f'{sweep.name}.optuna.db').resolve()}"


def redact(url: str) -> str:
    """The URL without its password, fit for logs and MLflow tags."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


_SCHEMA_RACE = (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.ProgrammingError)


def open_storage(url: str, attempts: int = 5, **kwargs: Any) -> RDBStorage:
    """Optuna's storage at ``url``, creating its tables on first use.

    Retried because two processes that open a new database at once race to create its schema, and the loser
    gets a unique-constraint or "already exists" error (Optuna does not lock it): workers started together on a
    fresh PostgreSQL database, or ``medseg sweep status`` while the first worker starts. A retry finds the
    schema made.
    """
    for attempt in range(1, attempts):
        try:
            return RDBStorage(url, **kwargs)
        except _SCHEMA_RACE:
            time.sleep(0.2 * attempt)
    return RDBStorage(url, **kwargs)  # the last attempt raises what it meets


def existing_study(url: str, name: str, sweep_path: Path) -> tuple[RDBStorage, int]:
    """The storage holding the study ``name`` and the study's id, without creating either.

    Raises:
        ValueError: the storage has no such study yet, naming the command that starts it.
    """
    missing = ValueError(f"no study {name!r} in {redact(url)} yet: start it with medseg sweep {sweep_path}")
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///").split("?")[0]).is_file():
        raise missing  # opening it would create an empty database file
    storage = open_storage(url)
    try:
        return storage, storage.get_study_id_from_name(name)
    except KeyError:
        raise missing from None


def open_study(sweep: SweepConfig, url: str) -> optuna.Study:
    """Creates the study or continues it; heartbeats let a later worker fail and retry trials of a dead one.

    Raises:
        ValueError: an existing study of that name optimises other directions.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable in practice
        retry = RetryHeartbeatStaleTrialCallback(max_retry=sweep.max_retries) if sweep.max_retries else None
        storage = open_storage(url, heartbeat_interval=sweep.heartbeat_interval, grace_period=sweep.grace_period,
                               heartbeat_stale_trial_callback=retry, engine_kwargs={"pool_pre_ping": True})
    directions = [objective.direction for objective in sweep.objectives]
    study = optuna.create_study(study_name=sweep.name, storage=storage, load_if_exists=True,
                                sampler=make_sampler(sweep.sampler, len(directions)),
                                pruner=make_pruner(sweep.pruner, max_epochs(sweep)), directions=directions)
    started = len(study.get_trials(deepcopy=False))
    if started and sweep.sampler.seed is not None:
        # a resumed worker with the same seed would propose the trials it proposed before: continue the sequence
        seeded = sweep.sampler.model_copy(update={"seed": sweep.sampler.seed + started})
        study.sampler = make_sampler(seeded, len(directions))
    existing = [direction.name.lower() for direction in study.directions]
    if existing != directions:
        raise ValueError(f"study {sweep.name!r} in {redact(url)} optimises {existing}, the sweep file {directions}; "
                         "rename the study or delete it")
    return study


def make_sampler(config: SamplerConfig, n_objectives: int) -> optuna.samplers.BaseSampler:
    if config.name == "random":
        return optuna.samplers.RandomSampler(seed=config.seed)
    if config.name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=config.seed, n_startup_trials=config.n_startup_trials)
    if config.name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=config.seed)
    return optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=config.n_startup_trials,
                                      multivariate=n_objectives == 1)


def max_epochs(sweep: SweepConfig) -> int | str:
    """The epochs of a full trial when the sweep fixes them (Hyperband's largest budget), else ``auto``."""
    value = sweep.overrides.get("trainer.max_epochs")
    return int(value) if value is not None else "auto"


def make_pruner(config: PrunerConfig, epochs: int | str = "auto") -> optuna.pruners.BasePruner:
    """The pruner of a sweep; the trial's training process builds the same one (a study does not store it)."""
    if config.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=config.n_startup_trials,
                                           n_warmup_steps=config.n_warmup_steps)
    if config.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=config.min_resource, max_resource=epochs,
                                              reduction_factor=config.reduction_factor)
    if config.name == "threshold":
        return optuna.pruners.ThresholdPruner(lower=config.lower, upper=config.upper,
                                              n_warmup_steps=config.n_warmup_steps)
    return optuna.pruners.NopPruner()


def suggest(trial: optuna.Trial, space: dict[str, Any]) -> dict[str, Any]:
    """The trial's value for every search-space path (a retried trial gets its original values back)."""
    values: dict[str, Any] = {}
    for name, param in space.items():
        if isinstance(param, CategoricalParam) and _unhashable(param):
            values[name] = param.choices[trial.suggest_categorical(name, list(range(len(param.choices))))]
        elif isinstance(param, CategoricalParam):
            values[name] = trial.suggest_categorical(name, param.choices)
        elif isinstance(param, FloatParam):
            values[name] = trial.suggest_float(name, param.low, param.high, log=param.log, step=param.step)
        else:
            values[name] = trial.suggest_int(name, param.low, param.high, log=param.log, step=param.step)
    return values


def _unhashable(param: CategoricalParam) -> bool:
    """Optuna stores choices of None, bool, int, float and str; lists (decoder widths) are stored by index."""
    return any(not isinstance(choice, str | int | float | bool | type(None)) for choice in param.choices)


def is_surplus(study: optuna.Study, trial_number: int, n_trials: int | None) -> bool:
    """Whether the budget was already taken by earlier trials when this one started.

    Workers create trials concurrently, so near the end two may start when one slot is left; the later-numbered
    one steps aside. Failed trials do not use the budget (their retries do).
    """
    if n_trials is None:
        return False
    earlier = [t for t in study.get_trials(deepcopy=False, states=_FINISHED_OR_ACTIVE)
               if t.number < trial_number and not t.system_attrs.get(SURPLUS_ATTR)]
    return len(earlier) >= n_trials


def finished_count(study: optuna.Study) -> int:
    """Trials that used the budget and are done (complete or pruned)."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
               if not t.system_attrs.get(SURPLUS_ATTR))


def budget_reached(study: optuna.Study, n_trials: int | None) -> bool:
    return n_trials is not None and finished_count(study) >= n_trials


def counted_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Every trial except those that stepped aside for the budget."""
    return [t for t in study.get_trials(deepcopy=False) if not t.system_attrs.get(SURPLUS_ATTR)]


def trials_table(study: optuna.Study, sweep: SweepConfig) -> pd.DataFrame:
    """One row per trial: number, state, parameters, objective values, duration, MLflow run and failure reason."""
    rows = []
    for trial in counted_trials(study):
        row: dict[str, Any] = {"number": trial.number, "state": trial.state.name}
        row |= {name: _shown(trial.params.get(name), sweep.space[name]) for name in sweep.space}
        values = trial.values or [None] * len(sweep.objectives)
        row |= {objective.metric: value for objective, value in zip(sweep.objectives, values, strict=True)}
        row["epochs"] = trial.user_attrs.get("epochs")
        row["duration"] = _duration(trial.duration)
        row["run_id"] = trial.user_attrs.get(RUN_ATTR, "")
        row["note"] = trial.user_attrs.get(REASON_ATTR, "")
        rows.append(row)
    return pd.DataFrame(rows)


def _shown(value: Any, param: Any) -> Any:
    if isinstance(param, CategoricalParam) and _unhashable(param) and value is not None:
        return param.choices[value]
    return value


def _duration(value: dt.timedelta | None) -> str:
    if value is None:
        return ""
    minutes, seconds = divmod(int(value.total_seconds()), 60)
    return f"{minutes}m{seconds:02d}s"


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best trial, or the Pareto front for several objectives (empty before the first completed trial)."""
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return []
    return list(study.best_trials) if len(study.directions) > 1 else [study.best_trial]
