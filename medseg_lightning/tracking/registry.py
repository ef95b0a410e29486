"""The MLflow Model Registry side of promotion: find a run's logged model, register it, tag it, move aliases."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from medseg_lightning.tracking import resolve_store_from_env, using_store

DESCRIPTION_LIMIT = 5000  # MLflow's SQL store keeps at most this many characters of a version's description


def client_for(root: Path) -> MlflowClient:
    return MlflowClient(resolve_store_from_env(root)[0])


def get_run(client: MlflowClient, run_id: str) -> Any:
    try:
        return client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ValueError(f"--run {run_id}: no such MLflow run in {client.tracking_uri}") from None


def logged_model_uri(client: MlflowClient, run: Any) -> str:
    """``models:/m-...`` of the model the run logged (MLflow 3 logged models are linked to their source run)."""
    with using_store(client.tracking_uri):
        models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                             filter_string=f"source_run_id = '{run.info.run_id}'",
                                             output_format="list")
    if not models:
        raise ValueError(f"run {run.info.run_id} logged no model (was tracking.log_model false?)")
    return f"models:/{models[0].model_id}"


def run_artifact_text(client: MlflowClient, run_id: str, path: str, folder: Path) -> str | None:
    try:
        return Path(client.download_artifacts(run_id, path, str(folder))).read_text()
    except (mlflow.exceptions.MlflowException, OSError):
        return None


def register_version(client: MlflowClient, model_uri: str, name: str, alias: str | None, tags: dict[str, str],
                     description: str) -> tuple[Any, str | None]:
    """Registers ``model_uri`` as a new version of ``name``; the alias moves to it and the version that had it
    gets the alias ``previous`` (``<alias>-previous`` for other aliases), so it stays findable.

    Returns the new version and the version number that was moved to the previous alias, if any.
    """
    with using_store(client.tracking_uri):
        version = mlflow.register_model(model_uri, name, tags=tags)
    client.update_model_version(name, version.version, description=description[:DESCRIPTION_LIMIT])
    moved = None
    if alias:
        try:
            holder = client.get_model_version_by_alias(name, alias)
        except mlflow.exceptions.MlflowException:
            holder = None
        client.set_registered_model_alias(name, alias, version.version)
        if holder is not None and holder.version != version.version:
            client.set_registered_model_alias(name, previous_alias(alias), holder.version)
            moved = holder.version
    return version, moved


def previous_alias(alias: str) -> str:
    return "previous" if alias == "champion" else f"{alias}-previous"


def config_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def list_versions(client: MlflowClient, name: str) -> list[dict[str, Any]]:
    """Versions of a registered model, newest first, with aliases, source run metrics and gate results."""
    try:
        model = client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        raise ValueError(f"no registered model {name!r} in {client.tracking_uri}") from None
    aliases: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for version in sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: -int(v.version)):
        metrics = client.get_run(version.run_id).data.metrics if version.run_id else {}
        rows.append({"version": version.version, "aliases": ",".join(sorted(aliases.get(str(version.version), []))),
                     "run_id": version.run_id, "created": version.creation_timestamp,
                     "test/dice": metrics.get("test/dice"), "gates": json.loads(version.tags.get("gates", "[]")),
                     "forced": version.tags.get("promotion.forced_reason")})
    return rows
