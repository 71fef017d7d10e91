"""Given images into a store (label_dataset) and a store's masks scored against labels."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffumask_datasets import shapes_world as sw
from diffumask_datasets.definitions import load_definition
from diffumask_datasets.errors import DiffuMaskError
from diffumask_datasets.label_store import LabelConfig, image_inputs, label_dataset
from diffumask_datasets.quality.labels import score_masks
from diffumask_datasets.store import Record, make_manifest, open_store, write_store

SHAPES = list(sw.SHAPES)
FAST = {"num_inference_steps": 10, "guidance_scale": 4.0, "strength": 0.3}


@pytest.fixture(scope="module")
def voc(tmp_path_factory, one_thread) -> Path:
    dest = tmp_path_factory.mktemp("label") / "voc"
    sw.render_voc(dest, count=6, seed=3, max_objects=2)
    return dest


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, voc) -> Path:
    out = tmp_path_factory.mktemp("label") / "store"
    config = LabelConfig(model="builtin:shapes", classes=SHAPES, definition="shapes", **FAST)
    label_dataset(voc, out, config, progress=False)
    return out


def test_a_voc_folder_is_labelled_into_a_store(labelled, voc):
    store = open_store(labelled)
    assert store.is_complete() and len(store) == 6
    assert store.class_names == load_definition("shapes").class_names
    # the card loads the folder itself: its settings would generate other images
    card = (labelled / "README.md").read_text()
    assert 'load_dataset("path/to/this/folder", split="train")' in card
    assert "diffumask label" in card and 'load_dataset("diffumask-' not in card
    jpegs = image_inputs(voc)
    for record, path in zip(store.records(), jpegs, strict=True):
        assert record.meta["source"] == str(path)
        # the stored image is the given one, pixel for pixel
        assert record.image.tobytes() == Image.open(path).convert("RGB").tobytes()
        assert record.mask.shape == (64, 64)
        assert record.meta["route"] == "image-to-image"
        # the definition's refinement, as generate takes it
        expected = load_definition("shapes").defaults["refinement"]["method"]
        assert record.meta["refinement"]["method"] == expected


def test_resume_keeps_the_store_and_other_settings_are_refused(labelled, voc, monkeypatch):
    from diffumask_datasets import DiffuMask

    engine = DiffuMask("builtin:shapes")

    def no_labelling(*args, **kwargs):
        raise AssertionError("a complete store labels nothing again")

    monkeypatch.setattr(engine, "label", no_labelling)

    config = LabelConfig(model="builtin:shapes", classes=SHAPES, definition="shapes", **FAST)
    label_dataset(voc, labelled, config, resume=True, progress=False, engine=engine)
    other = LabelConfig(
        model="builtin:shapes", classes=SHAPES, definition="shapes", **{**FAST, "strength": 0.5}
    )
    with pytest.raises(DiffuMaskError, match="different settings"):
        label_dataset(voc, labelled, other, resume=True, progress=False, engine=engine)


def test_labelled_masks_scored_against_the_voc_labels(labelled, voc):
    report = score_masks(labelled, voc)
    assert report.images == 6 and report.unmatched == 0
    assert set(report.per_class) == {"background", *SHAPES}
    assert (
        set(report.by_objects) <= {1, 2}
        and sum(r["images"] for r in report.by_objects.values()) == 6
    )
    assert 0.0 <= report.miou <= 1.0
    # every pixel but those the refinement's band leaves unlabelled (255)
    ignored = sum(int((r.mask == 255).sum()) for r in open_store(labelled).records())
    assert np.asarray(report.confusion).sum() == 6 * 64 * 64 - ignored
    data = json.loads(json.dumps(report.to_dict()))
    assert data["images"] == 6 and "confusion" in data
    assert "confusion" in report.describe()


def exact_store(path: Path, count: int, blank: set[int] = frozenset()):
    """A store of rendered scenes with exact masks; samples in `blank` all background."""
    manifest = make_manifest(load_definition("shapes"), {"source": "test"}, "test", count, 4, 8)
    records = []
    for r in sw.scene_records(count, seed=1, max_objects=3):
        mask = np.zeros_like(r.mask) if r.index in blank else r.mask
        records.append(Record(r.index, r.image, mask, r.prompt, r.seed, r.classes, 1.0))
    return write_store(path, records, manifest)


def test_scores_against_a_store_of_exact_masks_are_exact(tmp_path):
    truth = exact_store(tmp_path / "truth", 6)
    same = score_masks(truth.path, truth.path)
    assert same.miou == pytest.approx(1.0) and same.images == 6
    assert sorted(same.by_objects) == [1, 2, 3]  # scene i holds 1 + i % 3 objects
    blank = exact_store(tmp_path / "blank", 6, blank={0, 3})  # the two 1-object scenes
    report = score_masks(blank.path, truth.path)
    assert report.by_objects[2]["miou"] == pytest.approx(1.0)
    one = report.by_objects[1]
    assert np.nanmax([one["per_class"][s] for s in SHAPES]) == 0.0  # every object missed
    matrix = np.asarray(report.confusion)
    shapes_missed = sum(int((r.mask > 0).sum()) for r in truth.records() if r.index in (0, 3))
    assert matrix[1:, 0].sum() == shapes_missed  # object pixels predicted as background


def test_a_voc_folder_without_masks_is_one_line(labelled, tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "JPEGImages" / "a.jpg")
    with pytest.raises(DiffuMaskError, match=r"has no masks \(no PNG in SegmentationClass/\)"):
        score_masks(labelled, tmp_path)


def test_samples_without_ground_truth_are_refused(voc, tmp_path):
    other = exact_store(tmp_path / "other", 2)
    with pytest.raises(DiffuMaskError, match="no sample of .* has ground truth"):
        score_masks(other.path, voc)


def test_inputs_folder_coco_and_bad_ones(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("b.png", "a.jpg"):
        Image.new("RGB", (16, 8)).save(folder / name)
    (folder / "notes.txt").write_text("x")
    assert [p.name for p in image_inputs(folder)] == ["a.jpg", "b.png"]
    coco = tmp_path / "ann.json"
    coco.write_text(json.dumps({"images": [{"file_name": "photos/b.png"}]}))
    assert image_inputs(coco) == [tmp_path / "photos" / "b.png"]
    coco.write_text(json.dumps({"images": [{"file_name": "gone.png"}]}))
    with pytest.raises(DiffuMaskError, match="lists 'gone.png', found in none"):
        image_inputs(coco)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DiffuMaskError, match="holds no image files"):
        image_inputs(empty)
    (folder / "broken.png").write_text("not a png")
    with pytest.raises(DiffuMaskError, match=r"'.*broken.png' cannot be read as an image"):
        label_dataset(folder, tmp_path / "out", LabelConfig(classes=["dog"]), progress=False)
    assert not (tmp_path / "out").exists()


def invoke(*args: str):
    from click.testing import CliRunner

    from diffumask_datasets.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_label_and_score_from_the_command_line(voc, tmp_path):
    out = tmp_path / "labelled"
    flags = ["--classes", "circle,square", "--model", "builtin:shapes", "--steps", "10"]
    result = invoke("label", voc, *flags, "--guidance", "4", "--out", out)
    assert result.exit_code == 0, result.output
    assert "labelled 6 images" in result.output
    again = invoke("label", voc, *flags, "--guidance", "4", "--out", out)
    assert again.exit_code == 1 and "--resume" in again.output  # nothing overwritten
    assert invoke("label", voc, *flags, "--guidance", "4", "--out", out, "--resume").exit_code == 0
    assert open_store(out).class_names == {0: "background", 1: "circle", 2: "square"}
    exported = invoke("export", out, "--format", "voc", "--to", tmp_path / "voc-out")
    assert exported.exit_code == 0, exported.output
    coco = invoke("export", out, "--format", "coco", "--to", tmp_path / "coco-out")
    assert coco.exit_code == 0, coco.output
    listed = [image_inputs(j) for j in sorted((tmp_path / "coco-out").rglob("instances_*.json"))]
    assert sum(len(found) for found in listed) == 6  # the COCO layout's images are found
    scored = invoke("score", out, "--labels", voc, "--json")
    assert scored.exit_code == 0, scored.output
    data = json.loads(scored.output)
    assert data["images"] == 6 and set(data["per_class"]) == {"background", "circle", "square"}
    table = invoke("score", out, "--labels", voc)
    assert "mIoU" in table.output and "object(s)" in table.output


def test_command_line_bad_input_is_one_line(voc, tmp_path):
    (tmp_path / "novoc" / "JPEGImages").mkdir(parents=True)
    result = invoke("score", tmp_path / "store-missing", "--labels", voc)
    assert result.exit_code != 0
    bad = invoke(
        "label",
        voc,
        "--classes",
        "dog",
        "--model",
        "builtin:tiny-random",
        "--prompt",
        "a photo of a cat",
        "--out",
        tmp_path / "o",
    )
    assert bad.exit_code == 1 and "'dog'" in bad.output and "a photo of a cat" in bad.output
    assert len(bad.output.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "manifest.json").exists()
    strength = invoke(
        "label", voc, "--classes", "dog", "--model", "x", "--strength", "2", "--out", tmp_path / "p"
    )
    assert strength.exit_code == 2 and "outside (0, 1]" in strength.output
