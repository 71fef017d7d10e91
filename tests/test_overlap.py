"""Overlap: each batch's CPU part in a background thread while the next batch generates,
with the serial path's output byte for byte and errors surfacing in the caller."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest
from tiny import tiny_settings

from diffumask_datasets import shards
from diffumask_datasets.build import GenerationConfig, build_dataset
from diffumask_datasets.errors import DiffuMaskError
from diffumask_datasets.overlap import overlapped


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Runs compared with each other in this module use one CPU thread."""


def serial(jobs):
    """The path without overlap: every job run in the caller's thread, in turn."""
    for job in jobs:
        yield job()


def test_jobs_run_in_the_background_while_the_next_is_made():
    started = [threading.Event() for _ in range(3)]
    threads, held, most = [], [], [0]

    def jobs():
        for i in range(3):

            def job(i=i):
                started[i].set()
                threads.append(threading.current_thread().name)
                held.remove(i)
                return i * 10

            held.append(i)
            most[0] = max(most[0], len(held))
            yield job
            if i < 2:  # making the next batch overlaps with this one's job
                assert started[i].wait(timeout=10)

    assert list(overlapped(jobs())) == [0, 10, 20]
    assert all(name.startswith("diffumask-overlap") for name in threads)
    assert most[0] <= 2  # bounded: one batch being completed, one just made


def test_a_job_error_surfaces_in_the_caller_and_stops_the_rest():
    ran = []

    def jobs():
        for i in range(5):

            def job(i=i):
                ran.append(i)
                if i == 1:
                    raise DiffuMaskError("encoding failed")
                return i

            yield job

    out = []
    with pytest.raises(DiffuMaskError, match="encoding failed"):
        for value in overlapped(jobs()):
            out.append(value)
    assert out == [0] and max(ran) <= 2  # at most the job queued behind it ran


def test_the_caller_stopping_early_cancels_queued_jobs():
    ran = []
    stream = overlapped(lambda i=i: ran.append(i) or i for i in range(10))
    assert next(stream) == 0
    stream.close()
    assert len(ran) <= 3


def config(**changes) -> GenerationConfig:
    settings = dict(num_inference_steps=2, images_per_class=3, shard_size=4, batch_size=2, seed=3)
    return GenerationConfig(**tiny_settings(**{**settings, **changes}))


def digest(path) -> dict[str, str]:
    files = [path / "manifest.json", *sorted((path / "data").glob("*.parquet"))]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_overlapped_build_is_the_serial_build_byte_for_byte(tmp_path, tiny, monkeypatch):
    overlapped_store = build_dataset(tmp_path / "a", "voc", config(), progress=False, engine=tiny)
    monkeypatch.setattr(shards, "overlapped", serial)
    serial_store = build_dataset(tmp_path / "b", "voc", config(), progress=False, engine=tiny)
    assert digest(overlapped_store.path) == digest(serial_store.path)
    assert len(digest(serial_store.path)) == 3  # the manifest and two shards


def test_engine_call_equals_its_batches_run_serially(tiny):
    args = (
        ["a photo of a bird", "a dog", "a bird and a dog"],
        [["bird"], ["dog"], ["bird", "dog"]],
    )
    kwargs = dict(seed=5, num_inference_steps=2, height=64, width=64, batch_size=2)
    together = tiny(*args, **kwargs)
    apart = [s for job in tiny.batches(*args, **kwargs) for s in job()]
    for a, b in zip(together, apart, strict=True):
        assert np.asarray(a.image).tobytes() == np.asarray(b.image).tobytes()
        assert a.mask.tobytes() == b.mask.tobytes() and a.quality == b.quality
        assert a.meta == b.meta
        assert {k: v.tobytes() for k, v in a.attention.items()} == {
            k: v.tobytes() for k, v in b.attention.items()
        }


def test_an_encoding_error_in_the_worker_surfaces_and_writes_no_shard(tmp_path, tiny, monkeypatch):
    from diffumask_datasets.store import Store

    real = Store.encode
    calls = []

    def failing(self, record):
        calls.append(threading.current_thread().name)
        if record.index == 5:
            raise DiffuMaskError("sample 5 cannot be encoded")
        return real(self, record)

    monkeypatch.setattr(Store, "encode", failing)
    out = tmp_path / "out"
    with pytest.raises(DiffuMaskError, match="sample 5 cannot be encoded"):
        build_dataset(out, "voc", config(), progress=False, engine=tiny)
    assert all(name.startswith("diffumask-overlap") for name in calls)
    # shard 0 (samples 0-3) was complete and written; shard 1 (4-5) never reached disk
    assert sorted(p.name for p in (out / "data").glob("*.parquet")) == [
        "train-00000-of-00002.parquet"
    ]
    assert not list((out / ".work").glob("*.tmp"))
