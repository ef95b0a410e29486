"""Does annotating the most uncertain cases first beat annotating at random? A simulated active-learning study.

Fold 0 of the experiment's split fixes a validation split (it picks each model's best epoch) and a test split (it
scores every model, once each); the other subjects are the pool whose labels are "not yet drawn". The study
starts from ``--start`` random pool subjects, trains, and in each of ``--rounds`` rounds adds ``--step`` subjects
chosen by each strategy from the model of the previous round:

- ``uncertainty``: the highest ``entropy_structure`` (mean entropy inside the predicted structure, with flip
  TTA: what ``medseg triage`` ranks by);
- ``random``: uniformly at random;
- ``foreground_random``: at random with probability proportional to the predicted structure's volume, the
  case-level form of nnActive's foreground-aware random baseline (Luth et al., 2024), which keeps random draws
  from wasting labels on cases with little structure.

Every model is a ``medseg train`` run with ``trainer.evaluate_test`` on, so each test look is recorded as usual.
The starting set is shared by the strategies. Results are kept in ``OUT/results.json`` after every training, so
an interrupted study continues where it stopped. One seed: a hint, not a result. Run from the repository root::

    MEDSEG_DATA_ROOT=../shared/data python benchmarks/active_learning.py --data experiments/hippocampus_unet.yaml \\
        --out benchmarks/results/active_learning [--start 20 --step 10 --rounds 3 --epochs 8]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from medseg_lightning.config import load_config
from medseg_lightning.config.schema import ExperimentConfig
from medseg_lightning.data.check import prepare_dataset
from medseg_lightning.evaluation.evaluate import load_model
from medseg_lightning.inference.inputs import PredictInput, load_input
from medseg_lightning.inference.predict import Predictor
from medseg_lightning.inference.uncertainty import case_uncertainty
from medseg_lightning.training.train import run

STRATEGIES = ("uncertainty", "random", "foreground_random")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="experiment YAML (an MSD-style dataset folder)")
    parser.add_argument("--out", type=Path, required=True, help="folder for manifests, splits, results and plot")
    parser.add_argument("--start", type=int, default=20, help="labelled subjects before the first round")
    parser.add_argument("--step", type=int, default=10, help="subjects added per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of selection")
    parser.add_argument("--epochs", type=int, default=8, help="trainer.max_epochs of every training")
    parser.add_argument("--seed", type=int, default=0, help="the starting set and the random strategies")
    parser.add_argument("--plot", type=Path, help="also write the plot here (default: OUT/active_learning.png)")
    args = parser.parse_args()

    base = load_config(args.data, [f"trainer.max_epochs={args.epochs}", "trainer.evaluate_test=true"])
    args.out.mkdir(parents=True, exist_ok=True)
    dataset = prepare_dataset(base.data)
    dataset.raise_for_problems()
    subject_of = {case.case.case_id: case.case.subject_id for case in dataset.cases}
    subjects = {split: sorted({subject_of[case.case.case_id] for case in dataset.split(split)})
                for split in ("train", "val", "test")}
    if len(base.data.image_columns) != 1:
        sys.exit("this study handles one-modality datasets (a manifest with an image and a mask column)")
    manifest = pd.DataFrame([{"case_id": case.case.case_id, "subject_id": case.case.subject_id,
                              "image": str(case.case.image_paths[0].resolve()),
                              "mask": str(case.case.mask_path.resolve()), **case.case.attributes}
                             for case in dataset.cases])
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    needed = args.start + args.rounds * args.step
    if needed > len(subjects["train"]):
        sys.exit(f"--start {args.start} + --rounds {args.rounds} x --step {args.step} = {needed} subjects, but the "
                 f"pool (fold {base.data.split.fold}'s training subjects) has {len(subjects['train'])}")
    rng = np.random.default_rng(args.seed)
    start = sorted(rng.choice(subjects["train"], size=args.start, replace=False).tolist())
    first = _train(base, start, subjects, manifest, args.out, "start", results, results_path)
    for strategy in STRATEGIES:
        labelled, model = list(start), first
        for round_index in range(1, args.rounds + 1):
            key = f"{strategy}-{round_index}"
            if key not in results:
                pool = [subject for subject in subjects["train"] if subject not in labelled]
                picked = _choose(strategy, pool, args.step, model, manifest,
                                 np.random.default_rng([args.seed, round_index, STRATEGIES.index(strategy)]))
                labelled = sorted(labelled + picked)
            else:
                labelled = results[key]["labelled"]
            model = _train(base, labelled, subjects, manifest, args.out, key, results, results_path)
    _report(results, args, subjects)


def _train(base: ExperimentConfig, labelled: list[str], subjects: dict[str, list[str]], manifest: pd.DataFrame,
           out: Path, key: str, results: dict, results_path: Path) -> str:
    """Trains on ``labelled`` (or finds the finished training in ``results``); returns its model URI."""
    if key in results:
        return results[key]["model"]
    chosen = set(labelled) | set(subjects["val"]) | set(subjects["test"])
    subset = manifest[manifest["subject_id"].isin(chosen)]
    manifest_path, split_path = out / f"{key}_manifest.csv", out / f"{key}_split.csv"
    subset.to_csv(manifest_path, index=False)
    split_of = {**dict.fromkeys(labelled, "train"), **dict.fromkeys(subjects["val"], "val"),
                **dict.fromkeys(subjects["test"], "test")}
    pd.DataFrame({"subject_id": list(split_of), "split": list(split_of.values())}).to_csv(split_path, index=False)
    config = base.model_copy(update={"data": base.data.model_copy(update={
        "source": manifest_path, "split": base.data.split.model_copy(update={"method": "file", "file": split_path})})})
    config = config.model_copy(update={"tracking": config.tracking.model_copy(update={
        "experiment_name": f"{base.name}-active-learning", "run_name": key})})
    with contextlib.redirect_stdout(sys.stderr):  # training's progress stays out of the report on stdout
        result = run(config)
    results[key] = {"labelled": labelled, "n_labelled": len(labelled), "model": f"runs:/{result.run_id}",
                    "test_dice": result.metrics.get("test/dice"),
                    "test_dice_ci": [result.metrics.get("test/dice/mean_ci_low"),
                                     result.metrics.get("test/dice/mean_ci_high")],
                    "val_dice": result.metrics.get("val/dice")}
    results_path.write_text(json.dumps(results, indent=1))
    print(f"{key}: {len(labelled)} labelled, test Dice {results[key]['test_dice']:.4f}", file=sys.stderr)
    return results[key]["model"]


def _choose(strategy: str, pool: list[str], count: int, model: str, manifest: pd.DataFrame,
            rng: np.random.Generator) -> list[str]:
    if strategy == "random":
        return rng.choice(pool, size=count, replace=False).tolist()
    predictor = Predictor([load_model(model, Path.cwd())], tta=True)
    scores, volumes = {}, {}
    rows = manifest[manifest["subject_id"].isin(pool)]
    for row in rows.itertuples():  # a subject's score: the mean over its cases; its volume: their sum
        case = PredictInput(str(row.case_id), [Path(row.image)], "nifti")
        volume, _ = load_input(case)
        result = predictor.segment_with_uncertainty(volume, case.name)
        score = case_uncertainty(result.labels, result.entropy, result.member_labels)["entropy_structure"]
        scores.setdefault(row.subject_id, []).append(_finite(score))
        volumes[row.subject_id] = volumes.get(row.subject_id, 0.0) + float((result.labels > 0).sum())
    if strategy == "uncertainty":
        ranked = sorted(pool, key=lambda subject: -float(np.mean(scores[subject])))
        return ranked[:count]
    weights = np.array([volumes[subject] for subject in pool]) + 1.0
    return rng.choice(pool, size=count, replace=False, p=weights / weights.sum()).tolist()


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.inf  # nothing predicted: the least known case


def _report(results: dict, args: argparse.Namespace, subjects: dict[str, list[str]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    print(f"test Dice on {len(subjects['test'])} fixed test subjects (95% bootstrap interval over cases); pool "
          f"{len(subjects['train'])} subjects, validation {len(subjects['val'])}; {args.epochs} epochs, "
          f"seed {args.seed}")
    print(f"{'labelled':>8}  " + "  ".join(f"{strategy:>26}" for strategy in STRATEGIES))
    figure, axis = plt.subplots(figsize=(5.2, 3.6))
    for strategy in STRATEGIES:
        keys = ["start"] + [f"{strategy}-{index}" for index in range(1, args.rounds + 1)]
        found = [results[key] for key in keys if key in results]
        x = [item["n_labelled"] for item in found]
        y = [item["test_dice"] for item in found]
        low = [item["test_dice"] - item["test_dice_ci"][0] for item in found]
        high = [item["test_dice_ci"][1] - item["test_dice"] for item in found]
        axis.errorbar(x, y, yerr=[low, high], marker="o", capsize=3, label=strategy.replace("_", " "))
    for index in range(args.rounds + 1):
        keys = ["start"] * len(STRATEGIES) if index == 0 else [f"{s}-{index}" for s in STRATEGIES]
        cells = [results.get(key) for key in keys]
        count = next((cell["n_labelled"] for cell in cells if cell), args.start + index * args.step)
        print(f"{count:>8}  " + "  ".join(
            f"{_interval(cell):>26}" if cell else f"{'not trained':>26}" for cell in cells))
    axis.set_xlabel("labelled subjects")
    axis.set_ylabel("test Dice (mean over cases)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    plot = args.plot or args.out / "active_learning.png"
    plot.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(plot, dpi=110, bbox_inches="tight")
    print(f"plot: {plot.name}")


def _interval(cell: dict) -> str:
    low, high = cell["test_dice_ci"]
    return f"{cell['test_dice']:.4f} [{low:.4f}, {high:.4f}]"


if __name__ == "__main__":
    main()
