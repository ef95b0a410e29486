"""``medseg evaluate``: any logged, registered or saved model on any dataset, as an MLflow run of its own.

It also holds what training and evaluation share after scoring: the report files, the fairness tags and the
model card of a run (``write_outputs``), so both kinds of run document themselves the same way.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medseg_lightning import __version__
from medseg_lightning.config.schema import ExperimentConfig
from medseg_lightning.config.tasks import task_of
from medseg_lightning.data.datamodule import SegmentationDataModule
from medseg_lightning.data.dataset import CaseDataset
from medseg_lightning.evaluation.saliency_examples import attach_saliency
from medseg_lightning.evaluation.scoring import (
    EvaluationReport,
    report_files,
    split_group_counts,
    worst_group_tags,
)
from medseg_lightning.inference.bundle import ENSEMBLE_FILE, SPEC_FILE, ModelBundle, load_bundle
from medseg_lightning.reporting.model_card import CardInputs, build_card
from medseg_lightning.reporting.model_card_render import render_summary, write_card
from medseg_lightning.tracking.provenance import dvc_state, git_state

SPLITS = ("train", "val", "test")


@dataclass
class RunOutputs:
    """Files to log per artifact folder, tags, the model card and its digest for the run description."""

    files: dict[str, list[Path]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)
    description: str = ""


@dataclass
class RunContext:
    """What a model card needs to know about the run besides its scores."""

    config: ExperimentConfig
    kind: str
    run_id: str
    root: Path
    split_counts: dict[str, int]
    group_counts: dict[str, dict[str, dict[str, int | None]]]
    fingerprint: dict[str, Any]
    source_model: str | None = None
    source_run_id: str | None = None
    analyses: dict[str, Any] = field(default_factory=dict)  # study results for the card: cross_validation, cross_site
    caveats: list[str] = field(default_factory=list)  # caveats that follow from those results
    test_looks: Any = None  # SplitLooks: evaluations of the card's test split in the store


def write_outputs(reports: dict[str, EvaluationReport], context: RunContext, folder: Path) -> RunOutputs:
    """Report files of every split and the model card of the test split (validation when there is no test)."""
    outputs = RunOutputs()
    outputs.files["metrics"] = [path for report in reports.values()
                                for path in report_files(report, context.config.fairness, folder / "metrics")]
    for report in reports.values():
        outputs.tags |= worst_group_tags(report)
    card_split = "test" if "test" in reports else next(iter(reports), None)
    if card_split is None:
        return outputs
    git = git_state(context.root)
    report = reports[card_split]
    inputs = CardInputs(
        config=context.config, kind=context.kind, run_id=context.run_id,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        git_commit=git.get("git.commit"), git_dirty=git.get("git.dirty") == "true" if git else None,
        package_version=__version__, evaluation_split=card_split, summary=report.summary, fairness=report.fairness,
        split_counts=context.split_counts, group_counts=context.group_counts,
        dataset_fingerprint=context.fingerprint, dvc_hash=dvc_state(context.config.data.source).get("data.dvc_md5"),
        source_model=context.source_model, source_run_id=context.source_run_id,
        analyses=context.analyses | _saliency_entry(report),
        study_caveats=context.caveats,
        test_looks=context.test_looks.as_dict() if context.test_looks is not None and card_split == "test" else None,
    )
    outputs.card = build_card(inputs)
    outputs.description = render_summary(outputs.card)
    outputs.files["model_card"] = write_card(outputs.card, folder / "model_card")
    return outputs


def _saliency_entry(report: EvaluationReport) -> dict[str, Any]:
    """What the card says of the saliency figure: where it is and which cases it shows."""
    if not report.saliency:
        return {}
    rows = report.saliency["rows"]
    return {"saliency": {"figure": f"metrics/{report.split}_saliency.png", "cases": [row["title"] for row in rows],
                         "methods": list(rows[0]["maps"])}}


def load_model(spec: str, root: Path) -> ModelBundle:
    """A model from ``runs:/ID``, ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, a saved model folder (with
    ``model.yaml`` and ``weights.safetensors``) or a downloaded MLflow model folder."""
    if spec.startswith(("runs:/", "models:/")):
        from medseg_lightning import tracking

        return tracking.load_logged_bundle(spec, root)
    return load_bundle(local_model_folder(spec))


def local_model_folder(spec: str) -> Path:
    """The saved-model folder of a local ``--model``: the folder itself or a downloaded MLflow model's bundle."""
    path = Path(spec).expanduser()
    for folder in (path, path / "artifacts" / "bundle"):
        if (folder / SPEC_FILE).is_file() or (folder / ENSEMBLE_FILE).is_file():
            return folder
    raise ValueError(f"--model {spec}: not runs:/<run id>, models:/<name>@<alias>, models:/<name>/<version>, "
                     f"or a folder with {SPEC_FILE} and weights.safetensors (or an ensemble's {ENSEMBLE_FILE})")


def evaluation_config(data: ExperimentConfig, model: ExperimentConfig) -> ExperimentConfig:
    """The experiment's data, read the way the model was trained to see it (preprocessing, slicing, labels).

    Raises:
        ValueError: the data has a different number of modalities or classes than the model was trained on.
    """
    if len(data.data.image_columns) != len(model.data.image_columns):
        raise ValueError(f"the model takes {len(model.data.image_columns)} modalities {model.data.image_columns}, "
                         f"the data has {len(data.data.image_columns)} {data.data.image_columns}")
    if data.data.num_classes != model.data.num_classes:
        raise ValueError(f"the model predicts {model.data.num_classes} classes {model.data.labels}, the data has "
                         f"{data.data.num_classes} {data.data.labels}")
    fields = {"preprocessing": model.data.preprocessing, "slicing": model.data.slicing, "labels": model.data.labels}
    if task_of(model).detects_objects:  # the objects are scored as the model was trained to find them
        fields["instances"] = data.data.instances or model.data.instances
    # a semantic model on instance data keeps data.instances: its objects are then its connected components
    return data.model_copy(update={"data": data.data.model_copy(update=fields), "task": model.task,
                                   "model": model.model, "inference": model.inference})


