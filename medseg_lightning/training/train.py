"""The composition root: ``run(config)`` builds data, model, loss, trainer and logger, trains, tests and logs.

The CLI, the studies and the tests all call ``run``; nothing else wires components together. Callers that add to a
run without training knowing about them (an Optuna trial's pruning and result file) hand in :class:`RunHooks`.
"""

from __future__ import annotations

import re
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    EMAWeightAveraging,
    LearningRateMonitor,
    ModelCheckpoint,
    WeightAveraging,
)

from medseg_lightning import tracking
from medseg_lightning.config import config_to_yaml
from medseg_lightning.config.protocol import configuration_hash, split_definition
from medseg_lightning.config.schema import ExperimentConfig
from medseg_lightning.config.tasks import task_of
from medseg_lightning.data.datamodule import SegmentationDataModule
from medseg_lightning.evaluation.evaluate import SPLITS, RunContext, write_outputs
from medseg_lightning.evaluation.saliency_examples import attach_saliency
from medseg_lightning.evaluation.scoring import split_group_counts
from medseg_lightning.inference.bundle import predict_slices, save_bundle
from medseg_lightning.tracking.test_looks import SplitLooks, count_test_looks, record_test_look
from medseg_lightning.training.case_module import CaseModule
from medseg_lightning.training.transfer import load_pretrained


@dataclass
class RunHooks:
    """What a caller adds to a run: Lightning callbacks (on every DDP rank), and a function called on rank 0 once
    the run is logged, with its result and the last epoch trained (an Optuna trial writes its result file)."""

    callbacks: list[Callback] = field(default_factory=list)
    on_finished: Callable[[RunResult, int], None] | None = None


@dataclass
class RunResult:
    """What a finished run produced; ``metrics`` holds the best model's ``val/...`` and ``test/...`` values."""

    run_id: str
    experiment_name: str
    tracking_uri: str
    best_checkpoint: str
    best_epoch: int
    metrics: dict[str, float] = field(default_factory=dict)
    model_uri: str | None = None
    seconds: float = 0.0
    test_looks: SplitLooks | None = None  # the store's count of evaluations of this run's test split
    test_held_back: int = 0  # test cases not evaluated (trainer.evaluate_test: false)


def run(config: ExperimentConfig, *, root: Path | None = None, resume: str | None = None,
        resume_finished: bool = False, hooks: RunHooks | None = None) -> RunResult:
    """Trains and evaluates one experiment, tracked in MLflow.

    Args:
        root: project folder whose ``mlruns/`` holds the default store and checkpoints (default: found from cwd).
        resume: an MLflow run id to continue from its last checkpoint.
        resume_finished: allow ``resume`` to reopen a FINISHED run (``--force``), which then gets a second
            evaluation and model; without it only a FAILED, KILLED or RUNNING run is resumed.
        hooks: callbacks and a finishing step added by the caller (see :class:`RunHooks`).
    """
    with tracking.restoring_store_env():
        return _run(config, root, resume, resume_finished, hooks or RunHooks())


