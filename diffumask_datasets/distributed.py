"""Generation on Ray: N model workers, whole shards each, one driver.

    build_dataset("out/voc", "voc", config, workers=2)                 # a local Ray
    build_dataset("/shared/voc", "voc", config, ray_address="auto")    # a running cluster

The driver (the calling process) has written the manifest already (build.prepare). It
claims the unfinished shards, hands their ids to `ShardWorker` actors, and records each
shard's digest in digests.json as its (shard, digest) comes back. A worker loads the model
once, then generates a whole shard, writes it under a temporary name unique to its host
and process and renames it into the shared output folder itself: no image travels through
Ray's object store. A worker whose process dies is restarted and its shard given to it
again (max_restarts=-1, max_task_retries=-1), so a shard may be made twice; both makings
give the same bytes and each rename is atomic, so whichever lands last changes nothing.

Workers run torch on OMP_NUM_THREADS threads as the driver sees it (1 when unset) and
reserve that many CPUs: the store is the same, byte for byte, as one process makes with
that thread count on the same kind of machine.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffumask_datasets.config import GenerationConfig
from diffumask_datasets.definitions import Definition
from diffumask_datasets.errors import DiffuMaskError, one_line
from diffumask_datasets.shards import EngineHolder, make_shard, plan_for
from diffumask_datasets.store import MANIFEST, Digest, Store, file_digest, open_store

RAY_MISSING = 'Ray is not installed: pip install "diffumask-datasets[ray]"'
# Test-only: "exit:K:MARKER" makes a worker os._exit on its first attempt at shard K (the
# first attempt creates MARKER); "raise:K" makes it raise on shard K.
FAULT_ENV = "DIFFUMASK_TEST_FAULT"
# After this long with no worker started, the driver says what it is waiting for.
START_NOTICE_S = 60.0
# How often the driver asks busy workers how far into their shard they are.
POLL_S = 1.0


def require_ray() -> Any:
    """The ray module, or a DiffuMaskError naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise DiffuMaskError(RAY_MISSING) from None
    return ray


def check_options(workers: int | None, gpus_per_worker: float | None) -> None:
    """Refuse a `workers` that is not a positive integer or a negative `gpus_per_worker`,
    before Ray starts."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)):
        raise DiffuMaskError(f"workers={workers!r} must be a positive integer, e.g. 2")
    if workers is not None and workers < 1:
        raise DiffuMaskError(f"workers={workers} must be at least 1, e.g. 2")
    if gpus_per_worker is not None and not 0 <= gpus_per_worker:
        raise DiffuMaskError(
            f"gpus_per_worker={gpus_per_worker} must be 0 or more (0.5: two workers per GPU)"
        )


def worker_threads() -> int:
    """Torch CPU threads per worker: OMP_NUM_THREADS, 1 when unset."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip() or "1"
    if not value.isdigit() or int(value) < 1:
        raise DiffuMaskError(f"OMP_NUM_THREADS={value!r} must be a positive integer, e.g. 1")
    return int(value)


def host() -> str:
    """This process's host name and pid, to name a worker in messages and temporary files."""
    return f"{socket.gethostname()} pid {os.getpid()}"


