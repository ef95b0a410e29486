"""Cold versus warm preprocessing cache: the time of one full pass over the training data, as a user feels it.

A pass is what ``medseg train`` does before and during its first epoch on the data side: build the data module,
``setup()`` (manifest, splits, file digests, and per case either NIfTI decoding + checks + preprocessing into the
cache, or loading the cached entry memory-mapped), then iterate every training slice through ``SliceDataset``
with a ``DataLoader`` (``num_workers=0``, the config's batch size, sequential order). Augmentation is switched off
(``data.augmentation.preset=none``) so the pass measures data access, not random transforms.

* cold: a fresh, empty temporary cache dir, so every case is decoded, checked and preprocessed;
* warm: the same pass again in the same process on the cache the cold pass filled, with a new data module (and so
  a new ``PreprocessCache``): nothing is remembered in memory, only on disk.

Each of ``--repeats`` rounds uses its own temporary cache dir (one cold pass, then one warm pass); the medians are
reported. The OS page cache is not dropped, so from the second round on the NIfTI files are read from memory: the
cold time is decoding and preprocessing, not disk speed.

Run from the repository root::

    MEDSEG_DATA_ROOT=/path/to/data python benchmarks/cache_speed.py
    python benchmarks/cache_speed.py --experiment experiments/quickstart.yaml --repeats 5 --json cache.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from medseg_lightning.config import ConfigError, load_config
from medseg_lightning.config.schema import DataConfig
from medseg_lightning.data.check import DataCheckError
from medseg_lightning.data.datamodule import SegmentationDataModule

DEFAULT_EXPERIMENT = "experiments/hippocampus_unet.yaml"
NO_AUGMENTATION = "data.augmentation.preset=none"
TARGET_SPEEDUP = 5.0


@dataclass
class PassTiming:
    """One full data pass: seconds spent preparing (setup) and iterating, and what was iterated."""

    prepare_s: float
    iterate_s: float
    cases: int
    slices: int
    batches: int

    @property
    def total_s(self) -> float:
        return self.prepare_s + self.iterate_s


def data_pass(config: DataConfig, seed: int, cache_dir: Path) -> PassTiming:
    """Prepares the dataset against ``cache_dir`` and iterates every training sample once."""
    start = time.perf_counter()
    module = SegmentationDataModule(config, seed=seed, cache_dir=cache_dir)
    module.setup("fit")
    dataset = module.train_dataset()
    prepared = time.perf_counter()
    loader = DataLoader(dataset, batch_size=config.loader.batch_size, shuffle=False, num_workers=0)
    batches = slices = 0
    for batch in loader:
        batches += 1
        slices += int(batch["image"].shape[0])
    done = time.perf_counter()
    timing = PassTiming(prepared - start, done - prepared, len(dataset.cases), slices, batches)
    del loader, dataset, module  # drop the memory maps before the next pass
    gc.collect()
    return timing


def run_rounds(config: DataConfig, seed: int, repeats: int) -> tuple[list[PassTiming], list[PassTiming]]:
    """``repeats`` rounds, each a cold pass into a new temporary cache dir followed by a warm pass on it."""
    cold: list[PassTiming] = []
    warm: list[PassTiming] = []
    for round_number in range(1, repeats + 1):
        with tempfile.TemporaryDirectory(prefix="medseg-cache-bench-") as tmp:
            cache_dir = Path(tmp) / "cache"
            cold.append(data_pass(config, seed, cache_dir))
            warm.append(data_pass(config, seed, cache_dir))
        print(f"  round {round_number}/{repeats}: cold {cold[-1].total_s:.2f} s, warm {warm[-1].total_s:.2f} s",
              file=sys.stderr, flush=True)
    return cold, warm


def median_of(timings: list[PassTiming], attribute: str) -> float:
    return statistics.median(getattr(timing, attribute) for timing in timings)


def summarize(cold: list[PassTiming], warm: list[PassTiming], experiment: str, overrides: list[str]) -> dict[str, Any]:
    """Medians and the cold/warm ratio, plus every individual pass."""
    cold_s, warm_s = median_of(cold, "total_s"), median_of(warm, "total_s")
    return {
        "experiment": experiment,
        "overrides": overrides,
        "repeats": len(cold),
        "cases": cold[0].cases,
        "slices": cold[0].slices,
        "batches": cold[0].batches,
        "cold_s": cold_s,
        "warm_s": warm_s,
        "ratio": cold_s / warm_s if warm_s > 0 else float("inf"),
        "target_ratio": TARGET_SPEEDUP,
        "cold_prepare_s": median_of(cold, "prepare_s"),
        "cold_iterate_s": median_of(cold, "iterate_s"),
        "warm_prepare_s": median_of(warm, "prepare_s"),
        "warm_iterate_s": median_of(warm, "iterate_s"),
        "cold_passes": [asdict(timing) for timing in cold],
        "warm_passes": [asdict(timing) for timing in warm],
    }


def print_report(summary: dict[str, Any]) -> None:
    header = f"{'cases':>6}  {'slices':>7}  {'cold s':>8}  {'warm s':>8}  {'ratio':>7}"
    print(header)
    print("-" * len(header))
    print(f"{summary['cases']:>6}  {summary['slices']:>7}  {summary['cold_s']:>8.2f}  {summary['warm_s']:>8.2f}  "
          f"{summary['ratio']:>6.1f}x")
    print(f"(median of {summary['repeats']}; prepare/iterate: cold {summary['cold_prepare_s']:.2f}/"
          f"{summary['cold_iterate_s']:.2f} s, warm {summary['warm_prepare_s']:.2f}/{summary['warm_iterate_s']:.2f} s)")
    print(f"cache speed-up: {summary['ratio']:.1f}x (target >= {TARGET_SPEEDUP:g}x)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT,
                        help=f"experiment YAML (default {DEFAULT_EXPERIMENT})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, repeatable; applied after the benchmark's own "
                             f"'{NO_AUGMENTATION}'")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of one cold + one warm pass (default 3)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers as JSON to PATH")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = [NO_AUGMENTATION, *args.overrides]
    try:
        config = load_config(args.experiment, overrides)
    except ConfigError as error:
        print(f"error: cannot load {args.experiment}:\n{error}", file=sys.stderr)
        if "environment variable" in str(error):
            print("hint: set it to the folder holding the datasets, e.g. MEDSEG_DATA_ROOT=/path/to/data "
                  "python benchmarks/cache_speed.py", file=sys.stderr)
        return 2
    try:
        cold, warm = run_rounds(config.data, config.seed, args.repeats)
    except DataCheckError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if cold[0].slices == 0:
        print("error: the train split is empty; nothing to measure", file=sys.stderr)
        return 2
    summary = summarize(cold, warm, args.experiment, overrides)
    print_report(summary)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
