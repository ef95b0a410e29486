"""Synthetic cohort speed: ``generate_cohort`` against writing the very same files, in one process.

``generate_cohort`` (what the test suite's fixtures and fairness experiments call) draws labels, renders MRI-like
images and writes one gzipped NIfTI image and one mask per case plus the manifest. The baseline is the part it
cannot avoid: writing those same arrays to the same files with the same writer (``synth._save_nifti``: the same
header, dtype and gzip compression), the arrays already in memory. So the ratio is how many times the cost of
the file writes a generation costs; machine speed and load change both sides alike, which a fixed number of
seconds (the wall-clock bound the test suite used to assert) does not. A ratio of 1 would mean drawing and
rendering are free.

Each round generates a cohort into a fresh temporary folder, reads its arrays back (untimed), then writes them
into another fresh folder (timed); the two sides take turns, so load drift hits both, and the medians of
``--repeats`` rounds are reported.

Run from the repository root::

    python benchmarks/synth_speed.py
    python benchmarks/synth_speed.py --cases 20 --shape 48 48 32 --repeats 5
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg_lightning.data.synth import _save_nifti, generate_cohort

SPACING = (1.0, 1.0, 1.5)  # generate_cohort's default


def generate(folder: Path, cases: int, shape: tuple[int, int, int], seed: int) -> float:
    """Seconds of one ``generate_cohort`` call into ``folder``."""
    start = time.perf_counter()
    generate_cohort(folder, cases, seed=seed, shape=shape, spacing=SPACING)
    return time.perf_counter() - start


def write_only(source: Path, folder: Path) -> float:
    """Seconds to write ``source``'s images and masks again into ``folder``, the arrays read beforehand."""
    files = [(path.relative_to(source), nib.load(path)) for path in sorted(source.glob("*Tr/*.nii.gz"))]
    arrays = [(relative, np.asarray(image.dataobj), image.affine) for relative, image in files]
    for sub in {relative.parent for relative, _, _ in arrays}:
        (folder / sub).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for relative, array, affine in arrays:
        _save_nifti(array, affine, SPACING, folder / relative)
    (folder / "manifest.csv").write_bytes((source / "manifest.csv").read_bytes())
    return time.perf_counter() - start


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20, help="cases per cohort (default 20)")
    parser.add_argument("--shape", type=int, nargs=3, default=[48, 48, 32], metavar=("X", "Y", "Z"),
                        help="volume shape in voxels (default 48 48 32, generate_cohort's default)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of generate + write-only (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.cases < 1 or args.repeats < 1 or min(args.shape) < 1:
        parser.error("--cases, --repeats and --shape must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = tuple(args.shape)
    generated: list[float] = []
    written: list[float] = []
    for round_number in range(1, args.repeats + 1):
        with tempfile.TemporaryDirectory(prefix="medseg-synth-bench-") as tmp:
            root = Path(tmp)
            generated.append(generate(root / "generated", args.cases, shape, args.seed))
            written.append(write_only(root / "generated", root / "written"))
        print(f"  round {round_number}/{args.repeats}: generate {generated[-1]:.2f} s, write only "
              f"{written[-1]:.2f} s", file=sys.stderr, flush=True)
    gen_s, write_s = statistics.median(generated), statistics.median(written)
    header = f"{'cases':>6}  {'shape':>12}  {'generate s':>10}  {'write only s':>12}  {'ratio':>7}"
    print(header)
    print("-" * len(header))
    print(f"{args.cases:>6}  {'x'.join(map(str, shape)):>12}  {gen_s:>10.3f}  {write_s:>12.3f}  "
          f"{gen_s / write_s:>6.2f}x")
    print(f"(median of {args.repeats}; {gen_s / args.cases * 1000:.1f} ms per generated case)")
    print(f"generate_cohort costs {gen_s / write_s:.2f}x writing its own files")
    print("command: python " + shlex.join(["benchmarks/synth_speed.py", *(sys.argv[1:] if argv is None else argv)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
