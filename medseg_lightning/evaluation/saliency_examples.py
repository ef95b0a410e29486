"""The saliency figure of an evaluation: Grad-CAM and integrated gradients of its best and worst case.

A reader of a model card sees what the model looked at where it did well and where it failed, on the slice with
the largest predicted structure (or, when the model predicted nothing there, the reference structure: what it
should have found). The figure is a report file (``metrics/<split>_saliency.png``) that the card names; no case
identifier is drawn on it.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np
from torch import nn

from medseg_lightning.config.schema import ExperimentConfig
from medseg_lightning.config.tasks import task_of
from medseg_lightning.data.cache import PreparedCase
from medseg_lightning.data.dataset import CaseDataset
from medseg_lightning.evaluation.scoring import EvaluationReport, predict_labels


def attach_saliency(network: nn.Module, cases: list[PreparedCase], report: EvaluationReport,
                    config: ExperimentConfig) -> None:
    """Sets ``report.saliency`` for the best and worst case by mean Dice (``tracking.log_saliency``). A failure
    here costs the figure only, never the run's other outputs: it is reported and skipped."""
    if (not config.tracking.log_saliency or not task_of(config).averages_predictions
            or getattr(getattr(network, "encoder", None), "model", None) is None):
        return  # detectors output boxes, not a logit map to explain; a network without a timm encoder has no stage
    try:
        report.saliency = _examples(network, cases, report, config)
    except (RuntimeError, ValueError) as error:
        print(f"warning: no saliency figure for {report.split}: {error}", file=sys.stderr)


def _examples(network: nn.Module, cases: list[PreparedCase], report: EvaluationReport,
              config: ExperimentConfig) -> dict[str, Any] | None:
    from medseg_lightning.inference.saliency import saliency_maps

    dice = {row["case_id"]: row.get("dice/mean") for row in report.cases}
    scored = sorted((value, case_id) for case_id, value in dice.items()
                    if isinstance(value, float) and math.isfinite(value))
    if not scored:
        return None
    chosen = [("best", scored[-1])] + ([("worst", scored[0])] if len(scored) > 1 else [])
    position = {case.case.case_id: index for index, case in enumerate(cases)}
    dataset = CaseDataset(cases, config.data.slicing.context)
    centre = config.data.slicing.context * len(config.data.image_columns)
    rows = []
    was_training = network.training
    network.eval()
    for label, (value, case_id) in chosen:
        item = dataset[position[case_id]]
        predicted = predict_labels(network, item["image"], config.trainer.inference_batch_size)
        region, source = (predicted, "predicted") if predicted.any() else (item["mask"].numpy(), "reference")
        if not region.any():
            continue
        index = int((region > 0).reshape(len(region), -1).sum(1).argmax())
        found = saliency_maps(network, item["image"][index : index + 1], region[index : index + 1].astype(np.int64),
                              batch_size=1)
        rows.append({"title": f"{label} {report.split} case: Dice {value:.2f} ({source} region)",
                     "image": item["image"][index, centre].numpy(), "region": region[index],
                     "maps": {method: values[0] for method, values in found.maps.items()}})
    network.train(was_training)
    return {"labels": dict(config.data.labels), "rows": rows} if rows else None
