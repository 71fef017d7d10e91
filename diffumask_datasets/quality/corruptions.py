"""The realistic kinds of bad mask, as small pure functions over id masks.

What goes wrong when masks come from a diffusion model's attention, each made on purpose
so that noise learning can be measured against known truth (benchmarks/noise.py) and a
user can check a cleaning setup on their own data:

    from_other      a mask from another image (wrong place and shape), in this one's classes
    partial         each object shrunk to a part of itself (attention on one salient part)
    bleed           each object grown into the background (attention spilling over)
    drop_class      one class's pixels turned to background (an object the attention missed)
    swap_classes    two classes' labels exchanged (the prompt's words attached to the wrong
                    objects, the failure of multi-object prompts)

Masks are uint8 HxW: 0 background, class ids, 255 ignore; ignored pixels stay ignored.
`corrupt` picks a seeded share of a dataset and applies one kind to each picked mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffumask_datasets.errors import DiffuMaskError

from .metrics import IGNORE

KINDS = ("other", "partial", "bleed", "missing", "swap")
# the kinds that need a mask with two classes or more
MULTI_CLASS_KINDS = ("missing", "swap")


def object_ids(mask: np.ndarray) -> list[int]:
    """The class ids a mask shows (neither background nor ignore), ascending."""
    values = np.unique(np.asarray(mask))
    return [int(v) for v in values if v not in (0, IGNORE)]


def from_other(mask: np.ndarray, other: np.ndarray) -> np.ndarray:
    """`other`'s layout in `mask`'s classes: other's k-th class (ascending ids) becomes
    mask's k-th class (cycling when other shows more); pixels either ignores stay
    ignored. A mask that shows no class comes back as it was."""
    mask, other = np.asarray(mask), np.asarray(other)
    own, theirs = object_ids(mask), object_ids(other)
    if not own:
        return mask.copy()
    out = np.zeros_like(mask)
    for k, c in enumerate(theirs):
        out[other == c] = own[k % len(own)]
    out[(mask == IGNORE) | (other == IGNORE)] = IGNORE
    return out


def partial(mask: np.ndarray, angle: float, share: float = 0.5) -> np.ndarray:
    """Each object cut down to the `share` of its pixels that lie furthest along the
    direction `angle` (radians): a straight cut across it, the rest background."""
    if not 0.0 < share <= 1.0:
        raise DiffuMaskError(f"partial share {share} is outside (0, 1]; e.g. 0.5")
    mask = np.asarray(mask)
    out = mask.copy()
    ys, xs = np.indices(mask.shape)
    along = np.cos(angle) * xs + np.sin(angle) * ys
    for c in object_ids(mask):
        inside = mask == c
        cut = np.quantile(along[inside], 1.0 - share)
        out[inside & (along < cut)] = 0
    return out


def bleed(mask: np.ndarray, growth: float = 2.0) -> np.ndarray:
    """Each object grown into the background, one pixel ring (8-neighbourhood) at a time,
    until its area is at least `growth` times what it was or no background touches it.
    Objects grow in ascending id order; ignored pixels stay ignored."""
    from scipy import ndimage

    if growth < 1.0:
        raise DiffuMaskError(f"bleed growth {growth} is below 1; e.g. 2.0 doubles each object")
    mask = np.asarray(mask)
    out = mask.copy()
    ring = np.ones((3, 3), dtype=bool)
    for c in object_ids(mask):
        region = out == c
        target = growth * region.sum()
        while region.sum() < target:
            grown = ndimage.binary_dilation(region, ring) & (out == 0)
            if not grown.any():
                break
            out[grown] = c
            region |= grown
    return out


def drop_class(mask: np.ndarray, class_id: int) -> np.ndarray:
    """The mask with class_id's pixels turned to background."""
    mask = np.asarray(mask)
    return np.where(mask == class_id, 0, mask).astype(mask.dtype)


def swap_classes(mask: np.ndarray, a: int, b: int) -> np.ndarray:
    """The mask with the labels of classes a and b exchanged."""
    mask = np.asarray(mask)
    out = mask.copy()
    out[mask == a], out[mask == b] = b, a
    return out


def eligible(mask: np.ndarray, kind: str) -> bool:
    """Whether `kind` changes this mask: every kind needs an object; missing and swap
    need two classes or more."""
    need = 2 if kind in MULTI_CLASS_KINDS else 1
    return len(object_ids(mask)) >= need


def corrupt_one(
    mask: np.ndarray, kind: str, rng: np.random.Generator, other: np.ndarray | None = None
) -> np.ndarray:
    """One mask made bad by `kind` (see KINDS), with the random choices drawn from rng:
    the cut direction of partial (half the object kept), the class missing dropped, the
    pair swap exchanges. `other` (another image's mask) is what from_other takes."""
    ids = object_ids(mask)
    if kind == "other":
        if other is None:
            raise DiffuMaskError("the 'other' corruption needs another image's mask")
        return from_other(mask, other)
    if kind == "partial":
        return partial(mask, float(rng.uniform(0, 2 * np.pi)), 0.5)
    if kind == "bleed":
        return bleed(mask, 2.0)
    if kind == "missing":
        return drop_class(mask, ids[int(rng.integers(len(ids)))])
    if kind == "swap":
        a, b = rng.choice(ids, size=2, replace=False)
        return swap_classes(mask, int(a), int(b))
    raise DiffuMaskError(f"unknown corruption {kind!r}; use one of {', '.join(KINDS)}")


def corrupt(
    masks: Sequence[np.ndarray], kind: str, share: float, seed: int = 0
) -> tuple[list[np.ndarray], list[int]]:
    """A copy of `masks` in which round(share * len(masks)) of them, drawn (seeded) from
    those `kind` can change, are made bad by `kind`. For 'other', each picked mask takes
    the layout of a different, randomly drawn mask that shows an object. Returns (masks,
    the picked positions, ascending)."""
    if kind not in KINDS:
        raise DiffuMaskError(f"unknown corruption {kind!r}; use one of {', '.join(KINDS)}")
    if not 0.0 <= share <= 1.0:
        raise DiffuMaskError(f"corruption share {share} is outside [0, 1]; e.g. 0.25")
    rng = np.random.default_rng(seed)
    candidates = [i for i, m in enumerate(masks) if eligible(m, kind)]
    wanted = round(share * len(masks))
    if wanted > len(candidates):
        raise DiffuMaskError(
            f"{wanted} masks to corrupt with {kind!r} but only {len(candidates)} can be "
            f"({'two classes or more' if kind in MULTI_CLASS_KINDS else 'an object'} needed); "
            "lower the share or use more multi-object samples"
        )
    picked = sorted(rng.choice(candidates, size=wanted, replace=False).tolist())
    donors = [i for i, m in enumerate(masks) if object_ids(m)]
    out = [np.asarray(m).copy() for m in masks]
    for i in picked:
        other = None
        if kind == "other":
            choices = [j for j in donors if j != i]
            other = masks[choices[int(rng.integers(len(choices)))]] if choices else masks[i]
        out[i] = corrupt_one(masks[i], kind, rng, other)
    return out, picked
