import numpy as np
import pytest
from PIL import Image

from diffumask_datasets import DiffuMask
from diffumask_datasets.errors import DiffuMaskError
from diffumask_datasets.generate import sample_seed
from diffumask_datasets.models import BUILTINS, load_pipeline

PROMPTS = ["a photo of a bird", "a dog and a cat on grass", "an aeroplane over the sea"]
CLASSES = [["bird"], ["dog", "cat"], ["aeroplane"]]
SMALL = {"num_inference_steps": 3, "height": 64, "width": 64}


def test_contract_of_a_sample(tiny):
    samples = tiny(PROMPTS[:2], classes=CLASSES[:2], seed=0, **SMALL)
    assert len(samples) == 2
    s = samples[1]
    assert isinstance(s.image, Image.Image) and s.image.mode == "RGB" and s.image.size == (64, 64)
    assert s.mask.dtype == np.uint8 and s.mask.shape == (64, 64)
    assert set(np.unique(s.mask)) <= {0, 2, 3, 255}  # ids in order of first appearance
    assert set(s.attention) == {"dog", "cat"}
    for m in s.attention.values():
        assert m.dtype == np.float32 and m.shape == (64, 64) and 0 <= m.min() <= m.max() <= 1
    assert 0.0 <= s.quality <= 1.0
    assert s.meta["prompt"] == PROMPTS[1]
    assert s.meta["seed"] == sample_seed(0, 1)
    assert s.meta["model"] == "builtin:tiny-random"
    assert s.meta["num_inference_steps"] == 3
    assert s.meta["class_ids"] == {"dog": 2, "cat": 3}
    assert s.meta["refinement"]["method"] == "adaptive"
    assert s.meta["refinement"]["params"]["classes_from"] == "coarsest"
    assert s.meta["refinement"]["chain"][-1]["step"] == "cleanup"
    assert "colour" in [step["step"] for step in s.meta["refinement"]["chain"]]


def test_the_engine_hands_its_images_to_the_colour_step(tiny):
    """The masks follow the generated pixels only where the colour step runs: turned off,
    the same seed gives the same image and other scores, with no colour step recorded."""
    on = tiny(PROMPTS[:1], classes=CLASSES[:1], seed=5, **SMALL)[0]
    off = tiny(PROMPTS[:1], classes=CLASSES[:1], seed=5, refinement={"colour_steps": 0}, **SMALL)
    off = off[0]
    np.testing.assert_array_equal(np.asarray(on.image), np.asarray(off.image))
    assert "colour" not in [step["step"] for step in off.meta["refinement"]["chain"]]
    assert off.meta["refinement"]["params"]["colour_steps"] == 0
    assert np.abs(on.attention["bird"] - off.attention["bird"]).max() > 1e-3


def test_a_sample_does_not_depend_on_its_batch(tiny):
    one_by_one = tiny(PROMPTS, classes=CLASSES, seed=7, batch_size=1, **SMALL)
    together = tiny(PROMPTS, classes=CLASSES, seed=7, batch_size=3, **SMALL)
    alone = tiny(PROMPTS[2:], classes=CLASSES[2:], seed=[sample_seed(7, 2)], **SMALL)
    for a, b in zip(one_by_one, together, strict=True):
        diff = np.abs(np.asarray(a.image, int) - np.asarray(b.image, int))
        assert diff.max() <= 1
        assert (a.mask == b.mask).mean() >= 0.99
        for name in a.attention:  # the colour step reads the pixels, which may differ by 1
            np.testing.assert_allclose(a.attention[name], b.attention[name], atol=1e-3)
    np.testing.assert_array_equal(np.asarray(alone[0].image), np.asarray(one_by_one[2].image))


