"""What labelling a given image costs against generating one of the same size and steps.

Side by side in one run, interleaved round by round (so a busy machine slows both alike):
`DiffuMask.__call__` generating N images, then `DiffuMask.label` on those same images
with the same prompts, steps, size and refinement at each strength and start. Labelling
runs `strength` of the steps plus one autoencoder encoding and no decoding (from the
inversion: as many steps again, without guidance, to find the start); generating runs
every step plus one decoding. Prints seconds per image and label/generate per strength
and start; the last line is exactly `label_cost: <strength>/<start>=<ratio> ...`.

    python benchmarks/label_cost.py                       # builtin:shapes, 64 px, 20 steps
    python benchmarks/label_cost.py --model builtin:tiny-random --size 256 --steps 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffumask_datasets import shapes_world as sw  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:shapes")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.3, 0.5, 1.0])
    parser.add_argument(
        "--starts", nargs="+", choices=("inversion", "noise"), default=["inversion", "noise"]
    )
    parser.add_argument("--refinement", default='{"method": "affinity", "affinity_factor": 1}')
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import json

    import torch

    from diffumask_datasets import DiffuMask

    torch.set_num_threads(args.threads)
    dm = DiffuMask(args.model)
    refinement = json.loads(args.refinement)
    scenes = sw.sample_scenes(args.images, seed=0, count=1)
    prompts = [s.caption for s in scenes]
    classes = [[s.objects[0].shape] for s in scenes]
    common = {
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "refinement": refinement,
        "batch_size": args.batch,
    }
    # Warm-up, not timed: the first call of each imports and builds what it uses (the
    # image-to-image pipeline, diffusers' lazy modules: seconds, once per process).
    first = dm(prompts[:1], classes=classes[:1], height=args.size, width=args.size, **common)
    dm.label([first[0].image], classes=classes[:1], prompts=prompts[:1], **common)
    images = None
    labels = [(strength, start) for strength in args.strengths for start in args.starts]
    seconds = {"generate": 0.0, **{key: 0.0 for key in labels}}
    for _ in range(args.rounds):
        start = time.perf_counter()
        samples = dm(prompts, classes=classes, height=args.size, width=args.size, **common)
        seconds["generate"] += time.perf_counter() - start
        images = images or [s.image for s in samples]
        for strength, begin in labels:
            start = time.perf_counter()
            dm.label(
                images, classes=classes, prompts=prompts, strength=strength, start=begin, **common
            )
            seconds[strength, begin] += time.perf_counter() - start
    per_image = {k: v / (args.rounds * args.images) for k, v in seconds.items()}
    print(
        f"{args.model}, {args.images} images of {args.size} px, {args.steps} steps, batch "
        f"{args.batch}, {args.rounds} rounds, {args.threads} thread(s)"
    )
    print(f"{'':<26}{'s/image':>9}{'/ generate':>12}")
    print(f"{'generate':<26}{per_image['generate']:>9.3f}{1.0:>12.2f}")
    ratios = {}
    for strength, begin in labels:
        key = f"{strength}/{begin}"
        ratios[key] = per_image[strength, begin] / per_image["generate"]
        print(f"{f'label {key}':<26}{per_image[strength, begin]:>9.3f}{ratios[key]:>12.2f}")
    print("label_cost: " + " ".join(f"{k}={r:.2f}" for k, r in ratios.items()))
    per_image = {k if isinstance(k, str) else f"{k[0]}/{k[1]}": v for k, v in per_image.items()}
    return {"seconds_per_image": per_image, "ratios": ratios}


if __name__ == "__main__":
    main()
