"""All MLflow code: the store, the run and its provenance, artifacts, system metrics and the logged model.

Nothing outside this package imports mlflow, so the rest of the code trains, tests and predicts without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import mlflow
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag
from mlflow.tracking import MlflowClient

from medseg_lightning.config.protocol import configuration_hash
from medseg_lightning.config.schema import ExperimentConfig
from medseg_lightning.tracking.experiments import describe_experiment
from medseg_lightning.tracking.provenance import command_tags, dvc_state, git_state, package_versions

CONFIG_HASH_TAG = "medseg.config_hash"

RUN_ID_ENV = "MEDSEG_RUN_ID"
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bars for a few small files are noise


def project_root(start: Path) -> Path:
    """The nearest folder above ``start`` holding ``mlruns/`` or ``pyproject.toml``; else the working directory."""
    for folder in [start.resolve(), *start.resolve().parents]:
        if (folder / "mlruns").is_dir() or (folder / "pyproject.toml").is_file():
            return folder
    return Path.cwd()


def resolve_store(config: ExperimentConfig, root: Path) -> tuple[str, str | None]:
    """Tracking URI and artifact location: the config, ``$MLFLOW_TRACKING_URI``, else ``root/mlruns``."""
    if config.tracking.tracking_uri:
        ensure_schema(config.tracking.tracking_uri)
        return config.tracking.tracking_uri, None
    return resolve_store_from_env(root)


_SCHEMA_READY: set[str] = set()
_RACE_MESSAGES = ("already exists", "duplicate column", "unique constraint", "duplicate key", "database is locked")


def ensure_schema(uri: str, attempts: int = 8) -> None:
    """Creates MLflow's tables in a new database store before anything else uses it, once per process.

    Several processes opening a new store at once (the nodes of a multi-node run, sweep workers on an empty
    PostgreSQL database) race to create MLflow's schema, and the loser fails ("table experiments already
    exists", "duplicate column name") or, on SQLite, can leave a half-migrated file. MLflow does not lock it, so:
    an exclusive file lock beside a SQLite file (one machine), and retries for server databases, whose DDL runs in
    transactions that roll back.
    """
    if uri in _SCHEMA_READY:
        return
    if uri.startswith(("http://", "https://")):
        check_server_access(uri)
        _SCHEMA_READY.add(uri)
        return
    if not uri.startswith(("sqlite:", "postgresql", "mysql", "mssql")):
        return
    if uri.startswith("sqlite:///"):
        import fcntl

        database = Path(uri.removeprefix("sqlite:///"))
        database.parent.mkdir(parents=True, exist_ok=True)
        with open(database.with_name(database.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                MlflowClient(uri).search_experiments(max_results=1)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    else:
        for attempt in range(1, attempts + 1):
            try:
                MlflowClient(uri).search_experiments(max_results=1)
                break
            except Exception as error:  # SQLAlchemy and MLflow wrap the database's own error types
                if attempt == attempts or not any(text in str(error).lower() for text in _RACE_MESSAGES):
                    raise
                time.sleep(0.3 * attempt)
    _SCHEMA_READY.add(uri)


def is_global_zero() -> bool:
    """Whether this process is rank 0 as set by torchrun, SLURM or Lightning's launcher (True when alone)."""
    for name in ("RANK", "SLURM_PROCID"):
        if name in os.environ:
            return int(os.environ[name]) == 0
    return int(os.environ.get("NODE_RANK", 0)) == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0


class RunLogger(MLFlowLogger):
    """Lightning's MLflow logger, saying publicly which store and experiment it writes to (Lightning keeps both in
    private attributes)."""

    def __init__(self, *, experiment_name: str, tracking_uri: str, **kwargs: Any) -> None:
        super().__init__(experiment_name=experiment_name, tracking_uri=tracking_uri, **kwargs)
        self.experiment_name = experiment_name
        self.tracking_uri = tracking_uri


