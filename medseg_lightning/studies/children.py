"""Studies made of several training runs under one parent MLflow run: cross-validation folds, cross-site models.

Every child is a ``medseg train`` process (see ``launch``) on the study's resolved config plus the child's own
overrides, tagged with the hash of that config and the child's key. Rerunning the same study reuses finished
children and resumes an interrupted one from its last checkpoint, so a crash or Ctrl-C costs at most the epoch
it happened in, and nothing a user already has is lost.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from medseg_lightning.config import config_to_yaml
from medseg_lightning.config.protocol import configuration_hash
from medseg_lightning.config.schema import ExperimentConfig, hashed_model_settings
from medseg_lightning.evaluation.evaluate import RunContext, write_outputs
from medseg_lightning.evaluation.fairness import group_counts
from medseg_lightning.evaluation.scoring import EvaluationReport
from medseg_lightning.studies.launch import failure_reason, launch, medseg_command, override, set_options

CASES_ARTIFACT = "metrics/test_cases.csv"
Echo = Callable[[str], None]


class StudyError(RuntimeError):
    """A child training run failed; the message names the child, the exit status and its log."""


@dataclass
class Child:
    """One training run of a study: its key (``fold-0``, ``site-DU``) and its config overrides."""

    key: str
    overrides: dict[str, Any]


@dataclass
class Study:
    """A study's parent run and where its children's config and logs live."""

    kind: str
    config: ExperimentConfig
    root: Path
    config_hash: str
    client: Any
    run_id: str
    folder: Path

    @property
    def config_file(self) -> Path:
        return self.folder / "config.yaml"


# Settings added since studies were first hashed whose default is not None: at that default they stay out of the
# hash, as an unset optional setting does.
ADDED_WITH_DEFAULTS: list[tuple[str, str, object]] = [("tracking", "log_saliency", True)]


def config_hash(config: ExperimentConfig) -> str:
    """Hash of what determines the results: the resolved config without run names, tags and the fold.

    Settings left unset (``None``) are left out, so that an optional setting added in a later version (off by
    default) does not orphan the studies a user ran before it existed: their reruns still find their children.
    """
    data = config.data.model_copy(update={"split": config.data.split.model_copy(update={"fold": 0})})
    tracking = config.tracking.model_copy(update={"tags": {}, "run_name": None})
    neutral = config.model_copy(update={"data": data, "tracking": tracking}).model_dump(mode="json", exclude_none=True)
    neutral["model"] = {key: value for key, value in hashed_model_settings(config.model).items() if value is not None}
    for section, key, default in ADDED_WITH_DEFAULTS:
        if neutral.get(section, {}).get(key) == default:
            del neutral[section][key]
    return hashlib.sha256(yaml.safe_dump(neutral, sort_keys=False, allow_unicode=True).encode()).hexdigest()[:16]


@contextmanager
def open_study(kind: str, config: ExperimentConfig, root: Path, parent_run_id: str | None = None,
               tags: dict[str, str] | None = None, qualifier: str = "", label: str = "") -> Iterator[Study]:
    """The study's parent run (continued on a rerun), ended FINISHED, KILLED (Ctrl-C) or FAILED with the block.

    Args:
        qualifier: what else tells two studies of one config apart (a cross-site study's held-out attribute and
            reference run); it goes into the study's hash.
        label: a readable part of the study's folder name (the held-out attribute).
    """
    from medseg_lightning.tracking import studies as tracking

    digest = config_hash(config)  # children: a run depends on the config and its own overrides only
    study_digest = hashlib.sha256(f"{digest}:{qualifier}".encode()).hexdigest()[:16] if qualifier else digest
    client, run_id = tracking.open_study_run(config, root, kind, study_digest, f"{kind}-{config.name}", parent_run_id,
                                             tags)
    folder = root / "mlruns" / "studies" / f"{kind}-{config.name}{'-' + label if label else ''}-{study_digest}"
    folder.mkdir(parents=True, exist_ok=True)
    neutral = config.model_copy(update={"tracking": config.tracking.model_copy(update={"tags": {}, "run_name": None})})
    (folder / "config.yaml").write_text(config_to_yaml(neutral))
    study = Study(kind, config, root, digest, client, run_id, folder)
    try:
        yield study
    except BaseException as error:
        tracking.end_run(client, run_id, error)
        raise
    tracking.end_run(client, run_id, None)


def run_children(study: Study, children: list[Child], echo: Echo = print, artifact: str = CASES_ARTIFACT,
                 jobs: int = 1) -> dict[str, str]:
    """``run_child`` for every child, ``jobs`` at a time (each with its own GPUs, or a share of the CPU threads);
    the finished run of each child by its key. A failed child stops no other: the running ones finish, so a rerun
    has them, and the first failure is raised at the end.

    Raises:
        StudyError: a child's training failed.
    """
    if jobs <= 1:
        return {child.key: run_child(study, child, echo, artifact) for child in children}
    from concurrent.futures import ThreadPoolExecutor

    from medseg_lightning.studies.launch import DevicePool

    pool = DevicePool(jobs, 1, study.config.trainer.accelerator)

    def one(child: Child) -> str:
        with pool.acquire() as devices:
            return run_child(study, child, echo, artifact, devices)

    with ThreadPoolExecutor(max_workers=jobs) as executor:
        futures = {child.key: executor.submit(one, child) for child in children}
    errors = [future.exception() for future in futures.values() if future.exception() is not None]
    if errors:
        raise errors[0]
    return {key: future.result() for key, future in futures.items()}


def run_child(study: Study, child: Child, echo: Echo = print, artifact: str = CASES_ARTIFACT,
              env: dict[str, str] | None = None) -> str:
    """The run id of the child's finished training run: an earlier one of the same config, else a new one
    (continuing an interrupted one from its last checkpoint). A run counts as finished once it logged
    ``artifact`` (the per-case table the study reads).

    Raises:
        StudyError: the training process failed.
    """
    from medseg_lightning.tracking import studies as tracking

    earlier = tracking.child_runs(study.client, study.config, study.root, study.config_hash, child.key, artifact)
    if earlier.finished:
        echo(f"{child.key}: finished earlier (run {earlier.finished}), reused")
        return earlier.finished
    resume = earlier.interrupted if earlier.interrupted and _has_checkpoint(study, earlier.interrupted) else None
    tags = tracking.child_tags(study.run_id, study.kind, study.config_hash, child.key)
    items = [*(override(path, value) for path, value in child.overrides.items()), override("tracking.tags", tags),
             override("tracking.run_name", child.key)]
    command = [*medseg_command(), "train", str(study.config_file), *set_options(items)]
    command += ["--resume", resume] if resume else []
    log = study.folder / f"{child.key}.log"
    echo(f"{child.key}: {'resuming run ' + resume if resume else 'training'} (log: {log})")
    code = launch(command, env or {}, log, study.root)
    if code != 0:
        raise StudyError(f"{child.key}: training failed, {failure_reason(code, log)}")
    for line in _summary_lines(log):
        echo(f"  {line}")
    finished = tracking.child_runs(study.client, study.config, study.root, study.config_hash, child.key,
                                   artifact).finished
    if finished is None:
        raise StudyError(f"{child.key}: training ended without its results ({artifact}); log: {log}")
    return finished


def child_test_cases(study: Study, run_id: str) -> pd.DataFrame:
    """The per-case test table a child run logged (``metrics/test_cases.csv``)."""
    from medseg_lightning.tracking import studies as tracking

    return tracking.read_table(study.client, run_id, CASES_ARTIFACT, ["case_id"])


def child_report(study: Study, run_id: str, split: str) -> EvaluationReport:
    """A child's per-case table of ``split`` (``metrics/<split>_cases.csv``), summarised as its run summarised it."""
    from medseg_lightning.evaluation.scoring import summarize
    from medseg_lightning.tracking import studies as tracking

    table = tracking.read_table(study.client, run_id, f"metrics/{split}_cases.csv", ["case_id"])
    names = [name for key, name in sorted(study.config.data.labels.items()) if key > 0]
    return summarize(table.to_dict("records"), split, study.config.fairness, names)


