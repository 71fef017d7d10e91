"""What masks cost beside the plain pipeline, on a GPU: SD-1.5 at 512 px, SDXL at 1024 px.

For each configuration (real architectures with random weights, float16 on CUDA):
plain pipeline vs DiffuMask per refinement method, given the same latents (runs
alternate, medians); the decomposition (the capture alone, `trace` without refinement;
the refinement alone per image, on the device); extra peak GPU memory; and end to end,
images per second of `build_dataset` (what `diffumask generate` runs: generation,
refinement, PNG encoding, shard writes, overlapped) against a plain loop that runs the
pipeline and saves PNGs, same model, batch, steps and images. JSON out.

    # on an H100/H200 (BENCHMARKS.md has the set-up; the lab log, docs/lab/, its history):
    python benchmarks/gpu_overhead.py --device cuda --json gpu_overhead.json
    # on the CPU, tiny models (a smoke test of this script; seconds):
    python benchmarks/gpu_overhead.py --device cpu --configs tiny-b2,tiny-xl-b2 \
        --repeats 1 --json /tmp/gpu_overhead.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from full_size import sd15_pipeline, sdxl_pipeline  # noqa: E402

from diffumask_datasets import DiffuMask  # noqa: E402
from diffumask_datasets.capture import CaptureOptions, default_affinity_factor, trace  # noqa: E402
from diffumask_datasets.refine import Refinement, cut_masks, finish  # noqa: E402
from diffumask_datasets.tokens import class_token_indices  # noqa: E402

PROMPTS = [
    "a photo of a bird on a branch",
    "a photo of a dog on the grass",
    "a photo of a cat on a sofa",
    "a photo of a horse in a field",
]
CLASSES = [["bird"], ["dog"], ["cat"], ["horse"]]


@dataclass(frozen=True)
class Config:
    arch: str  # sd15 | sdxl | tiny | tiny-xl
    size: int
    steps: int
    batch: int


CONFIGS = {
    "sd15-b1": Config("sd15", 512, 50, 1),
    "sd15-b4": Config("sd15", 512, 50, 4),
    "sd15-b8": Config("sd15", 512, 50, 8),
    "sdxl-b2": Config("sdxl", 1024, 30, 2),
    "tiny-b2": Config("tiny", 64, 4, 2),
    "tiny-xl-b2": Config("tiny-xl", 64, 4, 2),
}
ISSUE = "sd15-b1,sd15-b4,sd15-b8,sdxl-b2"


def engine(config: Config, device: str) -> DiffuMask:
    if config.arch.startswith("tiny"):
        model = "builtin:tiny-random" if config.arch == "tiny" else "builtin:tiny-random-xl"
        return DiffuMask(model, device=device, dtype="float16" if device != "cpu" else None)
    dtype = torch.float16 if device != "cpu" else torch.float32
    build = sd15_pipeline if config.arch == "sd15" else sdxl_pipeline
    return DiffuMask(build(device, dtype))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def batch(config: Config, offset: int = 0) -> tuple[list[str], list[list[str]], list[int]]:
    picks = [(offset + i) % len(PROMPTS) for i in range(config.batch)]
    return [PROMPTS[i] for i in picks], [CLASSES[i] for i in picks], [1000 + i for i in picks]


def pipe_kwargs(dm: DiffuMask, config: Config, prompts, seeds) -> dict:
    return dict(
        prompt=prompts,
        latents=dm._latents(seeds, config.size, config.size),
        num_inference_steps=config.steps,
        guidance_scale=7.5,
        height=config.size,
        width=config.size,
        output_type="pil",
    )


def run_plain(dm: DiffuMask, config: Config):
    prompts, _, seeds = batch(config)
    with torch.no_grad():
        return dm.pipe(**pipe_kwargs(dm, config, prompts, seeds)).images


def run_ours(dm: DiffuMask, config: Config, method: str):
    prompts, classes, seeds = batch(config)
    return dm(
        prompts,
        classes=classes,
        seed=seeds,
        num_inference_steps=config.steps,
        guidance_scale=7.5,
        height=config.size,
        width=config.size,
        batch_size=config.batch,
        refinement=method,
    )


def capture_options(dm: DiffuMask, method: str) -> CaptureOptions:
    params = Refinement.from_any(method)
    factor = default_affinity_factor(dm.pipe.unet) if params.needs_affinity else None
    return CaptureOptions(affinity_factor=factor, conditional_half=True)


def run_trace(dm: DiffuMask, config: Config, method: str):
    """The pipeline inside the capture, as DiffuMask runs it, without refinement."""
    prompts, classes, seeds = batch(config)
    tokens = [
        sorted({p for ps in class_token_indices(dm.pipe.tokenizer, t, c).values() for p in ps})
        for t, c in zip(prompts, classes, strict=True)
    ]
    with torch.no_grad(), trace(dm.pipe, tokens, capture_options(dm, method)) as cap:
        dm.pipe(**pipe_kwargs(dm, config, prompts, seeds))
    return cap.result()


def refine_inputs(dm: DiffuMask, config: Config, method: str) -> dict:
    prompts, classes, _ = batch(config)
    captured = run_trace(dm, config, method)
    indices = [
        class_token_indices(dm.pipe.tokenizer, p, c) for p, c in zip(prompts, classes, strict=True)
    ]
    return dict(
        class_maps=[
            {name: captured.token_maps(i, ps) for name, ps in positions.items()}
            for i, positions in enumerate(indices)
        ],
        class_ids={c[0]: i + 1 for i, c in enumerate(CLASSES)},
        size=(config.size, config.size),
        params=Refinement.from_any(method),
        affinity=captured.affinity,
        affinity_size=captured.affinity_size,
        device=dm.pipe.device,
    )


def median_times(runs: dict, repeats: int, device: str) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():  # alternating: drift hits every variant alike
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_mb(device: str, fn) -> float | None:
    if not device.startswith("cuda"):
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated() / 2**20


def time_config(name: str, config: Config, args) -> dict:
    dm = engine(config, args.device)
    methods = args.methods.split(",")
    runs = {"plain": lambda: run_plain(dm, config)}
    for m in methods:
        runs[m] = lambda m=m: run_ours(dm, config, m)
        runs[f"trace:{m}"] = lambda m=m: run_trace(dm, config, m)
    for fn in runs.values():  # warm-up: kernels, allocator, caches
        fn()
    medians = median_times(runs, args.repeats, args.device)
    plain = medians["plain"]
    row = {"config": name, **vars(config), "plain_s": round(plain, 4), "methods": {}}
    plain_peak = peak_mb(args.device, runs["plain"])
    row["plain_peak_mb"] = plain_peak and round(plain_peak, 1)
    for m in methods:
        inputs = refine_inputs(dm, config, m)
        refine_s = median_times(
            {"refine": lambda inputs=inputs: finish(cut_masks(**inputs))},
            max(args.repeats, 5),
            args.device,
        )["refine"]
        peak = peak_mb(args.device, runs[m])
        row["methods"][m] = {
            "ours_s": round(medians[m], 4),
            "ratio": round(medians[m] / plain, 4),
            "trace_ratio": round(medians[f"trace:{m}"] / plain, 4),
            "refine_ms_per_image": round(refine_s / config.batch * 1000, 2),
            "extra_peak_mb": None if peak is None else round(peak - plain_peak, 1),
        }
    if args.e2e_batches:
        try:
            import datasets  # noqa: F401 - the store writes its shards with it
        except ImportError:
            row["end_to_end"] = "skipped: the `datasets` package is not installed"
        else:
            row["end_to_end"] = end_to_end(dm, config, args)
    return row


def end_to_end(dm: DiffuMask, config: Config, args) -> dict:
    """Images per second: build_dataset (what `diffumask generate` runs) against a plain
    loop that runs the pipeline and saves PNGs, the same prompts, seeds and batches."""
    from diffumask_datasets.build import GenerationConfig, build_dataset, prepare

    images = config.batch * args.e2e_batches
    classes = ["bird", "dog", "cat", "horse"]
    settings = GenerationConfig(
        model=f"random:{config.arch}",  # not loaded: the engine is given
        classes=classes,
        images_per_class=-(-images // len(classes)),
        num_inference_steps=config.steps,
        guidance_scale=7.5,
        resolution=config.size,
        batch_size=config.batch,
        shard_size=images,
        seed=0,
    )
    with tempfile.TemporaryDirectory() as scratch:
        _, plan, _, resolved = prepare(Path(scratch) / "plan", "voc", settings, False)
        negative = resolved.negative_prompt

        def ours(run=[0]):  # noqa: B006 - a fresh store per run
            run[0] += 1
            out = Path(scratch) / f"ours{run[0]}"
            build_dataset(out, "voc", settings, progress=False, engine=dm)

        def plain(run=[0]):  # noqa: B006
            run[0] += 1
            folder = Path(scratch) / f"plain{run[0]}"
            folder.mkdir()
            for start in range(0, len(plan), config.batch):
                items = plan[start : start + config.batch]
                prompts, seeds = [i.prompt for i in items], [i.seed for i in items]
                with torch.no_grad():
                    out = dm.pipe(
                        **pipe_kwargs(dm, config, prompts, seeds),
                        negative_prompt=[negative] * len(items) if negative else None,
                    ).images
                for item, image in zip(items, out, strict=True):
                    image.save(folder / f"{item.index:06d}.png")

        medians = median_times({"plain": plain, "ours": ours}, args.e2e_repeats, args.device)
    return {
        "images": len(plan),
        "plain_images_per_s": round(len(plan) / medians["plain"], 3),
        "generate_images_per_s": round(len(plan) / medians["ours"], 3),
        "ratio": round(medians["plain"] / medians["ours"], 4),
    }


def cpu_name() -> str:
    for line in (
        Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    ):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=ISSUE, help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--methods", default="threshold,adaptive")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--e2e-batches", type=int, default=4, help="0 skips end to end")
    parser.add_argument("--e2e-repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    print(f"device={args.device} ({device_name}) torch={torch.__version__}", flush=True)
    rows = []
    for name in args.configs.split(","):
        row = time_config(name, CONFIGS[name], args)
        rows.append(row)
        for method, m in row["methods"].items():
            print(
                f"{name:>10} {method:>9}: plain {row['plain_s']:.3f}s ours {m['ours_s']:.3f}s "
                f"ratio {m['ratio']:.3f} (trace only {m['trace_ratio']:.3f}; refine "
                f"{m['refine_ms_per_image']:.1f} ms/image) extra memory {m['extra_peak_mb']} MB",
                flush=True,
            )
        if isinstance(row.get("end_to_end"), str):
            print(f"{name:>10} end to end {row['end_to_end']}", flush=True)
        elif "end_to_end" in row:
            e = row["end_to_end"]
            print(
                f"{name:>10} end to end ({e['images']} images): plain loop "
                f"{e['plain_images_per_s']:.2f} images/s, generate "
                f"{e['generate_images_per_s']:.2f} images/s, ratio {e['ratio']:.3f}",
                flush=True,
            )
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {"device": device_name, "torch": torch.__version__, "rows": rows}, indent=1
                )
            )


if __name__ == "__main__":
    main()
