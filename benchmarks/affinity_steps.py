"""Masks from an affinity averaged over fewer denoising steps, on the shapes
benchmark's (a): 256 single-object images of `builtin:shapes`, 20 DDIM steps, guidance 4,
seed 0; the cross-attention always over every step, the affinity over a window of them
(`Refinement(affinity_steps=...)`). About 25 minutes on one CPU thread.

    python benchmarks/affinity_steps.py [--windows 0:20,10:20,15:20,18:20,0:10] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import shapes_quality as sq  # noqa: E402

from diffumask_datasets import DiffuMask  # noqa: E402


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", default="0:20,10:20,15:20,18:20,0:10")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dm = DiffuMask("builtin:shapes")
    prompts = sq.single_object_prompts(args.images, 0)
    rows = []
    for window in args.windows.split(","):
        first, stop = (int(v) for v in window.split(":"))
        methods = {
            name: {**sq.METHODS[name], "affinity_steps": [first, stop]}
            for name in ("affinity", "adaptive")
        }
        start = time.time()
        results, *_ = sq.mask_fidelity(dm, prompts, 20, 4.0, 0, 16, methods)
        row = {
            "affinity_steps": [first, stop],
            **{name: round(r["miou"], 4) for name, r in results.items()},
            "seconds": round(time.time() - start),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
