"""``medseg calibrate``: fit a model's softmax temperature on validation and store it with the model.

The calibrated model is the same network with ``inference.temperature`` set in its ``model.yaml`` (every member's,
for an ensemble) and a ``calibration`` record of the fit, so ``medseg predict``, ``triage`` and ``evaluate``
apply it wherever the model goes. The fit and its effect on validation are an MLflow run of their own (kind
``calibration``, linked to the model's run) that logs the calibrated model, so ``runs:/<id>`` names it; the
effect on test is measured, once, by ``medseg evaluate --split test`` on that model.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from medseg_lightning.config.schema import ExperimentConfig
from medseg_lightning.config.tasks import task_of
from medseg_lightning.data.datamodule import SegmentationDataModule
from medseg_lightning.data.dataset import CaseDataset
from medseg_lightning.evaluation.calibration import HISTOGRAM, calibration_summary, pooled, reliability
from medseg_lightning.evaluation.evaluate import evaluation_config, local_model_folder
from medseg_lightning.evaluation.scoring import predict_with_confidence, score_case
from medseg_lightning.evaluation.temperature import BOUNDS, TemperatureFit, fit_temperature, region_logits
from medseg_lightning.inference.bundle import ENSEMBLE_FILE, SPEC_FILE, ModelBundle, load_bundle, predict_slices
from medseg_lightning.inference.folding import prepare_for_inference
from medseg_lightning.inference.postprocess import classes_to_clean

SPLIT = "val"  # the temperature is chosen here; choosing it on test would make test calibration a selection score


@dataclass
class CalibrationResult:
    """The fit, the validation calibration before and after, and where the calibrated model went."""

    fit: TemperatureFit
    before: dict[str, float]
    after: dict[str, float]
    run_id: str
    tracking_uri: str
    model_uri: str
    out: Path | None
    seconds: float


def run_calibration(model_spec: str, experiment: ExperimentConfig, root: Path | None = None,
                    out: Path | None = None, warn: Callable[[str], None] = print) -> CalibrationResult:
    """Fits T on the experiment's validation split, logs the fit and the calibrated model, and optionally saves
    it into ``out`` (a new model folder).

    Raises:
        ValueError: an instance model, no validation cases, or data the model does not take.
    """
    from medseg_lightning import tracking
    from medseg_lightning.tracking.evaluation import evaluation_run, log_metrics

    started = time.perf_counter()
    if out is not None and out.exists():
        raise ValueError(f"--out {out}: exists; the calibrated model is written to a new folder (choose another)")
    root = root or tracking.project_root(Path.cwd())
    with tempfile.TemporaryDirectory() as tmp:
        source = _model_folder(model_spec, root, Path(tmp) / "download")  # read once: loaded, then copied
        bundle = load_bundle(source)
        if not task_of(bundle.config).averages_predictions:
            raise ValueError(f"calibrate: {bundle.config.task} models output detection scores, not a softmax to "
                             "scale; it applies to semantic models")
        config = evaluation_config(experiment, bundle.config)
        datamodule = SegmentationDataModule(config.data, seed=config.seed)
        datamodule.setup()
        if datamodule.in_channels != bundle.in_channels:
            raise ValueError(f"the model takes {bundle.in_channels} input channels, the data gives "
                             f"{datamodule.in_channels}")
        cases = datamodule.dataset.split(SPLIT)
        if not cases:
            raise ValueError(f"the experiment's split has no {SPLIT} cases to fit the temperature on; set data.split "
                             "so that it has a validation split (never calibrate on test)")
        dataset = CaseDataset(cases, config.data.slicing.context)
        network = prepare_for_inference(bundle.network)
        current = bundle.config.inference.temperature or 1.0
        fit = fit_temperature(region_logits(network, dataset, config.trainer.inference_batch_size), current)
        if fit.at_bound:
            warn(f"note: the fitted temperature {fit.temperature:.3g} lies on the searched range's edge {BOUNDS}")
        before = _calibration_at(network, dataset, config, current)
        after = _calibration_at(network, dataset, config, fit.temperature)
        with evaluation_run(config, root, model_spec, SPLIT, datamodule.dataset.fingerprint,
                            kind="calibration") as (client, run_id):
            folder = calibrated_copy(source, Path(tmp) / "calibrated", fit)
            metrics = {f"{SPLIT}/calibration/temperature": fit.temperature, f"{SPLIT}/calibration/nll": fit.nll_after,
                       f"{SPLIT}/calibration/nll_uncalibrated": fit.nll_before, f"{SPLIT}/n_cases": float(len(cases))}
            metrics |= {f"{SPLIT}/{key}": value for key, value in after["summary"].items()}
            metrics |= {f"{SPLIT}/{key}_uncalibrated": value for key, value in before["summary"].items()}
            log_metrics(client, run_id, metrics)
            plots = [plot for plot in (_plot(before, Path(tmp) / f"{SPLIT}_reliability_uncalibrated.png",
                                             "uncalibrated"),
                                       _plot(after, Path(tmp) / f"{SPLIT}_reliability.png",
                                             f"T = {fit.temperature:.3g}")) if plot]
            tracking.log_report(client, run_id, plots, "calibration",
                                {"medseg.temperature": f"{fit.temperature:.6g}"}, None)
            example = _example(bundle, config)  # the labels of one model do not depend on its temperature
            model_uri = tracking.log_model_to_run(client.tracking_uri, run_id, folder, example,
                                                  predict_slices(bundle.network, bundle.config,
                                                                 torch.from_numpy(example)))
            if out is not None:
                shutil.copytree(folder, out)
    return CalibrationResult(fit, before["summary"], after["summary"], run_id, client.tracking_uri, model_uri, out,
                             time.perf_counter() - started)


def calibrated_copy(source: Path, destination: Path, fit: TemperatureFit) -> Path:
    """A copy of the saved model (or ensemble) in ``source`` whose ``model.yaml`` files carry the temperature and
    the fit's record; ``source`` is never changed."""
    shutil.copytree(source, destination)
    specs = [destination / SPEC_FILE]
    if (destination / ENSEMBLE_FILE).is_file():
        names = yaml.safe_load((destination / ENSEMBLE_FILE).read_text()).get("members") or []
        specs = [destination / name / SPEC_FILE for name in names]
    for path in specs:
        spec = yaml.safe_load(path.read_text())
        spec["config"].setdefault("inference", {})["temperature"] = fit.temperature
        spec["calibration"] = fit.record()
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return destination


