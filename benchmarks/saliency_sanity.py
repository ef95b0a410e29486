"""The weight-randomisation sanity check (Adebayo et al., 2018) of medseg's saliency maps, on real cases.

A saliency method is only an explanation of *the model* if its maps change when the model's weights are
replaced by random ones. For each of the first ``--cases`` test cases of an experiment this computes the maps of
the trained model and of the same architecture with every layer re-initialised (three random draws), on the
slices of the trained model's predicted structure, and prints the Spearman rank correlation between them: near
1 means the map would look the same for a model that learnt nothing (it shows the image or the architecture);
near 0 or below, the map depends on what was learnt. Integrated gradients is also compared with the image's
own intensities, the usual reason such a method fails.

Run from the repository root, with the data the experiment reads::

    MEDSEG_DATA_ROOT=../shared/data python benchmarks/saliency_sanity.py \
        --data experiments/hippocampus_unet.yaml --experiment hippocampus_unet [--cases 10]

``--experiment`` takes the latest finished training run of that MLflow experiment that logged a model;
``--model`` names one (``runs:/ID``, ``models:/NAME@ALIAS`` or a saved folder) instead.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from medseg_lightning import tracking
from medseg_lightning.config import load_config
from medseg_lightning.data.datamodule import SegmentationDataModule
from medseg_lightning.data.dataset import CaseDataset
from medseg_lightning.evaluation.evaluate import evaluation_config, load_model
from medseg_lightning.inference.saliency import METHODS, rank_similarity, saliency_maps
from medseg_lightning.tracking.sweep import PARENT_TAG

RANDOM_DRAWS = 3


def randomised(network: torch.nn.Module, seed: int) -> torch.nn.Module:
    copied = copy.deepcopy(network)
    torch.manual_seed(seed)
    for module in copied.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return copied.eval()


def latest_model(experiment: str, root: Path) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.resolve_store_from_env(root)[0])
    found = client.get_experiment_by_name(experiment)
    if found is None:
        sys.exit(f"no MLflow experiment {experiment!r} in the store")
    for run in client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"]):
        if "medseg.kind" not in run.data.tags and PARENT_TAG not in run.data.tags:  # a top-level training run
            return f"runs:/{run.info.run_id}"
    sys.exit(f"no finished training run in {experiment!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="experiment YAML whose test cases to explain")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="runs:/ID, models:/NAME@ALIAS or a saved model folder")
    source.add_argument("--experiment", help="the latest finished training run of this MLflow experiment")
    parser.add_argument("--cases", type=int, default=10, help="test cases to explain")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    args = parser.parse_args()

    root = tracking.project_root(Path.cwd())
    bundle = load_model(args.model or latest_model(args.experiment, root), root)
    config = evaluation_config(load_config(args.data), bundle.config)
    datamodule = SegmentationDataModule(config.data, seed=config.seed)
    datamodule.setup()
    dataset = CaseDataset(datamodule.dataset.split(args.split)[: args.cases], config.data.slicing.context)
    network = bundle.network.eval()
    randoms = [randomised(network, seed) for seed in range(RANDOM_DRAWS)]
    against_random: dict[str, list[float]] = {method: [] for method in METHODS}
    with_image: list[float] = []
    for item in dataset:
        with torch.no_grad():
            region = network(item["image"]).argmax(1).numpy()
        rows = (region > 0).reshape(len(region), -1).any(1)
        if not rows.any():
            continue
        trained = saliency_maps(network, item["image"][rows], region[rows]).maps
        for random in randoms:
            maps = saliency_maps(random, item["image"][rows], region[rows]).maps
            for method in METHODS:
                against_random[method].append(rank_similarity(trained[method], maps[method]))
        centre = config.data.slicing.context * len(config.data.image_columns)
        intensity = np.abs(item["image"][rows, centre].numpy())
        with_image.append(rank_similarity(trained["integrated_gradients"], intensity))
    cases = len(with_image)
    print(f"{cases} {args.split} case(s) with a predicted structure, {RANDOM_DRAWS} random draws each; Spearman "
          "rank correlation of the trained model's map with ...")
    print(f"{'method':<22} {'randomised weights':>20} {'range':>18}")
    for method, values in against_random.items():
        print(f"{method:<22} {statistics.mean(values):>20.3f} {f'[{min(values):.3f}, {max(values):.3f}]':>18}")
    print(f"{'integrated_gradients':<22} {statistics.mean(with_image):>20.3f}   (with |image intensity|)")


if __name__ == "__main__":
    main()
