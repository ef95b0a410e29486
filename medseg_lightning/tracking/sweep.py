"""The MLflow side of a sweep: one parent run per study, the trials' training runs nested under it.

The parent run's id is kept in the study (user attribute), so a resumed sweep and every concurrent worker log
to the same parent. Trials are ordinary ``medseg train`` runs created with the tag ``mlflow.parentRunId``, which
the MLflow UI shows as nesting.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from medseg_lightning.config.schema import ExperimentConfig
from medseg_lightning.tracking import resolve_store, using_store
from medseg_lightning.tracking.experiments import describe_experiment, experiment_id_of
from medseg_lightning.tracking.provenance import git_state

PARENT_TAG = "mlflow.parentRunId"
STATES = {"running": RunStatus.RUNNING, "finished": RunStatus.FINISHED, "failed": RunStatus.FAILED,
          "killed": RunStatus.KILLED}


def experiment_id(client: MlflowClient, config: ExperimentConfig, root: Path) -> str:
    """The MLflow experiment of the base experiment (created when missing, described as a training experiment)."""
    name = config.tracking.experiment_name or config.name
    _, artifacts = resolve_store(config, root)
    with using_store(client.tracking_uri):
        found = experiment_id_of(client, name)
        if found is None:
            try:
                found = client.create_experiment(name, artifacts)
            except mlflow.exceptions.MlflowException:  # another worker created it a moment ago
                found = client.get_experiment_by_name(name).experiment_id
    describe_experiment(client, found, config.description)
    return found


def open_parent_run(
    config: ExperimentConfig, root: Path, study_name: str, known_run_id: str | None, params: dict[str, str],
    tags: dict[str, str], reopen: bool = True,
) -> tuple[MlflowClient, str, bool]:
    """The study's parent run: ``known_run_id`` (marked running again when ``reopen``) if it exists, else new.

    Returns the client, the run id and whether the run is new (the caller then records its id in the study).
    """
    client = MlflowClient(resolve_store(config, root)[0])
    if known_run_id:
        try:
            client.get_run(known_run_id)
            if reopen:
                client.update_run(known_run_id, status="RUNNING")
            return client, known_run_id, False
        except mlflow.exceptions.MlflowException:
            pass  # deleted from MLflow: start a new parent
    run = client.create_run(experiment_id(client, config, root), run_name=f"sweep-{study_name}",
                            tags={"medseg.kind": "sweep", "optuna.study": study_name, **git_state(root), **tags})
    client.log_batch(run.info.run_id, params=[Param(key, value[:6000]) for key, value in params.items()])
    return client, run.info.run_id, True


def drop_run(client: MlflowClient, run_id: str) -> None:
    """Deletes a parent run that lost the race to another worker (it has nothing logged but its settings)."""
    client.delete_run(run_id)


def trial_runs(client: MlflowClient, parent_run_id: str) -> dict[int, Any]:
    """The trials' runs under a parent, by trial number."""
    experiment = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([experiment], f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=10_000)
    return {int(run.data.tags["optuna.trial"]): run for run in runs if "optuna.trial" in run.data.tags}


def mark_trial_run(client: MlflowClient, run: Any, state: str, reason: str | None = None) -> None:
    """Records the trial's Optuna state on its run; a run left RUNNING by a dead process becomes FAILED."""
    client.set_tag(run.info.run_id, "optuna.state", state)
    if reason:
        client.set_tag(run.info.run_id, "optuna.fail_reason", reason[:5000])
    if run.info.status == "RUNNING" and state == "FAIL":
        client.set_terminated(run.info.run_id, "FAILED")


def log_summary(client: MlflowClient, run_id: str, metrics: dict[str, float], tags: dict[str, str],
                files: list[Path], status: str | None = None) -> None:
    """Best values and trial counts as metrics, best parameters as tags, reports and plots as artifacts."""
    now = int(time.time() * 1000)
    entries = [Metric(key, value, now, 0) for key, value in metrics.items() if math.isfinite(value)]
    if entries:
        client.log_batch(run_id, metrics=entries)
    for key, value in tags.items():
        client.set_tag(run_id, key, value[:5000])
    for path in files:
        client.log_artifact(run_id, str(path))
    if status:
        client.set_terminated(run_id, RunStatus.to_string(STATES[status]))


def download_config(client: MlflowClient, run_id: str, folder: Path) -> Path | None:
    """The resolved ``config.yaml`` a trial's training run logged (None when it has none)."""
    try:
        return Path(client.download_artifacts(run_id, "config.yaml", str(folder)))
    except (mlflow.exceptions.MlflowException, OSError):
        return None


def as_param(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