@dataclass
class EvaluationResult:
    run_id: str
    tracking_uri: str
    report: EvaluationReport
    seconds: float
    test_looks: Any = None  # SplitLooks of the evaluated test split, this evaluation included


def check_unseen(bundle: ModelBundle, dataset: Any, split: str, warn: Callable[[str], None]) -> None:
    """Cases that trained or selected the model score it on what it has learnt, not on new patients.

    Raises:
        ValueError: on the test split, naming how many cases the model has seen (a fold ensemble of a
            cross-validation has seen every case of its cohort). On other splits this is a warning.
    """
    from medseg_lightning.inference.bundle import seen_digest

    if not bundle.seen_cases:
        return  # a model saved before medseg recorded what it had seen
    cases = dataset.split(split)
    seen = sum(seen_digest(dataset.content_keys[case.case.case_id]) in bundle.seen_cases for case in cases)
    if not seen:
        return
    message = (f"{seen} of the {len(cases)} {split} cases trained or selected this model (its training or validation "
               "split): their scores measure what it has learnt, not how it does on new patients")
    if split == "test":
        raise ValueError(f"{message}. Evaluate it on cases it has not seen (a fold ensemble of a cross-validation "
                         "has seen every case of its cohort: its estimate is the cross-validation's pooled test)")
    warn(f"note: {message}")


def evaluated_configuration(bundle: ModelBundle, config: ExperimentConfig) -> str:
    """The configuration hash of what is evaluated: the model's training settings with the inference settings
    this evaluation applies (post-processing chosen per call is part of the configuration)."""
    from medseg_lightning.config.protocol import configuration_hash

    return configuration_hash(bundle.config.model_copy(update={"inference": config.inference}))


def run_evaluation(model_spec: str, experiment: ExperimentConfig, split: str = "test",
                   root: Path | None = None, largest_component: bool | None = None,
                   warn: Callable[[str], None] = print) -> EvaluationResult:
    """Evaluates a model on one split of the experiment's data, as its own MLflow run linked to the model's run.

    Args:
        largest_component: keep only the largest connected component of every class (default: the model's
            ``inference.largest_component``, as ``medseg predict`` does).
        warn: where the note goes when other configurations have already been evaluated on this test split.
    """
    from medseg_lightning import tracking
    from medseg_lightning.config.protocol import split_definition
    from medseg_lightning.tracking.evaluation import evaluation_run, log_metrics, source_run_id
    from medseg_lightning.tracking.test_looks import count_test_looks, record_test_look

    started = time.perf_counter()
    root = root or tracking.project_root(Path.cwd())
    bundle = load_model(model_spec, root)
    config = evaluation_config(experiment, bundle.config)
    if largest_component is not None:
        config = config.model_copy(update={"inference": config.inference.model_copy(
            update={"largest_component": largest_component})})
    datamodule = SegmentationDataModule(config.data, seed=config.seed)
    datamodule.setup("test")
    if datamodule.in_channels != bundle.in_channels:
        raise ValueError(f"the model takes {bundle.in_channels} input channels, the data gives "
                         f"{datamodule.in_channels}")
    cases = datamodule.dataset.split(split)
    if not cases:
        counts = ", ".join(f"{name} {count}" for name, count in datamodule.split_counts().items())
        raise ValueError(f"split {split!r} has no cases ({counts}); check data.split or pass --split")
    check_unseen(bundle, datamodule.dataset, split, warn)
    config_hash = evaluated_configuration(bundle, config)
    key = datamodule.dataset.split_key(split)
    looks = None
    with evaluation_run(config, root, model_spec, split, datamodule.dataset.fingerprint) as (client, run_id):
        if split == "test":
            earlier = count_test_looks(client, key, config_hash)
            if earlier.others:
                warn(f"note: {earlier.line()} ({earlier.others} other than this one). Choosing among them by these "
                     "scores makes the chosen score optimistic: compare configurations on validation "
                     "(--split val) and evaluate the chosen one on test once.")
            record_test_look(client, run_id, key, split_definition(config.data.split), config_hash)
            looks = count_test_looks(client, key, config_hash)
        dataset = CaseDataset(cases, config.data.slicing.context)
        report = task_of(config).evaluate(bundle.network, dataset, split, config)
        attach_saliency(bundle.network, cases, report, config)
        log_metrics(client, run_id, report.metrics())
        context = RunContext(
            config=config, kind="evaluation", run_id=run_id, root=root, split_counts=datamodule.split_counts(),
            group_counts=split_group_counts({s: datamodule.dataset.split(s) for s in SPLITS}, config.fairness),
            fingerprint=datamodule.dataset.fingerprint, source_model=model_spec,
            source_run_id=source_run_id(model_spec, root), test_looks=looks)
        with tempfile.TemporaryDirectory() as tmp:
            outputs = write_outputs({split: report}, context, Path(tmp))
            for folder, files in outputs.files.items():
                tracking.log_report(client, run_id, files, folder, {}, None)
            tracking.log_report(client, run_id, [], "", outputs.tags, outputs.description or None)
    return EvaluationResult(run_id=run_id, tracking_uri=client.tracking_uri, report=report,
                            seconds=time.perf_counter() - started, test_looks=looks)
