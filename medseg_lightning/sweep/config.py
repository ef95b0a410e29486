"""Sweep files: one YAML per study in ``sweeps/``, validated like experiment files.

A sweep names a base experiment and a search space over any of its fields by dotted path. Every path and every
bound is checked against the experiment's schema before the first trial starts, so a typo costs seconds, not a
night of failed trials.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from medseg_lightning.config import ConfigError, load_config
from medseg_lightning.config.schema import ExperimentConfig, StrictModel
from medseg_lightning.config.selection import check_selection_metric
from medseg_lightning.studies.launch import override


class FloatParam(StrictModel):
    """A float in ``[low, high]``, on a log scale or in steps of ``step``."""

    type: Literal["float"] = Field(description="the parameter's kind")
    low: float = Field(description="smallest value")
    high: float = Field(description="largest value")
    log: bool = Field(False, description="sample on a log scale (low > 0; not with step)")
    step: float | None = Field(None, description="sample in steps of this size; null: continuous")

    @model_validator(mode="after")
    def _check(self) -> FloatParam:
        _check_range(self.low, self.high, self.log, self.step)
        return self


class IntParam(StrictModel):
    """An integer in ``[low, high]``, on a log scale or in steps of ``step``."""

    type: Literal["int"] = Field(description="the parameter's kind")
    low: int = Field(description="smallest value")
    high: int = Field(description="largest value")
    log: bool = Field(False, description="sample on a log scale (low > 0; not with step)")
    step: int = Field(1, description="sample in steps of this size")

    @model_validator(mode="after")
    def _check(self) -> IntParam:
        _check_range(self.low, self.high, self.log, None if self.step == 1 else self.step)
        return self


class CategoricalParam(StrictModel):
    """One of ``choices`` (encoders, decoders, losses, augmentation presets, ...)."""

    type: Literal["categorical"] = Field(description="the parameter's kind")
    choices: list[Any] = Field(min_length=1, description="the values to choose from")


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


def _check_range(low: float, high: float, log: bool, step: float | None) -> None:
    if low > high:
        raise ValueError(f"low {low} is above high {high}")
    if log and low <= 0:
        raise ValueError(f"log scale needs low > 0, got {low}")
    if log and step is not None:
        raise ValueError("use either log or step, not both")


class SamplerConfig(StrictModel):
    """How trials choose their parameters."""

    name: Literal["tpe", "random", "cmaes", "nsga2"] = Field("tpe", description="nsga2 suits several objectives")
    seed: int | None = Field(None, description="fixes the sequence of one worker; give concurrent workers none")
    n_startup_trials: int = Field(5, ge=0, description="tpe/cmaes: random trials before modelling")


class PrunerConfig(StrictModel):
    """When a running trial is stopped early (single objective only)."""

    name: Literal["median", "hyperband", "threshold", "none"] = Field(
        "median", description="median, hyperband (epochs up to trainer.max_epochs), threshold (lower/upper), none")
    n_startup_trials: int = Field(3, ge=0, description="median: trials that are never pruned")
    n_warmup_steps: int = Field(1, ge=0, description="median/threshold: epochs before pruning starts")
    min_resource: int = Field(1, ge=1, description="hyperband: epochs of the smallest bracket")
    reduction_factor: int = Field(3, ge=2, description="hyperband: survivors per rung = 1 / this")
    lower: float | None = Field(None, description="threshold: prune when the metric is below")
    upper: float | None = Field(None, description="threshold: prune when the metric is above")


class Objective(StrictModel):
    """A metric the training run logs (its value for the best checkpoint) and whether to raise or lower it."""

    metric: str = Field("val/dice", description="a validation metric (a test/ metric is refused)")
    direction: Literal["maximize", "minimize"] = Field("maximize", description="raise or lower the metric")

    @model_validator(mode="after")
    def _check_metric(self) -> Objective:
        check_selection_metric(self.metric, "objective")
        return self


class TrialResources(StrictModel):
    """What one trial gets: a device count (GPUs, or DDP processes on a CPU) and the strategy."""

    devices: int = Field(1, ge=1, description="GPUs per trial (or CPU processes)")
    accelerator: str | None = Field(None, description="null: the experiment's trainer.accelerator")
    strategy: str | None = Field(None, description="null: ddp when devices > 1, else the experiment's")


class SweepConfig(StrictModel):
    """One Optuna study over one experiment."""

    name: str | None = Field(None, description="study name; null: the sweep file's name")
    experiment: Path = Field(description="the base experiment YAML (relative to this file)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="fixed for all trials, {trainer.max_epochs: 5}")
    storage: str | None = Field(None, description="Optuna storage URL; null: SQLite file next to the sweep file")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig, description="how trials choose parameters")
    pruner: PrunerConfig = Field(default_factory=PrunerConfig, description="when a trial is stopped early")
    objectives: list[Objective] = Field(default_factory=lambda: [Objective()], min_length=1,
                                        description="metrics to optimise; the first is reported every epoch")
    n_trials: int | None = Field(20, ge=1, description="trials the study runs in all (every worker together)")
    timeout: float | None = Field(None, gt=0, description="seconds this worker starts new trials for")
    jobs: int = Field(1, ge=1, description="trials at once on this machine (--jobs overrides)")
    resources: TrialResources = Field(default_factory=TrialResources, description="what one trial gets")
    space: dict[str, Param] = Field(description="dotted config path -> parameter, e.g. optimizer.lr")
    heartbeat_interval: int = Field(60, ge=1, description="seconds between a running trial's heartbeats")
    grace_period: int | None = Field(None, ge=1, description="silence after which a trial counts as dead; null: 2x")
    max_retries: int = Field(1, ge=0, description="reruns of a trial whose worker died")
    max_failures: int = Field(5, ge=1, description="this worker stops after so many failed trials in a row")

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        if self.n_trials is None and self.timeout is None:
            raise ValueError("set n_trials, timeout or both: otherwise the sweep never ends")
        if len(self.objectives) > 1 and self.pruner.name != "none":
            raise ValueError("pruning needs a single objective; set 'pruner: {name: none}' for several objectives")
        if len(self.objectives) > 1 and self.sampler.name == "cmaes":
            raise ValueError("cmaes optimises a single objective; use nsga2 or tpe for several")
        if self.pruner.name == "threshold" and self.pruner.lower is None and self.pruner.upper is None:
            raise ValueError("the threshold pruner needs 'lower' or 'upper'")
        return self


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepConfig, ExperimentConfig]:
    """Reads and validates a sweep file and checks every search-space path and bound against its experiment.

    Raises:
        ConfigError: naming the sweep file and the field, as for experiment files.
    """
    path = Path(path)
    sweep: SweepConfig = load_config(path, overrides or [], schema=SweepConfig)
    if sweep.name is None:
        sweep = sweep.model_copy(update={"name": path.stem})
    conflicts = resource_conflicts(sweep)
    if conflicts:
        raise ConfigError("\n".join(f"{path}: {problem}" for problem in conflicts))
    experiment = load_config(sweep.experiment, fixed_overrides(sweep))
    problems = []
    for name, param in sweep.space.items():
        for value in _probe_values(param):
            try:
                load_config(sweep.experiment, [*fixed_overrides(sweep), override(name, value)])
            except ConfigError as error:
                problems.append(f"{path}: space.{name} = {value!r}: {_strip_origin(str(error))}")
                break
    if problems:
        raise ConfigError("\n".join(problems))
    return sweep, experiment


def fixed_overrides(sweep: SweepConfig) -> list[str]:
    """The sweep's fixed ``overrides`` as ``--set`` arguments."""
    return [override(name, value) for name, value in sweep.overrides.items()]


