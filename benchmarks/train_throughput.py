"""Training throughput of `medseg train`'s loop under its speed options, against today's default, in one process.

Every variant runs the same Lightning loop (``SegmentationModule``, MLflow logger, slice metrics) on the same
network, initial weights and batches (real quickstart slices held in memory): the default (float32, eager,
contiguous memory), ``trainer.channels_last``, ``trainer.compile`` (``torch.compile`` of the network; its
compilation falls in the warm-up steps and is reported apart) and bfloat16 autocast (``trainer.precision:
bf16-mixed``, which ``precision: auto`` picks only where the hardware computes in bfloat16). The variants take turns
in every round, so machine noise hits them alike; the median step time is reported with its ratio to the default.

Run from the repository root::

    python benchmarks/train_throughput.py [--steps 30] [--repeats 2] [--variants default channels-last compile bf16]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_step_overhead import Settings, lightning_loop, prepare

VARIANTS = {"default": Settings(), "channels-last": Settings(channels_last=True), "compile": Settings(compile=True),
            "bf16": Settings(precision="bf16-mixed")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", type=Path, default=Path("experiments/quickstart.yaml"))
    parser.add_argument("--encoder", default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    names = ["default", *[name for name in args.variants if name != "default"]]
    config, batches, initial = prepare(args.experiment, args.encoder, args.batch_size, args.steps)
    steps: dict[str, list[float]] = {name: [] for name in names}
    first_round: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.repeats):
            for name in names:
                started = time.perf_counter()
                steps[name] += lightning_loop(copy.deepcopy(initial), batches, config, Path(tmp), VARIANTS[name])
                if round_index == 0:
                    first_round[name] = time.perf_counter() - started
    base = statistics.median(steps["default"])
    print(f"{config.model.arch}/{config.model.encoder}, batch {config.data.loader.batch_size}x"
          f"{tuple(batches[0]['image'].shape[1:])}, {len(steps['default'])} timed steps per variant, "
          f"{torch.get_num_threads()} threads, median step")
    for name in names:
        median = statistics.median(steps[name])
        print(f"{name:<14} {median * 1000:8.1f} ms/step  {base / median:5.2f}x the default's throughput  "
              f"(first round incl. warm-up: {first_round[name]:.0f} s)")


if __name__ == "__main__":
    main()
