"""Write tests/data/refine_golden.npz: refinement inputs and the masks, scores, quality
and chains that the numpy refinement of commit d0e6cdf (before refinement moved to
torch) made from them. tests/test_refine.py checks today's refinement against it.

    python scripts/make_refine_golden.py [OUT]    # ~1 minute on 2 CPU cores

The inputs are taken where the engine hands them to `refine.cut_masks` (the file in
tests/data was made at commit 80e52a7, when the engine called `refine.refine` per image
with the same inputs). They are stored rounded to float16, then used as float32 by both
sides, and the scores as float16 area averages of at most 64x64, so the test depends on
neither the capture nor scipy's filters: real captures of builtin:shapes and
builtin:tiny-random, and synthetic maps at 64 and 512 pixels.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

from diffumask_datasets.store import downsample

REPO = Path(__file__).resolve().parents[1]
OLD_COMMIT = "d0e6cdf"
OUT = REPO / "tests" / "data" / "refine_golden.npz"


def old_refine():
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{OLD_COMMIT}:diffumask_datasets/refine.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "diffumask_datasets" / "old_refine.py"
    path.parent.mkdir()
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("diffumask_datasets.old_refine", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def f16(a) -> np.ndarray:
    return np.asarray(a, np.float32).astype(np.float16)


def captured(model: str, prompts, classes, size: int, steps: int):
    """Refine's inputs for each prompt, as DiffuMask hands them over."""
    from diffumask_datasets import DiffuMask, generate

    kept, real = [], generate.cut_masks

    def keep(class_maps, class_ids, size, params, affinity=None, affinity_size=None, **kw):
        for i, maps in enumerate(class_maps):
            numpy_maps = {
                c: {s: np.asarray(m) for s, m in by_size.items()} for c, by_size in maps.items()
            }
            kept.append((numpy_maps, np.asarray(affinity[i]), affinity_size))
        return real(class_maps, class_ids, size, params, affinity, affinity_size, **kw)

    generate.cut_masks = keep
    try:
        DiffuMask(model)(
            prompts,
            classes=classes,
            seed=7,
            num_inference_steps=steps,
            guidance_scale=4.0,
            height=size,
            width=size,
            refinement="adaptive",
            batch_size=len(prompts),
        )
    finally:
        generate.cut_masks = real
    return kept


def field(shape, rng, side, blur=1.0, noise=0.08):
    low = ndimage.zoom(
        ndimage.gaussian_filter(shape.astype(np.float32), blur * shape.shape[0] / side),
        side / shape.shape[0],
        order=1,
    )
    return np.clip(low + rng.normal(0, noise, low.shape), 0, None)


def region_affinity(regions, side, rng, sharpness=20.0):
    small = ndimage.zoom(regions.astype(np.float32), side / regions.shape[0], order=0)
    features = small.reshape(-1, 1) + rng.normal(0, 0.05, (side * side, 1))
    logits = -sharpness * (features - features.T) ** 2
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    return weights / weights.sum(axis=1, keepdims=True)


def synthetic(seed: int, size: int, sides, affinity_side: int):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    bird = (yy - 0.3 - 0.05 * seed) ** 2 + (xx - 0.35) ** 2 <= 0.19**2
    dog = (np.abs(yy - 0.72) < 0.17) & (np.abs(xx - 0.6 + 0.04 * seed) < 0.17)
    maps = {n: {(s, s): field(m, rng, s) for s in sides} for n, m in (("bird", bird), ("dog", dog))}
    return maps, region_affinity(bird * 1 + dog * 2, affinity_side, rng), (affinity_side,) * 2


PARAMS = {
    "adaptive": {"method": "adaptive"},
    "threshold": {"method": "threshold"},
    "affinity": {"method": "affinity"},
    "custom": {
        "method": "adaptive",
        "band": 0.0,
        "min_area": 0.01,
        "affinity_power": 2,
        "gammas": [0.3, 0.6, 0.02],
        "threshold": 0.45,
    },
}


def main() -> None:
    R = old_refine()
    ids = {"bird": 3, "dog": 12, "circle": 1, "square": 2, "triangle": 3, "star": 4}
    cases = []  # (name, maps, affinity, affinity_size, size)
    shapes = captured(
        "builtin:shapes",
        [
            "a photo of a red circle on a white background",
            "a photo of a blue square and a yellow star on a gray background",
            "a photo of a green triangle on a black background",
        ],
        [["circle"], ["square", "star"], ["triangle"]],
        64,
        12,
    )
    cases += [(f"shapes{i}", *c, (64, 64)) for i, c in enumerate(shapes)]
    tiny = captured(
        "builtin:tiny-random", ["a photo of a bird and a dog"], [["bird", "dog"]], 64, 3
    )
    cases += [(f"tiny{i}", *c, (64, 64)) for i, c in enumerate(tiny)]
    for seed in range(3):
        cases.append((f"synthetic{seed}", *synthetic(seed, 64, (32, 16), 16), (64, 64)))
    cases.append(("synthetic512", *synthetic(5, 512, (64, 32, 16), 16), (512, 512)))

    arrays: dict[str, np.ndarray] = {}
    index = []
    for name, maps, affinity, affinity_size, size in cases:
        maps = {c: {s: f16(m) for s, m in sizes.items()} for c, sizes in maps.items()}
        affinity = f16(affinity)
        for c, sizes in maps.items():
            for s, m in sizes.items():
                arrays[f"{name}/maps/{c}/{s[0]}x{s[1]}"] = m
        arrays[f"{name}/affinity"] = affinity
        inputs32 = {
            c: {s: m.astype(np.float32) for s, m in sizes.items()} for c, sizes in maps.items()
        }
        entry = {
            "name": name,
            "classes": list(maps),
            "size": list(size),
            "affinity_size": list(affinity_size),
            "runs": [],
        }
        for key, params in PARAMS.items():
            out = R.refine(
                inputs32,
                ids,
                size,
                R.Refinement.from_any(params),
                affinity.astype(np.float32),
                tuple(affinity_size),
            )
            arrays[f"{name}/{key}/mask"] = out.mask
            if key in ("adaptive", "affinity"):  # the others cut the same scores as adaptive
                for c, s in out.attention.items():  # float16, at most 64x64: a small file
                    arrays[f"{name}/{key}/attention/{c}"] = f16(downsample(s, 64))
            entry["runs"].append(
                {"key": key, "params": params, "quality": out.quality, "chain": out.chain}
            )
        # re-thresholding the stored (area-averaged) maps, as the FiftyOne plugin does
        stored = {c: downsample(a, 16) for c, a in out.attention.items()}
        for c, a in stored.items():
            arrays[f"{name}/stored/{c}"] = a
        mask, quality, chain = R.rethreshold(stored, ids, 0.5, 0.1, 0.002, size=tuple(size))
        arrays[f"{name}/rethreshold/mask"] = mask
        entry["rethreshold"] = {
            "threshold": 0.5,
            "band": 0.1,
            "min_area": 0.002,
            "quality": quality,
            "chain": chain,
        }
        index.append(entry)
    arrays["index"] = np.frombuffer(json.dumps({"ids": ids, "cases": index}).encode(), np.uint8)
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    np.savez_compressed(out, **arrays)
    print(f"{out}: {out.stat().st_size / 1024:.0f} KiB, {len(index)} cases")


if __name__ == "__main__":
    main()
