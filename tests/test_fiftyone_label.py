"""FiftyOne: DiffuMask as a model for apply_model, and the label_samples operator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

fo = pytest.importorskip("fiftyone", reason="the fiftyone extra is not installed")
foo = pytest.importorskip("fiftyone.operators")

from click.testing import CliRunner  # noqa: E402

from diffumask_datasets.cli.fiftyone import plugin as plugin_command  # noqa: E402
from diffumask_datasets.fiftyone.model import (  # noqa: E402
    DiffuMaskModel,
    check_label_field,
    label_samples,
)

PLUGIN = "@diffumask/diffumask"
FAST = {"num_inference_steps": 4, "strength": 0.5}
SIZES = [(32, 48), (40, 40), (32, 48)]  # (height, width)


@pytest.fixture(scope="module")
def plugins_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fo-plugins")
    result = CliRunner().invoke(plugin_command, ["install", "--dir", str(path)])
    assert result.exit_code == 0, result.output
    previous = fo.config.plugins_dir
    fo.config.plugins_dir = str(path)
    yield path
    fo.config.plugins_dir = previous


@pytest.fixture
def photos(tmp_path):
    """A plain FiftyOne dataset of images on disk (not made by diffumask)."""
    rng = np.random.default_rng(0)
    dataset = fo.Dataset()
    for i, (h, w) in enumerate(SIZES):
        path = tmp_path / f"photo{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        dataset.add_sample(fo.Sample(filepath=str(path)))
    yield dataset
    dataset.delete()


def test_apply_model_writes_segmentations_at_each_image_size(photos, tiny):
    model = DiffuMaskModel(tiny, classes=["dog", "cat"], **FAST)
    photos.apply_model(model, label_field="diffumask", batch_size=2)
    photos.mask_targets = {"diffumask": model.mask_targets}
    photos.save()
    for sample, (h, w) in zip(photos.iter_samples(), SIZES, strict=True):
        label = sample.diffumask
        assert isinstance(label, fo.Segmentation)
        assert label.mask.shape == (h, w) and set(np.unique(label.mask)) <= {0, 1, 2, 255}
        assert 0.0 <= label.quality <= 1.0
    assert photos.mask_targets["diffumask"] == {1: "dog", 2: "cat"}


def test_a_mask_depends_on_its_image_not_its_batch_or_order(photos, tiny):
    model = DiffuMaskModel(tiny, classes=["dog"], **FAST)
    images = [np.asarray(Image.open(p)) for p in photos.values("filepath")]
    together = model.predict_all(images)
    alone = [model.predict(image) for image in reversed(images)][::-1]
    for a, b in zip(together, alone, strict=True):
        assert (a.mask == b.mask).mean() >= 0.99


def test_label_samples_on_a_view_sets_mask_targets(photos, tiny):
    model = DiffuMaskModel(tiny, classes=["bird"], **FAST)
    view = photos.limit(2)
    assert label_samples(view, model, "birds") == 2
    assert len(photos.exists("birds")) == 2
    assert photos.mask_targets["birds"] == {1: "bird"}
    assert check_label_field(photos, "birds") is None  # labelling again is fine
    assert "holds no masks" in check_label_field(photos, "filepath")
    assert "letters, digits" in check_label_field(photos, "my field")


def test_the_label_operator_labels_the_dataset(plugins_dir, photos):
    params = {"classes": ["dog"], "model": "builtin:tiny-random", "steps": 4, "strength": 0.5}
    result = foo.execute_operator(
        f"{PLUGIN}/label_samples", ctx={"dataset": photos, "params": {**params, "field": "dm"}}
    )
    assert result.result == {"field": "dm", "count": 3}
    assert photos.first().dm.mask.shape == SIZES[0]
    assert photos.mask_targets["dm"] == {1: "dog"}
    with pytest.raises(foo.executor.ExecutionError, match="name at least one class"):
        foo.execute_operator(
            f"{PLUGIN}/label_samples", ctx={"dataset": photos, "params": {"field": "x"}}
        )
