"""A full disk mid-run: the error names the shard's path and says that --resume continues
once space is freed; no part-written file is left, and the resumed run completes."""

from __future__ import annotations

import errno
from pathlib import Path

import pyarrow.parquet as pq
from click.testing import CliRunner

from diffumask_datasets.cli import main
from diffumask_datasets.resources import builders_dir
from diffumask_datasets.store import open_store

TINY = [
    "--model",
    "builtin:tiny-random",
    "--classes",
    "apple,banana",
    "--per-class",
    "2",
    "--steps",
    "2",
    "--size",
    "64",
    "--seed",
    "0",
    "--batch-size",
    "2",
]


def small_shards(tmp_path: Path) -> str:
    """The example definition with shards of 2 samples, so that a run spans two shards."""
    text = (builders_dir() / "diffumask" / "example.yaml").read_text()
    text = text.replace("shard_size: 32", "shard_size: 2").replace(
        "two_classes: 0.25", "two_classes: 0"
    )
    path = tmp_path / "fruit.yaml"
    path.write_text(text)
    return str(path)


def test_a_full_disk_names_the_shard_and_resume_continues(tmp_path, monkeypatch, one_thread):
    out = tmp_path / "out"
    definition = small_shards(tmp_path)
    real_write = pq.write_table
    calls = []

    def fills_the_disk(table, where, *args, **kwargs):
        calls.append(where)
        if len(calls) < 2:
            return real_write(table, where, *args, **kwargs)
        with open(where, "wb") as handle:  # some bytes reach the disk, then it is full
            handle.write(b"PAR1" + b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", str(where))

    monkeypatch.setattr(pq, "write_table", fills_the_disk)
    result = CliRunner().invoke(main, ["generate", definition, *TINY, "--out", str(out)])
    assert result.exit_code == 1, result.output
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("diffumask: error: no space left on the device")
    store = open_store(out, allow_incomplete=True)
    assert str(store.shard_path(1)) in error
    assert "--resume" in error and "free some space" in error and "(1 of 2) are kept" in error
    # nothing part-written is left, and nothing looks complete that is not
    leftovers = [p for p in out.rglob("*") if p.is_file() and ".tmp" in p.name]
    assert not leftovers, leftovers
    assert store.complete_shards() == [0] and not store.is_complete()
    assert store.check_shard(0).ok

    monkeypatch.setattr(pq, "write_table", real_write)
    again = ["generate", definition, *TINY, "--out", str(out), "--resume"]
    resumed = CliRunner().invoke(main, again)
    assert resumed.exit_code == 0, resumed.output
    done = open_store(out)
    assert done.is_complete() and len(done) == 4
    assert all(check.ok for check in done.verify())