def create_logger(config: ExperimentConfig, root: Path, resume_run_id: str | None = None) -> RunLogger:
    """The Lightning MLflow logger for this run.

    Rank 0 creates the run (or reopens ``resume_run_id``) before training starts and exports its id in
    ``MEDSEG_RUN_ID``, so processes that Lightning's DDP launcher starts later attach to the same run.
    """
    uri, artifacts = resolve_store(config, root)
    name = config.tracking.experiment_name or config.name
    if resume_run_id:
        try:
            MlflowClient(uri).get_run(resume_run_id)
        except mlflow.exceptions.MlflowException:
            raise ValueError(f"--resume {resume_run_id}: no such MLflow run in {uri}") from None
    run_id = resume_run_id or (None if is_global_zero() else os.environ.get(RUN_ID_ENV))
    logger = RunLogger(experiment_name=name, run_name=config.tracking.run_name or default_run_name(config),
                       tracking_uri=uri, tags=config.tracking.tags or None, artifact_location=artifacts, run_id=run_id)
    if is_global_zero():
        os.environ[RUN_ID_ENV] = logger.run_id  # creates the run now, on rank 0 only
        describe_experiment(logger.experiment, logger.experiment_id, config.description)
    return logger


def default_run_name(config: ExperimentConfig) -> str:
    """``<experiment>-<date>-<time>``: MLflow's random names come from Python's ``random``, which the run's seed
    has just fixed, so every run of a seeded experiment would get the same name in the UI."""
    return f"{config.name}-{datetime.now():%Y%m%d-%H%M%S}"


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def log_provenance(logger: MLFlowLogger, config: ExperimentConfig, config_yaml: str, fingerprint: dict[str, Any],
                   split_counts: dict[str, int], root: Path) -> None:
    """Params, tags and artifacts that make the run reproducible; no patient identifiers."""
    client, run_id = logger.experiment, logger.run_id
    params = {key: str(json.dumps(value) if isinstance(value, list | dict) else value)
              for key, value in flatten(config.model_dump(mode="json")).items()}
    logged = client.get_run(run_id).data.params  # a resumed run has them already; MLflow params are immutable
    logger.log_hyperparams({key: value for key, value in params.items() if key not in logged})
    for key, value in params.items():
        if key in logged and logged[key][:500] != value[:500]:
            client.set_tag(run_id, f"resumed.{key}", value)
    versions = package_versions()
    tags = {**git_state(root), **dvc_state(config.data.source),
            "medseg.version": versions.get("medseg-lightning", "unknown"),
            "data.fingerprint": fingerprint.get("fingerprint", ""), CONFIG_HASH_TAG: configuration_hash(config),
            **command_tags(), **{f"data.n_{split}": str(count) for split, count in split_counts.items()}}
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.yaml").write_text(config_yaml)
        (folder / "data_fingerprint.json").write_text(json.dumps(fingerprint, indent=2))
        (folder / "environment.json").write_text(json.dumps(versions, indent=2))
        for name in ("config.yaml", "data_fingerprint.json", "environment.json"):
            client.log_artifact(run_id, str(folder / name))
    log_dataset_input(client, run_id, config, fingerprint, "training")


