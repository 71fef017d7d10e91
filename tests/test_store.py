"""The shard store and build_dataset: layout, resume, refusal, concurrency, write_store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from tiny import tiny_settings

from diffumask_datasets.build import CorruptShardWarning, GenerationConfig, build_dataset
from diffumask_datasets.definitions import load_definition
from diffumask_datasets.errors import DiffuMaskError
from diffumask_datasets.families import SD3Family
from diffumask_datasets.store import DIGESTS, MANIFEST, file_digest, open_store, write_store

REPO = Path(__file__).resolve().parents[1]
SMALL = tiny_settings()


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Runs compared with each other in this module use one CPU thread."""


class NoEngine:
    """Stands in for the engine where nothing may be generated."""

    def __call__(self, *args, **kwargs):
        raise AssertionError("the engine was called although every shard was complete")


def config(**changes) -> GenerationConfig:
    return GenerationConfig(**{**SMALL, "images_per_class": 3, "shard_size": 2, **changes})


def as_tuples(store) -> list[tuple]:
    """Everything of every record, as comparable values."""
    rows = []
    for r in store.records():
        rows.append(
            (
                r.index,
                r.prompt,
                r.seed,
                tuple(r.classes),
                round(r.quality, 6),
                np.asarray(r.image).tobytes(),
                r.mask.tobytes(),
                tuple((k, v.astype(np.float32).tobytes()) for k, v in sorted(r.attention.items())),
            )
        )
    return rows


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("store") / "birds"
    store = build_dataset(out, "voc", config(), progress=False, engine=tiny)
    return store


def test_store_layout_and_records(built):
    store = built
    assert len(store) == 6 and store.num_shards == 3
    assert [p.name for p in sorted((store.path / "data").iterdir())] == [
        f"train-0000{k}-of-00003.parquet" for k in range(3)
    ]
    manifest = json.loads((store.path / MANIFEST).read_text())
    assert manifest["definition"]["name"] == "voc"
    assert manifest["config"]["classes"] == ["bird", "dog"]
    assert len(manifest["fingerprint"]) == 64
    records = list(store.records())
    assert [r.index for r in records] == list(range(6))
    assert [r.classes for r in records] == [["bird"]] * 3 + [["dog"]] * 3
    for r in records:
        assert r.image.mode == "RGB" and r.image.size == (64, 64)
        assert r.mask.dtype == np.uint8 and r.mask.shape == (64, 64)
        assert set(np.unique(r.mask)) <= {0, 3, 12, 255}
        # low-resolution float maps: resolution // 8, stored as float16
        (name,) = r.attention
        assert r.attention[name].shape == (8, 8) and r.attention[name].dtype == np.float32
        assert 0.0 <= r.attention[name].min() <= r.attention[name].max() <= 1.0
        assert r.meta["refinement"]["chain"] and r.meta["model"] == "builtin:tiny-random"
        assert 0.0 <= r.quality <= 1.0
    assert store.class_names[3] == "bird" and store.class_names[0] == "background"


