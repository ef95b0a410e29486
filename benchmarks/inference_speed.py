"""Volumes per second: `medseg predict`'s segmenter against a naive per-slice loop and MONAI's sliding window.

Two comparisons, both printed: on the *same network* (MONAI's inferer given medseg's inference copy, and medseg
given the plain network), which isolates what batching and re-stacking cost; and *end to end*, each side as one
would run it: ``medseg predict`` (its inference copy) against MONAI's usual path (the plain network). All use the
same weights and the same volumes (already read into memory, so file I/O is excluded alike),
and all three normalise the intensities the way the model was trained:

- medseg: ``Predictor.segment`` (preprocessing, slices batched ``inference_batch_size`` at a time, re-stacking),
  on its inference copy of the network (BatchNorm folded into the convolutions, channels-last memory);
- medseg, plain network: the same without that copy, to separate batching from the network optimisations;
- naive: the same preprocessing, then one slice per forward pass;
- MONAI: ``sliding_window_inference`` over the case's slices at their native in-plane size with the training
  size as the window (``sw_batch_size`` = the same batch size), as one would run a 2D network with MONAI;
- MONAI, folded network: the same inferer on medseg's inference copy (channels-last inputs), the same network as
  ``medseg predict`` runs.

Run from the repository root (needs the MSD hippocampus data and MONAI, in the dev extra)::

    MEDSEG_DATA_ROOT=../shared/data python benchmarks/inference_speed.py [--cases 40] [--model runs:/ID]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from medseg_lightning.config import load_config
from medseg_lightning.data.cache import preprocess_case
from medseg_lightning.data.io import Volume, read_image
from medseg_lightning.data.preprocess import normalize_intensity, restore_volume, to_slices
from medseg_lightning.inference.bundle import ModelBundle, build_network
from medseg_lightning.inference.predict import Predictor


def naive(bundle: ModelBundle) -> Callable[[Volume], np.ndarray]:
    config = bundle.config.data

    @torch.inference_mode()
    def segment(volume: Volume) -> np.ndarray:
        slices, _, _, meta = preprocess_case(volume, None, config)
        labels = [bundle.network(torch.from_numpy(np.ascontiguousarray(s[None], dtype=np.float32))).argmax(1)[0]
                  for s in slices]
        return restore_volume(torch.stack(labels).to(torch.uint8).numpy(), meta)

    return segment


def monai_window(bundle: ModelBundle, batch_size: int,
                 network: torch.nn.Module | None = None) -> Callable[[Volume], np.ndarray]:
    """MONAI's sliding window over the slices; ``network`` replaces the bundle's (channels-last inputs then)."""
    from monai.inferers import sliding_window_inference

    config = bundle.config.data
    if network is None:
        forward = bundle.network
    else:
        def forward(batch: torch.Tensor) -> torch.Tensor:
            return network(batch.contiguous(memory_format=torch.channels_last))
    roi = tuple(config.preprocessing.target_size or (64, 64))

    @torch.inference_mode()
    def segment(volume: Volume) -> np.ndarray:
        settings = config.preprocessing.intensity_for(volume.array.shape[0])
        image = normalize_intensity(np.asarray(volume.array), settings)
        slices = torch.from_numpy(np.ascontiguousarray(to_slices(image, config.slicing.axis, channels_first=True),
                                                       dtype=np.float32))
        logits = sliding_window_inference(slices, roi, batch_size, forward, overlap=0.25)
        labels = logits.argmax(1).to(torch.uint8).numpy()
        return np.moveaxis(labels, 0, config.slicing.axis)

    return segment


def time_methods(methods: dict[str, Callable[[Volume], np.ndarray]], volumes: list[Volume],
                 repeats: int) -> dict[str, float]:
    """Median over repeats of the seconds each method takes for every volume; the methods take turns within
    each repeat, so drift in the machine's load hits all of them alike."""
    for segment in methods.values():
        for volume in volumes[:3]:  # warm-up: allocator, kernels
            segment(volume)
    runs: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, segment in methods.items():
            started = time.perf_counter()
            for volume in volumes:
                segment(volume)
            runs[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", type=Path, default=Path("experiments/hippocampus_unet.yaml"))
    parser.add_argument("--model", help="runs:/ID, models:/NAME@ALIAS or a folder; default: untrained weights")
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = load_config(args.experiment)
    if args.model:
        from medseg_lightning.evaluation.evaluate import load_model

        bundle = load_model(args.model, Path.cwd())
    else:
        torch.manual_seed(0)
        bundle = ModelBundle(build_network(config, 1).eval(), config, 1)  # speed does not depend on the weights
    folder = Path(os.environ["MEDSEG_DATA_ROOT"]) / "hippocampus" / "imagesTr"
    paths = sorted(folder.glob("*.nii.gz"))[: args.cases]
    volumes = [read_image([path]) for path in paths]
    predictor = Predictor([bundle], tta=False, largest_component=False, device="cpu")
    plain = Predictor([bundle], tta=False, largest_component=False, device="cpu", optimize=False)
    methods = {"medseg predict": lambda volume: predictor.segment(volume, "case"),
               "medseg, plain network": lambda volume: plain.segment(volume, "case"), "naive per-slice": naive(bundle),
               "MONAI sliding window": monai_window(bundle, predictor.batch_size),
               "MONAI, folded network": monai_window(bundle, predictor.batch_size, predictor.networks[0])}
    seconds = time_methods(methods, volumes, args.repeats)
    slices = sum(volume.array.shape[1 + config.data.slicing.axis] for volume in volumes)
    print(f"{bundle.config.model.arch}/{bundle.config.model.encoder}, {len(volumes)} hippocampus volumes "
          f"({slices} slices), batch {predictor.batch_size}, {torch.get_num_threads()} threads, median of "
          f"{args.repeats}")
    for name, value in seconds.items():
        print(f"{name:<23}{len(volumes) / value:8.1f} volumes/s")
    ours, monai = seconds["medseg predict"], seconds["MONAI sliding window"]
    print("same network:")
    print(f"  folded: medseg vs MONAI   {seconds['MONAI, folded network'] / ours:.2f}x")
    print(f"  plain:  medseg vs MONAI   {monai / seconds['medseg, plain network']:.2f}x")
    print("end to end (medseg predict's folded network vs MONAI's usual path, the plain network):")
    print(f"  medseg vs MONAI           {monai / ours:.2f}x")
    print(f"medseg vs naive per-slice:  {seconds['naive per-slice'] / ours:.2f}x  (target >= 2)")


if __name__ == "__main__":
    main()
