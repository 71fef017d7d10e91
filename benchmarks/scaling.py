"""Images per second with 1 and 2 Ray workers, and Ray's fixed start-up cost.

Runs alternate (1, 2, then 2, 1, ...) in one Ray instance; each makes a fresh store. The
rate counts only the time after a worker has loaded its model: per worker, the shards it
finished after its first one, over the time between its first and last; the workers'
rates add up. Start-up is reported apart: ray.init, then each run's time until every
worker has loaded its model. On a machine shared with other work the wall-clock rates
depend on the CPU the others leave; images per CPU second of the workers (read from
/proc, Linux) do not, and say whether two workers are as efficient as one.

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
import threading
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


class CpuSampler:
    """CPU seconds of this machine's Ray shard workers, sampled in a thread: on a machine
    shared with other work, images per CPU second is the figure the others' load does not
    move (a worker that gets half a core is as efficient as one that gets a whole one)."""

    def __init__(self, every: float = 0.2):
        self.every = every
        self.samples: dict[int, list[tuple[float, float]]] = {}  # pid -> (time, cpu s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        while not self._stop.wait(self.every):
            now = time.monotonic()
            for proc in Path("/proc").glob("[0-9]*"):
                try:
                    if b"ShardWorker" not in (proc / "cmdline").read_bytes():
                        continue
                    fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                cpu = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
                self.samples.setdefault(int(proc.name), []).append((now, cpu))

    def cpu_at(self, pid: int, at: float) -> float:
        """The process's CPU seconds at the sample nearest to `at`."""
        return min(self.samples.get(pid, [(at, 0.0)]), key=lambda s: abs(s[0] - at))[1]


def images_per_cpu_second(timeline, sampler: CpuSampler, shard_size: int) -> float:
    """Per worker, the shards after its first over the CPU time it used meanwhile."""
    images = cpu = 0.0
    for worker, where in timeline.hosts.items():
        times = [at for w, _, at in timeline.finished if w == worker]
        pid = int(where.rsplit(" ", 1)[1])
        if len(times) >= 2:
            images += shard_size * (len(times) - 1)
            cpu += sampler.cpu_at(pid, max(times)) - sampler.cpu_at(pid, min(times))
    return images / cpu if cpu else float("nan")


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
    with CpuSampler() as sampler:
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
        "images_per_cpu_s": images_per_cpu_second(timeline, sampler, args.shard_size),
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
                # per CPU second of the workers: 2 workers as efficient as 1 means 2x on two
                # free cores (only the wall-clock figures above count the cores obtained)
                "images_per_cpu_s": {w: round(median(w, "images_per_cpu_s"), 3) for w in (1, 2)},
                "cpu_efficiency_2_vs_1": round(
                    median(2, "images_per_cpu_s") / median(1, "images_per_cpu_s"), 3
                ),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
