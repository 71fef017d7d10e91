"""From attention maps to a mask: small pure functions over arrays, chained by name.

Methods (the chain each runs):
- "threshold": aggregate -> threshold at a fixed background level -> band -> cleanup.
- "affinity":  aggregate at the affinity resolution -> propagate through the UNet's own
  self-attention (a random walk, the role AffinityNet plays in the paper, with no
  training) -> min-max normalise -> upsample -> threshold -> band -> cleanup.
- "adaptive":  the paper's per-image threshold: aggregate, then sweep the background
  level and keep the one whose mask best agrees with the propagated ("affinity") mask
  -> band -> cleanup.

Every sample records its chain, so a mask can be recomputed from the stored attention
with other parameters (`rethreshold`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from .errors import DiffuMaskError
from .sample import IGNORE

METHODS = ("threshold", "adaptive", "affinity")
Size = tuple[int, int]


@dataclass(frozen=True)
class Refinement:
    """Refinement parameters; every field is recorded with each sample.

    threshold: background level for "threshold" and "affinity"; the level at which the
        propagated reference mask is cut for "adaptive".
    gammas: (first, last, step) of the adaptive sweep; the paper's 0.35 ... 0.54.
    affinity_power: random-walk steps through the self-attention matrix.
    band: pixels whose winning score lies within band/2 of the threshold are labelled 255.
    min_area: connected components smaller than this fraction of the image are dropped.
    cross_factors / affinity_factor / steps: what capture keeps (see CaptureOptions).
    """

    method: str = "adaptive"
    threshold: float = 0.5
    gammas: tuple[float, float, float] = (0.35, 0.54, 0.01)
    affinity_power: int = 4
    band: float = 0.1
    min_area: float = 0.002
    cross_factors: tuple[int, ...] | None = None
    affinity_factor: int | None = None
    steps: tuple[int, int] | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise DiffuMaskError(
                f"refinement method {self.method!r} is unknown; use one of {', '.join(METHODS)}"
            )
        for name in ("threshold", "band", "min_area"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise DiffuMaskError(f"refinement {name}={value} is outside [0, 1]")
        first, last, step = self.gammas
        if not (0 <= first <= last <= 1 and step > 0):
            raise DiffuMaskError(
                f"refinement gammas={self.gammas} must be (first, last, step) with "
                "0 <= first <= last <= 1 and step > 0"
            )
        if int(self.affinity_power) < 1:
            raise DiffuMaskError(f"refinement affinity_power={self.affinity_power} must be >= 1")

    @property
    def needs_affinity(self) -> bool:
        return self.method in ("adaptive", "affinity")

    @classmethod
    def from_any(cls, value: Refinement | Mapping[str, Any] | str | None) -> Refinement:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(method=value)
        if isinstance(value, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise DiffuMaskError(
                    f"unknown refinement parameter(s) {unknown}; known: {sorted(known)}"
                )
            tuples = ("gammas", "cross_factors", "steps")
            return cls(
                **{k: tuple(v) if k in tuples and v is not None else v for k, v in value.items()}
            )
        raise DiffuMaskError(f"refinement {value!r} is not a method name, a dict or a Refinement")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class Refined:
    mask: np.ndarray  # uint8 HxW
    attention: dict[str, np.ndarray]  # the per-class scores the mask was cut from
    quality: float
    chain: list[dict[str, Any]] = field(default_factory=list)


# -- array steps ------------------------------------------------------------------


def resize(array: np.ndarray, size: Size) -> np.ndarray:
    """Bicubic resize of a 2-D map (as the reference implementation upsamples)."""
    import torch
    import torch.nn.functional as F

    if tuple(array.shape) == tuple(size):
        return array.astype(np.float32)
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    return F.interpolate(x, size=tuple(size), mode="bicubic", align_corners=False)[0, 0].numpy()


def normalise_max(array: np.ndarray) -> np.ndarray:
    peak = float(array.max())
    return array / peak if peak > 0 else np.zeros_like(array)


def normalise_minmax(array: np.ndarray) -> np.ndarray:
    low, high = float(array.min()), float(array.max())
    return (array - low) / (high - low) if high > low else np.zeros_like(array)


def aggregate(maps: Mapping[Size, np.ndarray], size: Size) -> np.ndarray:
    """Multi-resolution map: each map resized to `size`, divided by its maximum, averaged."""
    if not maps:
        raise DiffuMaskError("no attention maps to aggregate")
    stacked = [normalise_max(resize(m, size)) for m in maps.values()]
    return np.clip(np.mean(stacked, axis=0), 0.0, 1.0).astype(np.float32)


def propagate(cam: np.ndarray, affinity: np.ndarray, power: int) -> np.ndarray:
    """Random walk of a map through a row-stochastic affinity (Q x Q, Q = h*w): each
    pixel takes the affinity-weighted mean of its neighbours' scores, `power` times."""
    h, w = cam.shape
    if affinity.shape != (h * w, h * w):
        raise DiffuMaskError(f"affinity of shape {affinity.shape} does not fit a {h}x{w} map")
    # power matrix-vector products, never the matrix power: O(power * Q^2), not O(Q^3)
    affinity = np.asarray(affinity, dtype=np.float32)
    scores = cam.reshape(-1).astype(np.float32)
    for _ in range(int(power)):
        scores = affinity @ scores
    return scores.reshape(h, w)


