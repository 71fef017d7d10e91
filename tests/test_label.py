"""DiffuMask.label: masks for given images through the same capture and refinement."""

import numpy as np
import pytest
from PIL import Image

from diffumask_datasets import DiffuMask
from diffumask_datasets.capture import denoiser
from diffumask_datasets.errors import DiffuMaskError
from diffumask_datasets.generate import sample_seed
from diffumask_datasets.label import label_prompt, working_size

SMALL = {"num_inference_steps": 4, "strength": 0.5}


def noise_image(seed: int, height: int = 37, width: int = 50) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_the_sample_image_is_the_given_one_at_its_own_size(tiny, tmp_path):
    given = noise_image(0)  # 50x37: not a multiple of the latent scale
    path = tmp_path / "photo.png"
    noise_image(1, 40, 24).save(path)
    s, from_file = tiny.label([given, path], classes=["dog", "cat"], seed=3, **SMALL)
    assert s.image.size == (50, 37) and s.image.mode == "RGB"
    assert s.image.tobytes() == given.tobytes()
    assert from_file.image.tobytes() == Image.open(path).convert("RGB").tobytes()
    assert s.mask.shape == (37, 50) and s.mask.dtype == np.uint8
    assert from_file.mask.shape == (40, 24)
    assert set(np.unique(s.mask)) <= {0, 1, 2, 255}
    assert {k: v.shape for k, v in s.attention.items()} == {"dog": (37, 50), "cat": (37, 50)}
    assert s.meta["prompt"] == "a photo of a dog and a cat" == label_prompt(["dog", "cat"])
    assert s.meta["seed"] == sample_seed(3, 0) and from_file.meta["seed"] == sample_seed(3, 1)
    assert s.meta["strength"] == 0.5 and s.meta["route"] == "image-to-image"
    assert s.meta["denoised_size"] == [40, 48]  # sides rounded to multiples of 8
    assert (s.meta["height"], s.meta["width"]) == (37, 50)
    assert s.meta["source"] is None and from_file.meta["source"] == str(path)
    assert s.meta["class_ids"] == {"dog": 1, "cat": 2}
    assert "colour" in [step["step"] for step in s.meta["refinement"]["chain"]]


def test_masks_follow_the_given_image_and_the_seed(tiny):
    a, b = noise_image(0, 32, 32), noise_image(1, 32, 32)
    first = tiny.label([a, b], classes=["bird"], seed=0, **SMALL)
    again = tiny.label([a, b], classes=["bird"], seed=0, **SMALL)
    np.testing.assert_array_equal(first[0].attention["bird"], again[0].attention["bird"])
    assert np.abs(first[0].attention["bird"] - first[1].attention["bird"]).max() > 1e-3
    # from random noise the seed matters (from the inversion nothing random is left)
    seed_0, seed_1 = (
        tiny.label([a], classes=["bird"], seed=s, start="noise", **SMALL)[0] for s in (0, 1)
    )
    assert np.abs(seed_0.attention["bird"] - seed_1.attention["bird"]).max() > 1e-4


def test_a_labelled_sample_does_not_depend_on_its_batch(tiny, one_thread):
    images = [noise_image(i, 32, 40) for i in range(3)]
    classes = [["bird"], ["dog", "cat"], ["bird"]]
    one_by_one = tiny.label(images, classes=classes, seed=7, batch_size=1, **SMALL)
    together = tiny.label(images, classes=classes, seed=7, batch_size=3, **SMALL)
    alone = tiny.label(images[2:], classes=classes[2:], seed=[sample_seed(7, 2)], **SMALL)
    for a, b in zip(one_by_one, together, strict=True):
        assert a.image.tobytes() == b.image.tobytes()
        for name in a.attention:
            np.testing.assert_allclose(a.attention[name], b.attention[name], atol=1e-4)
        assert (a.mask == b.mask).mean() >= 0.99
    np.testing.assert_allclose(
        alone[0].attention["bird"], one_by_one[2].attention["bird"], atol=1e-4
    )


def test_images_of_different_sizes_in_one_call(tiny):
    images = [noise_image(0, 32, 32), noise_image(1, 24, 40), noise_image(2, 32, 32)]
    samples = tiny.label(images, classes=["bird"], batch_size=4, **SMALL)
    assert [s.mask.shape for s in samples] == [(32, 32), (24, 40), (32, 32)]


