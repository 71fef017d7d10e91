"""One set of dataset figures (statistics.py) behind `diffumask info`, the dataset card and
the FiftyOne class statistics; the store's mask-only read it uses."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from test_cli import synthetic_records

from diffumask_datasets.cards import render_card
from diffumask_datasets.cli import main
from diffumask_datasets.definitions import load_definition
from diffumask_datasets.errors import DiffuMaskError
from diffumask_datasets.statistics import (
    MaskFigures,
    class_rows,
    dataset_statistics,
    shard_summary,
    store_statistics,
)
from diffumask_datasets.store import make_manifest, open_store, write_store

NAMES = {0: "background", 3: "bird", 12: "dog", 15: "person"}


def test_figures_of_two_masks_by_hand():
    first = np.zeros((4, 4), np.uint8)
    first[:2, :2] = 3  # bird: 4 of 16 pixels
    first[3, 3] = 255
    second = np.zeros((2, 4), np.uint8)
    second[0, :] = 3  # bird: 4 of 8
    second[1, :2] = 12  # dog: 2 of 8
    stats = dataset_statistics(
        [
            MaskFigures.of_mask(first, ["bird"], 0.2),
            MaskFigures.of_mask(second, ["bird", "dog"], 0.6),
        ],
        NAMES,
    )
    assert stats["samples"] == 2
    assert stats["image_sizes"] == {"4x4": 1, "4x2": 1}
    bird, dog, person = (stats["classes"][n] for n in ("bird", "dog", "person"))
    assert (bird["id"], bird["prompted_images"], bird["images_with_pixels"]) == (3, 2, 2)
    assert bird["pixels"] == 8 and bird["pixel_share"] == pytest.approx(8 / 24)
    assert (bird["min_area"], bird["max_area"]) == (pytest.approx(0.25), pytest.approx(0.5))
    assert bird["mean_area"] == pytest.approx(0.375)
    assert bird["mean_quality"] == pytest.approx(0.4)
    assert dog["prompted_images"] == 1 and dog["mean_area"] == pytest.approx(0.25)
    assert dog["mean_quality"] == pytest.approx(0.6)
    assert person["images_with_pixels"] == 0 and person["mean_quality"] is None
    assert stats["ignore_share"] == pytest.approx(1 / 24)
    assert stats["background_share"] == pytest.approx(13 / 24)
    assert stats["quality"]["count"] == 2 and stats["quality"]["median"] == pytest.approx(0.4)
    assert sum(stats["quality"]["histogram"]) == 2
    # the rows a dataset has: prompted or shown, or asked for
    assert [r["name"] for r in class_rows(stats)] == ["bird", "dog"]
    assert [r["name"] for r in class_rows(stats, also=["person"])] == ["bird", "dog", "person"]


def test_a_sample_without_a_score_counts_but_leaves_the_quality_alone():
    mask = np.full((2, 2), 3, np.uint8)
    stats = dataset_statistics(
        [MaskFigures.of_mask(mask, ["bird"], 0.5), MaskFigures(["bird"], None, {3: 4}, (2, 2))],
        NAMES,
    )
    assert stats["samples"] == 2 and stats["quality"]["count"] == 1
    assert stats["classes"]["bird"]["prompted_images"] == 2
    assert stats["classes"]["bird"]["mean_quality"] == pytest.approx(0.5)


def test_an_empty_dataset_has_zero_figures():
    stats = dataset_statistics([], NAMES)
    assert stats["samples"] == 0 and stats["quality"]["count"] == 0
    assert stats["background_share"] == 0.0 and stats["quality"]["histogram"] == [0] * 10


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    manifest = make_manifest(
        load_definition("voc"),
        {"model": "builtin:tiny-random", "classes": ["bird", "dog"]},
        "figures",
        num_samples=6,
        shard_size=2,
        attention_size=8,
    )
    return write_store(tmp_path_factory.mktemp("figures") / "ds", synthetic_records(), manifest)


def test_the_store_reads_masks_classes_and_quality_alone(store):
    got = list(store.masks())
    records = list(store.records())
    assert len(got) == len(records) == 6
    for (mask, classes, quality), record in zip(got, records, strict=True):
        assert np.array_equal(mask, record.mask) and mask.dtype == np.uint8
        assert classes == record.classes and quality == pytest.approx(record.quality)


def test_info_and_the_card_show_the_same_figures(store):
    stats = store_statistics(store)
    expected = dataset_statistics(
        (MaskFigures.of_mask(r.mask, r.classes, r.quality) for r in store.records()),
        store.class_names,
    )
    assert stats == expected
    result = CliRunner().invoke(main, ["info", str(store.path), "--json"], catch_exceptions=False)
    shown = json.loads(result.stdout)
    assert shown["classes"] == json.loads(json.dumps(stats["classes"]))
    assert shown["quality"] == json.loads(json.dumps(stats["quality"]))
    card = render_card(store)
    for name in ("bird", "dog"):
        row = stats["classes"][name]
        assert (
            f"| {row['id']} | {name} | {row['prompted_images']} | {row['images_with_pixels']} "
            f"| {row['pixels']:,} | {100 * row['pixel_share']:.2f}% |"
        ) in card
    # the card lists the classes the dataset was made for, not the other 18 of VOC
    assert "| person |" not in card


def test_damaged_shards_are_named_with_the_fix(store, tmp_path):
    checks = store.verify()
    assert shard_summary(store, checks) == {"total": 3, "sha256_verified": 3, "no_digest": 0}
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(store.path, copy)
    shard = open_store(copy).shard_path(1)
    shard.write_bytes(shard.read_bytes()[:-20])
    damaged = open_store(copy, allow_incomplete=True)
    with pytest.raises(DiffuMaskError, match=r"1 of 3 shards are damaged.*--resume"):
        shard_summary(damaged, damaged.verify())
