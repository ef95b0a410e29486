"""Time per training step: `medseg train`'s Lightning loop versus a plain PyTorch loop, in one process.

Both loops train the same network (same initial weights), with the same loss, optimiser and batches (real
quickstart slices, held in memory so data loading is identical and excluded). The Lightning side is the real
thing: ``SegmentationModule`` with its logging and slice metrics, an MLflow logger writing to a temporary store,
checkpointing off. The step time is the median interval between consecutive batch starts after a warm-up, so
everything the loop does per step counts. The training settings that change the arithmetic (channels-last
memory, ``torch.compile``, bfloat16 autocast) are applied to both sides alike. Target: ratio <= 1.05.

Run from the repository root::

    python benchmarks/train_step_overhead.py [--steps 60] [--encoder resnet18] [--batch-size 32]
        [--channels-last] [--compile] [--precision bf16-mixed]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import MLFlowLogger
from torch.utils.data import DataLoader

from medseg_lightning.config import load_config
from medseg_lightning.config.schema import ExperimentConfig
from medseg_lightning.data.datamodule import SegmentationDataModule
from medseg_lightning.inference.bundle import build_network
from medseg_lightning.training.losses import create_loss
from medseg_lightning.training.segmentation_module import SegmentationModule

WARMUP = 5


@dataclass(frozen=True)
class Settings:
    """What both loops do alike: memory format, compilation and precision."""

    channels_last: bool = False
    compile: bool = False
    precision: str = "32-true"

    def label(self) -> str:
        parts = [*(["channels-last"] if self.channels_last else []), *(["compile"] if self.compile else []),
                 *([self.precision] if self.precision != "32-true" else [])]
        return ", ".join(parts) or "default (float32, eager, contiguous)"


class StepTimer(pl.Callback):
    """Timestamps of every batch start; the last one is taken at the end of training."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_start(self, *args: object) -> None:
        self.stamps.append(time.perf_counter())

    def on_train_end(self, *args: object) -> None:
        self.stamps.append(time.perf_counter())


def _intervals(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps[WARMUP:], stamps[WARMUP + 1 :], strict=False)]


def plain_loop(network: torch.nn.Module, batches: list[dict], config: ExperimentConfig,
               settings: Settings = Settings()) -> list[float]:
    loss_fn = create_loss(config.loss.name, config.data.num_classes)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.optimizer.lr,
                                  weight_decay=config.optimizer.weight_decay)
    network.train()
    memory = torch.channels_last if settings.channels_last else torch.contiguous_format
    network = network.to(memory_format=memory)
    forward = torch.compile(network) if settings.compile else network
    autocast = settings.precision.startswith("bf16")
    stamps = []
    for batch in batches:
        stamps.append(time.perf_counter())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(forward(batch["image"].contiguous(memory_format=memory)), batch["mask"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    stamps.append(time.perf_counter())
    return _intervals(stamps)


def lightning_loop(
    network: torch.nn.Module, batches: list[dict], config: ExperimentConfig, store: Path,
    settings: Settings = Settings()
) -> list[float]:
    module = SegmentationModule(network, create_loss(config.loss.name, config.data.num_classes),
                                config.data.labels, config.optimizer.model_copy(update={"scheduler": "none"}),
                                channels_last=settings.channels_last, compile_network=settings.compile)
    timer = StepTimer()
    logger = MLFlowLogger(experiment_name="bench", tracking_uri=f"sqlite:///{store / 'mlflow.db'}",
                          artifact_location=(store / "artifacts").as_uri())
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=logger, callbacks=[timer],
                         precision=settings.precision,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=config.trainer.log_every_n_steps, num_sanity_val_steps=0,
                         limit_val_batches=0)
    loader = DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    return _intervals(timer.stamps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", type=Path, default=Path("experiments/quickstart.yaml"))
    parser.add_argument("--encoder", default=None, help="override model.encoder")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2, help="alternate plain/lightning this many times")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (both loops)")
    parser.add_argument("--precision", default="32-true", help="32-true or bf16-mixed (autocast, both loops)")
    args = parser.parse_args()
    settings = Settings(args.channels_last, args.compile, args.precision)
    config, batches, initial = prepare(args.experiment, args.encoder, args.batch_size, args.steps)
    plain: list[float] = []
    lightning: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):  # alternate so machine noise hits both sides alike
            plain += plain_loop(copy.deepcopy(initial), batches, config, settings)
            lightning += lightning_loop(copy.deepcopy(initial), batches, config, Path(tmp), settings)
    p, lt = statistics.median(plain), statistics.median(lightning)
    print(f"{config.model.arch}/{config.model.encoder}, batch {config.data.loader.batch_size}x"
          f"{tuple(batches[0]['image'].shape[1:])}, {len(plain)} timed steps each, {torch.get_num_threads()} threads, "
          f"{settings.label()}")
    print(f"plain PyTorch loop : {p * 1000:8.1f} ms/step (median)")
    print(f"medseg (Lightning) : {lt * 1000:8.1f} ms/step (median)")
    print(f"ratio              : {lt / p:8.3f}  (target <= 1.05)")


def prepare(experiment: Path, encoder: str | None, batch_size: int | None,
            steps: int) -> tuple[ExperimentConfig, list[dict], torch.nn.Module]:
    """The experiment's config, ``steps`` real training batches held in memory, and the initial network."""
    overrides = ["data.augmentation.preset=none", "data.loader.num_workers=0"]
    if encoder:
        overrides.append(f"model.encoder={encoder}")
    if batch_size:
        overrides.append(f"data.loader.batch_size={batch_size}")
    config = load_config(experiment, overrides)
    torch.manual_seed(0)
    datamodule = SegmentationDataModule(config.data, seed=config.seed)
    datamodule.setup("fit")
    loader = DataLoader(datamodule.train_dataset(augment=False), batch_size=config.data.loader.batch_size,
                        shuffle=True, drop_last=True)
    batches = [batch for _, batch in zip(range(steps + WARMUP + 1), _cycle(loader), strict=False)]
    return config, batches, build_network(config, datamodule.in_channels)


def _cycle(loader: DataLoader) -> Iterator[dict]:
    while True:
        yield from loader


if __name__ == "__main__":
    main()
