"""quality/: evaluate, clean (noise learning), splice, and `shapes render`, on small data.

Segmenters here train a handful of steps at 32x32: the tests check the plumbing, the
arithmetic and the errors; how well the tools work is measured by the shapes benchmark.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli import assert_one_line_error, invoke

from diffumask_datasets import shapes_world as sw
from diffumask_datasets.cli import main
from diffumask_datasets.definitions import load_definition
from diffumask_datasets.errors import DiffuMaskError
from diffumask_datasets.quality import (
    TrainSettings,
    clean_store,
    evaluate,
    load_voc,
    mosaic,
    splice_store,
)
from diffumask_datasets.quality.clean import choose_kept, fold_of, prior_violation
from diffumask_datasets.quality.metrics import confusion, iou_per_class, sample_iou
from diffumask_datasets.store import make_manifest, open_store, write_store

FAST = TrainSettings(steps=3, batch_size=4, size=32)
FAST_FLAGS = ["--train-steps", "3", "--batch-size", "4", "--size", "32"]


def make_store(path: Path, count: int, definition="shapes", seed: int = 0):
    """A store of rendered shapes scenes with exact masks (no diffusion: fast)."""
    definition = load_definition(definition)
    manifest = make_manifest(definition, {"source": "test"}, "test", count, 8, 8)
    return write_store(path, sw.scene_records(count, seed, max_objects=2), manifest)


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + file.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def real(tmp_path_factory, one_thread) -> Path:
    dest = tmp_path_factory.mktemp("q") / "real"
    result = invoke("shapes", "render", "--count", "16", "--to", str(dest), "--seed", "3")
    assert result.exit_code == 0, result.output
    return dest


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("q") / "store"
    make_store(path, 12)
    return path


# -- metrics --------------------------------------------------------------------------------


def test_confusion_iou_ignores_255_and_sums_over_pixels():
    ref = np.array([[0, 1, 1, 255]], np.uint8)
    pred = np.array([[0, 1, 2, 1]], np.uint8)
    ious = iou_per_class(confusion(pred, ref, 3))
    assert ious[0] == 1.0 and ious[1] == 0.5 and ious[2] == 0.0
    # background and class 1 agree fully, class 2 never shows: scores 1
    assert sample_iou(ref, np.array([[0, 1, 1, 0]]), [0, 1, 2]) == 1.0
    assert sample_iou(ref, np.array([[1, 1, 0, 0]]), [0, 1]) == pytest.approx((0 + 1 / 3) / 2)


# -- shapes render -----------------------------------------------------------------------------


def test_shapes_render_writes_exact_masks_in_the_voc_layout(real):
    voc = real / "VOCdevkit" / "VOC2012"
    splits = {
        s: (voc / "ImageSets/Segmentation" / f"{s}.txt").read_text().split()
        for s in ("train", "val")
    }
    assert len(splits["train"]) == len(splits["val"]) == 8
    info = json.loads((voc / "diffumask.json").read_text())
    assert info["classes"] == {"1": "circle", "2": "square", "3": "triangle", "4": "star"}
    scenes = list(sw.scene_records(16, 3, max_objects=2))
    for name in splits["train"][:4]:
        mask = np.asarray(Image.open(voc / "SegmentationClass" / f"{name}.png"))
        assert np.array_equal(mask, scenes[int(name)].mask)
    counts = [len(s.classes) for s in scenes]
    assert set(counts) == {1, 2}
    loaded = load_voc(real, "val")
    assert len(loaded) == 8 and loaded.class_names[4] == "star"


# -- evaluate ----------------------------------------------------------------------------------


def test_evaluate_python_api_reports_every_class_and_the_ratio(store, real):
    result = evaluate(store, real, split="val", real_train="train", settings=FAST, progress=False)
    assert set(result.synthetic.per_class) == {"background", "circle", "square", "triangle", "star"}
    assert 0 <= result.synthetic.miou <= 1 and result.train_images == 12
    assert result.test_images == 8
    assert result.synthetic_over_real == pytest.approx(
        result.synthetic.miou / result.real_trained.miou
    )


def test_segmenter_learns_the_background_in_a_few_dozen_steps(store, real):
    settings = TrainSettings(steps=40, batch_size=8, size=32, learning_rate=5e-3)
    result = evaluate(store, real, split="val", settings=settings, progress=False)
    assert result.synthetic.per_class["background"] > 0.8, result.synthetic


def test_evaluate_cli_json(store, real):
    result = invoke("evaluate", str(store), "--real", str(real), "--json", *FAST_FLAGS)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["split"] == "val" and data["synthetic_over_real"] is None
    assert data["settings"]["steps"] == 3


def test_evaluate_refuses_a_real_folder_without_the_voc_layout(store, tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    result = invoke("evaluate", str(store), "--real", str(tmp_path), *FAST_FLAGS)
    assert_one_line_error(result, str(tmp_path), "no VOC layout", "shapes render")


def test_evaluate_refuses_a_missing_split(store, real):
    result = invoke("evaluate", str(store), "--real", str(real), "--split", "test", *FAST_FLAGS)
    assert_one_line_error(result, "'test'", "train, trainval, val", "--split")


def test_evaluate_refuses_a_train_class_missing_from_real(real, tmp_path):
    # REAL without our class list: the 20 VOC classes, which have no 'circle'
    import shutil

    plain = tmp_path / "voc"
    shutil.copytree(real, plain)
    (plain / "VOCdevkit/VOC2012/diffumask.json").unlink()
    store = make_store(tmp_path / "s", 4).path
    result = invoke("evaluate", str(store), "--real", str(plain), *FAST_FLAGS)
    assert_one_line_error(result, "'circle'", "aeroplane", "--classes")


# -- clean ---------------------------------------------------------------------------------------


def test_folds_choose_kept_and_priors():
    folds = fold_of(10, 3, seed=0)
    assert sorted(np.bincount(folds).tolist()) == [3, 3, 4]
    assert np.array_equal(folds, fold_of(10, 3, seed=0))
    scores = np.array([0.9, 0.1, 0.5, 0.7, 0.3])
    allowed = np.array([True, True, True, False, True])
    assert choose_kept(scores, allowed, 0.6).tolist() == [0, 2, 4]
    assert choose_kept(scores, np.ones(5, bool), 1.0).tolist() == [0, 1, 2, 3, 4]
    mask = np.zeros((10, 10), np.uint8)
    mask[:6] = 1  # 60% of the image
    priors = {"circle": {"area": (0.05, 0.5)}}
    assert prior_violation(mask, ["circle"], {"circle": 1}, priors) == "circle covers 0.60 > 0.5"
    assert prior_violation(mask[:4], ["circle"], {"circle": 1}, {}) is None


def test_clean_keeps_the_top_fraction_and_never_changes_the_source(store, tmp_path):
    before = tree_digest(store)
    result = invoke(
        "clean",
        str(store),
        "--folds",
        "3",
        "--keep",
        "0.5",
        "--to",
        str(tmp_path / "C"),
        *FAST_FLAGS,
    )
    assert result.exit_code == 0, result.output
    assert "kept 6 of 12 samples" in result.stdout
    assert tree_digest(store) == before
    cleaned = open_store(tmp_path / "C")
    entry = cleaned.manifest["clean"]
    assert entry["folds"] == 3 and entry["keep"] == 0.5 and len(entry["consistency"]) == 12
    kept = {r.index: r.meta["consistency"] for r in cleaned.records()}
    assert len(kept) == 6
    assert min(kept.values()) >= max(
        v for k, v in entry["consistency"].items() if int(k) not in kept
    )
    for index, value in kept.items():
        assert entry["consistency"][str(index)] == value


def test_consistency_is_held_out_agreement(monkeypatch):
    """K-fold wiring with an oracle segmenter (it predicts the true masks of images it was
    not trained on): corrupted masks score low, right ones 1, and no sample is predicted
    by a segmenter that saw it. How well a trained segmenter ranks masks is measured by
    benchmarks/shapes_ablation.py."""
    from diffumask_datasets.quality import clean

    records = list(sw.scene_records(12, seed=5, max_objects=1))
    truth = {id(r.image): r.mask for r in records}
    trained_on: list[set[int]] = []

    class Oracle:
        def __init__(self, images):
            self.seen = {id(i) for i in images}
            trained_on.append(self.seen)

        def predict(self, images, only=None):
            assert not self.seen & {id(i) for i in images}
            return [truth[id(i)] for i in images]

    monkeypatch.setattr(clean, "train_segmenter", lambda images, *a, **k: Oracle(images))
    masks = [r.mask.copy() for r in records]
    corrupted = [2, 7]
    for i in corrupted:
        masks[i] = np.roll(masks[i], 24, axis=1)
    masks[4][:2] = 255  # ignored pixels do not count
    classes = [[sw.CLASS_IDS[c] for c in r.classes] for r in records]
    scores = clean.consistency_scores(
        [r.image for r in records], masks, classes, 5, 3, FAST, progress=False
    )
    assert len(trained_on) == 3 and all(len(seen) == 8 for seen in trained_on)
    assert np.all(np.delete(scores, corrupted) == 1.0)
    assert np.all(scores[corrupted] < 0.5)


def test_clean_drops_samples_outside_their_class_prior(tmp_path):
    import yaml

    data = yaml.safe_load((Path(load_definition("shapes").source)).read_text())
    for entry in data["classes"]:
        entry["prior"] = {"area": [0.0, 0.02]}  # every rendered object is larger
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(data))
    store = make_store(tmp_path / "s", 6, definition=tmp_path / "d.yaml")
    assert store.definition.priors["circle"] == {"area": (0.0, 0.02)}
    result = invoke(
        "clean",
        str(store.path),
        "--folds",
        "2",
        "--keep",
        "1",
        "--to",
        str(tmp_path / "C"),
        *FAST_FLAGS,
    )
    assert "kept 0 of 6 samples" in result.stdout and "6 outside their class prior" in result.stdout
    result = invoke(
        "clean", str(store.path), "--folds", "2", "--keep", "1", "--no-priors",
        "--to", str(tmp_path / "D"), *FAST_FLAGS,
    )  # fmt: skip
    assert "kept 6 of 6" in result.stdout


@pytest.fixture
def trainings(monkeypatch) -> list[list[np.ndarray]]:
    """The masks each of clean's segmenter trainings learns from, in order."""
    from diffumask_datasets.quality import clean

    seen, train = [], clean.train_segmenter

    def spy(images, masks, *args, **kwargs):
        seen.append(list(masks))
        return train(images, masks, *args, **kwargs)

    monkeypatch.setattr(clean, "train_segmenter", spy)
    return seen


