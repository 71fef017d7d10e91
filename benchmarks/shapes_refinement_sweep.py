"""Refinement variants on the shapes model's captured attention, scored offline.

Generates single-object prompts once through `DiffuMask("builtin:shapes")` (the prompts
and reference masks of shapes_quality.py), keeps each sample's raw multi-resolution
cross-attention maps and self-attention affinity as the engine hands them to
`refine.cut_masks`, then scores, without generating again, several ways of normalising the
maps and of cutting them: threshold levels, random-walk steps, steps of the colour step
(0: off). Two prompt sets (seed 0 and seed 100) show which differences hold beyond one
set.

    python benchmarks/shapes_refinement_sweep.py      # ~1 minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import shapes_quality as sq  # noqa: E402

from diffumask_datasets import refine as R  # noqa: E402
from diffumask_datasets import shapes_world as sw  # noqa: E402


def clamp_border(m: np.ndarray) -> np.ndarray:
    """The outer ring may not exceed the interior's maximum (stray border peaks)."""
    top = float(m[1:-1, 1:-1].max())
    return np.clip(m, None, top) / top if top > 0 else np.zeros_like(m)


def percentile(p: float):
    def normalise(m: np.ndarray) -> np.ndarray:
        level = float(np.percentile(m, p))
        return np.clip(m / level, 0, 1) if level > 0 else np.zeros_like(m)

    return normalise


NORMALISATIONS = {
    "max (shipped)": R.normalise_max,
    "min-max": R.normalise_minmax,
    "border clamped": clamp_border,
    "99th percentile": percentile(99),
}


def capture(n: int, seed: int) -> list[dict]:
    """Generate n single-object samples; keep refine's inputs and the reference mask."""
    from diffumask_datasets import DiffuMask, generate

    kept, real_cut = [], generate.cut_masks

    def keep(class_maps, class_ids, size, params, affinity=None, affinity_size=None, **kw):
        for i, maps in enumerate(class_maps):
            kept.append(
                {
                    "maps": {k: np.asarray(m) for k, m in next(iter(maps.values())).items()},
                    "affinity": np.asarray(affinity[i]),
                    "affinity_size": affinity_size,
                }
            )
        return real_cut(class_maps, class_ids, size, params, affinity, affinity_size, **kw)

    prompts = sq.single_object_prompts(n, seed)
    generate.cut_masks = keep
    try:
        samples = DiffuMask("builtin:shapes")(
            [p for p, _, _ in prompts],
            classes=[[s] for _, s, _ in prompts],
            seed=seed,
            num_inference_steps=20,
            guidance_scale=4.0,
            class_ids=sw.CLASS_IDS,
            refinement={"method": "affinity", "band": 0.0, "affinity_factor": 1},
            batch_size=16,
        )
    finally:
        generate.cut_masks = real_cut
    for item, sample, (_, shape, _) in zip(kept, samples, prompts, strict=True):
        item["class_id"] = sw.CLASS_IDS[shape]
        item["reference"] = sq.reference_mask(sample.image, shape)
        item["image"] = generate.pixels([sample.image])[0]
    return [k for k in kept if (k["reference"] > 0).sum() >= sq.MIN_OBJECT_PIXELS]


def scores(item: dict, normalise, method: str, power: int, colour_steps: int = 0) -> np.ndarray:
    """The 64x64 score map refine would cut, with `normalise` for each attention map, and
    `colour_steps` of colour-guided smoothing."""
    size = (64, 64) if method == "threshold" else item["affinity_size"]
    maps = [R.resize(np.asarray(normalise(m)), size).numpy() for m in item["maps"].values()]
    cam = np.clip(np.mean(maps, axis=0), 0, 1)
    if method == "affinity":
        walked = R.normalise_minmax(R.propagate(cam, item["affinity"], power))
        cam = R.resize(walked, (64, 64)).numpy()
    cam = np.clip(cam, 0, 1)
    if colour_steps:
        weights = R.colour_weights(item["image"][None])
        cam = R.colour_smooth(cam[None, None], weights, colour_steps)[0, 0].numpy()
    return cam


def miou(
    items: list[dict], normalise, method: str, power: int, threshold: float, colour: int = 0
) -> float:
    score = sq.ConfusionIoU()
    for item in items:
        s = scores(item, normalise, method, power, colour)
        score.add(R.label(s[None], [item["class_id"]], threshold).numpy(), item["reference"])
    return score.miou()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--images",
        type=int,
        nargs=2,
        default=[64, 128],
        help="prompts in the seed-0 and the seed-100 set",
    )
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    sets = {"seed 0": capture(args.images[0], 0), "seed 100": capture(args.images[1], 100)}
    print("scored images: " + ", ".join(f"{k} {len(v)}" for k, v in sets.items()))
    levels = (0.4, 0.5, 0.6, 0.65, 0.7)
    print(
        f"{'method':<10}{'normalisation':<17}{'power':>6}{'colour':>7}  "
        + "  ".join(f"{name}: t=" + "/".join(f"{t:g}" for t in levels) for name in sets)
    )
    runs = [("threshold", name, 0, 0) for name in NORMALISATIONS]
    runs += [("affinity", name, 4, 0) for name in NORMALISATIONS]
    runs += [("affinity", "max (shipped)", p, 0) for p in (1, 2, 8)]
    # the colour step (refine.colour_smooth, the engine's default 10 steps)
    runs += [("threshold", "max (shipped)", 0, 10)]
    runs += [("affinity", "max (shipped)", 4, c) for c in (3, 10, 30)]
    runs += [("affinity", "max (shipped)", 2, 10)]
    for method, name, power, colour in runs:
        cells = [
            " ".join(
                f"{miou(items, NORMALISATIONS[name], method, power, t, colour):.3f}" for t in levels
            )
            for items in sets.values()
        ]
        print(f"{method:<10}{name:<17}{power:>6}{colour:>7}  " + "  |  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