def winners(scores: np.ndarray, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(class id with the highest score, that score) per pixel."""
    return np.asarray(ids, dtype=np.uint8)[scores.argmax(axis=0)], scores.max(axis=0)


def cut(winner: np.ndarray, best: np.ndarray, threshold: float) -> np.ndarray:
    """Background where the best score is below the threshold."""
    return np.where(best >= threshold, winner, np.uint8(0))


def label(scores: np.ndarray, ids: Sequence[int], threshold: float) -> np.ndarray:
    """Argmax over [background = threshold, class scores...] -> uint8 mask of class ids."""
    return cut(*winners(scores, ids), threshold)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def mean_iou(mask: np.ndarray, reference: np.ndarray, ids: Sequence[int]) -> float:
    """Mean IoU over background and the given classes, ignoring 255 in the reference."""
    valid = reference != IGNORE
    return float(np.mean([iou((mask == c) & valid, (reference == c) & valid) for c in [0, *ids]]))


def gamma_sweep(first: float, last: float, step: float) -> np.ndarray:
    return np.round(np.arange(first, last + step / 2, step), 6)


def adaptive_threshold(
    scores: np.ndarray, ids: Sequence[int], reference: np.ndarray, gammas: np.ndarray
) -> tuple[float, float]:
    """The background level whose mask best agrees (mean IoU) with `reference`.

    Ties go to the lowest level. Returns (level, agreement)."""
    winner, best = winners(scores, ids)  # the argmax does not depend on the level
    agreements = [mean_iou(cut(winner, best, g), reference, ids) for g in gammas]
    top = int(np.argmax(agreements))
    return float(gammas[top]), float(agreements[top])


def apply_band(mask: np.ndarray, scores: np.ndarray, threshold: float, width: float) -> np.ndarray:
    """Label 255 where the winning score is within width/2 of the threshold: those
    pixels could go either way."""
    if width <= 0:
        return mask
    out = mask.copy()
    out[np.abs(scores.max(axis=0) - threshold) < width / 2] = IGNORE
    return out


def remove_small_components(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """Relabel as background every class component smaller than `min_pixels`."""
    from scipy import ndimage

    if min_pixels <= 1:
        return mask
    out = mask.copy()
    for class_id in np.unique(mask):
        if class_id in (0, IGNORE):
            continue
        components, count = ndimage.label(mask == class_id)
        sizes = np.bincount(components.ravel(), minlength=count + 1)
        small = np.flatnonzero(sizes < min_pixels)
        small = small[small > 0]
        out[np.isin(components, small)] = 0
    return out


def quality_score(mask: np.ndarray, scores: np.ndarray, ids: Sequence[int]) -> float:
    """How clearly the attention separates each class from the rest, in [0, 1].

    For every class of the prompt: mean score inside its region minus mean score over
    the other labelled pixels (0 if the class got no pixels), averaged over classes,
    then multiplied by the share of pixels that are not 255. Crisp, confident maps score
    near 1; flat or contradictory maps, or masks that lost a class, near 0.
    """
    labelled = mask != IGNORE
    separations = []
    for score, class_id in zip(scores, ids, strict=True):
        inside = mask == class_id
        outside = labelled & ~inside
        if not inside.any() or not outside.any():
            separations.append(0.0)
            continue
        separations.append(float(score[inside].mean() - score[outside].mean()))
    separation = float(np.clip(np.mean(separations), 0.0, 1.0))
    return round(separation * float(labelled.mean()), 6)


# -- chains -----------------------------------------------------------------------


def _finish(
    scores: np.ndarray,
    names: Sequence[str],
    ids: Sequence[int],
    threshold: float,
    params: Refinement,
    chain: list[dict[str, Any]],
) -> Refined:
    mask = label(scores, ids, threshold)
    chain.append({"step": "threshold", "value": threshold})
    mask = apply_band(mask, scores, threshold, params.band)
    chain.append({"step": "band", "width": params.band})
    min_pixels = int(round(params.min_area * mask.size))
    mask = remove_small_components(mask, min_pixels)
    chain.append({"step": "cleanup", "min_area": params.min_area, "min_pixels": min_pixels})
    attention = {n: s.astype(np.float32) for n, s in zip(names, scores, strict=True)}
    return Refined(mask, attention, quality_score(mask, scores, ids), chain)


def _propagated(
    class_maps: Mapping[str, Mapping[Size, np.ndarray]],
    affinity: np.ndarray | None,
    affinity_size: Size | None,
    size: Size,
    params: Refinement,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    if affinity is None or affinity_size is None:
        raise DiffuMaskError(
            f"refinement method {params.method!r} needs the self-attention affinity; "
            "capture it (DiffuMask does so for this method) or use method='threshold'"
        )
    maps = [
        normalise_minmax(propagate(aggregate(m, affinity_size), affinity, params.affinity_power))
        for m in class_maps.values()
    ]
    scores = np.stack([np.clip(resize(m, size), 0.0, 1.0) for m in maps])
    steps = [
        {"step": "aggregate", "size": list(affinity_size), "normalise": "max"},
        {"step": "propagate", "power": params.affinity_power, "size": list(affinity_size)},
        {"step": "normalise", "kind": "minmax"},
        {"step": "upsample", "mode": "bicubic", "size": list(size)},
    ]
    return scores, steps


def refine(
    class_maps: Mapping[str, Mapping[Size, np.ndarray]],
    class_ids: Mapping[str, int],
    size: Size,
    params: Refinement | None = None,
    affinity: np.ndarray | None = None,
    affinity_size: Size | None = None,
) -> Refined:
    """Mask, per-class scores, quality and chain for one image.

    class_maps: {class name: {(h, w): mean cross-attention map}} for the prompt's classes.
    """
    params = params or Refinement()
    names = list(class_maps)
    ids = [class_ids[n] for n in names]
    aggregate_step = {
        "step": "aggregate",
        "sizes": [list(s) for s in sorted({tuple(s) for m in class_maps.values() for s in m})],
        "upsample": "bicubic",
        "normalise": "max",
    }
    if params.method == "threshold":
        scores = np.stack([aggregate(m, size) for m in class_maps.values()])
        return _finish(scores, names, ids, params.threshold, params, [aggregate_step])
    propagated, steps = _propagated(class_maps, affinity, affinity_size, size, params)
    if params.method == "affinity":
        return _finish(propagated, names, ids, params.threshold, params, [aggregate_step, *steps])
    scores = np.stack([aggregate(m, size) for m in class_maps.values()])
    reference = label(propagated, ids, params.threshold)
    gamma, agreement = adaptive_threshold(scores, ids, reference, gamma_sweep(*params.gammas))
    chain = [
        aggregate_step,
        *steps,
        {"step": "reference", "threshold": params.threshold},
        {
            "step": "adaptive",
            "gammas": list(params.gammas),
            "chosen": gamma,
            "agreement": round(agreement, 6),
        },
    ]
    return _finish(scores, names, ids, gamma, params, chain)


def rethreshold(
    attention: Mapping[str, np.ndarray],
    class_ids: Mapping[str, int],
    threshold: float,
    band: float = 0.0,
    min_area: float = 0.0,
    size: Size | None = None,
) -> tuple[np.ndarray, float, list[dict[str, Any]]]:
    """Recompute a mask from stored per-class scores with another threshold, band and
    cleanup. Maps are resized to `size` (default: the largest map's size)."""
    if not attention:
        raise DiffuMaskError("no attention maps to re-threshold")
    names = list(attention)
    unknown = [n for n in names if n not in class_ids]
    if unknown:
        raise DiffuMaskError(f"class(es) {unknown} have no id; known: {sorted(class_ids)}")
    params = Refinement(method="threshold", threshold=threshold, band=band, min_area=min_area)
    size = size or max((m.shape for m in attention.values()), key=lambda s: s[0] * s[1])
    scores = np.stack([np.clip(resize(attention[n], size), 0.0, 1.0) for n in names])
    refined = _finish(
        scores, names, [class_ids[n] for n in names], threshold, params, [{"step": "stored"}]
    )
    return refined.mask, refined.quality, refined.chain