def test_deterministic(tiny):
    a = tiny(PROMPTS[:1], classes=CLASSES[:1], seed=3, **SMALL)[0]
    b = tiny(PROMPTS[:1], classes=CLASSES[:1], seed=3, **SMALL)[0]
    c = tiny(PROMPTS[:1], classes=CLASSES[:1], seed=4, **SMALL)[0]
    np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.quality == b.quality
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_seeds_are_spread():
    seeds = {sample_seed(b, i) for b in range(4) for i in range(50)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("method", ["threshold", "affinity"])
def test_methods_and_given_class_ids(tiny, method):
    s = tiny(PROMPTS[:1], classes=CLASSES[:1], class_ids={"bird": 3}, refinement=method, **SMALL)
    assert set(np.unique(s[0].mask)) <= {0, 3, 255}
    assert s[0].meta["refinement"]["method"] == method


def test_no_guidance(tiny):
    s = tiny(PROMPTS[:1], classes=CLASSES[:1], guidance_scale=1.0, **SMALL)
    assert s[0].mask.shape == (64, 64)


def test_sdxl_architecture():
    dm = DiffuMask("builtin:tiny-random-xl")
    s = dm(PROMPTS[:1], classes=CLASSES[:1], **SMALL)[0]
    assert s.mask.shape == (64, 64) and set(s.attention) == {"bird"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": [["bird"]]}, r"classes has 1 entries for 3 prompts"),
        ({"classes": [["bird"], [], ["x"]]}, r"needs at least one class name"),
        ({"classes": [["bird"], ["dog"], ["cow"]]}, r"class 'cow' does not appear in prompt"),
        ({"num_inference_steps": 0}, r"num_inference_steps=0 must be a positive integer"),
        ({"height": 60}, r"height=60 is not a multiple of 8"),
        ({"batch_size": 0}, r"batch_size=0 must be a positive integer"),
        ({"seed": [1, 2]}, r"seed has 2 values for 3 prompts"),
        ({"class_ids": {"bird": 1}}, r"class 'dog' has no id in class_ids"),
        (
            {"class_ids": {"bird": 1, "dog": 255, "cat": 3, "aeroplane": 4}},
            r"class 'dog' has id 255; class ids are mask values, integers in 1..254",
        ),
        ({"refinement": "crf"}, r"refinement method 'crf' is unknown"),
    ],
)
def test_bad_input_is_named(tiny, kwargs, message):
    args = {"classes": CLASSES, **SMALL, **kwargs}
    with pytest.raises(DiffuMaskError, match=message):
        tiny(PROMPTS, **args)


def test_unknown_builtin_lists_the_builtins():
    with pytest.raises(DiffuMaskError, match=r"builtin:tiny-random, builtin:tiny-random-xl"):
        load_pipeline("builtin:huge")


def test_hub_model_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DiffuMaskError) as err:
        load_pipeline("someone/not-a-cached-model")
    message = str(err.value)
    assert "'someone/not-a-cached-model'" in message and "HF_HUB_OFFLINE" in message
    assert all(alias in message for alias in BUILTINS)


def test_local_folder_round_trip(tmp_path, tiny):
    tiny.pipe.save_pretrained(tmp_path / "model", safe_serialization=True)
    dm = DiffuMask(str(tmp_path / "model"))
    a = dm(PROMPTS[:1], classes=CLASSES[:1], **SMALL)[0]
    b = tiny(PROMPTS[:1], classes=CLASSES[:1], **SMALL)[0]
    np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))


def test_pipeline_object_is_used_as_is(tiny):
    assert DiffuMask(tiny.pipe).pipe is tiny.pipe


def test_not_a_pipeline():
    with pytest.raises(DiffuMaskError, match=r"'int' is not a diffusers text-to-image pipeline"):
        load_pipeline(3)


def test_a_named_model_goes_to_the_best_device(monkeypatch):
    import torch

    moves = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        "diffumask_datasets.generate.load_pipeline",
        lambda model, device=None, dtype=None: (
            moves.append((device, dtype)) or load_pipeline(model)
        ),
    )
    DiffuMask("builtin:tiny-random")
    DiffuMask("builtin:tiny-random", device="cpu")
    DiffuMask("builtin:tiny-random", dtype="bfloat16")
    assert moves == [("cuda", "float16"), ("cpu", None), ("cuda", "bfloat16")]


def test_one_capture_refined_several_ways_equals_generating_with_each(tiny):
    captured = list(tiny.captures(PROMPTS, classes=CLASSES, refinement="separate", **SMALL))
    for method in ("affinity", "adaptive", "separate"):
        generated = tiny(PROMPTS, classes=CLASSES, refinement=method, **SMALL)
        refined = [s for maps in captured for s in tiny.refine_captured(maps, method)]
        assert [s.meta for s in refined] == [s.meta for s in generated]
        for a, b in zip(refined, generated, strict=True):
            np.testing.assert_array_equal(a.mask, b.mask)
            assert a.quality == b.quality and a.image.tobytes() == b.image.tobytes()


def test_a_capture_refuses_a_refinement_that_reads_other_maps(tiny):
    maps = next(tiny.captures(PROMPTS[:1], classes=CLASSES[:1], refinement="threshold", **SMALL))
    with pytest.raises(DiffuMaskError, match="needs the self-attention affinity"):
        tiny.refine_captured(maps, "separate")
    with pytest.raises(DiffuMaskError, match=r"capture options \{'steps': \(0, 1\)\}"):
        tiny.refine_captured(maps, {"method": "threshold", "steps": [0, 1]})
