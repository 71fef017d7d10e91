"""Refinement time per image at 512 px, one CPU thread: the torch refinement against the
numpy one it replaced (commit d0e6cdf, read with `git show`), alternating; medians and
minima (on a shared machine the minimum is the least disturbed run).

Inputs shaped as SD-1.5 at 512 px hands them over: cross-attention maps at 64, 32 and
16 px per class, a 32x32 self-attention affinity (1024 x 1024); synthetic objects. The
colour step (`colour_steps`, on by default in the engine) runs only in the row given an
image (its cost does not depend on the pixels: a random one).

    OMP_NUM_THREADS=1 python benchmarks/refine_speed.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from make_refine_golden import old_refine, synthetic  # noqa: E402

from diffumask_datasets import refine as new  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--classes", type=int, default=1, choices=[1, 2])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    old = old_refine()
    maps, affinity, affinity_size = synthetic(0, 512, (64, 32, 16), 32)
    maps = {k: maps[k] for k in list(maps)[: args.classes]}
    maps = {c: {s: m.astype(np.float32) for s, m in by.items()} for c, by in maps.items()}
    affinity = affinity.astype(np.float32)
    ids = {"bird": 1, "dog": 2}
    tensors = {c: {s: torch.from_numpy(m) for s, m in by.items()} for c, by in maps.items()}
    batch8 = torch.from_numpy(affinity)[None].expand(8, -1, -1)
    image = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    rows = []
    for method in ("threshold", "affinity", "adaptive"):
        runs = {
            "numpy (d0e6cdf)": lambda m=method: old.refine(
                maps, ids, (512, 512), old.Refinement(m), affinity, affinity_size
            ),
            "torch": lambda m=method: new.refine_batch(
                [tensors], ids, (512, 512), new.Refinement(m), batch8[:1], affinity_size
            ),
            "torch, batch of 8 (per image)": lambda m=method: new.refine_batch(
                [tensors] * 8, ids, (512, 512), new.Refinement(m), batch8, affinity_size
            ),
            # the rows above have no image, so no colour step (the numpy code had none)
            "torch + colour step": lambda m=method: new.refine_batch(
                [tensors],
                ids,
                (512, 512),
                new.Refinement(m),
                batch8[:1],
                affinity_size,
                images=image,
            ),
        }
        times = {name: [] for name in runs}
        for fn in runs.values():
            fn()
        for _ in range(args.repeats):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                per = 8 if "batch" in name else 1
                times[name].append((time.perf_counter() - start) * 1000 / per)
        for name, values in times.items():
            row = {
                "method": method,
                "implementation": name,
                "median_ms": round(statistics.median(values), 2),
                "min_ms": round(min(values), 2),  # the least disturbed run on a busy machine
            }
            rows.append(row)
            print(
                f"{method:>9}  {name:<30} median {row['median_ms']:7.1f} ms/image, "
                f"min {row['min_ms']:7.1f}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