def test_clean_never_keeps_nor_learns_from_a_mask_that_shows_no_object(tmp_path, trainings):
    records = list(sw.scene_records(6, 0, max_objects=2))
    for record in records[::2]:  # its prompt names objects, its mask shows none
        record.mask = np.zeros_like(record.mask)
    manifest = make_manifest(load_definition("shapes"), {"source": "test"}, "test", 6, 8, 8)
    store = write_store(tmp_path / "s", records, manifest)
    result = invoke(
        "clean", str(store.path), "--folds", "2", "--keep", "1", "--to", str(tmp_path / "C"),
        *FAST_FLAGS,
    )  # fmt: skip
    assert "kept 3 of 6 samples" in result.stdout and "3 with no object" in result.stdout
    cleaned = open_store(tmp_path / "C")
    assert sorted(r.prompt for r in cleaned.records()) == sorted(r.prompt for r in records[1::2])
    assert cleaned.manifest["clean"]["empty_rejected"] == 3
    assert cleaned.manifest["clean"]["kept_indices"] == [1, 3, 5]
    assert all(((r.mask != 0) & (r.mask != 255)).any() for r in cleaned.records())
    # each of the 2 folds learnt from the other fold's samples that show an object
    taught = [mask for training in trainings for mask in training]
    assert len(taught) == 3 and all((m != 0).any() for m in taught)


