"""What capture + refinement cost on top of the plain diffusers pipeline, for MMDiT models.

The real-size SD3-medium and FLUX.1-dev architectures (transformer, VAE, CLIP encoders,
T5-XXL) are built with random weights from their configurations, so the cost is real and
nothing is downloaded. Same prompts, seeds (hence latents), steps and size; plain and
DiffuMask runs alternate in one process and the medians are compared, by wall time and (on
the CPU, where a shared machine makes wall time noisy) by the process's CPU time. Extra
memory: the
growth of torch's peak allocation on a GPU (of the process's peak RSS on the CPU) when the
DiffuMask run follows the plain one.

    python benchmarks/mmdit_overhead.py --tiny          # the tiny built-ins on the CPU
    python benchmarks/mmdit_overhead.py                 # sd3-medium, flux-dev: 1024 px,
                                                        # 28 steps, batch 2, bfloat16, cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
from full_size import flux_dev, sd3_medium

from diffumask_datasets import DiffuMask

PROMPTS = ["a photo of a bird on a branch", "a photo of a dog on the grass"]
CLASSES = [["bird"], ["dog"]]


REAL = {"sd3-medium": sd3_medium, "flux-dev": flux_dev}
TINY = {"sd3-tiny": "builtin:tiny-random-sd3", "flux-tiny": "builtin:tiny-random-flux"}


def engine(config: str, device: str, dtype: str) -> DiffuMask:
    if config in TINY:
        return DiffuMask(TINY[config])
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: seconds, not minutes
        pipe = REAL[config]()
    return DiffuMask(pipe.to(dtype=getattr(torch, dtype)))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_plain(dm: DiffuMask, args) -> None:
    settings = {
        "negative_prompt": None,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "height": args.size,
        "width": args.size,
    }
    seeds = list(range(len(PROMPTS)))
    latents = dm._latents(seeds, args.size, args.size)
    dm.pipe(**dm.family.call_arguments(PROMPTS, latents, settings))


def run_ours(dm: DiffuMask, args) -> None:
    dm(
        PROMPTS,
        classes=CLASSES,
        seed=list(range(len(PROMPTS))),
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        height=args.size,
        width=args.size,
        batch_size=len(PROMPTS),
        refinement=args.method,
    )


def peak(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(config: str, args) -> dict:
    dm = engine(config, args.device, args.dtype)
    sync(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run_plain(dm, args)  # warm-up, and the plain peak
    sync(args.device)
    plain_peak = peak(args.device)
    run_ours(dm, args)
    sync(args.device)
    ours_peak = peak(args.device)
    times: dict[str, list[tuple[float, float]]] = {"plain": [], "diffumask": []}
    for _ in range(args.repeats):
        for name, fn in (("plain", run_plain), ("diffumask", run_ours)):
            start, cpu = time.perf_counter(), time.process_time()
            fn(dm, args)
            sync(args.device)
            times[name].append((time.perf_counter() - start, time.process_time() - cpu))
    plain, ours = (statistics.median(t for t, _ in times[n]) for n in ("plain", "diffumask"))
    cpu_plain, cpu_ours = (statistics.median(c for _, c in times[n]) for n in times)
    return {
        "config": config,
        "device": args.device,
        "dtype": "float32" if config in TINY else args.dtype,
        "size": args.size,
        "steps": args.steps,
        "batch": len(PROMPTS),
        "method": args.method,
        "plain_s": round(plain, 4),
        "diffumask_s": round(ours, 4),
        "ratio": round(ours / plain, 3),
        "cpu_ratio": round(cpu_ours / cpu_plain, 3),
        "extra_peak_mb": round(ours_peak - plain_peak, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny built-ins on the CPU")
    parser.add_argument("--configs", default=None, help="sd3-medium,flux-dev (default)")
    parser.add_argument("--size", type=int, default=None, help="1024; --tiny: 128")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--method", default="adaptive")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    if args.tiny:
        args.configs = args.configs or ",".join(TINY)
        args.size = args.size or 128
        args.device = args.device or "cpu"
    else:
        args.configs = args.configs or ",".join(REAL)
        args.size = args.size or 1024
        args.device = args.device or "cuda"
    for config in args.configs.split(","):
        print(json.dumps(measure(config, args)), flush=True)


if __name__ == "__main__":
    main()