def _has_checkpoint(study: Study, run_id: str) -> bool:
    return (study.root / "mlruns" / "checkpoints" / run_id / "last.ckpt").is_file()


def _summary_lines(log: Path) -> list[str]:
    """The lines ``medseg train`` prints at the end (from ``finished in`` on), for the study's own output."""
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    start = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith("finished in")), None)
    return [line for line in lines[start:] if line.strip() and not line.startswith("look at it")] if start is not None \
        else []


def study_context(study: Study, report: EvaluationReport, first_run: str, analyses: dict[str, Any],
                  caveats: list[str] | None = None, *, kind: str) -> RunContext:
    """What the model card of a study needs: the pooled case counts and the dataset fingerprint of its runs."""
    from medseg_lightning.tracking.studies import read_json

    table = pd.DataFrame(report.cases)
    return RunContext(config=study.config, kind=kind, run_id=study.run_id, root=study.root,
                      split_counts={report.split: len(report.cases)},
                      group_counts={report.split: group_counts(table, study.config.fairness)},
                      fingerprint=read_json(study.client, first_run, "data_fingerprint.json"),
                      analyses=analyses, caveats=caveats or [])


def log_study(study: Study, context: RunContext, reports: dict[str, EvaluationReport],
              metrics: dict[str, float]) -> None:
    """Metrics, report files, model card and description of a study's parent run."""
    from medseg_lightning import tracking
    from medseg_lightning.config import config_to_yaml
    from medseg_lightning.tracking.evaluation import log_metrics
    from medseg_lightning.tracking.studies import log_config

    log_config(study.client, study.run_id, study.config, config_to_yaml(study.config))
    log_metrics(study.client, study.run_id, metrics)
    provenance = {tracking.CONFIG_HASH_TAG: configuration_hash(study.config),
                  "data.fingerprint": (context.fingerprint or {}).get("fingerprint", "")}
    tracking.log_report(study.client, study.run_id, [], "", provenance, None)
    with tempfile.TemporaryDirectory() as tmp:
        outputs = write_outputs(reports, context, Path(tmp))
        for folder, files in outputs.files.items():
            tracking.log_report(study.client, study.run_id, files, folder, {}, None)
        tracking.log_report(study.client, study.run_id, [], "", outputs.tags, outputs.description or None)
