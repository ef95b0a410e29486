"""An MLflow experiment as the UI shows it: its description, its kind (training, not GenAI) and the URL of its runs.

MLflow 3's UI opens an experiment without a kind in its GenAI view (traces) in a fresh browser; the tag
``mlflow.experimentKind`` set to ``custom_model_development`` (what the UI's own "Machine learning" choice writes)
opens it as a model-training experiment, with the runs table.
"""

from __future__ import annotations

import functools
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

DESCRIPTION_TAG = "mlflow.note.content"  # the experiment's description on its page, as Markdown
KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
UI_PORT = 5000  # medseg ui's default port


def describe_experiment(client: MlflowClient, experiment_id: str, description: str) -> None:
    """Sets the experiment's description (from the config's ``description``) and its kind, each only when the
    experiment has none yet: what a user has written or chosen in the UI stays.

    A store that refuses the tags (a server's permissions) leaves the experiment as it is: how it is shown is no
    reason to stop a run.
    """
    try:
        tags = client.get_experiment(experiment_id).tags
        if description.strip() and DESCRIPTION_TAG not in tags:
            client.set_experiment_tag(experiment_id, DESCRIPTION_TAG, description)
        if KIND_TAG not in tags and ui_knows_training_kind():
            client.set_experiment_tag(experiment_id, KIND_TAG, TRAINING_KIND)
    except mlflow.exceptions.MlflowException:
        pass


@functools.cache
def ui_knows_training_kind() -> bool:
    """Whether the installed MLflow UI knows the training kind (a tag value it does not know would be shown as an
    unknown kind, so older versions get none)."""
    bundles = (Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js").glob("main.*.js")
    marker = f'"{TRAINING_KIND}"'.encode()
    return any(marker in bundle.read_bytes() for bundle in bundles)


def ui_root(tracking_uri: str, port: int = UI_PORT) -> str:
    """Where the UI of a store is: a tracking server serves its own; a local store gets ``medseg ui``'s."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return f"http://127.0.0.1:{port}"


def runs_table_url(root: str, experiment_id: str) -> str:
    """The experiment's runs table in MLflow 3's UI (a hash route)."""
    return f"{root.rstrip('/')}/#/experiments/{experiment_id}/runs"


def experiment_id_of(client: MlflowClient, name: str, required: bool = False) -> str | None:
    """The id of the experiment ``name``; None when there is none, or with ``required`` a ValueError."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None and required:
        known = sorted(item.name for item in client.search_experiments())
        raise ValueError(f"no MLflow experiment {name!r} in {client.tracking_uri}; "
                         f"known: {', '.join(known) if known else 'none yet (train first)'}")
    return experiment.experiment_id if experiment else None


def look_at_run(tracking_uri: str, run_id: str) -> str:
    """The line that tells the user where to see a run's experiment: ``medseg ui`` and the runs table's URL."""
    try:
        experiment_id = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    except mlflow.exceptions.MlflowException:
        return "look at it: medseg ui"
    url = runs_table_url(ui_root(tracking_uri), experiment_id)
    if tracking_uri.startswith(("http://", "https://")):
        return f"look at it: {url}"
    return f"look at it: medseg ui   (then open {url})"