def test_a_fold_with_no_teaching_samples_beside_it_learns_from_them_all(trainings):
    from diffumask_datasets.quality import clean

    records = list(sw.scene_records(6, 0, max_objects=2))
    assignment = fold_of(6, 2, FAST.seed)
    # two of fold 0's samples teach fold 1's segmenter; none is beside fold 0
    teaches = (assignment == 0) & (np.cumsum(assignment == 0) <= 2)
    predictions = clean.held_out_predictions(
        [r.image for r in records],
        [r.mask for r in records],
        [[sw.CLASS_IDS[c] for c in r.classes] for r in records],
        num_labels=max(sw.CLASS_IDS.values()) + 1,
        folds=2,
        settings=FAST,
        progress=False,
        teaches=teaches,
    )
    assert len(predictions) == 6 and sorted(len(t) for t in trainings) == [2, 3]


@pytest.mark.parametrize("keep", ["0", "1.5", "-0.2"])
def test_clean_refuses_keep_outside_0_1(store, tmp_path, keep):
    result = invoke("clean", str(store), "--keep", keep, "--to", str(tmp_path / "C"))
    assert_one_line_error(result, f"--keep {float(keep)}", "(0, 1]", "0.7")
    assert not (tmp_path / "C").exists()


def test_clean_refuses_too_few_samples_for_the_folds(tmp_path):
    small = make_store(tmp_path / "s", 2).path
    result = invoke("clean", str(small), "--folds", "3", "--to", str(tmp_path / "C"))
    assert_one_line_error(result, "2 samples", "3 folds", "--folds 2")
    result = invoke("clean", str(small), "--folds", "1", "--to", str(tmp_path / "C"))
    assert_one_line_error(result, "--folds 1", "at least 2")
    assert not (tmp_path / "C").exists()


