"""Images per second with 1 and 2 Ray workers, and Ray's fixed start-up cost.

Runs alternate (1, 2, then 2, 1, ...) in one Ray instance; each makes a fresh store. The
rate counts only the time after a worker has loaded its model: per worker, the shards it
finished after its first one, over the time between its first and last; the workers'
rates add up. Start-up is reported apart: ray.init, then each run's time until every
worker has loaded its model.

    python benchmarks/scaling.py                                  # tiny model, CPU workers
    python benchmarks/scaling.py --model sd15 --device cuda --dtype float16 \\
        --gpus-per-worker 0.5 --size 512 --steps 20 --per-class 16 --shard-size 4
        # two workers sharing one GPU, on the SD-1.5 architecture (random weights)

Each CPU worker runs torch on OMP_NUM_THREADS threads (1 when unset), so on 2 cores two
workers use both and one worker uses one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]


def sd15_folder(root: Path) -> str:
    """The SD-1.5 architecture with random weights, saved once as a diffusers folder that
    every worker can load (see overhead.py)."""
    folder = root / "sd15-random"
    if not (folder / "model_index.json").is_file():
        sys.path.insert(0, str(Path(__file__).parent))
        from overhead import sd15_pipeline

        sd15_pipeline().save_pretrained(folder)
    return str(folder)


def steady_rate(timeline, shard_size: int) -> float:
    """Images per second once started: per worker, shards after its first over the time
    from its first to its last; summed over workers."""
    by_worker: dict[int, list[float]] = {}
    for worker, _, at in timeline.finished:
        by_worker.setdefault(worker, []).append(at)
    rate = 0.0
    for times in by_worker.values():
        if len(times) >= 2:
            rate += shard_size * (len(times) - 1) / (max(times) - min(times))
    return rate


def one_run(root: Path, workers: int, args: argparse.Namespace) -> dict:
    from diffumask_datasets.build import GenerationConfig, prepare
    from diffumask_datasets.distributed import run_on_ray

    config = GenerationConfig(
        model=args.model,
        classes=["bird", "dog"],
        images_per_class=args.per_class,
        num_inference_steps=args.steps,
        resolution=args.size,
        seed=0,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        device=args.device,
        dtype=args.dtype,
    )
    out = Path(tempfile.mkdtemp(dir=root)) / f"w{workers}"
    store, _, definition, config = prepare(out, "voc", config, resume=False)
    started = time.monotonic()
    timeline = run_on_ray(
        store,
        definition,
        config,
        workers=workers,
        gpus_per_worker=args.gpus_per_worker,
        progress=False,
    )
    total = time.monotonic() - started
    return {
        "workers": workers,
        "images_per_s": steady_rate(timeline, args.shard_size),
        "start_s": max(timeline.ready) - timeline.started,
        "wall_s": total,
        "images": len(store),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny-random", help="or sd15 (random)")
    parser.add_argument("--per-class", type=int, default=24, help="images per class (2 classes)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of 1 and 2 workers")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--gpus-per-worker", type=float, default=None)
    args = parser.parse_args()

    import ray

    root = Path(tempfile.mkdtemp(prefix="scaling-"))
    if args.model == "sd15":
        args.model = sd15_folder(root)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    began = time.monotonic()
    ray.init(
        num_cpus=max(4, os.cpu_count() or 1),
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    init_s = time.monotonic() - began
    runs = []
    for round_ in range(args.rounds):
        for workers in (1, 2) if round_ % 2 == 0 else (2, 1):
            run = one_run(root, workers, args)
            runs.append(run)
            print(json.dumps(run), flush=True)
    ray.shutdown()

    def median(workers: int, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["workers"] == workers)

    one, two = median(1, "images_per_s"), median(2, "images_per_s")
    print(
        json.dumps(
            {
                "model": args.model,
                "size": args.size,
                "steps": args.steps,
                "images_per_run": runs[0]["images"],
                "cpus": os.cpu_count(),
                "threads_per_worker": int(os.environ.get("OMP_NUM_THREADS") or 1),
                "ray_init_s": round(init_s, 2),
                "worker_start_s": {w: round(median(w, "start_s"), 2) for w in (1, 2)},
                "images_per_s": {1: round(one, 3), 2: round(two, 3)},
                "speedup": round(two / one, 3),
                "scaling_efficiency": round(two / (2 * one), 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