def check_resumable(config: ExperimentConfig, root: Path, run_id: str, resume_finished: bool = False) -> None:
    """Refuses to resume a FINISHED run unless asked: it would be evaluated again and log a second model over the
    results its users already read (and may have registered); checked before any data is read.

    Raises:
        ValueError: no such run, or a finished one without ``resume_finished``.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    uri, _ = tracking.resolve_store(config, root)
    try:
        status = MlflowClient(uri).get_run(run_id).info.status
    except mlflow.exceptions.MlflowException:
        raise ValueError(f"--resume {run_id}: no such MLflow run in {uri}") from None
    if status == "FINISHED" and not resume_finished:
        raise ValueError(f"--resume {run_id}: the run is FINISHED; resuming would evaluate it again and log a second "
                         "model into it. Train a new run (without --resume), or pass --force to resume it anyway")


def _run(config: ExperimentConfig, root: Path | None, resume: str | None, resume_finished: bool,
         hooks: RunHooks) -> RunResult:
    started = time.perf_counter()
    _quiet_library_chatter()
    root = root or tracking.project_root(Path.cwd())
    if resume and tracking.is_global_zero():  # DDP ranks > 0 attach to the run rank 0 has just reopened
        check_resumable(config, root, resume, resume_finished)
    pl.seed_everything(config.seed, workers=True, verbose=False)
    datamodule = SegmentationDataModule(config.data, seed=config.seed)
    datamodule.setup("fit")  # checks every case first: bad data fails here, before any model is built
    task = task_of(config)
    config = task.prepare(config, datamodule)  # logged with the model, which is rebuilt from it
    network = task.build_network(config, datamodule.in_channels, pretrained=config.model.pretrained == "timm")
    report = load_pretrained(network, config.model.pretrained, root)
    if report:
        print(report)
    module = task.lightning_module(config, network)
    logger = tracking.create_logger(config, root, resume_run_id=resume)
    checkpoints = root / "mlruns" / "checkpoints" / logger.run_id if logger.run_id else None
    checkpoint = ModelCheckpoint(dirpath=checkpoints, monitor=config.trainer.monitor, mode=config.trainer.monitor_mode,
                                 save_last=True, filename="best-epoch{epoch:03d}", auto_insert_metric_name=False)
    callbacks = [checkpoint, *_callbacks(config, logger), *hooks.callbacks]
    trainer = _trainer(config, logger, callbacks)
    monitor = None
    if trainer.is_global_zero:
        tracking.log_provenance(logger, config, config_to_yaml(config), datamodule.dataset.fingerprint,
                                datamodule.split_counts(), root)
        monitor = tracking.start_system_metrics(logger.run_id, logger.tracking_uri)
    try:
        last = checkpoints / "last.ckpt" if resume and checkpoints else None
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last and last.is_file() else None)
        metrics = _evaluate_best(trainer, module, datamodule, test=config.trainer.evaluate_test)
    finally:
        if monitor is not None:
            monitor.finish()
    result = RunResult(run_id=logger.run_id or "", experiment_name=logger.experiment_name,
                       tracking_uri=logger.tracking_uri, best_checkpoint=checkpoint.best_model_path,
                       best_epoch=_epoch_of(checkpoint.best_model_path), metrics=metrics,
                       test_held_back=0 if config.trainer.evaluate_test else datamodule.split_counts().get("test", 0))
    if trainer.is_global_zero:
        if "test" in module.reports:
            result.test_looks = _record_test_look(logger, config, datamodule)
        result.model_uri = _log_outputs(logger, module, datamodule, config, checkpoint.best_model_path, root,
                                        result.test_looks)
        if hooks.on_finished:
            hooks.on_finished(result, trainer.current_epoch)
        _prune_checkpoints(checkpoints, checkpoint.best_model_path, config.trainer.keep_checkpoints)
    result.seconds = time.perf_counter() - started
    return result


def _quiet_library_chatter() -> None:
    """Silences advice and deprecation notes from libraries that users cannot act on."""
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def _trainer(config: ExperimentConfig, logger: Any, callbacks: list[Callback]) -> pl.Trainer:
    settings = config.trainer
    strategy: Any = settings.strategy
    if strategy == "ddp" and config.model.encoder_freeze_epochs:
        strategy = "ddp_find_unused_parameters_true"  # frozen encoder parameters get no gradient
    return pl.Trainer(
        max_epochs=settings.max_epochs, accelerator=settings.accelerator, devices=settings.devices,
        strategy=strategy, num_nodes=settings.num_nodes, precision=resolve_precision(settings.precision,
                                                                                     settings.accelerator),
        gradient_clip_val=settings.gradient_clip_val, accumulate_grad_batches=settings.accumulate_grad_batches,
        deterministic=settings.deterministic,
        limit_train_batches=None if settings.limit_train_batches == 1.0 else settings.limit_train_batches,
        check_val_every_n_epoch=settings.check_val_every_n_epoch, log_every_n_steps=settings.log_every_n_steps,
        logger=logger, callbacks=callbacks, num_sanity_val_steps=0, enable_model_summary=False,
    )


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bfloat16 autocast where the hardware computes in it (elsewhere it is slower than float32)."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    if accelerator in ("auto", "cpu") and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return "bf16-mixed"
    return "32-true"


def _callbacks(config: ExperimentConfig, logger: Any) -> list[Callback]:
    callbacks: list[Callback] = [LearningRateMonitor(logging_interval="epoch")]
    if config.trainer.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor=config.trainer.monitor, mode=config.trainer.monitor_mode,
                                       patience=config.trainer.early_stopping_patience))
    if config.tracking.log_overlays:
        callbacks.append(tracking.OverlayCallback(logger, config.data.labels))
    if config.trainer.ema_decay:
        callbacks.append(EMAWeightAveraging(decay=config.trainer.ema_decay))
    return callbacks


def _evaluate_best(trainer: pl.Trainer, module: CaseModule, datamodule: SegmentationDataModule,
                   test: bool = True) -> dict[str, float]:
    """Validation (and test, when the split has cases and ``test``) of the best checkpoint; its weights stay in
    ``module``."""
    metrics: dict[str, float] = {}
    # A weight-averaging checkpoint holds the averaged weights as its state_dict, as validated during training; the
    # callback would load the raw weights back into the module (and not swap for test), so it is dropped first.
    trainer.callbacks = [callback for callback in trainer.callbacks if not isinstance(callback, WeightAveraging)]
    best = "best" if trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_path else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint need to be provided.*")
        for results in trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False):
            metrics.update(results)
        if test and datamodule.split_counts().get("test"):
            for results in trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False):
                metrics.update(results)
    return {key: float(value) for key, value in metrics.items()}


def _epoch_of(checkpoint: str) -> int:
    """The epoch in the best checkpoint's name (``best-epoch007.ckpt``): read without unpickling the file."""
    match = re.search(r"best-epoch(\d+)", Path(checkpoint).name) if checkpoint else None
    return int(match.group(1)) if match else -1


