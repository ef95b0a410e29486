"""A study's results for people: the trials table, the best trial(s) or Pareto front, Optuna's plots, and the
best trial's config as an experiment file ready for ``medseg train`` and promotion."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optuna
import yaml
from optuna.trial import TrialState

from medseg_lightning.sweep.config import SweepConfig
from medseg_lightning.sweep.study import RUN_ATTR, best_trials, counted_trials, trials_table

TRIAL_TAG_PREFIXES = ("mlflow.", "optuna.")


Report = tuple[list[Path], dict[str, float], dict[str, str]]


def write_report(study: optuna.Study, sweep: SweepConfig, folder: Path,
                 fetch_config: Callable[[str, Path], Path | None]) -> Report:
    """Files for the parent run, its metrics (``best/<objective>``, ``trials/<state>``) and tags (best trial).

    Args:
        fetch_config: downloads a run's ``config.yaml`` into a folder (MLflow lives in the tracking package).
    """
    folder.mkdir(parents=True, exist_ok=True)
    table = trials_table(study, sweep)
    files = [folder / "trials.csv"]
    table.to_csv(files[0], index=False)
    counts = {state.name.lower(): 0 for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL,
                                                   TrialState.RUNNING)}
    for trial in counted_trials(study):
        if trial.state.name.lower() in counts:
            counts[trial.state.name.lower()] += 1
    metrics = {f"trials/{state}": float(count) for state, count in counts.items()}
    tags: dict[str, str] = {}
    best = best_trials(study)
    if best:
        files.append(folder / "best_trials.json")
        files[-1].write_text(json.dumps([_trial_summary(t, sweep) for t in best], indent=2) + "\n")
        if len(sweep.objectives) == 1:
            metrics |= {f"best/{o.metric}": v for o, v in zip(sweep.objectives, best[0].values, strict=True)}
            tags = {"best.trial": str(best[0].number), "best.run_id": best[0].user_attrs.get(RUN_ATTR, ""),
                    "best.params": json.dumps(best[0].params)}
        else:
            files.append(folder / "pareto_front.csv")
            table[table["number"].isin([t.number for t in best])].to_csv(files[-1], index=False)
        config = best_config(best[0], folder, fetch_config)
        if config:
            files.append(config)
    files += _plots(study, sweep, folder)
    return files, {k: v for k, v in metrics.items() if math.isfinite(v)}, tags


def _trial_summary(trial: optuna.trial.FrozenTrial, sweep: SweepConfig) -> dict[str, Any]:
    return {"number": trial.number, "values": dict(zip([o.metric for o in sweep.objectives], trial.values,
                                                         strict=True)),
            "params": trial.params, "run_id": trial.user_attrs.get(RUN_ATTR)}


def best_config(trial: optuna.trial.FrozenTrial, folder: Path,
                fetch_config: Callable[[str, Path], Path | None]) -> Path | None:
    """The best trial's resolved config, without the sweep's nesting tags, as ``best_config.yaml``."""
    run_id = trial.user_attrs.get(RUN_ATTR)
    source = fetch_config(run_id, folder / "download") if run_id else None
    if source is None:
        return None
    config = yaml.safe_load(source.read_text())
    tracking = config.get("tracking", {})
    tracking["tags"] = {k: v for k, v in (tracking.get("tags") or {}).items()
                        if not k.startswith(TRIAL_TAG_PREFIXES)}
    tracking["run_name"] = None
    config.setdefault("trainer", {})["evaluate_test"] = True  # the chosen configuration's one look at test
    target = folder / "best_config.yaml"
    header = (f"# Best trial {trial.number} of the sweep (MLflow run {run_id}), chosen on validation. Train it once "
              f"with its test evaluation: medseg train {target.name}\n")
    target.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return target


def _plots(study: optuna.Study, sweep: SweepConfig, folder: Path) -> list[Path]:
    """Optimisation history, parameter importances, parallel coordinates, Pareto front: what each can draw."""
    from optuna.visualization import matplotlib as plots

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        return []
    names = [o.metric for o in sweep.objectives]
    wanted: list[tuple[str, Callable[[], Any]]] = []
    if len(names) == 1:
        wanted += [("optimization_history", lambda: plots.plot_optimization_history(study, target_name=names[0])),
                   ("parallel_coordinate", lambda: plots.plot_parallel_coordinate(study, target_name=names[0]))]
        if len(complete) >= 2 and sweep.space:
            wanted.append(("param_importances", lambda: plots.plot_param_importances(study)))
    else:
        wanted.append(("pareto_front", lambda: plots.plot_pareto_front(study, target_names=names)))
        wanted += [(f"optimization_history_{i}", lambda i=i: plots.plot_optimization_history(
            study, target=lambda t: t.values[i], target_name=names[i])) for i in range(len(names))]
    files = []
    for name, draw in wanted:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            try:
                axes = draw()
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue  # e.g. importances of a parameter that never varied
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        path = folder / f"{name}.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        files.append(path)
    return files
