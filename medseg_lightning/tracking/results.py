"""The MLflow side of ``medseg results``: which runs make the rows of a table."""

from __future__ import annotations

import contextlib

import mlflow
from mlflow.entities import Run, ViewType
from mlflow.tracking import MlflowClient

from medseg_lightning.reporting.results import RunRecord
from medseg_lightning.tracking.sweep import PARENT_TAG


def find_runs(client: MlflowClient, experiments: list[str], run_ids: list[str], parent: str | None,
              kinds: list[str], filter_string: str | None) -> list[RunRecord]:
    """Finished runs chosen by id, or by experiment (all when none is named), parent run, kind and an MLflow filter.

    Without ``parent`` only top-level runs are taken (a study's children are rows of their own only when asked
    for with ``parent``). Rows come in start order.

    Raises:
        ValueError: an unknown experiment or run (naming what exists), or an invalid filter.
    """
    if run_ids:
        return [_record(_get_run(client, run_id)) for run_id in run_ids]
    known = {item.name: item.experiment_id for item in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)}
    missing = [name for name in experiments if name not in known]
    if missing:
        raise ValueError(f"--experiment {missing[0]}: no such experiment; the store has: {', '.join(sorted(known))}")
    ids = [known[name] for name in experiments] or list(known.values())
    clauses = ["attributes.status = 'FINISHED'", *([f"tags.`{PARENT_TAG}` = '{parent}'"] if parent else []),
               *([filter_string] if filter_string else [])]
    try:
        runs = client.search_runs(ids, " and ".join(clauses), order_by=["attributes.start_time ASC"],
                                  max_results=5000) if ids else []
    except mlflow.exceptions.MlflowException as error:
        raise ValueError(f"--filter {filter_string!r}: {error.message}") from None
    records = [_record(run) for run in runs if parent or PARENT_TAG not in run.data.tags]
    # a calibration run holds a temperature and validation calibration, no Dice: a row only when asked for
    return [record for record in records if record.kind in kinds or (not kinds and record.kind != "calibration")]


def _get_run(client: MlflowClient, run_id: str) -> Run:
    try:
        return client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ValueError(f"--run {run_id}: no such run in {client.tracking_uri}") from None


def _record(run: Run) -> RunRecord:
    return RunRecord(run.info.run_id, run.info.run_name or run.info.run_id, dict(run.data.metrics),
                     dict(run.data.params), dict(run.data.tags))


def calibration_links(client: MlflowClient, records: list[RunRecord]) -> dict[str, dict[str, RunRecord]]:
    """For each calibration run: the run whose model it calibrated (``source``, with that model's own test
    evaluation when training made one) and the latest finished test evaluation of the calibrated model (``test``)."""
    from medseg_lightning.tracking.evaluation import SOURCE_RUN_TAG

    links: dict[str, dict[str, RunRecord]] = {}
    for record in records:
        found: dict[str, RunRecord] = {}
        source = record.tags.get(SOURCE_RUN_TAG)
        if source:
            with contextlib.suppress(mlflow.exceptions.MlflowException):  # deleted: its half of the row stays empty
                found["source"] = _record(client.get_run(source))
        experiment = client.get_run(record.run_id).info.experiment_id
        evaluations = client.search_runs(
            [experiment], f"tags.`{SOURCE_RUN_TAG}` = '{record.run_id}' and tags.`medseg.split` = 'test' and "
            "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1)
        if evaluations:
            found["test"] = _record(evaluations[0])
        links[record.run_id] = found
    return links