def _prune_checkpoints(folder: Path | None, best: str, keep: str) -> None:
    """After a successful run, only the checkpoints ``trainer.keep_checkpoints`` asks for stay on disk (a failed or
    interrupted run never gets here, so it keeps its last checkpoint to resume from)."""
    if folder is None or not folder.is_dir():
        return
    kept = {"none": set(), "last": {"last.ckpt"}, "best": {Path(best).name}, "both": {"last.ckpt", Path(best).name}}
    for path in folder.glob("*.ckpt"):
        if path.name not in kept[keep]:
            path.unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()


def _checkpoint_artifact(best: str, mode: str, folder: Path) -> Path | None:
    """The best checkpoint as ``tracking.log_checkpoint`` asks: the file itself, or its weights and epoch only."""
    if mode == "none" or not best or not Path(best).is_file():
        return None
    if mode == "full":
        return Path(best)
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)  # our own file: tensors and plain data
    keep = {key: checkpoint[key] for key in ("state_dict", "epoch", "global_step", "current_model_state")
            if key in checkpoint}
    path = folder / f"{Path(best).stem}-weights.ckpt"
    torch.save(keep, path)
    return path


def _record_test_look(logger: Any, config: ExperimentConfig, datamodule: SegmentationDataModule) -> SplitLooks:
    """Tags the run as one look at its test split and counts the looks the store holds (this one included)."""
    config_hash = configuration_hash(config)
    key = datamodule.dataset.split_key()
    record_test_look(logger.experiment, logger.run_id, key, split_definition(config.data.split), config_hash)
    return count_test_looks(logger.experiment, key, config_hash)


def _log_outputs(logger: Any, module: CaseModule, datamodule: SegmentationDataModule,
                 config: ExperimentConfig, best_checkpoint: str, root: Path,
                 test_looks: SplitLooks | None = None) -> str | None:
    """Reports and model card of the best model, the best checkpoint, and the model (safetensors + config)."""
    dataset = datamodule.dataset
    context = RunContext(
        config=config, kind="training", run_id=logger.run_id, root=root, split_counts=datamodule.split_counts(),
        group_counts=split_group_counts({split: dataset.split(split) for split in SPLITS}, config.fairness),
        fingerprint=dataset.fingerprint, test_looks=test_looks)
    card_split = "test" if "test" in module.reports else "val"
    if card_split in module.reports:
        attach_saliency(module.network, dataset.split(card_split), module.reports[card_split], config)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        outputs = write_outputs(module.reports, context, folder)
        for artifact_folder, files in outputs.files.items():
            tracking.log_report(logger.experiment, logger.run_id, files, artifact_folder, {})
        tracking.log_report(logger.experiment, logger.run_id, [], "", outputs.tags, outputs.description or None)
        artifact = _checkpoint_artifact(best_checkpoint, config.tracking.log_checkpoint, folder)
        if artifact is not None:
            tracking.log_artifact_file(logger, artifact, "checkpoints")
        if not config.tracking.log_model:
            return None
        network = module.network.cpu().eval().to(memory_format=torch.contiguous_format)
        seen = [dataset.content_keys[case.case.case_id] for split in ("train", "val") for case in dataset.split(split)]
        bundle = save_bundle(network, config, datamodule.in_channels, folder / "bundle", seen,
                             median_spacing(dataset.split("train")))
        example = _example_input(datamodule)
        prediction = predict_slices(network, config, torch.from_numpy(example))
        return tracking.log_model(logger, bundle, example, prediction)


def median_spacing(cases: list[Any]) -> tuple[float, float, float] | None:
    """The median voxel size (mm) per axis of prepared cases that have a physical spacing (None: none has)."""
    known = [case.meta["spacing"] for case in cases if case.meta.get("spacing_known")]
    return tuple(float(value) for value in np.median(np.asarray(known, dtype=float), axis=0)) if known else None


def _example_input(datamodule: SegmentationDataModule) -> np.ndarray:
    """One preprocessed slice, the shape the logged model expects: ``(1, C, H, W)`` float32."""
    item = datamodule.train_dataset(augment=False)[0]
    return item["image"].numpy()[None].astype(np.float32)