class ShardWorker:
    """One model, many shards. Ray runs it as an actor (see run_on_ray); it is a plain
    class so that its checks can be tried without Ray."""

    def __init__(
        self, store_dir: str, fingerprint: str, config: dict, threads: int, fault: str = ""
    ):
        self.store_dir = Path(store_dir)
        self.fingerprint = fingerprint
        self.config = GenerationConfig(**config)
        self.threads = threads
        self.fault = fault
        self._ready: tuple[Store, list, Definition, EngineHolder] | None = None
        self._progress = (-1, 0)  # (shard, images of it generated so far)

    def setup(self) -> str:
        """Check the output folder, load the model; returns where this worker runs."""
        if self._ready is None:
            store = self._open_shared_store()
            import torch

            torch.set_num_threads(self.threads)
            definition = store.definition
            holder = EngineHolder(self.config)
            holder()  # the model, loaded once per worker process
            self._ready = (store, plan_for(definition, self.config), definition, holder)
        return host()

    def _open_shared_store(self) -> Store:
        manifest = self.store_dir / MANIFEST
        shared = "it must be on a filesystem all workers see, at the same path (NFS, shared mount)"
        if not manifest.is_file():
            raise DiffuMaskError(
                f"worker on {socket.gethostname()} cannot see the output folder "
                f"{str(self.store_dir)!r} (no {MANIFEST} there): {shared}"
            )
        store = open_store(self.store_dir, allow_incomplete=True)
        if store.fingerprint != self.fingerprint:
            raise DiffuMaskError(
                f"worker on {socket.gethostname()} sees another dataset at "
                f"{str(self.store_dir)!r} than the driver does: {shared}"
            )
        store.record_digests = False  # the driver records what this worker returns
        return store

    def make(self, shard: int) -> tuple[int, str, int]:
        """Generate and write shard `shard`; returns (shard, sha256, size in bytes)."""
        self.setup()
        store, plan, definition, holder = self._ready
        records = make_shard(store, shard, plan, definition, self.config, holder)
        for position, _ in enumerate(records):
            self._progress = (shard, position + 1)
            if position == 0:
                self._fault(shard)
        digest = store.written.get(shard) or file_digest(store.shard_path(shard))
        return shard, digest.sha256, digest.size

    def progress(self) -> tuple[int, int]:
        """(shard, images generated of it); answered while `make` runs (the actor has a
        second thread for it)."""
        return self._progress

    def _fault(self, shard: int) -> None:
        if not self.fault:
            return
        kind, _, rest = self.fault.partition(":")
        target, _, marker = rest.partition(":")
        if int(target) != shard:
            return
        if kind == "raise":
            raise RuntimeError(f"test fault on shard {shard}")
        if kind == "exit" and not os.path.exists(marker):
            Path(marker).write_text(host())
            os._exit(1)


def run_on_ray(
    store: Store,
    definition: Definition,
    config: GenerationConfig,
    workers: int | None = None,
    address: str | None = None,
    gpus_per_worker: float | None = None,
    progress: bool = True,
) -> Timeline:
    """Make the missing shards of `store` on Ray workers (see the module doc); returns
    when each worker became ready and each shard finished (benchmarks/scaling.py)."""
    ray = require_ray()
    check_options(workers, gpus_per_worker)
    threads = worker_threads()
    started = _connect(ray, address, workers, threads)
    try:
        resources = ray.cluster_resources()
        if gpus_per_worker is None:
            gpus = 0.0 if config.device == "cpu" else resources.get("GPU", 0.0)
            gpus_per_worker = default_gpus_per_worker(gpus, workers)
        count = workers or default_workers(resources, gpus_per_worker, threads)
        options = dict(
            num_cpus=threads,
            num_gpus=gpus_per_worker,
            max_restarts=-1,
            max_task_retries=-1,
            max_concurrency=2,  # `progress` answers while `make` runs
        )
        # absolute: a worker runs in another folder (and maybe on another machine)
        args = (str(store.path.resolve()), store.fingerprint, config.to_dict(), threads)
        fault = os.environ.get(FAULT_ENV, "")
        # Actors end with the driver's connection (ray.shutdown below); in a Ray instance
        # the caller started, they are killed (with a notice from Ray for a busy one).
        with _Pool(ray, count, options, (*args, fault), kill=not started) as pool:
            # First every free shard; then the shards other processes were making, once
            # they let go of them (made, or left unmade by a process that died).
            for blocking in (False, True):
                missing = [k for k in range(store.num_shards) if not store.has_shard(k)]
                if missing:
                    pool.run(store, missing, definition.name, progress, blocking)
        return pool.timeline
    finally:
        if started:
            ray.shutdown()