def _model_folder(spec: str, root: Path, download: Path) -> Path:
    if spec.startswith(("runs:/", "models:/")):
        from medseg_lightning import tracking

        return tracking.logged_bundle_folder(spec, root, download)
    return local_model_folder(spec)


def _calibration_at(network: torch.nn.Module, dataset: CaseDataset, config: ExperimentConfig,
                    temperature: float) -> dict[str, Any]:
    """Calibration of the split at ``temperature``, scored in the native grid exactly as ``medseg evaluate`` does
    (overall and per audited group), with the pooled reliability histogram."""
    names = dict(config.data.labels)
    keep = classes_to_clean(config.inference.largest_component, names)
    rows = [score_case(item, predict_with_confidence(network, item["image"], config.trainer.inference_batch_size,
                                                     temperature), names, keep) for item in dataset]
    histograms = [row.pop(HISTOGRAM, None) for row in rows]
    return {"summary": calibration_summary(histograms, pd.DataFrame(rows), config.fairness),
            "histogram": pooled(histograms)}


def _plot(calibration: dict[str, Any], path: Path, label: str) -> Path | None:
    from medseg_lightning.reporting.plots import save_reliability_plot

    histogram = calibration["histogram"]
    if histogram is None or histogram[0].sum() == 0:
        return None
    return save_reliability_plot(*reliability(histogram), calibration["summary"]["calibration/ece"], path,
                                 f"{SPLIT}, {label}")


def _example(bundle: ModelBundle, config: ExperimentConfig) -> np.ndarray:
    rows, cols = config.data.preprocessing.target_size or (64, 64)
    return np.zeros((1, bundle.in_channels, rows, cols), dtype=np.float32)
