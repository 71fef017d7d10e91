import numpy as np
import pytest
from scipy import ndimage

from diffumask_datasets.errors import DiffuMaskError
from diffumask_datasets.refine import (
    Refinement,
    aggregate,
    apply_band,
    iou,
    label,
    propagate,
    quality_score,
    refine,
    remove_small_components,
    rethreshold,
)
from diffumask_datasets.sample import IGNORE

SIZE = (64, 64)


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


@pytest.mark.parametrize("method", ["threshold", "adaptive", "affinity"])
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


def test_small_components_are_dropped():
    mask = np.zeros((20, 20), np.uint8)
    mask[2:12, 2:12] = 1
    mask[15, 15] = 1
    mask[17:19, 0:2] = 2
    out = remove_small_components(mask, 5)
    assert out[15, 15] == 0 and (out[17:19, 0:2] == 0).all()
    assert (out[2:12, 2:12] == 1).all()


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
        (3, r"not a method name"),
    ],
)
def test_bad_refinement_parameters(value, message):
    with pytest.raises(DiffuMaskError, match=message):
        Refinement.from_any(value)


def test_affinity_methods_need_an_affinity():
    rng = np.random.default_rng(0)
    with pytest.raises(DiffuMaskError, match="needs the self-attention affinity"):
        refine(
            {"bird": multires(disc((32, 32), 9), rng)}, {"bird": 1}, SIZE, Refinement("affinity")
        )