def _connect(ray: Any, address: str | None, workers: int | None, threads: int) -> bool:
    """Join the cluster at `address`, or start a local one; True when this started it."""
    if ray.is_initialized():
        return False
    quiet = dict(log_to_driver=False, logging_level="WARNING")
    if address is None:
        cpus = max(os.cpu_count() or 1, (workers or 1) * threads)
        ray.init(num_cpus=cpus, include_dashboard=False, **quiet)
        return True
    try:
        ray.init(address=address, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise DiffuMaskError(
            f"cannot join the Ray cluster at {address!r} ({one_line(exc)[:200]}); "
            "start one with `ray start --head` (then --ray auto on that machine), or leave "
            "--ray out to run on this machine"
        ) from None
    return True


def default_gpus_per_worker(gpus: float, workers: int | None) -> float:
    """One GPU each where there are GPUs, an equal share where more workers than GPUs were
    asked for, none without GPUs."""
    if not gpus:
        return 0.0
    return min(1.0, gpus / workers) if workers else 1.0


def default_workers(resources: dict, gpus_per_worker: float, threads: int) -> int:
    """As many workers as the cluster holds: per GPU (or share of one) where workers take
    GPUs, else per `threads` CPUs."""
    if gpus_per_worker > 0:
        return max(1, int(resources.get("GPU", 0) / gpus_per_worker))
    return max(1, int(resources.get("CPU", 1) // threads))


@dataclass
class Timeline:
    """time.monotonic() stamps of a run: its start, each worker's end of setup (model
    loaded), and each shard's arrival as (worker number, shard, time); where each worker
    runs ("host pid N", by worker number)."""

    started: float = field(default_factory=time.monotonic)
    ready: list[float] = field(default_factory=list)
    finished: list[tuple[int, int, float]] = field(default_factory=list)
    hosts: dict[int, str] = field(default_factory=dict)


class _Pool:
    """The actors, and the loop that keeps each busy with one shard at a time."""

    def __init__(self, ray: Any, count: int, options: dict, args: tuple, kill: bool):
        self.ray, self.count, self.options, self.args = ray, count, options, args
        self.kill = kill
        self.actors: list[Any] = []
        self.idle: list[Any] = []
        self.ready = 0  # workers whose setup finished
        self.timeline = Timeline()

    def __enter__(self) -> _Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kill:
            for actor in self.actors:
                self.ray.kill(actor, no_restart=True)

    def _start(self, needed: int) -> dict:
        """Start workers up to min(count, needed); their setup calls, to wait on."""
        worker = self.ray.remote(**self.options)(ShardWorker)
        pending = {}
        while len(self.actors) < min(self.count, needed):
            actor = worker.remote(*self.args)
            self.actors.append(actor)
            pending[actor.setup.remote()] = (actor, None)
        return pending

    def run(
        self, store: Store, shards: list[int], name: str, progress: bool, blocking: bool
    ) -> None:
        """Make `shards` (those whose claim this process gets) on the workers."""
        ray = self.ray
        todo = deque(shards)
        claims: dict[int, contextlib.ExitStack] = {}  # held while a shard is in flight

        def hand_out(actor: Any) -> None:
            while todo:
                shard = todo.popleft()
                claim = contextlib.ExitStack()
                if claim.enter_context(store.claim(shard, blocking)) and not store.has_shard(shard):
                    claims[shard] = claim
                    pending[actor.make.remote(shard)] = (actor, shard)
                    return
                claim.close()  # made, or being made, by another process
            self.idle.append(actor)

        pending = self._start(len(shards))
        bar = _ProgressBar(store, shards, name, len(self.actors), self.ready, progress)
        for actor in self.idle[:]:
            self.idle.remove(actor)
            hand_out(actor)
        waiting_since = polled = time.monotonic()
        try:
            # Until no shard is left: a worker still waiting for resources is not waited for.
            while pending and (todo or any(shard is not None for _, shard in pending.values())):
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
                if progress and time.monotonic() - polled >= POLL_S:
                    bar.partial(self._poll(pending))
                    polled = time.monotonic()
                if not ready:
                    if not bar.started and time.monotonic() - waiting_since >= START_NOTICE_S:
                        bar.note(_waiting_notice(ray, self.options))
                        waiting_since = float("inf")  # said once
                    continue
                ref = ready[0]
                actor, shard = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    self._record_finished(store, pending)
                    raise _worker_failure(exc, shard, store) from None
                if shard is None:
                    self.ready += 1
                    self.timeline.ready.append(time.monotonic())
                    self.timeline.hosts[self.actors.index(actor)] = result
                    bar.worker_started()
                else:
                    store.record_digest(shard, Digest(result[1], result[2]))
                    worker = self.actors.index(actor)
                    self.timeline.finished.append((worker, shard, time.monotonic()))
                    claims.pop(shard).close()
                    bar.shard_done(shard)
                hand_out(actor)
        finally:
            for claim in claims.values():
                claim.close()
            bar.close()

    def _poll(self, pending: dict) -> int:
        """Images generated so far in the shards in flight (workers that do not answer
        within a moment, e.g. while restarting, count as none)."""
        asked = {
            actor.progress.remote(): shard for actor, shard in pending.values() if shard is not None
        }
        answered, _ = self.ray.wait(list(asked), num_returns=len(asked), timeout=POLL_S)
        images = 0
        for ref in answered:
            with contextlib.suppress(self.ray.exceptions.RayError):
                shard, count = self.ray.get(ref)
                images += count if shard == asked[ref] else 0
        return images

    def _record_finished(self, store: Store, pending: dict) -> None:
        """Record the shards that finished while another one failed: they are kept."""
        ready, _ = self.ray.wait(list(pending), num_returns=len(pending), timeout=0)
        for ref in ready:
            _, shard = pending[ref]
            if shard is None:
                continue
            with contextlib.suppress(self.ray.exceptions.RayError):
                _, sha256, size = self.ray.get(ref)
                store.record_digest(shard, Digest(sha256, size))


def _worker_failure(exc: Exception, shard: int | None, store: Store) -> DiffuMaskError:
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, DiffuMaskError):
        what = str(cause)
    else:
        text = str(cause).strip().splitlines()
        what = f"{type(cause).__name__}: {text[-1] if text else ''}"
    kept = len(store.complete_shards())
    where = "while starting" if shard is None else f"on shard {shard}"
    return DiffuMaskError(
        f"a worker failed {where}: {one_line(what)}. The run stopped; {store.path} "
        f"keeps its {kept} finished shards: fix the cause and run the same command with --resume"
    )


def _waiting_notice(ray: Any, options: dict) -> str:
    free = ray.available_resources()
    return (
        f"no worker has started yet: each needs {options['num_cpus']} CPU and "
        f"{options['num_gpus']} GPU; the cluster has {free.get('CPU', 0):g} CPU and "
        f"{free.get('GPU', 0):g} GPU free"
    )


class _ProgressBar:
    """One bar over all workers: images (rate, ETA) with shards and workers beside."""

    def __init__(
        self, store: Store, shards: list[int], name: str, workers: int, running: int, show: bool
    ):
        self.total_shards = store.num_shards
        self.done_shards = self.total_shards - len(shards)
        self.store = store
        self.workers = workers
        self.running = running
        self.done_images = sum(len(store.shard_range(k)) for k in store.complete_shards())
        self.in_flight = 0  # images generated in shards not finished yet
        self.bar = None
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=len(store), initial=self.done_images, desc=f"generating {name}", unit="image"
            )
            self._postfix()

    @property
    def started(self) -> bool:
        return self.running > 0

    def _postfix(self, refresh: bool = True) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(
                f"shards {self.done_shards}/{self.total_shards}, "
                f"workers {self.running}/{self.workers}",
                refresh=refresh,
            )

    def worker_started(self) -> None:
        self.running += 1
        self._postfix()

    def shard_done(self, shard: int) -> None:
        self.done_shards += 1
        self.done_images += len(self.store.shard_range(shard))
        self.in_flight = 0  # until the next poll
        self._postfix(refresh=False)
        self._show()

    def partial(self, in_flight: int) -> None:
        self.in_flight = in_flight
        self._show()

    def _show(self) -> None:
        if self.bar is not None:
            # never backwards: a shard counted in flight that just finished is not lost
            self.bar.update(max(0, self.done_images + self.in_flight - self.bar.n))

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
