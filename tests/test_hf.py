"""load_dataset("diffumask-voc"): name resolution, caching, streaming, resume, num_proc."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from tiny import tiny_settings

import diffumask_datasets.datasets_builder  # noqa: F401  (registers the names where no .pth is installed)
from diffumask_datasets.errors import DiffuMaskError
from diffumask_datasets.resources import builders_dir

REPO = Path(__file__).resolve().parents[1]
# The acceptance line, with one shard per sample so that a kill leaves some done.
ARGS = tiny_settings(shard_size=1)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Runs compared with each other in this module use one CPU thread."""


def stray_files(folder: Path) -> None:
    """Files that the packaged-builder factory would pick up by scanning the directory."""
    (folder / "train.csv").write_text("a,b\n1,2\n")
    (folder / "notes.txt").write_text("not data\n")
    (folder / "data").mkdir(exist_ok=True)
    (folder / "data" / "train-00000-of-00001.parquet").write_bytes(b"not parquet")
    (folder / "my.yaml").write_text("name: not-a-definition\n")


@pytest.fixture(autouse=True)
def cluttered_cwd(tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    stray_files(work)
    monkeypatch.chdir(work)
    return work


def load(cache_dir: Path, **changes):
    from datasets import load_dataset

    return load_dataset(
        "diffumask-voc", split="train", cache_dir=str(cache_dir), **{**ARGS, **changes}
    )


def rows(dataset) -> list[tuple]:
    out = []
    for row in dataset:
        out.append(
            (
                row["index"],
                row["prompt"],
                row["seed"],
                tuple(row["classes"]),
                round(row["quality"], 6),
                np.asarray(row["image"]).tobytes(),
                np.asarray(row["mask"]).tobytes(),
                np.asarray(row["attention"], np.float32).tobytes(),
                row["meta"],
            )
        )
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted prepared run: what every other way of loading must equal."""
    return rows(load(tmp_path_factory.mktemp("hf-reference")))


FRESH = textwrap.dedent(
    """
    import json, socket, sys
    at_start = sorted(m for m in ("torch", "datasets", "diffumask_datasets") if m in sys.modules)
    hook = "_diffumask_datasets_hook" in sys.modules
    attempts = []
    def refuse(self, address):
        attempts.append(str(address))
        raise OSError("network disabled by the test")
    socket.socket.connect = refuse
    import torch
    torch.set_num_threads(1)
    from datasets import load_dataset
    import numpy as np
    ds = load_dataset("diffumask-voc", model="builtin:tiny-random", classes=["bird", "dog"],
                      images_per_class=2, num_inference_steps=3, resolution=64, seed=0,
                      split="train")
    values = sorted(set(np.concatenate([np.asarray(m).ravel() for m in ds["mask"]]).tolist()))
    print(json.dumps({"n": len(ds), "values": values, "classes": list(ds["classes"]),
                      "columns": ds.column_names, "attempts": attempts,
                      "at_start": at_start, "hook": hook,
                      "mask_mode": ds[0]["mask"].mode}))
    """
)


def test_fresh_interpreter_loads_by_name_from_any_directory_offline(tmp_path):
    """The acceptance line, as a user runs it: a new interpreter, no import of the package,
    a working directory full of unrelated data files, no network."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    stray_files(work)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", FRESH],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["hook"], "the .pth hook is not installed: run `make install`"
    assert result["at_start"] == [], "start-up imported heavy modules"
    assert result["n"] == 4
    assert set(result["values"]) <= {0, 3, 12, 255} and {3, 12} & set(result["values"])
    assert sorted(c for classes in result["classes"] for c in classes) == [3, 3, 12, 12]
    assert {"image", "mask", "prompt", "seed", "classes", "quality", "attention"} <= set(
        result["columns"]
    )
    assert result["mask_mode"] == "L"
    assert result["attempts"] == []


def test_same_settings_give_the_same_samples_in_another_cache_dir(reference, tmp_path):
    assert rows(load(tmp_path / "other-cache")) == reference