def test_records_decode_in_a_process_that_never_imported_datasets(built):
    # Without `datasets`, pyarrow does not know its Array3D extension type and reads the
    # attention column as nested lists: records must come out the same.
    script = textwrap.dedent(
        f"""
        import sys
        from diffumask_datasets.store import open_store
        records = list(open_store({str(built.path)!r}).records())
        assert "datasets" not in sys.modules
        print(len(records), sorted({{m.shape for r in records for m in r.attention.values()}}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert out.stdout.split() == ["6", "[(8,", "8)]"]


def test_shards_are_readable_by_datasets_directly(built, tmp_path):
    import datasets

    ds = datasets.load_dataset(
        "parquet", data_dir=str(built.path), split="train", cache_dir=str(tmp_path)
    )
    assert len(ds) == len(built)
    assert isinstance(ds.features["mask"], datasets.Image)
    assert ds.features["classes"].feature.names[12] == "dog"
    records = list(built.records())
    for row, record in zip(ds, records, strict=True):
        assert row["mask"].mode == "L"
        assert np.array_equal(np.asarray(row["mask"]), record.mask)
        assert np.asarray(row["attention"]).shape == (1, 8, 8)


def test_resume_skips_complete_shards_and_gives_the_same_store(built):
    again = build_dataset(
        built.path, "voc", config(), resume=True, progress=False, engine=NoEngine()
    )
    assert as_tuples(again) == as_tuples(built)


def test_batch_size_is_not_part_of_the_settings(built):
    again = build_dataset(
        built.path, "voc", config(batch_size=1), resume=True, progress=False, engine=NoEngine()
    )
    assert len(again) == len(built)


def test_existing_store_without_resume_is_refused(built):
    with pytest.raises(DiffuMaskError, match="resume"):
        build_dataset(built.path, "voc", config(), progress=False, engine=NoEngine())


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"num_inference_steps": 4}, "num_inference_steps"),
        ({"classes": ["bird"]}, "classes"),
        ({"seed": 1}, "seed"),
    ],
)
def test_resume_with_other_settings_is_refused_naming_them(built, change, named):
    with pytest.raises(DiffuMaskError, match=named):
        build_dataset(built.path, "voc", config(**change), resume=True, engine=NoEngine())


def test_the_fingerprint_reads_the_refinements_resolved_parameters(monkeypatch):
    """Spelt three ways, the default refinement is one setting; a changed parameter (as a
    changed default would be) is another, so a store is never resumed with masks cut two
    ways. Left without a method, the refinement is each model family's default: a changed
    family default changes its hash, and not a named method's."""
    definition = load_definition("voc")
    default = config(refinement=None).fingerprint(definition)
    named = config(refinement="adaptive").fingerprint(definition)
    assert config(refinement={}).fingerprint(definition) == default
    assert config(refinement={"colour_steps": 10}).fingerprint(definition) == default
    assert config(refinement={"colour_steps": 0}).fingerprint(definition) != default
    assert config(refinement={"classes_from": "all"}).fingerprint(definition) != default
    assert named != default  # SD3 and FLUX.1 default to another method
    monkeypatch.setattr(SD3Family, "default_method", "affinity")
    assert config(refinement=None).fingerprint(definition) != default
    assert config(refinement="adaptive").fingerprint(definition) == named


def test_a_store_whose_settings_now_resolve_otherwise_is_refused_saying_why(built, tmp_path):
    """A store written by a version whose defaults cut masks otherwise: the same stored
    settings, another fingerprint; resuming names the likely cause and writes nothing."""
    old = copy_store(built, tmp_path / "old")
    manifest = json.loads((old / MANIFEST).read_text())
    manifest["fingerprint"] = "0" * 64  # what an earlier version's defaults hashed to
    (old / MANIFEST).write_text(json.dumps(manifest))
    before = file_hashes(old)
    with pytest.raises(DiffuMaskError, match="resolve to other samples in this version"):
        build_dataset(old, "voc", config(), resume=True, progress=False, engine=NoEngine())
    assert file_hashes(old) == before


def test_a_missing_shard_is_regenerated_identically(built, tiny, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(built.path, copy)
    (copy / "data" / "train-00001-of-00003.parquet").unlink()
    with pytest.raises(DiffuMaskError, match="incomplete"):
        open_store(copy)
    store = build_dataset(copy, "voc", config(), resume=True, progress=False, engine=tiny)
    assert as_tuples(store) == as_tuples(built)


def copy_store(store, to: Path) -> Path:
    import shutil

    shutil.copytree(store.path, to)
    return to


def file_hashes(path: Path) -> dict[str, str]:
    """sha256 of every file of a store but its lock files."""
    return {
        str(f.relative_to(path)): file_digest(f).sha256
        for f in sorted(path.rglob("*"))
        if f.is_file() and ".work" not in f.parts
    }


def test_each_shard_digest_is_recorded_when_written(built):
    recorded = json.loads((built.path / DIGESTS).read_text())
    assert recorded["algorithm"] == "sha256"
    assert sorted(recorded["shards"]) == [f"train-0000{k}-of-00003.parquet" for k in range(3)]
    for k in range(3):
        entry = recorded["shards"][built.shard_path(k).name]
        actual = file_digest(built.shard_path(k))
        assert (entry["sha256"], entry["bytes"]) == (actual.sha256, actual.size)
    checks = built.verify()
    assert [(c.shard, c.ok, c.verified) for c in checks] == [(k, True, True) for k in range(3)]


def test_damaged_shards_are_found_and_remade_on_resume_with_a_warning(built, tiny, tmp_path):
    copy = copy_store(built, tmp_path / "copy")
    expected = file_hashes(copy)
    # shard 1: one byte changed in the middle (same size, footer intact: only the digest
    # sees it); shard 2: torn (truncated) by a crash of a network filesystem
    flipped = copy / "data" / "train-00001-of-00003.parquet"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    torn = copy / "data" / "train-00002-of-00003.parquet"
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])

    with pytest.raises(DiffuMaskError, match="train-00002-of-00003.parquet.*corrupt.*--resume"):
        open_store(copy)
    checks = open_store(copy, allow_incomplete=True).verify()
    assert [c.ok for c in checks] == [True, False, False]
    assert "sha256 differs" in checks[1].problem and "bytes on disk" in checks[2].problem

    with pytest.warns(CorruptShardWarning) as caught:
        store = build_dataset(copy, "voc", config(), resume=True, progress=False, engine=tiny)
    messages = " ".join(str(w.message) for w in caught)
    assert "shard 1 " in messages and "shard 2 " in messages and "regenerating" in messages
    assert "shard 0 " not in messages
    assert file_hashes(copy) == expected
    assert all(c.ok and c.verified for c in store.verify())


