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