def log_dataset_input(client: MlflowClient, run_id: str, config: ExperimentConfig, fingerprint: dict[str, Any],
                      context: str) -> None:
    """The dataset (its source and fingerprint digest) as an MLflow dataset input of the run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # several local source types match a path; any of them is right
        source = resolve_dataset_source(str(config.data.source))
    dataset = MetaDataset(source=source, name=config.name, digest=fingerprint.get("fingerprint", "")[:36])
    tag = InputTag(key="mlflow.data.context", value=context)
    entry = dataset.to_dict()  # the public description MLflow's own log_input turns into the entity below
    entity = DatasetEntity(name=entry["name"], digest=entry["digest"], source_type=entry["source_type"],
                           source=entry["source"], schema=entry.get("schema"), profile=entry.get("profile"))
    client.log_inputs(run_id, datasets=[DatasetInput(entity, tags=[tag])])


def log_report(client: MlflowClient, run_id: str, files: list[Path], folder: str, tags: dict[str, str],
               description: str | None = None) -> None:
    """Report files as artifacts under ``folder``, tags, and the model card as the run's description.

    MLflow shows the description (tag ``mlflow.note.content``) as rendered Markdown on the run page, so the card
    is the first thing a reader sees.
    """
    for path in files:
        client.log_artifact(run_id, str(path), folder)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    if description is not None:
        client.set_tag(run_id, "mlflow.note.content", description)


def start_system_metrics(run_id: str, tracking_uri: str) -> Any | None:
    """CPU/GPU/memory usage sampled into the run every 10 s; None where psutil is missing."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError:
        return None
    monitor = SystemMetricsMonitor(run_id, sampling_interval=10, tracking_uri=tracking_uri)
    monitor.start()
    return monitor


@contextmanager
def using_store(uri: str) -> Iterator[None]:
    """Points MLflow's fluent API at ``uri`` for a block and restores it after.

    ``mlflow.set_tracking_uri`` also sets ``MLFLOW_TRACKING_URI`` for the whole process, which would silently
    send the next run in the same process (a sweep, a test) to this store.
    """
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