def test_clean_refuses_a_non_empty_destination(store, tmp_path):
    (tmp_path / "C").mkdir()
    (tmp_path / "C" / "keep.txt").write_text("mine")
    with pytest.raises(DiffuMaskError, match="not empty"):
        clean_store(store, tmp_path / "C", 2, 0.5, FAST, progress=False)
    assert (tmp_path / "C" / "keep.txt").read_text() == "mine"


# -- priors in definitions -------------------------------------------------------------------


def test_a_prior_leaves_the_fingerprint_alone_and_bad_priors_are_refused():
    from diffumask_datasets.definitions import Definition

    plain = load_definition("shapes")
    data = plain.to_dict()
    data["classes"][0]["prior"] = {"area": [0.05, 0.5]}
    with_prior = Definition.from_dict(data)
    assert with_prior.priors == {"circle": {"area": (0.05, 0.5)}}
    assert with_prior.fingerprint() == plain.fingerprint()
    assert Definition.from_dict(with_prior.to_dict()).priors == with_prior.priors
    data["classes"][0]["prior"] = {"area": [0.6, 0.5]}
    with pytest.raises(DiffuMaskError, match=r"prior area must be \[min, max\].*\[0.6, 0.5\]"):
        Definition.from_dict(data)
    data["classes"][0]["prior"] = {"height": [0, 1]}
    with pytest.raises(DiffuMaskError, match="height"):
        Definition.from_dict(data)


# -- splice ----------------------------------------------------------------------------------