def test_a_store_without_digests_opens_and_gets_them_on_resume(built, tmp_path):
    copy = copy_store(built, tmp_path / "old")
    expected = (copy / DIGESTS).read_text()
    (copy / DIGESTS).unlink()  # as written before digests existed
    store = open_store(copy)
    checks = store.verify()
    assert all(c.ok and not c.verified for c in checks)
    assert "no digest recorded" in checks[0].describe()
    build_dataset(copy, "voc", config(), resume=True, progress=False, engine=NoEngine())
    assert (copy / DIGESTS).read_text() == expected


def test_resume_removes_only_the_temporary_files_of_dead_writers(built, tmp_path):
    import socket

    copy = copy_store(built, tmp_path / "tmps")
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    host, name = socket.gethostname(), "train-00001-of-00003.parquet"
    dead = copy / ".work" / f"{name}.{host}.{ended.stdout.strip()}.tmp"
    alive = copy / ".work" / f"{name}.{host}.{os.getpid()}.tmp"
    elsewhere = copy / ".work" / f"{name}.other-machine.1.tmp"
    for tmp in (dead, alive, elsewhere):
        tmp.write_bytes(b"half a shard")
    build_dataset(copy, "voc", config(), resume=True, progress=False, engine=NoEngine())
    assert not dead.exists() and alive.exists() and elsewhere.exists()


def test_an_unreadable_digest_file_is_named(built, tmp_path):
    copy = copy_store(built, tmp_path / "bad")
    (copy / DIGESTS).write_text("{ torn")
    with pytest.raises(DiffuMaskError, match=f"{DIGESTS}.*corrupt.*delete it"):
        open_store(copy)


