"""Scale-out: several processes on one store, several nodes in one run, a tracking server (slow tests)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest


def _open_and_write(uri: str, barrier: multiprocessing.synchronize.Barrier, name: str) -> None:
    from mlflow.tracking import MlflowClient

    from medseg_lightning.tracking import ensure_schema

    barrier.wait()
    ensure_schema(uri)
    MlflowClient(uri).create_experiment(name)


def test_processes_that_open_a_new_mlflow_store_together_all_get_it(tmp_path: Path) -> None:
    """The nodes of a multi-node run (or sweep workers) all open a new store at once; without a lock one of them
    dies with "table experiments already exists" or "duplicate column name" (MLflow does not lock its schema)."""
    context = multiprocessing.get_context("fork")
    for attempt in range(4):
        uri = f"sqlite:///{tmp_path / str(attempt) / 'mlflow.db'}"
        barrier = context.Barrier(3)
        workers = [context.Process(target=_open_and_write, args=(uri, barrier, f"e{index}")) for index in range(3)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
        assert [worker.exitcode for worker in workers] == [0, 0, 0], f"attempt {attempt}"
        from mlflow.tracking import MlflowClient

        names = {item.name for item in MlflowClient(uri).search_experiments()}
        assert {"e0", "e1", "e2"} <= names


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow  # two torchrun "nodes" on loopback, each a training process
def test_two_torchrun_nodes_train_one_run_on_a_new_store(cohort: Path, tmp_path: Path) -> None:
    """The documented multi-node command, with both nodes on this machine: one MLflow run, every validation case
    scored once, one logged model; the nodes open the (new) store at the same moment."""
    import os
    import subprocess
    import sys

    import yaml
    from mlflow.tracking import MlflowClient

    data = {"source": str(cohort), "labels": {0: "background", 1: "organ", 2: "lesion"},
            "preprocessing": {"target_size": [32, 32]}, "split": {"n_folds": 3, "test_fraction": 0.2},
            "loader": {"batch_size": 4, "num_workers": 0}}
    experiment = tmp_path / "nodes.yaml"
    experiment.write_text(yaml.safe_dump({"name": "nodes", "data": data}))
    (tmp_path / "pyproject.toml").write_text("")  # the project root: both nodes share its mlruns/ store
    torchrun = Path(sys.executable).with_name("torchrun")
    medseg = Path(sys.executable).with_name("medseg")
    port = _free_port()
    overrides = ["model.encoder=test_resnet", "trainer.accelerator=cpu", "trainer.max_epochs=1",
                 "tracking.log_overlays=0", "trainer.num_nodes=2", "trainer.devices=1", "trainer.strategy=ddp"]
    nodes = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDSEG_CACHE_DIR": str(tmp_path / f"cache-node{rank}")}
        env.pop("MEDSEG_RUN_ID", None)
        command = [str(torchrun), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
                   "--master-addr", "127.0.0.1", "--master-port", str(port), str(medseg), "train", str(experiment),
                   *(part for item in overrides for part in ("--set", item))]
        log = (tmp_path / f"node{rank}.log").open("wb")
        nodes.append(subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [node.wait(timeout=900) for node in nodes]
    logs = [(tmp_path / f"node{rank}.log").read_text(errors="replace")[-3000:] for rank in (0, 1)]
    assert codes == [0, 0], logs
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("nodes").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["val/n_cases"] == float(run.data.tags["data.n_val"])  # every case once, not twice
    assert run.data.metrics["test/n_cases"] == float(run.data.tags["data.n_test"])
    with pytest.MonkeyPatch.context():
        import mlflow

        mlflow.set_tracking_uri(client.tracking_uri)
        models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert len(models) == 1 and models[0].source_run_id == run.info.run_id
    assert "finished in" in logs[0]


SERVER = "MEDSEG_TEST_MLFLOW_SERVER"
needs_server = pytest.mark.skipif(
    not __import__("os").environ.get(SERVER), reason=f"{SERVER} is not set (.ci/run starts an MLflow server)")


def _tiny_experiment(folder: Path, cohort: Path, name: str) -> Path:
    import yaml

    data = {"source": str(cohort), "labels": {0: "background", 1: "organ", 2: "lesion"},
            "preprocessing": {"target_size": [32, 32]}, "split": {"n_folds": 3, "test_fraction": 0.2},
            "loader": {"batch_size": 4, "num_workers": 0}}
    settings = {"model": {"encoder": "test_resnet"}, "trainer": {"accelerator": "cpu", "max_epochs": 1},
                "tracking": {"log_overlays": 0}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "data": data, **settings}))
    return path


def _medseg(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> tuple[int, str]:
    import subprocess
    import sys

    process = subprocess.run([sys.executable, "-m", "medseg_lightning.cli", *args], cwd=cwd, env=env,
                             capture_output=True, text=True, timeout=timeout)
    return process.returncode, process.stdout + process.stderr


def _server_env(cache: Path, credentials: bool = True) -> dict[str, str]:
    import os

    env = {**os.environ, "MLFLOW_TRACKING_URI": os.environ[SERVER], "MEDSEG_CACHE_DIR": str(cache),
           "OMP_NUM_THREADS": "1"}
    env.pop("MEDSEG_RUN_ID", None)
    if credentials:
        env |= {"MLFLOW_TRACKING_USERNAME": os.environ["MEDSEG_TEST_MLFLOW_USER"],
                "MLFLOW_TRACKING_PASSWORD": os.environ["MEDSEG_TEST_MLFLOW_PASSWORD"]}
    else:
        env.pop("MLFLOW_TRACKING_USERNAME", None)
        env.pop("MLFLOW_TRACKING_PASSWORD", None)
    return env


@pytest.mark.slow
@needs_server
def test_train_promote_and_predict_through_an_authenticated_tracking_server(cohort: Path, tmp_path: Path) -> None:
    import os
    import uuid

    from mlflow.tracking import MlflowClient

    name = f"server-{uuid.uuid4().hex[:8]}"
    experiment = _tiny_experiment(tmp_path, cohort, name)
    env = _server_env(tmp_path / "cache")
    outputs = []
    code, out = _medseg(["train", str(experiment)], tmp_path, env)
    outputs.append(out)
    assert code == 0, out
    with pytest.MonkeyPatch.context() as patch:
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            patch.setenv(key, env[key])
        client = MlflowClient(os.environ[SERVER])
        [run] = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        assert run.info.status == "FINISHED" and "test/dice" in run.data.metrics
        code, out = _medseg(["promote", "--run", run.info.run_id, "--name", name, "--min-cases", "1"], tmp_path, env)
        outputs.append(out)
        assert code == 0 and f"registered {name} version 1" in out, out
        source = cohort / "imagesTr" / "synth_000.nii.gz"
        code, out = _medseg(["predict", "--model", f"models:/{name}@champion", str(source), "--out",
                             str(tmp_path / "pred")], tmp_path, env)
        outputs.append(out)
        assert code == 0 and (tmp_path / "pred" / "synth_000.nii.gz").is_file(), out

        # without credentials the server refuses, and the command says so and what to set
        code, out = _medseg(["models", "list", name], tmp_path, _server_env(tmp_path / "cache", credentials=False))
        assert code == 2 and "refused" in out and "MLFLOW_TRACKING_USERNAME" in out, out

        # the password is nowhere: params, tags, artifacts, the model card, the commands' output
        password = env["MLFLOW_TRACKING_PASSWORD"]
        assert not [v for v in {**run.data.params, **run.data.tags}.values() if password in v]
        local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
        files = [path for path in local.rglob("*") if path.is_file()]
        assert files and not [str(path) for path in files if password.encode() in path.read_bytes()]
        assert not [out for out in outputs if password in out]
        server_files = Path(os.environ.get("MEDSEG_MLFLOW_DIR", "/tmp/medseg-mlflow-server")) / "artifacts"
        assert not [str(path) for path in server_files.rglob("*") if path.is_file()
                    and password.encode() in path.read_bytes()]


@pytest.mark.slow
@needs_server
@pytest.mark.skipif(not __import__("os").environ.get("MEDSEG_TEST_POSTGRES"), reason="MEDSEG_TEST_POSTGRES is not set")
def test_two_sweep_workers_on_two_machines_share_one_study_and_server(cohort: Path, tmp_path: Path) -> None:
    """Two workers with their own folders and caches, as two machines have: one PostgreSQL study, one tracking
    server; exactly n_trials trials, no parameters twice, every trial's run under one parent, the best promotable."""
    import os
    import shutil
    import subprocess
    import sys
    import uuid

    import optuna
    import yaml
    from mlflow.tracking import MlflowClient

    from tests.postgres import drop_database, fresh_database

    name = f"sweep-{uuid.uuid4().hex[:8]}"
    storage = fresh_database("optuna")
    try:
        machines = [tmp_path / "machine-a", tmp_path / "machine-b"]
        for folder in machines:
            folder.mkdir()
            (folder / "pyproject.toml").write_text("")
            shutil.copy(_tiny_experiment(tmp_path, cohort, name), folder / "exp.yaml")
            sweep = {"name": name, "experiment": "exp.yaml", "n_trials": 4, "storage": storage,
                     "sampler": {"name": "random"}, "pruner": {"name": "none"},
                     "space": {"optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}
            (folder / "sweep.yaml").write_text(yaml.safe_dump(sweep))
        command = [sys.executable, "-m", "medseg_lightning.cli", "sweep", "sweep.yaml"]
        workers = [subprocess.Popen(command, cwd=folder, env=_server_env(folder / "cache"), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for folder in machines]
        outputs = [worker.communicate(timeout=1200)[0] for worker in workers]
        assert [worker.returncode for worker in workers] == [0, 0], outputs
        study = optuna.load_study(study_name=name, storage=storage)
        complete = [trial for trial in study.trials if trial.state.name == "COMPLETE"]
        assert len(complete) == 4 and len({trial.params["optimizer.lr"] for trial in complete}) == 4
        env = _server_env(tmp_path / "cache")
        with pytest.MonkeyPatch.context() as patch:
            for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                patch.setenv(key, env[key])
            client = MlflowClient(os.environ[SERVER])
            runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=100)
            [parent] = [run for run in runs if run.data.tags.get("medseg.kind") == "sweep"]
            children = {run.info.run_id for run in runs
                        if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
            assert {trial.user_attrs["mlflow_run_id"] for trial in complete} <= children
        code, out = _medseg(["promote", "--sweep", "sweep.yaml", "--name", name, "--split", "val", "--min-cases", "1"],
                            machines[1], env)
        assert code == 0 and "registered" in out, out
    finally:
        drop_database(storage)
