"""The MLflow side of studies (cross-validation, cross-site): one parent run, its training runs nested under it.

A study is found again by its kind and the hash of its resolved config, so rerunning the same command continues
the same parent run; children are found by the same hash and their key (``fold-0``, ``site-DU``), so finished
ones are reused and interrupted ones resumed, wherever they were started from.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import Param, RunStatus
from mlflow.tracking import MlflowClient

from medseg_lightning.config.schema import ExperimentConfig
from medseg_lightning.tracking import resolve_store
from medseg_lightning.tracking.provenance import command_tags, git_state
from medseg_lightning.tracking.sweep import PARENT_TAG, experiment_id

KIND_TAG = "medseg.kind"
HASH_TAG = "medseg.study.config"
KEY_TAG = "medseg.study.key"


@dataclass
class ChildRuns:
    """A child's earlier runs: the newest finished one, and the newest interrupted one (to resume)."""

    finished: str | None
    interrupted: str | None


def open_study_run(config: ExperimentConfig, root: Path, kind: str, config_hash: str, run_name: str,
                   parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> tuple[MlflowClient, str]:
    """The study's parent run: the newest earlier one of this kind and config (marked running again), else new."""
    client = MlflowClient(resolve_store(config, root)[0])
    experiment = experiment_id(client, config, root)
    earlier = client.search_runs([experiment], f"tags.`{KIND_TAG}` = '{kind}' and tags.`{HASH_TAG}` = '{config_hash}'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    extra = {**({PARENT_TAG: parent_run_id} if parent_run_id else {}), **(tags or {})}
    if earlier:
        run_id = earlier[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        for key, value in command_tags().items():  # the command that continued (and so completed) the study
            client.set_tag(run_id, key, value)
        for key, value in extra.items():
            if key != PARENT_TAG or PARENT_TAG not in earlier[0].data.tags:  # a study keeps the parent it had
                client.set_tag(run_id, key, value)
        return client, run_id
    run = client.create_run(experiment, run_name=run_name,
                            tags={KIND_TAG: kind, HASH_TAG: config_hash, **git_state(root), **command_tags(),
                                  **extra})
    return client, run.info.run_id


def child_tags(parent_run_id: str, kind: str, config_hash: str, key: str) -> dict[str, str]:
    """Tags that nest a child under the study's run in the MLflow UI and find it again on a rerun."""
    return {PARENT_TAG: parent_run_id, "medseg.study.kind": kind, HASH_TAG: config_hash, KEY_TAG: key}


def child_runs(client: MlflowClient, config: ExperimentConfig, root: Path, config_hash: str, key: str,
               required_artifact: str) -> ChildRuns:
    """Earlier training runs of this child; a run counts as finished only if it logged ``required_artifact``."""
    experiment = experiment_id(client, config, root)
    runs = client.search_runs([experiment], f"tags.`{HASH_TAG}` = '{config_hash}' and tags.`{KEY_TAG}` = '{key}'",
                              order_by=["attributes.start_time DESC"], max_results=100)
    finished = next((run.info.run_id for run in runs if run.info.status == "FINISHED"
                     and _has_artifact(client, run.info.run_id, required_artifact)), None)
    interrupted = next((run.info.run_id for run in runs if run.info.status != "FINISHED"), None)
    return ChildRuns(finished, interrupted)


def fold_runs_of(client: MlflowClient, run_id: str) -> dict[int, str]:
    """The finished fold runs of a cross-validation study run (or of the one a cross-site run used), by fold.

    Raises:
        ValueError: no such run, or a run that is neither a cross-validation nor a cross-site study.
    """
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ValueError(f"--seen-from {run_id}: no such MLflow run") from None
    if run.data.tags.get(KIND_TAG) == "cross-site" and "medseg.crossval_run_id" in run.data.tags:
        return fold_runs_of(client, run.data.tags["medseg.crossval_run_id"])
    if run.data.tags.get(KIND_TAG) != "cross-validation":
        raise ValueError(f"--seen-from {run_id}: not a cross-validation or cross-site run "
                         f"(medseg.kind {run.data.tags.get(KIND_TAG)!r})")
    children = client.search_runs([run.info.experiment_id], f"tags.`{PARENT_TAG}` = '{run_id}'", max_results=1000)
    folds = {int(child.data.tags[KEY_TAG].removeprefix("fold-")): child.info.run_id for child in children
             if child.info.status == "FINISHED" and child.data.tags.get(KEY_TAG, "").startswith("fold-")}
    return dict(sorted(folds.items()))


def _has_artifact(client: MlflowClient, run_id: str, path: str) -> bool:
    folder, _, name = path.rpartition("/")
    return any(item.path == path for item in client.list_artifacts(run_id, folder or None)) if name else False


def read_table(client: MlflowClient, run_id: str, path: str, text_columns: list[str]) -> pd.DataFrame:
    """A CSV artifact of a run (``text_columns`` kept as text, so codes like ``01`` stay codes)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, path, tmp)
        header = pd.read_csv(local, nrows=0).columns
        return pd.read_csv(local, dtype={column: str for column in header if column in text_columns
                                         or column.startswith("attr/")})


def end_run(client: MlflowClient, run_id: str, error: BaseException | None) -> None:
    """FINISHED, KILLED (Ctrl-C) or FAILED."""
    status = (RunStatus.FINISHED if error is None else
              RunStatus.KILLED if isinstance(error, KeyboardInterrupt) else RunStatus.FAILED)
    with contextlib.suppress(mlflow.exceptions.MlflowException):  # the store went away: a rerun continues anyway
        client.set_terminated(run_id, RunStatus.to_string(status))


def read_json(client: MlflowClient, run_id: str, path: str) -> Any:
    """A JSON artifact of a run."""
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, path, tmp)).read_text())


def log_config(client: MlflowClient, run_id: str, config: ExperimentConfig, config_yaml: str) -> None:
    """The study's resolved config as params (once: MLflow params are immutable) and as ``config.yaml``."""
    from medseg_lightning.tracking import flatten

    if client.get_run(run_id).data.params:
        return
    params = [Param(key, str(json.dumps(value) if isinstance(value, list | dict) else value)[:6000])
              for key, value in flatten(config.model_dump(mode="json")).items()]
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start : start + 100])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(config_yaml)
        client.log_artifact(run_id, str(path))