def test_open_store_errors_name_the_path(tmp_path):
    with pytest.raises(DiffuMaskError, match="does not exist"):
        open_store(tmp_path / "nowhere")
    with pytest.raises(DiffuMaskError, match="manifest.json"):
        open_store(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(DiffuMaskError, match="corrupt"):
        open_store(tmp_path)


def test_a_folder_with_other_files_is_not_taken_over(tmp_path):
    (tmp_path / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(DiffuMaskError, match="not empty"):
        build_dataset(tmp_path, "voc", config(), engine=NoEngine())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["holiday.jpg"]


def test_write_store_keeps_indices_and_is_complete(built, tmp_path):
    kept = [r for r in built.records() if r.index % 2 == 0]
    manifest = {**built.manifest, "shard_size": 2, "filter": {"note": "even indices"}}
    copy = write_store(tmp_path / "even", iter(kept), manifest)
    assert len(copy) == 3 and copy.num_shards == 2
    assert [r.index for r in copy.records()] == [0, 2, 4]
    assert copy.manifest["filter"] == {"note": "even indices"}
    assert all(c.ok and c.verified for c in copy.verify())
    with pytest.raises(DiffuMaskError, match="not empty"):
        write_store(tmp_path / "even", iter(kept), manifest)


WORKER = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from diffumask_datasets.build import GenerationConfig, build_dataset
    config = GenerationConfig(model="builtin:tiny-random", classes=["bird", "dog"],
        images_per_class=3, num_inference_steps=3, resolution=64, seed=0, shard_size=1)
    store = build_dataset(sys.argv[1], "voc", config, resume=True, progress=False)
    print(len(store))
    """
)


def test_two_processes_filling_one_store_give_the_uninterrupted_result(tmp_path, tiny):
    reference = build_dataset(
        tmp_path / "reference", "voc", config(shard_size=1), progress=False, engine=tiny
    )
    shared = tmp_path / "shared"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(shared)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for worker in workers:
        out, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-2000:]
        assert out.strip().splitlines()[-1] == "6"
    assert as_tuples(open_store(shared)) == as_tuples(reference)
    assert not [p for p in (shared / ".work").iterdir() if p.suffix == ".tmp"]


# -- dataset cards ----------------------------------------------------------------------


def test_card_is_rendered_with_real_statistics_and_valid_hub_metadata(built):
    import re

    import yaml

    from diffumask_datasets.cards import render_card, validate_card

    text = (built.path / "README.md").read_text()  # written when the build completed
    assert text == render_card(built)
    card = validate_card(text)
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["task_categories"] == ["image-segmentation"]
    assert header["license"] == "apache-2.0"  # the built-in model's license
    assert header["size_categories"] == ["n<1K"]
    assert header["configs"][0]["data_files"][0]["split"] == "train"
    assert card.data.pretty_name == "DiffuMask PASCAL VOC"
    assert not re.findall(r"\$[a-z_]+", text.split("---\n", 2)[2])  # every placeholder filled
    masks = [r.mask for r in built.records()]
    for name, class_id in (("bird", 3), ("dog", 12)):
        pixels = sum(int((m == class_id).sum()) for m in masks)
        row = next(
            line for line in text.splitlines() if line.startswith(f"| {class_id} | {name} |")
        )
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == "3"  # images prompted
        assert cells[4] == f"{pixels:,}"
    assert "| 5 | bottle |" not in text  # classes the dataset was not made for are left out
    assert "builtin:tiny-random" in text and "wu2023diffumask" in text
    assert "Known limitations" in text


def test_store_with_its_card_loads_as_a_dataset_folder(built, tmp_path):
    import datasets

    ds = datasets.load_dataset(str(built.path), split="train", cache_dir=str(tmp_path))
    assert len(ds) == len(built) and ds.features["mask"] == datasets.Image()


def test_every_definition_has_a_card_template():
    from diffumask_datasets.definitions import builtin_definitions
    from diffumask_datasets.resources import cards_dir

    for name in [*builtin_definitions(), "diffumask"]:
        assert (cards_dir() / f"{name}.md").is_file(), name


@pytest.mark.parametrize(
    ("old", "new", "named"),
    [
        ("license: apache-2.0", "license: my-own", "license"),
        ("- n<1K", "- lots", "size_categories"),
        ("- image-segmentation", "- image-classification", "image-segmentation"),
        ("  - split: train", "  - split: train-set", "train-set"),
    ],
)
def test_card_validation_names_what_the_hub_would_refuse(built, old, new, named):
    from diffumask_datasets.cards import validate_card

    text = (built.path / "README.md").read_text()
    assert old in text
    with pytest.raises(DiffuMaskError, match=named):
        validate_card(text.replace(old, new, 1))


def test_definition_pairing_default_is_dropped_for_a_single_class():
    from diffumask_datasets.definitions import load_definition
    from diffumask_datasets.resources import builders_dir
    from diffumask_datasets.shards import plan_for

    fruit = load_definition(builders_dir() / "diffumask" / "example.yaml")
    assert fruit.defaults["two_classes"] == 0.25
    assert GenerationConfig(classes=["apple", "banana"]).resolve(fruit).two_classes == 0.25
    single = GenerationConfig(classes=["apple"]).resolve(fruit)
    assert single.two_classes == 0.0 and len(plan_for(fruit, single)) == 50
    asked = GenerationConfig(classes=["apple"], two_classes=0.5).resolve(fruit)
    with pytest.raises(DiffuMaskError, match="two classes"):
        plan_for(fruit, asked)
