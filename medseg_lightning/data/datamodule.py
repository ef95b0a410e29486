"""The LightningDataModule: check and prepare once, then serve slice batches (train) and case batches (val/test)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from medseg_lightning.config.schema import DataConfig
from medseg_lightning.data.check import PreparedDataset, prepare_dataset
from medseg_lightning.data.dataset import CaseDataset, ForegroundBalancedSampler, SliceDataset, collate_cases
from medseg_lightning.data.transforms import build_augmentation


class SegmentationDataModule(pl.LightningDataModule):
    """Wires manifest, splits, cache, datasets and loaders from a :class:`DataConfig`.

    ``prepare_data`` (one process per node) checks every case and fills the cache, failing with the full list of
    problems before any training step; ``setup`` (every process) reads the cache back, memory-mapped.
    """

    def __init__(self, config: DataConfig, seed: int = 0, cache_dir: Path | None = None) -> None:
        super().__init__()
        self.config = config
        self.seed = seed
        self.cache_dir = cache_dir
        self.dataset: PreparedDataset | None = None
        self.augment = build_augmentation(config.augmentation)  # fail on bad transforms before preparing data

    @property
    def in_channels(self) -> int:
        """Network input channels: modalities x (2 * context + 1) slices."""
        assert self.dataset is not None, "call setup() first"
        return int(self.dataset.cases[0].image.shape[1]) * (2 * self.config.slicing.context + 1)

    def prepare_data(self) -> None:
        if self.dataset is None:  # already checked when set up before the Trainer existed
            prepare_dataset(self.config, self.cache_dir).raise_for_problems()

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = prepare_dataset(self.config, self.cache_dir)
            self.dataset.raise_for_problems()

    def _loader(self, dataset: Any, **kwargs: Any) -> DataLoader:
        loader = self.config.loader
        workers = loader.num_workers
        pin = torch.cuda.is_available() if loader.pin_memory is None else loader.pin_memory
        return DataLoader(dataset, num_workers=workers, pin_memory=pin,
                          persistent_workers=loader.persistent_workers and workers > 0, **kwargs)

    def split_counts(self) -> dict[str, int]:
        """Number of cases per split."""
        assert self.dataset is not None, "call setup() first"
        return {split: len(self.dataset.split(split)) for split in ("train", "val", "test")}

    def train_dataset(self, augment: bool = True) -> SliceDataset:
        assert self.dataset is not None, "call setup() first"
        return SliceDataset(self.dataset.split("train"), self.config.slicing.context, self.augment if augment else None)

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset()
        if len(dataset) == 0:
            raise ValueError("the train split is empty; check data.split")
        sampler = ForegroundBalancedSampler(dataset.foreground, self.config.slicing.background_fraction, self.seed)
        return self._loader(dataset, batch_size=self.config.loader.batch_size, sampler=sampler, drop_last=False)

    def case_dataloader(self, split: str) -> DataLoader:
        """Whole cases of ``split``, one per batch item, in a stable order."""
        assert self.dataset is not None, "call setup() first"
        dataset = CaseDataset(self.dataset.split(split), self.config.slicing.context)
        return self._loader(dataset, batch_size=1, shuffle=False, collate_fn=collate_cases)

    def val_dataloader(self) -> DataLoader:
        return self.case_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.case_dataloader("test")