def test_mosaic_places_each_source_in_its_cell():
    import torch

    images = torch.stack([torch.full((3, 8, 8), float(k)) for k in range(4)])
    masks = torch.stack([torch.full((8, 8), k) for k in range(4)])
    masks[3, :, :4] = 255
    image, mask = mosaic(images, masks, (2, 2))
    assert image.shape == (3, 8, 8) and mask.shape == (8, 8)
    assert image[0, 0, 0] == 0 and image[0, 0, 7] == 1 and image[0, 7, 0] == 2
    assert mask[7, 7] == 3 and mask[7, 4] == 255
    wide, wide_mask = mosaic(images[:2], masks[:2], (1, 2), size=(8, 16))
    assert wide.shape == (3, 8, 16) and wide_mask[:, 8:].eq(1).all()


def test_splice_store_through_the_cli(store, tmp_path):
    before = tree_digest(store)
    result = invoke(
        "splice", str(store), "--grid", "2x2", "--count", "5", "--to", str(tmp_path / "S")
    )
    assert result.exit_code == 0, result.output
    assert tree_digest(store) == before
    spliced = open_store(tmp_path / "S")
    sources = {r.index: r for r in open_store(store).records()}
    assert len(spliced) == 5 and spliced.manifest["splice"]["grid"] == [2, 2]
    for record in spliced.records():
        info = record.meta["splice"]
        assert info["grid"] == [2, 2] and len(info["sources"]) == 4
        first = sources[info["sources"][0]]
        # the top-left cell is the first source, halved (nearest neighbour for masks)
        assert np.array_equal(record.mask[:32, :32], first.mask[::2, ::2])
        assert set(record.classes) == {c for i in info["sources"] for c in sources[i].classes}


def test_splice_python_api_other_grids(store, tmp_path):
    for grid in ("1x2", "2x1", "3x3"):
        spliced = splice_store(store, tmp_path / grid, grid, count=2, progress=False)
        assert spliced.manifest["splice"]["grid"] == [int(v) for v in grid.split("x")]


@pytest.mark.parametrize("grid", ["2", "1x1", "0x2", "9x9", "axb"])
def test_splice_refuses_a_bad_grid(store, tmp_path, grid):
    result = invoke(
        "splice", str(store), "--grid", grid, "--count", "2", "--to", str(tmp_path / "S")
    )
    assert_one_line_error(result, repr(grid), "2x2")
    assert not (tmp_path / "S").exists()


def test_evaluate_trains_with_splicing(store, real):
    settings = TrainSettings(steps=3, batch_size=4, size=32, splice=True)
    result = evaluate(store, real, settings=settings, progress=False)
    assert result.settings["splice"] is True


def test_new_commands_have_examples():
    for verb in ("evaluate", "clean", "splice"):
        assert "Examples" in invoke(verb, "--help").output
    assert main.commands["shapes"].commands["render"]


def test_builtin_fcn_segmenter_and_a_missing_checkpoint(store, real, tmp_path):
    settings = TrainSettings(steps=3, batch_size=4, size=32, segmenter="builtin:fcn")
    result = evaluate(store, real, settings=settings, progress=False)
    assert result.settings["segmenter"] == "builtin:fcn" and 0 <= result.synthetic.miou <= 1
    missing = str(tmp_path / "no-such-checkpoint")
    result = invoke("evaluate", str(store), "--real", str(real), "--segmenter", missing)
    assert_one_line_error(result, repr(missing), "nvidia/mit-b0", "builtin:fcn")


def test_predict_can_be_limited_to_the_classes_an_image_shows():
    from diffumask_datasets.quality import train_segmenter

    records = list(sw.scene_records(6, seed=1, max_objects=2))
    segmenter = train_segmenter(
        [r.image for r in records], [r.mask for r in records], 5, FAST, progress=False
    )
    free = segmenter.predict([r.image for r in records])
    limited = segmenter.predict([r.image for r in records], only=[[0, 2]] * 6)
    assert all(p.shape == (64, 64) for p in free + limited)
    assert set(np.unique(np.stack(limited)).tolist()) <= {0, 2}
