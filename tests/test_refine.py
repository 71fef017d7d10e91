import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from diffumask_datasets.errors import DiffuMaskError
from diffumask_datasets.refine import (
    Refinement,
    adaptive_threshold,
    aggregate,
    apply_band,
    colour_smooth,
    colour_weights,
    gamma_sweep,
    label,
    levels_below,
    propagate,
    quality_score,
    refine,
    refine_batch,
    remove_small_components,
    resize,
    rethreshold,
)
from diffumask_datasets.sample import IGNORE
from diffumask_datasets.store import downsample

SIZE = (64, 64)
GOLDEN = Path(__file__).parent / "data" / "refine_golden.npz"


def iou(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def disc(center, radius, size=SIZE):
    yy, xx = np.mgrid[: size[0], : size[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def square(top_left, side, size=SIZE):
    out = np.zeros(size, bool)
    out[top_left[0] : top_left[0] + side, top_left[1] : top_left[1] + side] = True
    return out


def attention_field(shape, rng, size, blur=1.0, noise=0.08):
    """What a cross-attention map looks like: the object at low resolution, blurred by
    `blur` of its own pixels, with noise."""
    field = ndimage.gaussian_filter(shape.astype(np.float32), blur * shape.shape[0] / size)
    zoom = size / shape.shape[0]
    low = ndimage.zoom(field, zoom, order=1)
    return np.clip(low + rng.normal(0, noise, low.shape), 0, None).astype(np.float32)


def multires(shape, rng):
    return {(s, s): attention_field(shape, rng, s) for s in (32, 16)}


def affinity_from_regions(regions, size, rng, sharpness=20.0):
    """A self-attention-like affinity: pixels attend to pixels of their own region."""
    small = ndimage.zoom(regions.astype(np.float32), size / regions.shape[0], order=0)
    features = small.reshape(-1, 1) + rng.normal(0, 0.05, (size * size, 1))
    distance = (features - features.T) ** 2
    logits = -sharpness * distance
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("method", ["threshold", "adaptive", "affinity", "separate"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_known_masks_from_synthetic_attention(method, seed):
    rng = np.random.default_rng(seed)
    bird = disc((20 + 4 * seed, 22), 12)
    dog = square((36, 30 - 3 * seed), 22)
    regions = bird * 1 + dog * 2
    maps = {"bird": multires(bird, rng), "dog": multires(dog, rng)}
    affinity = affinity_from_regions(regions, 32, rng)
    params = Refinement(method=method, threshold=0.4, band=0.0, min_area=0.01)
    out = refine(maps, {"bird": 3, "dog": 12}, SIZE, params, affinity, (32, 32))
    assert iou(out.mask == 3, bird) >= 0.9
    assert iou(out.mask == 12, dog) >= 0.9
    assert iou(out.mask == 0, regions == 0) >= 0.9
    assert 0.5 < out.quality <= 1.0
    assert [s["step"] for s in out.chain][-3:] == ["threshold", "band", "cleanup"]


def test_adaptive_records_its_chosen_level():
    rng = np.random.default_rng(0)
    bird = disc((32, 32), 14)
    out = refine(
        {"bird": multires(bird, rng)},
        {"bird": 1},
        SIZE,
        Refinement(method="adaptive"),
        affinity_from_regions(bird.astype(int), 16, rng),
        (16, 16),
    )
    step = next(s for s in out.chain if s["step"] == "adaptive")
    assert 0.35 <= step["chosen"] <= 0.54
    assert next(s for s in out.chain if s["step"] == "threshold")["value"] == step["chosen"]


def test_aggregate_normalises_each_resolution():
    maps = {(8, 8): np.full((8, 8), 0.01, np.float32), (4, 4): np.full((4, 4), 0.5, np.float32)}
    np.testing.assert_allclose(aggregate(maps, (16, 16)), 1.0, atol=1e-5)


def test_propagation_spreads_inside_regions_only():
    rng = np.random.default_rng(0)
    regions = np.zeros((16, 16), int)
    regions[:, 8:] = 1
    cam = np.zeros((16, 16), np.float32)
    cam[4, 12] = 1.0  # one hot pixel inside the right half
    out = propagate(cam, affinity_from_regions(regions, 16, rng), power=4)
    assert out[:, 8:].min() > 10 * out[:, :8].max()


def test_label_argmax_and_background():
    scores = np.stack([np.array([[0.9, 0.2], [0.6, 0.1]]), np.array([[0.5, 0.3], [0.7, 0.2]])])
    np.testing.assert_array_equal(label(scores, [3, 12], 0.4), [[3, 0], [12, 0]])


def test_band_marks_uncertain_pixels():
    scores = np.array([[[0.1, 0.48, 0.52, 0.9]]], np.float32)
    mask = label(scores, [1], 0.5)
    np.testing.assert_array_equal(apply_band(mask, scores, 0.5, 0.1), [[0, IGNORE, IGNORE, 1]])


def test_band_and_label_with_three_classes_and_ties():
    scores = np.array([[[0.9, 0.2, 0.5]], [[0.1, 0.46, 0.5]], [[0.3, 0.45, 0.2]]], np.float32)
    mask = label(scores, [4, 5, 6], 0.4)
    np.testing.assert_array_equal(mask, [[4, 5, 4]])  # a tie goes to the first class
    np.testing.assert_array_equal(apply_band(mask, scores, 0.5, 0.1), [[4, IGNORE, IGNORE]])


def test_small_components_are_dropped():
    mask = np.zeros((20, 20), np.uint8)
    mask[2:12, 2:12] = 1
    mask[15, 15] = 1
    mask[17:19, 0:2] = 2
    out = remove_small_components(mask, 5)
    assert out[15, 15] == 0 and (out[17:19, 0:2] == 0).all()
    assert (out[2:12, 2:12] == 1).all()


@pytest.mark.parametrize("seed", range(4))
def test_cleanup_in_the_class_box_equals_labelling_the_whole_mask(seed):
    """The cleanup labels each class inside the box around its pixels: same masks as
    labelling the whole image, with the classes named or found."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    mask = np.zeros((64, 64), np.uint8)
    for class_id in (3, 7):
        for _ in range(6):
            y, x, h, w = rng.integers(0, 60), rng.integers(0, 60), *rng.integers(1, 12, 2)
            mask[y : y + h, x : x + w] = class_id
    mask[rng.random(mask.shape) < 0.01] = IGNORE
    before = mask.copy()
    expected = mask.copy()
    for class_id in (3, 7):
        components, _ = ndimage.label(mask == class_id)
        sizes = np.bincount(components.ravel())
        expected[(components > 0) & (sizes[components] < 20)] = 0
    np.testing.assert_array_equal(remove_small_components(mask, 20, [3, 7, 9]), expected)
    np.testing.assert_array_equal(remove_small_components(mask, 20), expected)
    np.testing.assert_array_equal(mask, before)  # the input is left as it was


def test_quality_orders_crisp_above_flat():
    rng = np.random.default_rng(0)
    crisp = np.where(disc((32, 32), 12), 0.95, 0.05)[None] + rng.normal(0, 0.02, (1, *SIZE))
    flat = 0.5 + rng.normal(0, 0.05, (1, *SIZE))
    q_crisp = quality_score(label(crisp, [1], 0.5), crisp, [1])
    q_flat = quality_score(label(flat, [1], 0.5), flat, [1])
    assert q_crisp > 0.8 > 0.2 > q_flat >= 0.0
    # a class that lost all its pixels scores 0
    assert quality_score(np.zeros(SIZE, np.uint8), crisp, [1]) == 0.0


def test_rethreshold_higher_threshold_fewer_pixels():
    rng = np.random.default_rng(0)
    field = {"bird": aggregate(multires(disc((32, 32), 14), rng), (32, 32))}
    low, _, _ = rethreshold(field, {"bird": 3}, 0.3, size=SIZE)
    high, _, chain = rethreshold(field, {"bird": 3}, 0.7, size=SIZE)
    assert low.shape == SIZE
    assert (high == 3).sum() < (low == 3).sum()
    assert chain[0] == {"step": "stored"}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("otsu", r"method 'otsu' is unknown"),
        ({"threshold": 1.5}, r"threshold=1.5 is outside \[0, 1\]"),
        ({"thresold": 0.5}, r"unknown refinement parameter\(s\) \['thresold'\]"),
        ({"gammas": [0.5, 0.3, 0.01]}, r"gammas=\(0.5, 0.3, 0.01\)"),
        ({"affinity_steps": [10, 5]}, r"affinity_steps=\(10, 5\) must be \(start, stop\)"),
        ({"affinity_steps": [-1, 5]}, r"affinity_steps=\(-1, 5\)"),
        ({"affinity_steps": [0.5, 1]}, r"affinity_steps=\(0.5, 1\)"),
        ({"affinity_steps": 10}, r"affinity_steps=10 must be \(start, stop\)"),
        ({"colour_steps": -1}, r"colour_steps=-1 must be an integer >= 0"),
        ({"colour_steps": 2.5}, r"colour_steps=2.5 must be an integer >= 0"),
        (3, r"not a method name"),
    ],
)
def test_bad_refinement_parameters(value, message):
    with pytest.raises(DiffuMaskError, match=message):
        Refinement.from_any(value)


# -- the colour step ------------------------------------------------------------------------


def painted(*regions, background=(0.1, 0.1, 0.1)):
    """[3, H, W]: a flat background with each (mask, rgb) region painted over it."""
    image = np.empty((3, *SIZE), np.float32)
    image[:] = np.array(background, np.float32)[:, None, None]
    for mask, rgb in regions:
        image[:, mask] = np.array(rgb, np.float32)[:, None]
    return image


def test_colour_smoothing_spreads_inside_a_colour_and_not_across_an_edge():
    left = np.zeros(SIZE, bool)
    left[:, :32] = True
    image = painted((left, (0.9, 0.8, 0.2)))
    scores = np.zeros((1, 1, *SIZE), np.float32)
    scores[0, 0, 10:20, 5:15] = 1.0  # a patch on the left half
    out = colour_smooth(scores, colour_weights(image[None]), 10)[0, 0].numpy()
    assert out[:, 32:].max() < 1e-3  # nothing leaks across the edge
    assert out[:, :32].min() > 0 or out[30:, :32].max() > 0.01  # it spread on its own side
    assert out[25:35, 5:15].mean() > 0.05
    assert out.max() <= 1.0 + 1e-6 and out.min() >= 0.0  # a mean of neighbours, no overshoot
    assert abs(out.sum() - 100) / 100 < 0.5  # moved, not made or lost wholesale


@pytest.mark.parametrize("method", ["threshold", "adaptive", "affinity"])
def test_the_colour_step_snaps_a_coarse_mask_to_the_objects_edges(method):
    """Attention seen only through an 8x8 grid, and an 8x8 affinity: without the
    image the masks are blocky; with it they follow the painted outlines."""
    rng = np.random.default_rng(3)
    bird = disc((22, 22), 12)
    dog = square((38, 34), 20)
    maps = {
        "bird": {(8, 8): attention_field(bird, rng, 8)},
        "dog": {(8, 8): attention_field(dog, rng, 8)},
    }
    affinity = affinity_from_regions(bird * 1 + dog * 2, 8, rng)
    image = painted((bird, (0.9, 0.2, 0.2)), (dog, (0.2, 0.3, 0.9)))
    ids = {"bird": 3, "dog": 12}
    params = Refinement(method=method, band=0.0, min_area=0.0)
    plain = refine(maps, ids, SIZE, params, affinity, (8, 8))
    snapped = refine(maps, ids, SIZE, params, affinity, (8, 8), image=image)
    for mask, name, truth in ((3, "bird", bird), (12, "dog", dog)):
        before, after = iou(plain.mask == mask, truth), iou(snapped.mask == mask, truth)
        assert after >= 0.95 and after > before + 0.05, (name, before, after)
    assert "colour" not in [s["step"] for s in plain.chain]
    colour = [s for s in snapped.chain if s["step"] == "colour"]
    assert colour == [{"step": "colour", "steps": 10, "dilations": [1, 2, 4, 8]}]
    off = refine(maps, ids, SIZE, Refinement(method, colour_steps=0), affinity, (8, 8), image=image)
    assert "colour" not in [s["step"] for s in off.chain]


@pytest.mark.parametrize("method", ["threshold", "affinity"])
def test_the_quality_reads_the_attention_before_the_colour_step(method):
    """After the colour step every mask looks confident; the quality judges the mask by the
    attention's own scores (those the same refinement without the step cuts from)."""
    rng = np.random.default_rng(4)
    bird = disc((30, 30), 12)
    maps = {"bird": {(8, 8): attention_field(bird, rng, 8, noise=0.3)}}
    affinity = affinity_from_regions(bird.astype(int), 8, rng)
    params = Refinement(method=method)
    image = painted((bird, (0.2, 0.8, 0.3)))
    plain = refine(maps, {"bird": 1}, SIZE, Refinement(method, colour_steps=0), affinity, (8, 8))
    snapped = refine(maps, {"bird": 1}, SIZE, params, affinity, (8, 8), image=image)
    own = np.stack([plain.attention["bird"]])
    assert snapped.quality == pytest.approx(quality_score(snapped.mask, own, [1]), abs=1e-6)
    smoothed = np.stack([snapped.attention["bird"]])
    assert snapped.quality < quality_score(snapped.mask, smoothed, [1]) - 0.01


def test_the_colour_step_needs_images_at_mask_size():
    rng = np.random.default_rng(0)
    bird = disc((32, 32), 9)
    with pytest.raises(DiffuMaskError, match=r"images of shape \(1, 3, 32, 32\) do not fit"):
        refine(
            {"bird": multires(bird, rng)},
            {"bird": 1},
            SIZE,
            Refinement("threshold"),
            image=np.zeros((3, 32, 32), np.float32),
        )


@pytest.mark.parametrize("method", ["affinity", "adaptive", "separate"])
def test_affinity_methods_need_an_affinity(method):
    rng = np.random.default_rng(0)
    with pytest.raises(DiffuMaskError, match="needs the self-attention affinity"):
        refine({"bird": multires(disc((32, 32), 9), rng)}, {"bird": 1}, SIZE, Refinement(method))


def two_objects_that_attend_to_each_other(seed):
    """Two separated objects, a circle and a star, as the shapes model sees them: the
    self-attention links the objects to each other as much as to themselves, the finer
    cross-attention maps attend to both objects for both classes, and only the coarsest
    tell the classes apart. Returns (maps, affinity, image, circle, star)."""
    rng = np.random.default_rng(seed)
    circle, star = disc((18, 18), 10), disc((46, 44), 10)
    both = circle | star
    maps = {
        "circle": {
            (32, 32): attention_field(both, rng, 32),
            (8, 8): attention_field(circle, rng, 8),
        },
        "star": {(32, 32): attention_field(both, rng, 32), (8, 8): attention_field(star, rng, 8)},
    }
    image = np.ones((3, *SIZE), np.float32)
    image[:, circle] = np.array([0.9, 0.1, 0.1])[:, None]
    image[:, star] = np.array([0.1, 0.2, 0.9])[:, None]
    return maps, affinity_from_regions(both.astype(int), 16, rng), image, circle, star


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_separate_keeps_each_object_its_own_class(seed):
    maps, affinity, image, circle, star = two_objects_that_attend_to_each_other(seed)
    ids = {"circle": 1, "star": 4}
    params = {"band": 0.0, "min_area": 0.01}
    masks = {
        method: refine(
            maps, ids, SIZE, Refinement(method, **params), affinity, (16, 16), image=image
        ).mask
        for method in ("affinity", "separate")
    }
    assert iou(masks["separate"] == 1, circle) >= 0.9
    assert iou(masks["separate"] == 4, star) >= 0.9
    # the walk through the affinity spreads one class over both objects
    assert len(set(np.unique(masks["affinity"][circle | star])) - {0}) == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adaptive_names_each_object_from_the_coarsest_maps(seed):
    """adaptive's default (classes_from="coarsest") names each object by the coarsest
    maps; named from every resolution's average, finer maps that attend to the other
    object (here: swapped, the coarsest attending to the other at half strength) take
    pixels of one object for the other."""
    maps, affinity, image, circle, star = two_objects_that_attend_to_each_other(seed)
    rng = np.random.default_rng(seed)
    maps["circle"] = {
        (32, 32): attention_field(star, rng, 32),
        (8, 8): attention_field(circle + 0.5 * star, rng, 8),
    }
    maps["star"] = {
        (32, 32): attention_field(circle, rng, 32),
        (8, 8): attention_field(star + 0.5 * circle, rng, 8),
    }
    ids = {"circle": 1, "star": 4}

    def mask(classes_from):
        params = Refinement("adaptive", band=0.0, min_area=0.01, classes_from=classes_from)
        out = refine(maps, ids, SIZE, params, affinity, (16, 16), image=image)
        return out.mask, out.chain

    coarsest, chain = mask("coarsest")
    every, every_chain = mask("all")
    assert iou(coarsest == 1, circle) >= 0.9 and iou(coarsest == 4, star) >= 0.9
    assert min(iou(every == 1, circle), iou(every == 4, star)) < 0.9
    assert {"step": "classes", "from": "cross", "sizes": [[8, 8]]} in chain
    assert not any(step["step"] == "classes" for step in every_chain)


def test_classes_from_one_class_changes_nothing_and_a_bad_value_is_named():
    rng = np.random.default_rng(0)
    bird = disc((30, 28), 12)
    maps = {"bird": multires(bird, rng)}
    affinity = affinity_from_regions(bird.astype(int), 16, rng)
    masks = [
        refine(
            maps, {"bird": 1}, SIZE, Refinement("adaptive", classes_from=c), affinity, (16, 16)
        ).mask
        for c in ("coarsest", "all")
    ]
    np.testing.assert_array_equal(*masks)
    with pytest.raises(DiffuMaskError, match=r"classes_from='finest' is unknown; use 'coarsest'"):
        Refinement(classes_from="finest")


def test_separate_with_one_class_is_affinity():
    rng = np.random.default_rng(0)
    bird = disc((30, 28), 12)
    maps = {"bird": multires(bird, rng)}
    affinity = affinity_from_regions(bird.astype(int), 16, rng)
    image = np.stack([bird.astype(np.float32)] * 3)
    out = {
        m: refine(maps, {"bird": 1}, SIZE, Refinement(m), affinity, (16, 16), image=image)
        for m in ("affinity", "separate")
    }
    np.testing.assert_array_equal(out["separate"].mask, out["affinity"].mask)
    assert out["separate"].quality == pytest.approx(out["affinity"].quality, abs=1e-6)
    assert {"step": "classes", "from": "cross", "sizes": [[16, 16]]} in out["separate"].chain


# -- the torch refinement against the numpy one it replaced ---------------------------------


def golden_cases():
    """(case, {class: {(h, w): map}}, affinity) for each case of the golden file, which
    scripts/make_refine_golden.py made with the numpy refinement of d0e6cdf."""
    golden = np.load(GOLDEN)
    index = json.loads(bytes(golden["index"]))
    for case in index["cases"]:
        name = case["name"]
        maps = {c: {} for c in case["classes"]}
        for key in golden.files:
            if key.startswith(f"{name}/maps/"):
                _, _, c, side = key.split("/")
                h, w = map(int, side.split("x"))
                maps[c][(h, w)] = golden[key].astype(np.float32)
        yield case, maps, golden[f"{name}/affinity"].astype(np.float32), golden, index["ids"]


def walk_range(maps, affinity, affinity_size, power):
    """Smallest relative range (max - min) / max over the classes' random-walk outputs."""
    return min(
        float((w.max() - w.min()) / w.max())
        for m in maps.values()
        for w in [propagate(aggregate(m, affinity_size), affinity, power)]
    )


def test_masks_equal_the_numpy_refinement():
    """Masks, chains (adaptive's chosen level and its agreement included) and quality as
    the numpy code made them, on real captures (builtin:shapes, builtin:tiny-random) and
    synthetic maps at 64 and 512 px. The documented tolerance: scores within float32
    rounding (compared here to float16 copies); quality within 5e-5; and where the
    random walk's output is flat (range < 0.1% of its peak, as on the random-weight
    tiny model) the min-max stretch magnifies rounding, so what is cut from the
    propagated map (method affinity, adaptive's reference) may differ."""
    checked = flat = 0
    for case, maps, affinity, golden, ids in golden_cases():
        name, size = case["name"], tuple(case["size"])
        for run in case["runs"]:
            # the numpy code named the classes from every resolution (classes_from="all")
            params = replace(Refinement.from_any(run["params"]), classes_from="all")
            out = refine(maps, ids, size, params, affinity, tuple(case["affinity_size"]))
            where = f"{name}/{run['key']}"
            if (
                walk_range(maps, affinity, tuple(case["affinity_size"]), params.affinity_power)
                < 1e-3
            ):
                flat += 1
                assert "tiny" in name, where  # only the random-weight model is that flat
                if params.method == "affinity":
                    continue
                chain = [s for s in out.chain if s["step"] != "adaptive"]
                expected = [s for s in run["chain"] if s["step"] != "adaptive"]
                assert chain == expected, where
            else:
                assert out.chain == run["chain"], where
            np.testing.assert_array_equal(out.mask, golden[f"{where}/mask"], err_msg=where)
            assert out.quality == pytest.approx(run["quality"], abs=5e-5), where
            scores = "affinity" if params.method == "affinity" else "adaptive"
            for c, attention in out.attention.items():
                old = golden[f"{name}/{scores}/attention/{c}"].astype(np.float32)
                np.testing.assert_allclose(downsample(attention, 64), old, atol=5e-4)
            checked += 1
        stored = {c: golden[f"{name}/stored/{c}"] for c in case["classes"]}
        spec = case["rethreshold"]
        mask, quality, chain = rethreshold(
            stored, ids, spec["threshold"], spec["band"], spec["min_area"], size=size
        )
        np.testing.assert_array_equal(mask, golden[f"{name}/rethreshold/mask"])
        assert quality == pytest.approx(spec["quality"], abs=5e-5)
        assert chain == spec["chain"]
    assert checked >= 28 and flat <= 4


@pytest.mark.parametrize(("source", "target"), [(64, 512), (8, 512), (16, 64), (64, 32), (32, 8)])
def test_resize_is_pytorch_bicubic(source, target):
    maps = torch.rand(2, 3, source, source, generator=torch.Generator().manual_seed(source))
    expected = F.interpolate(maps, size=(target, target), mode="bicubic", align_corners=False)
    np.testing.assert_allclose(resize(maps, (target, target)), expected, atol=2e-6)


def test_levels_below_counts_exactly_at_the_levels():
    levels = gamma_sweep(0.35, 0.54, 0.01)
    edges = levels.astype(np.float32)
    near = np.concatenate(
        [edges, np.nextafter(edges, np.float32(0)), np.nextafter(edges, np.float32(1))]
    )
    scores = np.concatenate([near, np.random.default_rng(0).random(10_000, np.float32)])
    expected = (scores[:, None].astype(np.float64) >= levels[None]).sum(axis=1)
    got = levels_below(torch.from_numpy(scores), levels)
    np.testing.assert_array_equal(got.numpy(), expected)
    uneven = np.array([0.1, 0.3, 0.35, 0.9])  # counted by binary search
    got = levels_below(torch.from_numpy(scores), uneven)
    np.testing.assert_array_equal(got.numpy(), (scores[:, None] >= uneven[None]).sum(axis=1))


def test_adaptive_sweep_equals_cutting_at_every_level():
    """The one-histogram sweep against cutting and scoring each level in turn (what the
    numpy code did), with up to five classes and a shared id."""
    rng = np.random.default_rng(3)
    scores = torch.from_numpy(rng.random((2, 5, 24, 24), np.float32))
    classes = [[1, 2, 3, 4, 5], [1, 2, 2]]  # image 1: classes 2 and 3 share a label
    labels = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 2, 0, 0]], dtype=torch.uint8)
    scores[1, 3:] = 0  # padding
    reference = torch.from_numpy(rng.integers(0, 6, (2, 24, 24)).astype(np.uint8))
    reference[1] = reference[1] % 3
    levels = gamma_sweep(0.2, 0.8, 0.05)
    chosen, agreements = adaptive_threshold(scores, labels, reference, levels, classes)
    for i, image_classes in enumerate(classes):
        expected = []
        for level in levels:
            mask = np.asarray(label(scores[i], labels[i], float(level)))
            ref = np.asarray(reference[i])
            ious = [iou(mask == c, ref == c) for c in [0, *image_classes]]
            expected.append(float(np.mean(ious)))
        top = int(np.argmax(expected))
        assert chosen[i] == float(levels[top]) and agreements[i] == expected[top]


def batch_inputs(images=3):
    rng = np.random.default_rng(1)
    maps, affinities = [], []
    for i in range(images):
        bird = disc((20 + 5 * i, 24), 11)
        dog = square((34, 20 + 4 * i), 20)
        names = {"bird": bird, "dog": dog} if i != 1 else {"dog": dog}  # 2, 1, 2 classes
        maps.append({n: multires(m, rng) for n, m in names.items()})
        affinities.append(affinity_from_regions(bird * 1 + dog * 2, 16, rng))
    return maps, np.stack(affinities)


@pytest.mark.parametrize("method", ["threshold", "adaptive", "affinity", "separate"])
def test_batched_equals_per_image(method):
    maps, affinity = batch_inputs()
    params = Refinement(method=method, min_area=0.01)
    ids = {"bird": 3, "dog": 12}
    images = np.random.default_rng(2).random((len(maps), 3, *SIZE), dtype=np.float32)
    together = refine_batch(
        maps, ids, SIZE, params, affinity, (16, 16), chunk=len(maps), images=images
    )
    alone = [
        refine(m, ids, SIZE, params, a, (16, 16), image=i)
        for m, a, i in zip(maps, affinity, images, strict=True)
    ]
    for a, b in zip(together, alone, strict=True):
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.chain == b.chain and a.quality == pytest.approx(b.quality, abs=2e-6)
        assert list(a.attention) == list(b.attention)
        for name in a.attention:
            np.testing.assert_allclose(a.attention[name], b.attention[name], atol=1e-6)
    assert list(together[1].attention) == ["dog"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_refinement_matches_the_cpu():
    maps, affinity = batch_inputs()
    ids = {"bird": 3, "dog": 12}
    cpu = refine_batch(maps, ids, (512, 512), Refinement(), affinity, (16, 16))
    cuda = refine_batch(maps, ids, (512, 512), Refinement(), affinity, (16, 16), device="cuda")
    for a, b in zip(cpu, cuda, strict=True):
        assert (a.mask != b.mask).mean() < 1e-3
        assert a.quality == pytest.approx(b.quality, abs=1e-3)


def test_class_ids_must_be_mask_values():
    rng = np.random.default_rng(0)
    with pytest.raises(DiffuMaskError, match=r"class 'bird' has id 300; class ids are mask"):
        refine(
            {"bird": multires(disc((32, 32), 9), rng)}, {"bird": 300}, SIZE, Refinement("threshold")
        )
    with pytest.raises(DiffuMaskError, match=r"class\(es\) \['bird'\] have no id"):
        refine(
            {"bird": multires(disc((32, 32), 9), rng)}, {"dog": 1}, SIZE, Refinement("threshold")
        )


def test_class_maps_of_a_batch_share_their_sizes():
    rng = np.random.default_rng(0)
    maps = {"bird": multires(disc((32, 32), 9), rng), "dog": {(16, 16): np.ones((16, 16))}}
    with pytest.raises(DiffuMaskError, match=r"at different sizes \[\(\(16, 16\),\), "):
        refine(maps, {"bird": 1, "dog": 2}, SIZE, Refinement("threshold"))