@pytest.mark.parametrize(
    "model",
    ["builtin:tiny-random-xl", "builtin:tiny-random-sd3", "builtin:tiny-random-flux"],
)
def test_every_family_labels_through_its_image_to_image_route(model):
    dm = DiffuMask(model)
    given = noise_image(4, 32, 48)
    s = dm.label(given, classes=["dog", "cat"], seed=0, **SMALL)[0]
    assert s.image.tobytes() == given.tobytes()
    assert s.mask.shape == (32, 48)
    assert set(s.attention) == {"dog", "cat"}
    assert all(np.ptp(m) > 0 for m in s.attention.values())  # read from the attention
    assert type(dm.image_pipeline()).__name__.endswith("Img2ImgPipeline")
    assert denoiser(dm.image_pipeline()) is denoiser(dm.pipe)  # shared, not loaded again


def test_resolution_scales_the_denoised_image_not_the_mask(tiny):
    s = tiny.label(noise_image(0, 48, 96), classes=["bird"], resolution=32, **SMALL)[0]
    assert s.meta["denoised_size"] == [16, 32] and s.mask.shape == (48, 96)
    assert working_size((37, 50), 8, None) == (40, 48)
    assert working_size((1000, 500), 16, 512) == (512, 256)


def test_a_rendered_shapes_scene_is_labelled_with_its_exact_mask():
    """The trained model labels a rendered scene (exact mask known) nearly perfectly."""
    from diffumask_datasets import shapes_world as sw

    rng = np.random.default_rng(5)
    scenes = [sw.random_scene(rng, count=1, name_colour=1.0) for _ in range(4)]
    samples = DiffuMask("builtin:shapes").label(
        [s.image for s in scenes],
        classes=[[s.objects[0].shape] for s in scenes],
        prompts=[s.caption for s in scenes],
        num_inference_steps=20,
        guidance_scale=4.0,
        class_ids=sw.CLASS_IDS,
        refinement={"method": "affinity", "affinity_factor": 1, "band": 0.0},
    )
    for sample, scene in zip(samples, scenes, strict=True):
        assert np.asarray(sample.image).tobytes() == scene.image.tobytes()
        assert (sample.mask == scene.mask).mean() >= 0.95


@pytest.mark.parametrize(
    ("images", "kwargs", "message"),
    [
        ("missing.png", {}, r"image 0 '.*missing.png' cannot be read as an image"),
        ([noise_image(0)], {"prompts": ["a photo of a cat"]}, r"'dog'.*'a photo of a cat'"),
        ([noise_image(0)], {"strength": 0.0}, r"strength=0.0 must be in \(0, 1\]"),
        ([noise_image(0)], {"strength": 0.1}, r"strength=0.1 of num_inference_steps=4 runs no"),
        (
            [noise_image(0)],
            {"refinement": {"method": "threshold", "steps": [2, 4]}},
            r"steps=\[2, 4\] selected none of the 2 denoising steps run",
        ),
        ([noise_image(0)], {"classes": [["dog"], ["cat"]]}, r"classes has 2 lists for 1 images"),
        ([noise_image(0)], {"classes": []}, r"must name at least one class"),
        ([noise_image(0)], {"prompts": ["a dog", "a dog"]}, r"prompts has 2 entries for 1"),
        ([42], {}, r"image 0 of type int is not an image"),
        ([], {}, r"no images given"),
    ],
)
def test_bad_input_is_one_line_naming_it(tiny, tmp_path, images, kwargs, message):
    if images == "missing.png":
        images = [tmp_path / "missing.png"]
    kwargs = {"classes": ["dog"], **SMALL, **kwargs}
    with pytest.raises(DiffuMaskError, match=message) as err:
        tiny.label(images, **kwargs)
    assert "\n" not in str(err.value)


def test_a_file_that_is_not_an_image_is_named(tiny, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    with pytest.raises(DiffuMaskError, match=r"'.*notes.jpg' cannot be read as an image"):
        tiny.label([noise_image(0), bad], classes=["dog"], **SMALL)


def test_labelling_prints_no_library_advice():
    """The image-to-image pipeline's first import makes transformers advise installing
    torchvision; a user labelling images should see none of it."""
    from test_cli import run_python

    code = (
        "import numpy as np\n"
        "from PIL import Image\n"
        "from diffumask_datasets import DiffuMask\n"
        "image = Image.fromarray(np.zeros((64, 64, 3), np.uint8))\n"
        "DiffuMask('builtin:shapes').label([image], classes=['circle'],"
        " num_inference_steps=2, strength=1.0, start='noise', progress=False)\n"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert "torchvision" not in out.stderr and "[transformers]" not in out.stderr, out.stderr
