"""The MLflow side of ``medseg evaluate``: an evaluation run of its own, linked to the run that trained the model."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from medseg_lightning.config.schema import ExperimentConfig
from medseg_lightning.tracking import log_dataset_input, resolve_store, resolve_store_from_env, using_store
from medseg_lightning.tracking.experiments import describe_experiment
from medseg_lightning.tracking.provenance import command_tags, dvc_state, git_state, package_versions

SOURCE_RUN_TAG = "medseg.source_run_id"
MODEL_URI_TAG = "medseg.model_uri"


def source_run_id(model_uri: str, root: Path) -> str | None:
    """The run that logged the model behind ``runs:/ID/...``, ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``
    or ``models:/m-...`` (None for a local folder)."""
    if model_uri.startswith("runs:/"):
        return model_uri.removeprefix("runs:/").split("/")[0]
    if not model_uri.startswith("models:/"):
        return None
    client = MlflowClient(resolve_store_from_env(root)[0])
    name = model_uri.removeprefix("models:/").rstrip("/")
    try:
        if "@" in name:
            return client.get_model_version_by_alias(*name.split("@", 1)).run_id
        if "/" in name:
            return client.get_model_version(*name.split("/", 1)).run_id
        return client.get_logged_model(name).source_run_id
    except mlflow.exceptions.MlflowException:
        return None


@contextmanager
def evaluation_run(config: ExperimentConfig, root: Path, model_uri: str, split: str,
                   fingerprint: dict[str, Any], kind: str = "evaluation") -> Iterator[tuple[MlflowClient, str]]:
    """Creates the evaluation run, yields ``(client, run_id)``, and marks it FINISHED, or FAILED on an error
    (``kind`` "calibration": the run of ``medseg calibrate``, which reads a model the same way).

    The run lives in the experiment's MLflow experiment, tagged with the evaluated model and its training run so
    the two are one click apart (``medseg.source_run_id``).
    """
    uri, artifacts = resolve_store(config, root)
    client = MlflowClient(uri)
    name = config.tracking.experiment_name or config.name
    with using_store(uri):
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name, artifacts)
    describe_experiment(client, experiment_id, config.description)
    source = source_run_id(model_uri, root)
    tags = {"medseg.kind": kind, MODEL_URI_TAG: model_uri, "medseg.split": split,
            "data.fingerprint": fingerprint.get("fingerprint", ""), **git_state(root),
            **dvc_state(config.data.source), "medseg.version": package_versions().get("medseg-lightning", "unknown"),
            **({SOURCE_RUN_TAG: source} if source else {}), **command_tags(), **config.tracking.tags}
    verb = "calibrate" if kind == "calibration" else "evaluate"
    run = client.create_run(experiment_id, run_name=config.tracking.run_name or f"{verb}-{split}", tags=tags)
    run_id = run.info.run_id
    try:
        params = {"model_uri": model_uri, "split": split, "data.source": str(config.data.source),
                  "fairness.attributes": json.dumps(config.fairness.attributes),
                  "fairness.bins": json.dumps(config.fairness.bins),
                  "fairness.min_group_size": str(config.fairness.min_group_size)}
        client.log_batch(run_id, params=[Param(key, value[:6000]) for key, value in params.items()])
        log_dataset_input(client, run_id, config, fingerprint, "evaluation")
        yield client, run_id
    except BaseException:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float]) -> None:
    """Finite metrics in batches (MLflow caps one batch at 1000 entries)."""
    now = int(time.time() * 1000)
    entries = [Metric(key, value, now, 0) for key, value in metrics.items() if math.isfinite(value)]
    for start in range(0, len(entries), 1000):
        client.log_batch(run_id, metrics=entries[start : start + 1000])
