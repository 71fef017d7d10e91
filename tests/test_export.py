"""VOC, COCO and HF exports: read back the way the toolkits read them, masks equal ours."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffumask_datasets.errors import DiffuMaskError
from diffumask_datasets.export import assign_splits, sample_name
from diffumask_datasets.export.coco import export_coco
from diffumask_datasets.export.hf import card_configs, export_hf, with_configs
from diffumask_datasets.export.voc import export_voc, voc_colormap
from diffumask_datasets.store import Record

# Non-contiguous ids, as a definition with the 20 VOC classes gives bird and dog.
# pycocotools 2.0.11 calls np.array(copy=False) on numpy 2: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CLASS_NAMES = {3: "bird", 12: "dog"}


def synthetic_mask(rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """Blobs of both classes, single pixels, diagonal-only contacts, border touches and
    an ignore band: every case the component split must get right."""
    mask = np.zeros((size, size), np.uint8)
    for class_id in CLASS_NAMES:
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 8, 2)
            h, w = rng.integers(2, 12, 2)
            mask[y : y + h, x : x + w] = class_id
    mask[0, :5] = 3  # touches the border
    mask[size - 1, size - 1] = 12  # one pixel
    mask[20, 20] = mask[21, 21] = 3  # 8-connected diagonal pair
    mask[rng.random((size, size)) < 0.03] = 255
    return mask


def make_records(n: int = 6, size: int = 48) -> list[Record]:
    rng = np.random.default_rng(0)
    records = []
    for index in range(n):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        records.append(
            Record(
                index=index,
                image=Image.fromarray(pixels),
                mask=synthetic_mask(rng, size),
                prompt=f"a photo of a {CLASS_NAMES[3 if index % 2 else 12]}",
                seed=1000 + index,
                classes=["bird" if index % 2 else "dog"],
                quality=float(rng.random()),
            )
        )
    return records


def read_voc_like_torchvision(root: Path, image_set: str) -> list[tuple[Image.Image, Image.Image]]:
    # The steps of torchvision.datasets.VOCSegmentation (year "2012"), which cannot be
    # imported next to the CPU torch here: root/VOCdevkit/VOC2012, the split file's
    # stripped lines, <name>.jpg and <name>.png, image converted to RGB, target as is.
    voc_root = os.path.join(root, "VOCdevkit/VOC2012")
    assert os.path.isdir(voc_root)
    split_f = os.path.join(voc_root, "ImageSets/Segmentation", image_set.rstrip("\n") + ".txt")
    with open(split_f) as f:
        file_names = [x.strip() for x in f.readlines()]
    images = [os.path.join(voc_root, "JPEGImages", x + ".jpg") for x in file_names]
    masks = [os.path.join(voc_root, "SegmentationClass", x + ".png") for x in file_names]
    pairs = zip(images, masks, strict=True)
    return [(Image.open(i).convert("RGB"), Image.open(m)) for i, m in pairs]


def test_voc_colormap_is_the_standard_one():
    cmap = voc_colormap()
    assert cmap.shape == (256, 3) and cmap.dtype == np.uint8
    assert cmap[0].tolist() == [0, 0, 0]
    assert cmap[1].tolist() == [128, 0, 0]  # aeroplane
    assert cmap[3].tolist() == [128, 128, 0]  # bird
    assert cmap[12].tolist() == [64, 0, 128]  # dog
    assert cmap[15].tolist() == [192, 128, 128]  # person
    assert cmap[255].tolist() == [224, 224, 192]  # the ignore/boundary colour
    assert len({tuple(c) for c in cmap.tolist()}) == 256  # every id its own colour


def test_voc_export_reads_back_like_torchvision(tmp_path):
    records = make_records(8)
    summary = export_voc(records, CLASS_NAMES, tmp_path / "V", val_fraction=0.25)
    by_name = {sample_name(r.index): r for r in records}
    voc = tmp_path / "V" / "VOCdevkit" / "VOC2012"
    split_files = {
        s: (voc / "ImageSets/Segmentation" / f"{s}.txt").read_text().split()
        for s in ("train", "val", "trainval")
    }
    assert len(split_files["val"]) == 2 and len(split_files["train"]) == 6
    assert sorted(split_files["train"] + split_files["val"]) == sorted(split_files["trainval"])
    assert sorted(split_files["trainval"]) == sorted(by_name)
    assert summary.splits["val"] == split_files["val"]
    for image_set in ("train", "val", "trainval"):
        pairs = read_voc_like_torchvision(tmp_path / "V", image_set)
        assert len(pairs) == len(split_files[image_set])
        for name, (image, target) in zip(split_files[image_set], pairs, strict=True):
            record = by_name[name]
            assert target.mode == "P"
            palette = np.array(target.getpalette()[: 256 * 3]).reshape(256, 3)
            assert (palette == voc_colormap()).all()
            np.testing.assert_array_equal(np.array(target), record.mask)
            assert image.size == record.image.size
            # JPEG is lossy; noise images are its worst case, so only a loose bound.
            diff = np.abs(np.asarray(image, float) - np.asarray(record.image, float))
            assert diff.mean() < 20
    # mmsegmentation reads ann_file lines + suffixes, and the PNG with pillow 'unchanged'.
    info = json.loads((voc / "diffumask.json").read_text())
    assert info["mmseg_classes"][3] == "bird" and info["mmseg_classes"][12] == "dog"
    assert info["mmseg_classes"][0] == "background" and len(info["mmseg_classes"]) == 13
    assert info["ignore_index"] == 255


def test_coco_export_round_trips_through_pycocotools(tmp_path):
    from pycocotools.coco import COCO
    from scipy import ndimage

    records = make_records(6)
    # a store's class_names carry background at 0: it is no COCO category
    with_background = {0: "background", **CLASS_NAMES}
    summary = export_coco(records, with_background, tmp_path / "C", val_fraction=0.3)
    by_index = {r.index: r for r in records}
    seen = []
    for split in ("train", "val"):
        coco = COCO(str(tmp_path / "C" / "annotations" / f"instances_{split}.json"))
        cats = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
        assert cats == CLASS_NAMES
        for image_id in coco.getImgIds():
            entry = coco.loadImgs(image_id)[0]
            record = by_index[entry["diffumask_index"]]
            seen.append(record.index)
            assert entry["file_name"] == f"{sample_name(record.index)}.png"
            image = Image.open(tmp_path / "C" / "images" / split / entry["file_name"])
            np.testing.assert_array_equal(np.asarray(image), np.asarray(record.image))
            semantic = Image.open(tmp_path / "C" / "semantic" / split / entry["file_name"])
            assert semantic.mode == "L"
            np.testing.assert_array_equal(np.asarray(semantic), record.mask)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            covered = np.zeros(record.mask.shape, np.int32)
            for class_id in CLASS_NAMES:
                union = np.zeros(record.mask.shape, bool)
                regions = [a for a in anns if a["category_id"] == class_id]
                _, n_components = ndimage.label(record.mask == class_id, np.ones((3, 3)))
                assert len(regions) == n_components
                for ann in regions:
                    decoded = coco.annToMask(ann).astype(bool)
                    assert ann["iscrowd"] == 0
                    assert ann["area"] == decoded.sum()
                    ys, xs = np.nonzero(decoded)
                    x0, y0 = xs.min(), ys.min()
                    w, h = xs.max() - x0 + 1, ys.max() - y0 + 1
                    assert ann["bbox"] == [x0, y0, w, h]
                    assert ndimage.label(decoded, np.ones((3, 3)))[1] == 1
                    union |= decoded
                    covered += decoded
                np.testing.assert_array_equal(union, record.mask == class_id)
            assert covered.max() <= 1  # annotations never overlap
            assert not covered[record.mask == 255].any()  # ignore is in no annotation
    assert sorted(seen) == sorted(by_index)
    assert summary.details["annotations"] > len(records) * 2


def test_assign_splits_is_deterministic_and_exact():
    indices = list(range(50))
    first = assign_splits(indices, 0.2)
    assert first == assign_splits(list(reversed(indices)), 0.2)
    assert sum(s == "val" for s in first.values()) == 10
    assert all(s == "train" for s in assign_splits(indices, 0.0).values())
    assert sum(s == "val" for s in assign_splits([0, 1, 2], 0.01).values()) == 1
    assert sum(s == "val" for s in assign_splits([0, 1], 0.9).values()) == 1
    # a different set of samples gives a different val set, not always the first ones
    assert {i for i, s in first.items() if s == "val"} != set(range(10))
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(DiffuMaskError, match="val-fraction"):
            assign_splits(indices, bad)


@pytest.mark.parametrize("export", [export_voc, export_coco])
def test_export_refuses_non_empty_destination_and_overwrites_whole(tmp_path, export):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(DiffuMaskError, match="not empty.*--overwrite"):
        export(make_records(2), CLASS_NAMES, dest)
    assert (dest / "keep.txt").read_text() == "mine"
    export(make_records(2), CLASS_NAMES, dest, overwrite=True)
    assert not (dest / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folders left


@pytest.mark.parametrize("export", [export_voc, export_coco])
def test_failed_export_leaves_nothing_behind(tmp_path, export):
    records = make_records(3)
    records[2].mask = records[2].mask[:10]  # corrupt: mask smaller than its image
    with pytest.raises(DiffuMaskError, match="sample 2"):
        export(records, CLASS_NAMES, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_unknown_class_ids(tmp_path):
    records = make_records(1)
    records[0].mask[0, 0] = 7
    with pytest.raises(DiffuMaskError, match=r"\[7\]"):
        export_coco(records, CLASS_NAMES, tmp_path / "C")


@pytest.mark.parametrize("fmt", ["voc", "coco", "hf"])
def test_every_format_checks_its_records_in_one_loop(tmp_path, fmt):
    """The one checked loop: a sample given twice and a mask of another size are refused
    by every format, and nothing is left at the destination."""
    write = {"voc": export_voc, "coco": export_coco}.get(fmt) or (
        lambda *a, **k: export_hf(*a, card="# c\n", **k)
    )
    twice = make_records(2)
    twice[1].index = twice[0].index
    with pytest.raises(DiffuMaskError, match="sample 0 appears twice"):
        write(with_attention(twice), CLASS_NAMES, tmp_path / "twice")
    shrunk = make_records(2)
    shrunk[1].mask = shrunk[1].mask[:-1]
    with pytest.raises(DiffuMaskError, match="does not match its"):
        write(with_attention(shrunk), CLASS_NAMES, tmp_path / "shrunk")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_destination_overlapping_the_store(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    with pytest.raises(DiffuMaskError, match="overlaps the store"):
        export_voc(make_records(1), CLASS_NAMES, store / "voc", source=store)
    with pytest.raises(DiffuMaskError, match="overlaps the store"):
        export_voc(make_records(1), CLASS_NAMES, tmp_path, overwrite=True, source=store)


def with_attention(records: list[Record]) -> list[Record]:
    rng = np.random.default_rng(2)
    for record in records:
        record.attention = {name: rng.random((8, 8)).astype(np.float32) for name in record.classes}
    return records


@pytest.mark.parametrize("layout", ["parquet", "disk"])
def test_hf_export_round_trips_masks_images_and_splits(tmp_path, layout):
    import datasets

    records = with_attention(make_records(6))
    by_index = {r.index: r for r in records}
    card = "---\nlicense: other\nconfigs:\n- config_name: old\n---\n# My card\n"
    summary = export_hf(
        records, CLASS_NAMES, tmp_path / "H", val_fraction=0.3, card=card, layout=layout
    )
    if layout == "parquet":
        loaded = datasets.load_dataset(str(tmp_path / "H"), cache_dir=str(tmp_path / "c"))
    else:
        loaded = datasets.load_from_disk(str(tmp_path / "H"))
    expected = assign_splits(list(by_index), 0.3)
    assert set(loaded) == {"train", "validation"}
    for hf_split, split in (("train", "train"), ("validation", "val")):
        part = loaded[hf_split]
        assert sorted(part["index"]) == sorted(i for i, s in expected.items() if s == split)
        assert summary.splits[split] == [sample_name(i) for i in sorted(part["index"])]
        names = part.features["classes"].feature.names
        for row in part:
            record = by_index[row["index"]]
            assert row["mask"].mode == "L"
            np.testing.assert_array_equal(np.asarray(row["mask"]), record.mask)
            np.testing.assert_array_equal(np.asarray(row["image"]), np.asarray(record.image))
            assert [names[c] for c in row["classes"]] == record.classes
            assert row["prompt"] == record.prompt and row["seed"] == record.seed
            attention = np.asarray(row["attention"], np.float32)
            np.testing.assert_allclose(attention[0], record.attention[record.classes[0]], atol=1e-3)
    readme = (tmp_path / "H" / "README.md").read_text()
    assert "# My card" in readme and "license: other" in readme
    if layout == "parquet":  # the card's own configs give way to the files written
        assert "config_name: old" not in readme
        assert "path: data/validation-*-" in readme
    assert sorted(p.name for p in tmp_path.iterdir()) in (["H"], ["H", "c"])  # no staging


def test_hf_push_needs_the_parquet_layout(tmp_path):
    with pytest.raises(DiffuMaskError, match="parquet"):
        export_hf(
            make_records(2),
            CLASS_NAMES,
            tmp_path / "H",
            card="x",
            layout="disk",
            push_to_hub="me/x",
        )
    assert not (tmp_path / "H").exists()


def test_with_configs_adds_a_header_when_the_card_has_none():
    text = with_configs("# Card\n", card_configs({"train": "data/train-*.parquet"}))
    assert text.startswith("---\nconfigs:\n- config_name: default\n")
    assert text.endswith("---\n\n# Card\n")


def test_hf_exports_into_same_named_folders_never_load_each_others_rows(tmp_path):
    # datasets keys its cache on the folder name and the card's data_files strings; the
    # export's content digest in those strings keeps a second export from loading the
    # first one's cached rows.
    import datasets

    cache = str(tmp_path / "cache")
    first, second = with_attention(make_records(3)), with_attention(make_records(5))
    export_hf(first, CLASS_NAMES, tmp_path / "a" / "H", card="# a\n", val_fraction=0)
    export_hf(second, CLASS_NAMES, tmp_path / "b" / "H", card="# b\n", val_fraction=0)
    assert len(datasets.load_dataset(str(tmp_path / "a" / "H"), cache_dir=cache)["train"]) == 3
    assert len(datasets.load_dataset(str(tmp_path / "b" / "H"), cache_dir=cache)["train"]) == 5
