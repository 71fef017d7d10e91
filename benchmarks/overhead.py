"""What capture + refinement cost on top of the plain diffusers pipeline.

Same prompts, seeds (hence latents), steps and size; plain and DiffuMask runs alternate
in one process and the medians are compared, by wall time and by the process's CPU time
(the latter stays meaningful on a machine shared with other work). Extra peak memory is
measured in a fresh process that runs the plain pipeline first and then DiffuMask: the
growth of peak RSS on the CPU, of torch's peak allocation on a GPU.

    python benchmarks/overhead.py                      # tiny model and SD-1.5 architecture, CPU
    python benchmarks/overhead.py --configs sd15 --size 512 --steps 50 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from diffumask_datasets import DiffuMask

PROMPTS = ["a photo of a bird on a branch", "a photo of a dog on the grass"]
CLASSES = [["bird"], ["dog"]]


def sd15_pipeline():
    """The Stable Diffusion 1.5 architecture (UNet, VAE, CLIP ViT-L text encoder) with
    random weights built from its configuration: realistic cost, no download."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from full_size import sd15_pipeline as build

    return build("cpu", torch.float32)


def engine(config: str, device: str, dtype: str | None) -> DiffuMask:
    model = sd15_pipeline() if config == "sd15" else "builtin:tiny-random"
    return DiffuMask(model, device=device, dtype=dtype)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_plain(dm: DiffuMask, args) -> None:
    seeds = [1000 + i for i in range(args.prompts)]
    latents = dm._latents(seeds, args.size, args.size)
    with torch.no_grad():
        dm.pipe(
            prompt=PROMPTS[: args.prompts],
            latents=latents,
            num_inference_steps=args.steps,
            guidance_scale=7.5,
            height=args.size,
            width=args.size,
            output_type="pil",
        )


def run_ours(dm: DiffuMask, args, method: str) -> None:
    seeds = [1000 + i for i in range(args.prompts)]
    dm(
        PROMPTS[: args.prompts],
        classes=CLASSES[: args.prompts],
        seed=seeds,
        num_inference_steps=args.steps,
        guidance_scale=7.5,
        height=args.size,
        width=args.size,
        batch_size=args.prompts,
        refinement=method,
    )


def timed(fn, device: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process)."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def time_config(config: str, args) -> list[dict]:
    dm = engine(config, args.device, args.dtype)
    methods = args.methods.split(",")
    runs = {"plain": lambda: run_plain(dm, args)}
    runs.update({m: (lambda m=m: run_ours(dm, args, m)) for m in methods})
    for fn in runs.values() if args.warmup else ():  # kernels, allocator, first-call caches
        fn()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():  # alternate, so drift hits every variant alike
            times[name].append(timed(fn, args.device))

    def median(name: str, which: int) -> float:
        return statistics.median(t[which] for t in times[name])

    rows = []
    for name in methods:
        rows.append(
            {
                "config": config,
                "variant": name,
                "size": args.size,
                "steps": args.steps,
                "plain_s": round(median("plain", 0), 4),
                "ours_s": round(median(name, 0), 4),
                "ratio": round(median(name, 0) / median("plain", 0), 4),
                "cpu_ratio": round(median(name, 1) / median("plain", 1), 4),
            }
        )
    return rows


def peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_child(args) -> None:
    """Plain pipeline first, then DiffuMask, in this fresh process: print how far the
    second raised the peak (MB). Everything DiffuMask imports is imported up front, so
    module code does not count as capture memory."""
    import scipy.ndimage  # noqa: F401

    import diffumask_datasets.refine  # noqa: F401

    dm = engine(args.configs, args.device, args.dtype)
    run_plain(dm, args)
    plain = peak_mb(args.device)
    run_ours(dm, args, args.child)
    print(json.dumps({"plain_peak_mb": plain, "extra_mb": peak_mb(args.device) - plain}))


def peak_memory(config: str, variant: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--configs",
        config,
        "--size",
        str(args.memory_size),
        "--steps",
        str(args.memory_steps),
        "--device",
        args.device,
        "--prompts",
        "1",
    ]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny,sd15")
    parser.add_argument("--methods", default="threshold,adaptive")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=2, choices=[1, 2])
    parser.add_argument("--warmup", type=int, default=1, help="0 skips the warm-up runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--memory-size", type=int, default=512, help="0 skips memory")
    parser.add_argument("--memory-steps", type=int, default=1)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        peak_memory_child(args)
        return
    print(f"device={args.device} torch_threads={torch.get_num_threads()} pid={os.getpid()}")
    for config in args.configs.split(","):
        size = args.size if config == "sd15" else 64
        for row in time_config(config, argparse.Namespace(**{**vars(args), "size": size})):
            print(
                f"time {row['config']:>5} {row['variant']:>9} {row['size']}px {row['steps']} "
                f"steps: plain {row['plain_s']:.3f}s ours {row['ours_s']:.3f}s "
                f"ratio {row['ratio']:.3f} (by CPU time {row['cpu_ratio']:.3f})"
            )
    if "sd15" in args.configs and args.memory_size:
        for variant, what in (("threshold", "cross-attention"), ("adaptive", "cross + affinity")):
            m = peak_memory("sd15", variant, args)
            print(
                f"memory sd15 {args.memory_size}px {what}: plain peak "
                f"{m['plain_peak_mb']:.0f} MB, extra {m['extra_mb']:+.0f} MB"
            )


if __name__ == "__main__":
    main()