@contextmanager
def restoring_store_env() -> Iterator[None]:
    """Undoes ``MLFLOW_TRACKING_URI`` changes made inside the block (Lightning's MLFlowLogger sets it for the
    whole process when it creates the run, which would send a later run in the same process to this store)."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def log_artifact_file(logger: MLFlowLogger, path: Path, folder: str | None = None) -> None:
    logger.experiment.log_artifact(logger.run_id, str(path), folder)


def log_model(logger: MLFlowLogger, bundle_folder: Path, example: Any, prediction: Any) -> str:
    """Logs the bundle as an MLflow pyfunc model from code (no pickled Python object); returns its URI."""
    return log_model_to_run(logger.tracking_uri, logger.run_id, bundle_folder, example, prediction)


def log_model_to_run(tracking_uri: str, run_id: str, bundle_folder: Path, example: Any, prediction: Any) -> str:
    """``log_model`` for any run of a store (a study's parent run logs its fold ensemble this way).

    MLflow records the paths it was given in the model's ``MLmodel`` file, so the model is logged from a staging
    folder with relative paths: no user folder (checkout, temporary directory) ends up in the store.
    """
    import shutil

    from mlflow.models import infer_signature

    import medseg_lightning

    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        shutil.copy(Path(__file__).with_name("pyfunc_model.py"), staging / "pyfunc_model.py")
        shutil.copytree(bundle_folder, staging / "bundle")
        shutil.copytree(Path(medseg_lightning.__file__).parent, staging / "medseg_lightning",
                        ignore=shutil.ignore_patterns("__pycache__"))
        with (using_store(tracking_uri), mlflow.start_run(run_id=run_id), warnings.catch_warnings(),
              contextlib.chdir(staging)):
            warnings.simplefilter("ignore", UserWarning)  # type-hint advice that does not apply to tensor models
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model="pyfunc_model.py",
                artifacts={"bundle": "bundle"},
                code_paths=["medseg_lightning"],
                signature=infer_signature(example, prediction),
                input_example=example,
                pip_requirements=[f"{name}=={version}" for name, version in package_versions().items()
                                  if name not in ("python", "medseg-lightning")],
            )
    return info.model_uri


def download_bundle(tracking_uri: str, model_uri: str, folder: Path) -> Path:
    """The saved-model folder (``model.yaml`` + weights) inside a logged model, downloaded into ``folder``."""
    with using_store(tracking_uri):
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(folder)))
    return local / "artifacts" / "bundle"


class OverlayCallback(Callback):
    """Logs image | truth | prediction PNGs of a few validation cases each epoch (rank 0 only)."""

    def __init__(self, logger: MLFlowLogger, labels: dict[int, str]) -> None:
        self.logger = logger
        self.labels = labels

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking or not getattr(pl_module, "overlays", None):
            return
        from medseg_lightning.reporting.plots import save_overlay

        with tempfile.TemporaryDirectory() as tmp:
            for sample in pl_module.overlays:
                path = Path(tmp) / f"{sample['case_id']}.png"
                save_overlay(sample["image"], sample["truth"], sample["prediction"], self.labels, path,
                             title=f"{sample['case_id']}, epoch {trainer.current_epoch}")
                log_artifact_file(self.logger, path, f"overlays/epoch_{trainer.current_epoch:03d}")


def load_logged_bundle(uri: str, root: Path) -> Any:
    """A medseg model logged in MLflow (``runs:/ID[/model]``, ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``,
    ``models:/m-...``), rebuilt from its ``model.yaml`` and safetensors weights by the installed package's code.

    The model's files are downloaded, never imported: ``mlflow.pyfunc.load_model`` would import the
    ``python_model`` file and the code copy stored with the model, so whoever can write to the artifact store
    could run code on every machine that predicts, evaluates or exports. The pyfunc stays for ``mlflow models
    serve``.

    Raises:
        ValueError: the model cannot be found in the store, or is not a medseg model.
    """
    from medseg_lightning.inference.bundle import load_bundle

    with tempfile.TemporaryDirectory() as tmp:
        return load_bundle(logged_bundle_folder(uri, root, Path(tmp)))  # weights are read into memory


def logged_bundle_folder(uri: str, root: Path, folder: Path) -> Path:
    """Downloads a logged medseg model into ``folder``; returns its saved-model folder (``model.yaml``, weights).

    Raises:
        ValueError: the model cannot be found in the store, or is not a medseg model.
    """
    if uri.startswith("runs:/") and uri.rstrip("/").count("/") == 1:
        uri = f"{uri.rstrip('/')}/model"
    store, _ = resolve_store_from_env(root)
    try:
        found = download_bundle(store, uri, folder)
    except mlflow.exceptions.MlflowException as error:
        raise ValueError(f"cannot load {uri} from {store}: {error.message}") from None
    if not found.is_dir():
        raise ValueError(f"{uri} is not a medseg model (no artifacts/bundle folder with model.yaml)")
    return found


def check_server_access(uri: str) -> None:
    """One cheap request to a tracking server, so a refused login is reported as such before anything runs (MLflow
    would otherwise surface it later as "no such run" or "no registered model").

    Raises:
        ValueError: the server refused the request (HTTP 401 or 403), naming the variables that carry credentials.
    """
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except mlflow.exceptions.MlflowException as error:
        status = getattr(error, "get_http_status_code", lambda: None)()
        text = str(error)
        if status in (401, 403) or " 401 " in text or " 403 " in text:
            given = "MLFLOW_TRACKING_USERNAME" in os.environ or "MLFLOW_TRACKING_TOKEN" in os.environ
            raise ValueError(
                f"the tracking server {uri} refused the request (HTTP {status or '401/403'}): "
                + ("the credentials in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) "
                   "were not accepted, or that user lacks permission" if given else
                   "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (basic auth) or MLFLOW_TRACKING_TOKEN")
            ) from None
        raise ValueError(f"cannot use the tracking server {uri}: {text.splitlines()[0][:300]}") from None


def resolve_store_from_env(root: Path) -> tuple[str, str | None]:
    """The store used when no experiment config is at hand: ``$MLFLOW_TRACKING_URI`` or ``root/mlruns``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        ensure_schema(uri)
        return uri, None
    mlruns = root / "mlruns"
    mlruns.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{mlruns / 'mlflow.db'}"
    ensure_schema(uri)
    return uri, (mlruns / "artifacts").as_uri()
