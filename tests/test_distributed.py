"""Generation on Ray: same bytes as one process, worker deaths, failures, a killed driver.

One local Ray instance serves the module (start-up costs seconds). Its CPUs are logical:
an actor pool on a 2-CPU instance can stall (Ray issue 44687).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else Ray 2.60 writes ~/.ray/auth_token
ray = pytest.importorskip("ray")

from tiny import tiny_settings  # noqa: E402

from diffumask_datasets.build import GenerationConfig, build_dataset  # noqa: E402
from diffumask_datasets.distributed import (  # noqa: E402
    FAULT_ENV,
    ShardWorker,
    default_gpus_per_worker,
    default_workers,
)
from diffumask_datasets.errors import DiffuMaskError  # noqa: E402
from diffumask_datasets.store import DIGESTS, file_digest, open_store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = GenerationConfig(**tiny_settings(shard_size=1))


@pytest.fixture(scope="module", autouse=True)
def cluster(one_thread):
    """A local Ray whose workers import the tree under test; one torch thread here, as in
    each worker (OMP_NUM_THREADS unset: 1)."""
    assert "OMP_NUM_THREADS" not in os.environ or os.environ["OMP_NUM_THREADS"] == "1"
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    yield
    ray.shutdown()


def store_files(path: Path) -> dict[str, str]:
    """Every file of a store: sha256 by relative path (lock files by name only)."""
    return {
        str(f.relative_to(path)): "" if ".work" in f.parts else file_digest(f).sha256
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("one") / "store"
    build_dataset(out, "voc", CONFIG, progress=False)
    return store_files(out)


def test_two_workers_give_the_bytes_of_one_process(one_process, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out: the workers run in another folder
    store = build_dataset("two", "voc", CONFIG, progress=False, workers=2)
    assert store_files(store.path) == one_process
    assert "digests.json" in one_process and len(one_process) == 4 + 5 + 3  # data, locks, rest


def test_a_failed_run_keeps_its_shards_and_a_worker_death_costs_nothing(
    one_process, tmp_path, monkeypatch
):
    out = tmp_path / "failed"
    # 1. a worker raises on shard 2: one error naming it, the run stops, shards 0 and 1 kept
    monkeypatch.setenv(FAULT_ENV, "raise:2")
    with pytest.raises(DiffuMaskError) as caught:
        build_dataset(out, "voc", CONFIG, progress=False, workers=1)  # shards in order
    message = str(caught.value)
    assert "on shard 2: RuntimeError: test fault on shard 2" in message
    assert "keeps its 2 finished shards" in message and "--resume" in message
    store = open_store(out, allow_incomplete=True)
    assert store.complete_shards() == [0, 1] and sorted(store.digests()) == [0, 1]

    # 2. resumed on two workers, one of which dies (os._exit) in the middle of shard 3:
    # Ray restarts it and gives it shard 3 again; no half or duplicate shard, same bytes
    marker = tmp_path / "crashed-once"
    monkeypatch.setenv(FAULT_ENV, f"exit:3:{marker}")
    build_dataset(out, "voc", CONFIG, resume=True, progress=False, workers=2)
    assert marker.is_file()  # the worker did die
    assert store_files(out) == one_process
    assert not list((out / ".work").glob("*.tmp"))


def test_a_worker_that_cannot_see_the_output_folder_says_so(tmp_path):
    worker = ShardWorker(str(tmp_path / "elsewhere"), "0" * 64, CONFIG.to_dict(), threads=1)
    with pytest.raises(DiffuMaskError, match="cannot see the output folder.*all workers see"):
        worker.setup()


def test_workers_and_gpus_default_to_what_the_cluster_holds():
    assert default_gpus_per_worker(0, 2) == 0 and default_gpus_per_worker(0, None) == 0
    assert default_gpus_per_worker(4, None) == 1 and default_gpus_per_worker(4, 2) == 1
    assert default_gpus_per_worker(1, 2) == 0.5  # two workers asked for on one GPU share it
    assert default_workers({"CPU": 16, "GPU": 4}, 1.0, threads=1) == 4
    assert default_workers({"CPU": 16, "GPU": 1}, 0.5, threads=1) == 2
    assert default_workers({"CPU": 16}, 0.0, threads=4) == 4


def test_bad_worker_options_are_named(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(DiffuMaskError, match="workers=0 must be at least 1"):
        build_dataset(out, "voc", CONFIG, workers=0)
    with pytest.raises(DiffuMaskError, match="gpus_per_worker=-1 must be 0 or more"):
        build_dataset(out, "voc", CONFIG, workers=1, gpus_per_worker=-1)
    with pytest.raises(DiffuMaskError, match="gpus_per_worker=0.5 needs workers=N"):
        build_dataset(out, "voc", CONFIG, gpus_per_worker=0.5)
    with pytest.raises(DiffuMaskError, match="engine= cannot be sent to Ray workers"):
        build_dataset(out, "voc", CONFIG, workers=2, engine=object())
    assert not out.exists()


def test_driver_killed_then_resumed_without_ray_gives_the_clean_bytes(tmp_path):
    """The CLI end to end: a --workers 2 run killed with SIGKILL, one of its shards then
    damaged on disk, finished by --resume without Ray: the store of a clean run."""
    from click.testing import CliRunner
    from test_cli import TINY, run_and_stop, shard_per_sample_definition

    from diffumask_datasets.cli import main

    definition = shard_per_sample_definition(tmp_path)
    args = ["generate", str(definition), *TINY, "--per-class", "4", "--batch-size", "1"]
    clean = tmp_path / "clean"
    result = CliRunner().invoke(main, [*args, "--out", str(clean)], catch_exceptions=False)
    assert result.exit_code == 0, result.output

    out = tmp_path / "killed"
    shards = lambda: sorted((out / "data").glob("*.parquet"))  # noqa: E731
    # Killed once the driver has recorded two shards' digests: a shard a worker renamed
    # after its driver died has none until the next build records it from its bytes, so
    # only a recorded shard's damage is the digest's to find.
    code, stderr = run_and_stop(
        [*args, "--workers", "2", "--out", str(out)],
        lambda: len(recorded_shards(out)) >= 2,
        signal.SIGKILL,
    )
    assert code == -signal.SIGKILL, stderr
    assert 2 <= len(shards()) < 8
    # A worker killed with the driver may have left a half-written temporary file; once
    # its process is gone, --resume removes it. (A worker that outlived its driver and
    # renamed a shard late would be fine too, its bytes are the same, but the digest
    # recorded for it would then wait for the next resume.)
    wait_for_writers_to_end(out / ".work")
    damaged = out / "data" / recorded_shards(out)[0]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x01
    damaged.write_bytes(bytes(data))

    final = CliRunner().invoke(main, [*args, "--out", str(out), "--resume"])
    assert final.exit_code == 0, final.output
    assert f"diffumask: warning: shard {int(damaged.name[6:11])} ({damaged.name})" in final.stderr
    assert "regenerating it" in final.stderr
    assert store_files(out) == store_files(clean)  # temporary files of dead writers gone


def recorded_shards(out: Path) -> list[str]:
    """The names of the shards whose digest the driver has recorded so far."""
    try:
        return sorted(json.loads((out / DIGESTS).read_text())["shards"])
    except (OSError, ValueError, KeyError):  # not written yet
        return []


def wait_for_writers_to_end(work: Path, timeout: float = 90) -> None:
    """Until the killed run's workers are gone (Ray stops them within seconds of their
    driver's death): no process named in a temporary shard file lives, and no shard
    worker is left on this machine that could still rename a shard into place."""
    from diffumask_datasets.store import _writer_gone

    def workers() -> list[Path]:
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if b"ray::ShardWorker" in (proc / "cmdline").read_bytes():
                    found.append(proc)
            except OSError:
                pass
        return found

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tags = [t.name[: -len(".tmp")].split(".parquet.", 1)[1] for t in work.glob("*.tmp")]
        if all(_writer_gone(tag) for tag in tags) and not workers():
            return
        time.sleep(0.2)
    raise AssertionError(f"the killed run's workers still run: {workers()}")