def resource_conflicts(sweep: SweepConfig) -> list[str]:
    """Trainer settings in ``overrides`` or ``space`` that the trial's ``resources`` replace: every trial gets
    ``resources.devices`` (and the accelerator and strategy when set), so the sweep's own value would be silently
    ignored; one line per conflict, naming the resources key to set instead."""
    resources = sweep.resources
    replaced = {"trainer.devices": ("resources.devices", resources.devices, True),
                "trainer.accelerator": ("resources.accelerator", resources.accelerator,
                                        resources.accelerator is not None),
                "trainer.strategy": ("resources.strategy", resources.strategy or "ddp",
                                     resources.strategy is not None or resources.devices > 1)}
    problems = []
    fixed = _dotted(sweep.overrides)
    for key, (resource, value, applies) in replaced.items():
        if not applies:
            continue
        if key in fixed:
            problems.append(f"overrides: {key} ({fixed[key]!r}) would be replaced in every trial by {resource} "
                            f"({value!r}); set {resource} instead (e.g. --set {resource}={fixed[key]})")
        if key in sweep.space:
            problems.append(f"space: {key} cannot be searched: every trial takes it from {resource} ({value!r})")
    return problems


def _dotted(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{trainer: {devices: 2}}`` and ``{trainer.devices: 2}`` both as ``{"trainer.devices": 2}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_dotted(value, f"{name}."))
        else:
            flat[name] = value
    return flat



def _probe_values(param: FloatParam | IntParam | CategoricalParam) -> list[Any]:
    return list(param.choices) if isinstance(param, CategoricalParam) else [param.low, param.high]


def _strip_origin(message: str) -> str:
    """``--set: data.x: ...`` -> ``data.x: ...``: the origin is the sweep's space, named by the caller."""
    return message.removeprefix("--set: ").replace("\n--set: ", "; ")
