"""Mask R-CNN training-step time against the feature pyramid's width (``model.fpn_channels``).

torchvision's Mask R-CNN heads are 256 channels wide whatever the pyramid; medseg's heads follow the pyramid
(``models/mask_rcnn.roi_heads``), so a narrow pyramid for small medical slices also narrows the mask head's four
3x3 convolutions over every positive region, which dominate a CPU step. This script times one optimiser step
(forward, backward, AdamW) of the same network at each width, on the same batch of slices with a few touching
square objects, in one process, and prints the medians and the ratio against the first width.

Run from the repository root::

    python benchmarks/mask_rcnn_width.py
    python benchmarks/mask_rcnn_width.py --encoder resnet18 --size 64 --batch 8 --widths 256 128 64 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from medseg_lightning.models.mask_rcnn import anchor_sizes_for, create_mask_rcnn


def synthetic_batch(batch: int, size: int, objects: int) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Noise images, each with ``objects`` touching squares of side size/5 in a row: boxes, labels and masks."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 1, size, size, generator=generator)
    side = max(4, size // 5)
    targets = []
    for _ in range(batch):
        masks = torch.zeros(objects, size, size, dtype=torch.uint8)
        boxes = []
        for k in range(objects):
            x, y = 2 + k * side, size // 3
            masks[k, y : y + side, x : x + side] = 1
            boxes.append([x, y, x + side, y + side])
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                        "labels": torch.ones(objects, dtype=torch.int64), "masks": masks})
    return images, targets


def step_seconds(width: int, encoder: str, size: int, images: torch.Tensor, targets: list[dict[str, torch.Tensor]],
                 warmup: int, repeats: int) -> float:
    """Median seconds of one training step at pyramid width ``width``."""
    torch.manual_seed(0)
    network = create_mask_rcnn(encoder, 1, 2, (size, size), anchor_sizes_for([size / 5.0] * 10, (size, size)),
                               fpn_channels=width)
    network.train()
    optimiser = torch.optim.AdamW(network.parameters(), 1e-4)
    times = []
    for index in range(warmup + repeats):
        start = time.perf_counter()
        loss = sum(network(images, targets).values())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--size", type=int, default=64, help="slice side in pixels")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--objects", type=int, default=4, help="objects per slice")
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 64])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images, targets = synthetic_batch(args.batch, args.size, args.objects)
    print(f"{args.encoder}, {args.batch} slices of {args.size}x{args.size}, {args.objects} objects each, "
          f"{args.threads} thread(s); median of {args.repeats} steps")
    baseline = None
    for width in args.widths:
        seconds = step_seconds(width, args.encoder, args.size, images, targets, args.warmup, args.repeats)
        baseline = baseline or seconds
        print(f"  fpn_channels {width:4d}: {seconds:6.2f} s/step  ({baseline / seconds:.2f}x the first width)")


if __name__ == "__main__":
    main()