def test_streaming_yields_the_prepared_samples(reference, tmp_path):
    from datasets import load_dataset

    stream = load_dataset(
        "diffumask-voc", split="train", streaming=True, cache_dir=str(tmp_path), **ARGS
    )
    iterator = iter(stream)
    first = next(iterator)  # available before the rest is generated
    store = next((tmp_path / "diffumask_stores").iterdir())
    assert len(list((store / "data").glob("*.parquet"))) < 4
    assert rows([first, *iterator]) == reference


def test_num_proc_splits_the_shards_and_changes_nothing(reference, tmp_path):
    assert rows(load(tmp_path, num_proc=2)) == reference


KILLED = textwrap.dedent(
    """
    import sys, time, torch
    torch.set_num_threads(1)
    import diffumask_datasets.datasets_builder
    from diffumask_datasets import store

    # a pause after each shard, so the kill lands mid-run however fast the machine is
    write_shard = store._write_parquet_atomic
    store._write_parquet_atomic = lambda *a: (write_shard(*a), time.sleep(0.5))[0]
    from datasets import load_dataset
    load_dataset("diffumask-voc", split="train", cache_dir=sys.argv[1], model="builtin:tiny-random",
                 classes=["bird", "dog"], images_per_class=2, num_inference_steps=3,
                 resolution=64, seed=0, shard_size=1, batch_size=1)
    """
)


def test_kill_9_mid_generation_then_rerun_equals_an_uninterrupted_run(reference, tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED, str(cache)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    shards: list[Path] = []
    while time.monotonic() < deadline and process.poll() is None:
        shards = list(cache.glob("diffumask_stores/*/data/*.parquet"))
        if len(shards) >= 2:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the generation ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert 2 <= len(list(cache.glob("diffumask_stores/*/data/*.parquet"))) < 4
    again = load(cache, batch_size=1)
    assert [row["index"] for row in again] == [0, 1, 2, 3]  # no duplicates, none missing
    assert rows(again) == reference


def test_user_definition_through_data_files(tmp_path):
    from datasets import load_dataset

    example = builders_dir() / "diffumask" / "example.yaml"
    ds = load_dataset(
        "diffumask",
        data_files=str(example),
        split="train",
        cache_dir=str(tmp_path),
        model="builtin:tiny-random",
        classes="apple,banana",
        images_per_class=1,
        num_inference_steps=2,
        resolution=64,
        two_classes=0.0,
    )
    assert len(ds) == 2
    assert ds.features["classes"].feature.names == ["background", "apple", "banana", "orange"]
    assert [row["classes"] for row in ds] == [[1], [2]]


def test_misuse_is_refused_with_the_fix(tmp_path):
    from datasets import load_dataset

    with pytest.raises(DiffuMaskError, match="data_files='my_dataset.yaml'"):
        load_dataset("diffumask", split="train", cache_dir=str(tmp_path))
    with pytest.raises(DiffuMaskError, match="takes no data_files"):
        load_dataset("diffumask-voc", data_files="my.yaml", cache_dir=str(tmp_path))
    with pytest.raises(DiffuMaskError, match="'bird'"):
        load_dataset(
            "diffumask-voc",
            classes=["brid"],
            cache_dir=str(tmp_path),
            **{k: v for k, v in ARGS.items() if k != "classes"},
        )
    with pytest.raises(DiffuMaskError, match="resolution"):
        load_dataset("diffumask-voc", cache_dir=str(tmp_path), **{**ARGS, "resolution": 60})
    with pytest.raises(DiffuMaskError, match="HF_HUB_OFFLINE"):
        load_dataset(
            "diffumask-voc", cache_dir=str(tmp_path), **{**ARGS, "model": "nobody/no-model"}
        )
    with pytest.raises(DiffuMaskError, match="builtin:tiny-random"):
        load_dataset("diffumask-voc", cache_dir=str(tmp_path), **{**ARGS, "model": "builtin:tiny"})
