"""Test-set hygiene: validation chooses, test only reports.

A setting chosen by reading test scores (the best epoch, the weight averaging, a sweep's winner) makes the test
score a selection score: it no longer estimates how the model does on new patients. ``config.selection`` keeps
selection on validation metrics; these helpers identify a test split and a configuration, so every look at a
test split can be counted (``tracking/test_looks.py``) and shown where the figure is read (console, model card).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from medseg_lightning.config.schema import ExperimentConfig, SplitConfig, hashed_model_settings


def configuration_hash(config: ExperimentConfig) -> str:
    """Hash of every setting that shapes a model's predictions, without names, tracking, reporting, the seed and
    the test-evaluation switch: two runs with the same hash are repeats of one configuration (seeds), and two
    hashes on one test split are two configurations compared on it."""
    trainer = config.trainer.model_dump(mode="json", exclude={"evaluate_test", "inference_batch_size",
                                                               "log_every_n_steps"})
    data = config.data.model_dump(mode="json", exclude={"source", "loader", "cache_dir"})  # the data: the split key
    data["batch_size"] = config.data.loader.batch_size
    if config.data.attributes is not None and config.data.attributes.table is not None:
        data["attributes"]["table"] = config.data.attributes.table.name  # no machine's folders in the hash
    if config.data.split.file is not None:
        data["split"]["file"] = config.data.split.file.name
    settings = {"task": config.task, "data": data, "model": hashed_model_settings(config.model),
                "loss": config.loss.model_dump(mode="json"), "optimizer": config.optimizer.model_dump(mode="json"),
                "trainer": trainer, "inference": config.inference.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(_without_none(settings), sort_keys=True).encode()).hexdigest()[:16]


def split_definition(split: SplitConfig) -> dict[str, Any]:
    """The fields that decide which subjects are tested (shown with the count; the key below is exact)."""
    fields = {"method": split.method, "seed": split.seed}
    if split.method == "kfold":
        fields |= {"n_folds": split.n_folds, "fold": split.fold, "holdout": split.holdout}
        if split.holdout == "val":
            fields["test_fraction"] = split.test_fraction
        if split.stratify_by:
            fields["stratify_by"] = split.stratify_by
    elif split.method == "leave_group_out":
        fields |= {"group_attribute": split.group_attribute, "held_out_group": split.held_out_group}
    else:
        fields["file"] = split.file.name if split.file else None
    return fields


def split_key(case_digests: Iterable[str]) -> str:
    """One key per test set: a hash of its cases' file contents, so the same patients are the same split whatever
    the preprocessing, the experiment name or the way the split was defined (and no case id is stored)."""
    return hashlib.sha256("|".join(sorted(case_digests)).encode()).hexdigest()[:20]


def _without_none(value: Any) -> Any:
    """Unset optional settings left out, so a setting added later (off by default) keeps the old hashes."""
    if isinstance(value, dict):
        return {key: _without_none(item) for key, item in value.items() if item is not None}
    return value
