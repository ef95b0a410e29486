"""The same small study with and without pruning: the compute each used and the best value each found.

Both studies run the quickstart experiment (embedded data) with the same TPE seed and search space, one trial at
a time, into a temporary MLflow store and Optuna storage; the only difference is the pruner (median after the
first epochs, versus none). Compute is counted in trial-epochs (epochs actually trained) and wall time.

Run from the repository root::

    python benchmarks/sweep_pruning.py [--trials 6] [--epochs 4] [--limit-train-batches 0.5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

from medseg_lightning.sweep.session import run_sweep

REPO = Path(__file__).resolve().parents[1]
SPACE = {
    "optimizer.lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
    "model.arch": {"type": "categorical", "choices": ["unet", "fcn"]},
    "loss.name": {"type": "categorical", "choices": ["dice_ce", "focal"]},
}


def study(folder: Path, name: str, pruner: dict, args: argparse.Namespace) -> dict[str, float]:
    sweep = {"experiment": str(REPO / "experiments" / "quickstart.yaml"), "n_trials": args.trials,
             "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 2}, "pruner": pruner, "space": SPACE,
             "overrides": {"trainer.max_epochs": args.epochs, "trainer.limit_train_batches": args.limit_train_batches,
                           "tracking.log_overlays": 0, "tracking.log_model": False}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    started = time.perf_counter()
    outcome = run_sweep(path, root=folder)
    seconds = time.perf_counter() - started
    trials = outcome.study.trials
    return {"trials": len(trials), "pruned": sum(t.state.name == "PRUNED" for t in trials),
            "trial_epochs": sum(t.user_attrs.get("epochs", 0) for t in trials), "seconds": seconds,
            "best": outcome.study.best_value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--limit-train-batches", type=float, default=0.5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        results = {
            "no pruning": study(folder, "plain", {"name": "none"}, args),
            "median pruning": study(folder, "pruned", {"name": "median", "n_startup_trials": 2,
                                                       "n_warmup_steps": 1}, args),
        }
    print(f"\nquickstart, TPE seed 0, {args.trials} trials x up to {args.epochs} epochs "
          f"(limit_train_batches {args.limit_train_batches})")
    print(f"{'study':<16}{'pruned':>8}{'trial-epochs':>14}{'wall s':>10}{'best val/dice':>15}")
    for name, row in results.items():
        print(f"{name:<16}{row['pruned']:>8}{row['trial_epochs']:>14}{row['seconds']:>10.0f}{row['best']:>15.4f}")
    plain, pruned = results["no pruning"], results["median pruning"]
    print(f"compute with pruning: {pruned['trial_epochs'] / plain['trial_epochs']:.2f}x the trial-epochs, "
          f"{pruned['seconds'] / plain['seconds']:.2f}x the wall time")


if __name__ == "__main__":
    main()
