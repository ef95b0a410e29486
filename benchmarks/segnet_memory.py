"""Activation memory of SegNet (pool indices) versus U-Net (skip maps) on the same timm encoder.

Per architecture and encoder, on one batch (default 8 x 1 x 256 x 256, 2 classes):

* ``params``: parameter count (encoder + decoder + head).
* ``handoff``: bytes the encoder hands to the decoder: U-Net's float stage maps versus SegNet's uint8 pool codes
  plus the deepest map. This is what the decoder holds on to, by construction.
* ``saved``: bytes of activations autograd saves for backward in one training forward pass, counted with
  ``torch.autograd.graph.saved_tensors_hooks``; each storage once, parameters excluded. Deterministic.
  ``saved dec`` is the part saved after the encoder (decoder and head): the encoder's share is the same for every
  architecture, because each stage map is saved by the next stage's first layer whatever the decoder keeps.
* ``peak no_grad`` / ``peak train``: peak bytes allocated above the starting point during an inference forward
  (``torch.no_grad``) and during forward + backward. On CUDA ``torch.cuda.max_memory_allocated``; on CPU the
  allocation and free events of ``torch.profiler(profile_memory=True)`` replayed in time order.

Run from the repository root::

    python benchmarks/segnet_memory.py
    python benchmarks/segnet_memory.py --encoders resnet34 --batch 4 --size 512 --device cuda
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from medseg_lightning.models import SegmentationModel, create_model
from medseg_lightning.models.segnet import PoolCode

MIB = 2**20


@dataclass
class Row:
    encoder: str
    arch: str
    streams: bool
    params: int
    handoff: int
    saved: int
    saved_decoder: int
    peak_no_grad: int
    peak_train: int


def handoff_bytes(model: SegmentationModel, image: torch.Tensor) -> int:
    """Bytes of what the encoder passes to the decoder (stage maps, or codes + deepest map for SegNet)."""
    with torch.no_grad():
        kept = model.encoder(image, model.decoder.encode_feature)
    total = 0
    for item in kept:
        tensor = item.code if isinstance(item, PoolCode) else item
        total += 0 if tensor is None else tensor.nbytes
    return total


def saved_for_backward_bytes(model: nn.Module, image: torch.Tensor) -> int:
    """Bytes of distinct non-parameter storages autograd saves during one forward pass of ``model``."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(image)
    del output
    return sum(storages.values())


def peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated above the level at the start of ``step``."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def measure(arch: str, encoder: str, args: argparse.Namespace, device: torch.device) -> Row:
    torch.manual_seed(0)
    model = create_model(arch, encoder, args.in_channels, args.num_classes).to(device).train()
    image = torch.randn(args.batch, args.in_channels, args.size, args.size, device=device)

    def inference() -> None:
        with torch.no_grad():
            model(image)

    def train_step() -> None:
        model(image).float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    train_step()  # warm-up: lazy allocations (cuDNN workspaces, grads) happen before measuring
    saved = saved_for_backward_bytes(model, image)
    saved_encoder = saved_for_backward_bytes(model.encoder, image)
    peak_train = peak_bytes(train_step, device)
    model.eval()
    return Row(
        encoder=encoder,
        arch=arch,
        streams=model.encoder.streams_stages,
        params=sum(p.numel() for p in model.parameters()),
        handoff=handoff_bytes(model, image),
        saved=saved,
        saved_decoder=saved - saved_encoder,
        peak_no_grad=peak_bytes(inference, device),
        peak_train=peak_train,
    )


def print_table(rows: list[Row], device: torch.device) -> None:
    method = "cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler memory events"
    print(f"device {device}; peaks from {method}; MiB")
    columns = ("encoder", "arch", "stream", "params", "handoff", "saved", "saved dec", "pk nograd", "pk train")
    widths = (16, 7, 6, 11, 8, 8, 9, 9, 9)
    cells = [f"{c:{w}}" if i < 3 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(columns, widths, strict=True))]
    header = " ".join(cells)
    print(header)
    print("-" * len(header))
    for r in rows:
        sizes = (r.handoff, r.saved, r.saved_decoder, r.peak_no_grad, r.peak_train)
        numbers = " ".join(f"{b / MIB:{w}.1f}" for b, w in zip(sizes, widths[4:], strict=True))
        print(f"{r.encoder:16} {r.arch:7} {r.streams!s:6} {r.params:>11,} {numbers}")
    by_key = {(r.encoder, r.arch): r for r in rows}
    for encoder in dict.fromkeys(r.encoder for r in rows):
        unet, segnet = by_key.get((encoder, "unet")), by_key.get((encoder, "segnet"))
        if unet and segnet:
            ratios = {
                field: getattr(segnet, field) / max(getattr(unet, field), 1)
                for field in ("params", "handoff", "saved", "saved_decoder", "peak_no_grad", "peak_train")
            }
            print(f"segnet/unet on {encoder}: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", nargs="+", default=["resnet18", "efficientnet_b0"])
    parser.add_argument("--archs", nargs="+", default=["unet", "segnet", "fcn"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"batch {args.batch} x {args.in_channels} x {args.size} x {args.size}, {args.num_classes} classes")
    rows = [measure(arch, encoder, args, device) for encoder in args.encoders for arch in args.archs]
    print_table(rows, device)


if __name__ == "__main__":
    main()
