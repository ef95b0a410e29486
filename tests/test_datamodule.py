"""The data module: dict batches with fixed keys, 2.5D channels, whole cases for evaluation, sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medseg_lightning.config import load_config
from medseg_lightning.data.datamodule import SegmentationDataModule
from medseg_lightning.data.dataset import ForegroundBalancedSampler
from medseg_lightning.data.preprocess import restore_volume


def _module(experiment: Path, *overrides: str) -> SegmentationDataModule:
    config = load_config(experiment, list(overrides))
    module = SegmentationDataModule(config.data, seed=config.seed)
    module.prepare_data()
    module.setup("fit")
    return module


def test_train_batches(cohort: Path, make_experiment) -> None:
    module = _module(make_experiment(cohort), "data.slicing.context=1", "data.preprocessing.target_size=[40, 36]")
    assert module.in_channels == 3
    batch = next(iter(module.train_dataloader()))
    assert set(batch) == {"image", "mask", "case_id", "slice_index", "attributes"}
    assert batch["image"].shape == (4, 3, 40, 36) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (4, 40, 36) and batch["mask"].dtype == torch.int64
    assert set(batch["attributes"]) == {"sex", "age", "site"} and len(batch["attributes"]["sex"]) == 4
    train_cases = {case.case.case_id for case in module.dataset.split("train")}
    assert set(batch["case_id"]) <= train_cases


def test_val_and_test_keep_whole_cases(cohort: Path, make_experiment) -> None:
    module = _module(make_experiment(cohort, split={"n_folds": 3, "test_fraction": 0.2}))
    val = [item for batch in module.val_dataloader() for item in batch]
    test = [item for batch in module.test_dataloader() for item in batch]
    assert len(val) == 4 and len(test) == 2  # 6 subjects x 2 cases: 1 test subject, then 5 into 3 folds
    item = val[0]
    assert item["image"].shape == (10, 1, 32, 32) and item["mask"].shape == (10, 32, 32)
    assert item["meta"]["shape"] == [1, 32, 32, 10] and item["meta"]["spacing"] == [1.0, 1.0, 1.5]
    assert item["target"].shape == (32, 32, 10)  # ground truth in the original grid
    restored = restore_volume(item["mask"].numpy(), item["meta"])
    np.testing.assert_array_equal(restored, item["target"].numpy())
    ids = {i["case_id"] for i in val} | {i["case_id"] for i in test}
    train = {case.case.case_id for case in module.dataset.split("train")}
    assert not ids & train


def test_background_subsampling_draws_fresh_slices_each_epoch() -> None:
    foreground = np.array([True] * 10 + [False] * 30)
    sampler = ForegroundBalancedSampler(foreground, 0.2, seed=0)
    first, second = list(sampler), list(sampler)
    assert len(first) == len(sampler) == 16
    assert set(range(10)) <= set(first)  # every foreground slice, every epoch
    assert set(first) != set(second)  # a different background subset next epoch
    sampler.set_epoch(0)
    assert list(sampler) == first  # reproducible from seed and epoch
