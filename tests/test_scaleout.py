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
