"""From attention maps to a mask: small pure functions over torch tensors, chained by name.

Methods (the chain each runs):
- "threshold": aggregate -> colour -> threshold at a fixed background level -> band ->
  cleanup.
- "affinity":  aggregate at the affinity resolution -> propagate through the UNet's own
  self-attention (a random walk, the role AffinityNet plays in the paper, with no
  training) -> min-max normalise -> upsample -> colour -> threshold -> band -> cleanup.
- "adaptive":  the paper's per-image threshold: aggregate -> colour, then sweep the
  background level and keep the one whose mask best agrees with the propagated
  ("affinity", colour included) mask -> band -> cleanup.
- "separate":  the foreground from the affinity, the class from the cross-attention: the
  propagated ("affinity", colour included) maps decide which pixels are an object, and
  at each of those pixels the class whose coarsest cross-attention map (aggregated and
  colour-smoothed alone) scores highest wins -> threshold -> band -> cleanup. The walk
  through the self-attention spreads every class over every object (it links objects to
  each other as well as to themselves), and the finer cross-attention maps attend to
  every object alike; the coarsest maps tell the classes apart. With one class it is
  "affinity".

"colour" is the image-guided step, the role of the paper's dense CRF: at image size, each
pixel's scores become the mean of its like-coloured neighbours', several times, so a mask
drawn from a 16x16 or 32x32 attention grid snaps to the image's own edges. It needs the
generated images (the engine passes them) and is skipped without them.

Every sample records its chain, so a mask can be recomputed from the stored attention
with other parameters (`rethreshold`).

Where it runs: everything up to the cut mask runs in torch on the device of the capture
(or the one asked for), batched over the images of a pipeline call (`cut_masks`); the
rest runs on the CPU at mask size (`finish`): small-component cleanup (scipy) and the
quality score. One implementation: on a CPU-only machine the same torch code runs on the
CPU. Bicubic resizing is a product with precomputed interpolation matrices, equal to
`F.interpolate(mode="bicubic")` up to float32 rounding (a few 1e-7) and several times
faster on the CPU; the adaptive sweep counts every level at once from one histogram.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from .errors import DiffuMaskError
from .sample import IGNORE

METHODS = ("threshold", "adaptive", "affinity", "separate")
CLASSES_FROM = ("coarsest", "all")
BLOCK_CHOICES = ("cross_blocks", "affinity_blocks", "concept_blocks")  # MMDiT models' blocks
Size = tuple[int, int]


@dataclass(frozen=True)
class Refinement:
    """Refinement parameters; every field is recorded with each sample.

    threshold: background level for "threshold", "affinity" and "separate"; the level at
        which the propagated reference mask is cut for "adaptive".
    gammas: (first, last, step) of the adaptive sweep; the paper's 0.35 ... 0.54.
    affinity_power: random-walk steps through the self-attention matrix.
    band: pixels whose winning score lies within band/2 of the threshold are labelled 255.
    min_area: connected components smaller than this fraction of the image are dropped.
    colour_steps: steps of colour-guided smoothing of the scores at image size before they
        are cut (`colour_smooth`: each pixel takes the mean of its like-coloured
        neighbours'), so masks follow the image's edges where the attention's coarse grid
        cannot; 0 turns it off. Runs where the images are given (the engine gives them).
    cross_factors / affinity_factor / steps / affinity_steps: what capture keeps (see
        CaptureOptions). affinity_steps=(10, 20) of 20 steps halves the affinity's capture
        cost; on the shapes benchmark its masks matched every step's (BENCHMARKS.md).
    cross_blocks / affinity_blocks: MMDiT models (SD3, SD3.5, FLUX.1) only: the blocks whose
        attention makes the class maps and the affinity (see CaptureOptions); None: the
        model's defaults.
    concept_blocks: MMDiT models with map_kind "concept" only: the joint blocks whose
        ConceptAttention maps make the class maps; None: the second half.
    classes_from: which cross-attention maps name each foreground pixel's class, for
        "adaptive" and "separate": "coarsest" (the coarsest captured resolution's, which
        tell several objects apart on the shapes model) or "all" (every resolution's
        average, the paper's). "threshold" and "affinity" name from all maps and the
        walk, as ever.
    """

    method: str = "adaptive"
    threshold: float = 0.5
    gammas: tuple[float, float, float] = (0.35, 0.54, 0.01)
    affinity_power: int = 4
    band: float = 0.1
    min_area: float = 0.002
    colour_steps: int = 10
    cross_factors: tuple[int, ...] | None = None
    affinity_factor: int | None = None
    steps: tuple[int, int] | None = None
    affinity_steps: tuple[int, int] | None = None
    cross_blocks: tuple[int, ...] | None = None
    affinity_blocks: tuple[int, ...] | None = None
    concept_blocks: tuple[int, ...] | None = None
    classes_from: str = "coarsest"

    def __post_init__(self):
        if self.method not in METHODS:
            raise DiffuMaskError(
                f"refinement method {self.method!r} is unknown; use one of {', '.join(METHODS)}"
            )
        if self.classes_from not in CLASSES_FROM:
            raise DiffuMaskError(
                f"refinement classes_from={self.classes_from!r} is unknown; use "
                "'coarsest' (the coarsest cross-attention maps name the classes) or 'all'"
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
        window = self.affinity_steps
        if window is not None and not (
            isinstance(window, tuple | list)
            and len(window) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in window)
            and 0 <= window[0] < window[1]
        ):
            raise DiffuMaskError(
                f"refinement affinity_steps={window!r} must be (start, stop) step indices "
                "with 0 <= start < stop, e.g. (10, 20) for the last half of 20 steps"
            )
        steps = self.colour_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise DiffuMaskError(
                f"refinement colour_steps={steps!r} must be an integer >= 0 (0 turns the "
                "colour-guided smoothing off)"
            )
        for name in BLOCK_CHOICES:
            blocks = getattr(self, name)
            if blocks is not None and not (
                isinstance(blocks, tuple | list)
                and blocks
                and all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in blocks)
            ):
                shown = list(blocks) if isinstance(blocks, tuple | list) else blocks
                raise DiffuMaskError(
                    f"refinement {name}={shown!r} must be a non-empty list of block indices "
                    "(integers >= 0), e.g. [1, 2], or None for the model's default"
                )
        if int(self.affinity_power) < 1:
            raise DiffuMaskError(f"refinement affinity_power={self.affinity_power} must be >= 1")

    @property
    def needs_affinity(self) -> bool:
        return self.method in ("adaptive", "affinity", "separate")

    @classmethod
    def from_any(
        cls, value: Refinement | Mapping[str, Any] | str | None, method: str | None = None
    ) -> Refinement:
        """The parameters `value` names; `method`: the method where it names none (None
        or parameters without one), e.g. the model family's default."""
        if value is None:
            return cls() if method is None else cls(method=method)
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
            if method is not None and "method" not in value:
                value = {**value, "method": method}
            tuples = (
                "gammas",
                "cross_factors",
                "steps",
                "affinity_steps",
                *BLOCK_CHOICES,
            )
            return cls(
                **{
                    k: tuple(v) if k in tuples and isinstance(v, list | tuple) else v
                    for k, v in value.items()
                }
            )
        raise DiffuMaskError(f"refinement {value!r} is not a method name, a dict or a Refinement")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class Refined:
    """One refined image: its mask, the per-class scores it was cut from, its quality score
    and the chain of steps that made it."""

    mask: np.ndarray  # uint8 HxW
    attention: dict[str, np.ndarray]  # the per-class scores the mask was cut from
    quality: float
    chain: list[dict[str, Any]] = field(default_factory=list)


Array = torch.Tensor | np.ndarray


def as_tensor(array: Array, device: torch.device | str | None = None) -> torch.Tensor:
    """`array` as float32 on `device` (default: where it is; the CPU for numpy arrays)."""
    if not isinstance(array, torch.Tensor):
        array = torch.from_numpy(np.array(array, dtype=np.float32))
    return array.to(device=device, dtype=torch.float32)


# -- tensor steps: maps are [..., h, w], scores [..., classes, h, w] ------------------------


@functools.lru_cache(maxsize=64)
def bicubic_matrix(source: int, target: int, device: str = "cpu") -> torch.Tensor:
    """[target, source]: PyTorch's bicubic interpolation along one axis (align_corners
    False, A = -0.75, edge samples repeated, no antialiasing) as a matrix, so that
    `rows @ x @ cols.T` resizes x as F.interpolate(mode="bicubic") does, in two matrix
    products instead of 16 taps per output pixel."""
    a = -0.75
    position = (torch.arange(target, dtype=torch.float64) + 0.5) * (source / target) - 0.5
    left = torch.floor(position)
    t = position - left

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=1)
    taps = (left.long()[:, None] + torch.arange(-1, 3)).clamp(0, source - 1)
    matrix = torch.zeros(target, source, dtype=torch.float64).scatter_add_(1, taps, weights)
    return matrix.to(device=device, dtype=torch.float32)


def resize(maps: Array, size: Size) -> torch.Tensor:
    """Bicubic resize of the last two dimensions (as the reference implementation
    upsamples)."""
    maps = as_tensor(maps)
    height, width = maps.shape[-2:]
    if (height, width) == tuple(size):
        return maps
    device = str(maps.device)
    rows = bicubic_matrix(height, int(size[0]), device)
    cols = bicubic_matrix(width, int(size[1]), device)
    return rows @ maps @ cols.T


def normalise_max(maps: Array) -> torch.Tensor:
    """Each map divided by its maximum; zero where that is not positive."""
    maps = as_tensor(maps)
    peak = maps.amax(dim=(-2, -1), keepdim=True)
    return maps / torch.where(peak > 0, peak, torch.inf)  # x / inf = 0: no full-size select


FLAT = 1e-3  # ranges under this share of a map's peak are not stretched to the full [0, 1]


def normalise_minmax(maps: Array) -> torch.Tensor:
    """Each map of `maps` (..., H, W) stretched to [0, 1]; a flat map becomes zeros.

    A nearly flat map is stretched only as far as a range of FLAT of its peak would be:
    a walk through an affinity that attends everywhere alike (a random model's) leaves
    maps level to 1e-7..1e-4 of their peak, and stretching that to [0, 1] would cut masks
    out of the kernels' rounding, which changes with the batch. The shapes model's walked
    maps mostly span 0.4% to 5% of their peak; the flatter ones (some given images') cut
    that way had taken pixels from the object's class (BENCHMARKS.md, labelling). On the
    MMDiT shapes model a fifth to a third of single-object images walk flatter than FLAT
    and get no object; cutting them anyway measured worse (docs/lab/shapes-training.md)."""
    maps = as_tensor(maps)
    low = maps.amin(dim=(-2, -1), keepdim=True)
    high = maps.amax(dim=(-2, -1), keepdim=True)
    span = torch.maximum(high - low, FLAT * high.abs())
    return (maps - low) / torch.where(span > 0, span, torch.inf)


def aggregate(maps: Mapping[Size, Array], size: Size) -> torch.Tensor:
    """Multi-resolution map: each map resized to `size`, divided by its maximum, averaged."""
    if not maps:
        raise DiffuMaskError("no attention maps to aggregate")
    total = None
    for m in maps.values():  # summed in order, then divided: the rounding of a mean
        part = normalise_max(resize(m, size))
        total = part if total is None else total + part
    return (total / len(maps)).clamp(0.0, 1.0)


def propagate(cam: Array, affinity: Array, power: int) -> torch.Tensor:
    """Random walk of maps through a row-stochastic affinity (Q x Q, Q = h*w): each pixel
    takes the affinity-weighted mean of its neighbours' scores, `power` times.

    cam [h, w] with affinity [Q, Q], or cam [..., classes, h, w] with affinity [..., Q, Q].
    """
    cam = as_tensor(cam)
    if cam.ndim == 2:
        return propagate(cam[None], affinity, power)[0]
    h, w = cam.shape[-2:]
    affinity = as_tensor(affinity, cam.device)
    if tuple(affinity.shape[-2:]) != (h * w, h * w):
        raise DiffuMaskError(
            f"affinity of shape {tuple(affinity.shape)} does not fit a {h}x{w} map"
        )
    # power matrix products with the maps, never the matrix power: O(power * Q^2)
    scores = cam.flatten(-2).transpose(-1, -2)  # [..., Q, classes]
    for _ in range(int(power)):
        scores = affinity @ scores
    return scores.transpose(-1, -2).reshape(cam.shape)


COLOUR_DILATIONS = (1, 2, 4, 8)
COLOUR_SHARPNESS = 0.1  # a colour step of 0.1 local spreads costs a neighbour e^-10 of weight


def _offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    return [
        (dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx
    ]


def _shifted(padded: torch.Tensor, pad: int, dy: int, dx: int, size: Size) -> torch.Tensor:
    """The [..., h, w] window of a replicate-padded map moved by (dy, dx)."""
    h, w = size
    return padded[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w]


def _pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    flat = torch.nn.functional.pad(x.reshape(-1, 1, h, w), (pad,) * 4, mode="replicate")
    return flat.reshape(*x.shape[:-2], h + 2 * pad, w + 2 * pad)


def colour_weights(images: Array, dilations: Sequence[int] = COLOUR_DILATIONS) -> torch.Tensor:
    """[images, K, H, W]: how much each pixel takes from each of its K neighbours (the 8 at
    each dilation), by how alike their colours are: a softmax over the neighbours of
    -|colour difference| / (COLOUR_SHARPNESS x the spread of the neighbours' colours),
    averaged over channels; near 1/K inside a flat region, near 0 across an edge.

    images: [images, 3, H, W], any range. The pixel-adaptive refinement of Araslanov and
    Roth (CVPR 2020), in the role the paper gives a dense CRF: masks follow the image's
    edges. One neighbour at a time and in place, so memory stays K maps, not K images.
    """
    images = as_tensor(images)
    pad, size, offsets = max(dilations), tuple(images.shape[-2:]), _offsets(dilations)
    padded = _pad(images, pad)
    windows = [_shifted(padded, pad, dy, dx, size) for dy, dx in offsets]
    total, squares = torch.zeros_like(images), torch.zeros_like(images)
    for window in windows:
        total += window
        squares.addcmul_(window, window)
    mean = total / len(windows)
    spread = (squares / len(windows) - mean * mean).clamp_min_(0).sqrt_().add_(1e-8)
    # 1 / (sharpness x spread x channels): the channel sum below is then the mean
    scale = spread.mul_(COLOUR_SHARPNESS * images.shape[1]).reciprocal_()
    distance = torch.empty(images.shape[0], len(windows), *size, device=images.device)
    difference = torch.empty_like(images)
    for k, window in enumerate(windows):
        torch.sub(window, images, out=difference)
        torch.sum(difference.abs_().mul_(scale), dim=1, out=distance[:, k])
    # softmax of -distance over the neighbours, shifted by the nearest for stability
    weights = distance.sub_(distance.amin(dim=1, keepdim=True)).neg_().exp_()
    return weights.div_(weights.sum(dim=1, keepdim=True))


def colour_smooth(
    scores: Array, weights: torch.Tensor, steps: int, dilations: Sequence[int] = COLOUR_DILATIONS
) -> torch.Tensor:
    """Scores [images, classes, H, W] replaced `steps` times by the colour-weighted mean of
    their neighbours' (weights from `colour_weights` with the same dilations)."""
    scores = as_tensor(scores, weights.device)
    pad, size, offsets = max(dilations), tuple(scores.shape[-2:]), _offsets(dilations)
    for _ in range(int(steps)):
        padded = _pad(scores, pad)
        smoothed = torch.zeros_like(scores)
        for k, (dy, dx) in enumerate(offsets):
            smoothed.addcmul_(_shifted(padded, pad, dy, dx, size), weights[:, k : k + 1])
        scores = smoothed
    return scores


def separate_scores(foreground: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Scores [..., classes, H, W] whose winner per pixel is the class `classes` scores
    highest and whose winning score is the best of `foreground`'s: each class gets the
    foreground score times its share of the top class score (1 where no class scores), so
    a cut at any level keeps `foreground`'s objects and names them by `classes`."""
    best = best_score(foreground)[..., None, :, :]
    top = best_score(classes)[..., None, :, :]
    shares = torch.where(top > 0, classes / torch.where(top > 0, top, 1.0), 1.0)
    return best * shares


def _ids(ids: Any, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(ids, dtype=np.uint8), device=device)


def _per_map(level: float | torch.Tensor) -> float | torch.Tensor:
    """A level for all maps (a float) or one per map of the batch ([...] -> [..., 1, 1])."""
    return level[..., None, None] if isinstance(level, torch.Tensor) else level


def best_score(scores: torch.Tensor) -> torch.Tensor:
    """The highest class score per pixel: [..., classes, H, W] -> [..., H, W]."""
    return scores[..., 0, :, :] if scores.shape[-3] == 1 else scores.amax(dim=-3)


def first_max(scores: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values[class with the highest score], that score) per pixel; ties go to the first
    class. scores [..., classes, H, W], values [..., classes] uint8. (A select per class:
    on the CPU, torch's argmax over a leading dimension is far slower.)"""
    best = best_score(scores)
    picked = values[..., -1, None, None].expand(best.shape)
    for c in range(scores.shape[-3] - 2, -1, -1):
        picked = torch.where(scores[..., c, :, :] == best, values[..., c, None, None], picked)
    return picked, best


def winners(scores: Array, ids: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(class id with the highest score, that score) per pixel; ties go to the first
    class. ids: [classes], or [..., classes] per image."""
    scores = as_tensor(scores)
    return first_max(scores, _ids(ids, scores.device))


def cut(winner: torch.Tensor, best: torch.Tensor, level: float | torch.Tensor) -> torch.Tensor:
    """Background where the best score is below the level (float32 comparison)."""
    return winner * (best >= _per_map(level))


def label(scores: Array, ids: Any, level: float | torch.Tensor) -> torch.Tensor:
    """Argmax over [background = level, class scores...] -> uint8 mask of class ids."""
    return cut(*winners(scores, ids), level)


def gamma_sweep(first: float, last: float, step: float) -> np.ndarray:
    """The background levels the adaptive method tries: `first` to `last` by `step`."""
    return np.round(np.arange(first, last + step / 2, step), 6)


def _float32_at_least(levels: np.ndarray) -> np.ndarray:
    """The smallest float32 >= each level: `score >= level` in float64 is
    `score >= this` in float32, on any device."""
    low = levels.astype(np.float32)
    return np.where(low < levels, np.nextafter(low, np.float32(np.inf)), low)


def levels_below(best: torch.Tensor, levels: np.ndarray) -> torch.Tensor:
    """How many of the (ascending) levels each score reaches: #{j: best >= levels[j]},
    compared as float64, like numpy compares a float32 map with a float64 level.

    Evenly spaced levels (gamma_sweep's) are counted by arithmetic; only scores within
    1e-5 of a level are looked up exactly (a binary search is several times slower)."""
    edges = torch.from_numpy(_float32_at_least(levels)).to(best.device)
    count = len(levels)
    spacing = float(levels[-1] - levels[0]) / max(count - 1, 1)
    even = levels[0] + spacing * np.arange(count)
    if count < 3 or spacing <= 0 or np.abs(levels - even).max() > 2e-6:
        return torch.searchsorted(edges, best, right=True)
    steps = (best - float(levels[0])) / spacing
    below = (steps.floor() + 1).clamp(0, count)
    near = ((steps - steps.round()).abs() > 1e-5 / spacing).logical_not_().nonzero().squeeze(1)
    below[near] = torch.searchsorted(edges, best[near].contiguous(), right=True).float()
    return below  # float32: exact for these small counts, and cheaper than int64


def adaptive_threshold(
    scores: torch.Tensor,
    labels: torch.Tensor,
    reference: torch.Tensor,
    levels: np.ndarray,
    classes: Sequence[Sequence[int]],
) -> tuple[list[float], list[float]]:
    """Per image, the level whose mask best agrees with `reference` (mean IoU over the
    background and the image's classes); ties go to the lowest. Returns (levels,
    agreements).

    scores [images, classes, H, W]; labels [images, classes] uint8: each class's label,
    1..classes (0 for padding); reference [images, H, W]: a label mask; classes: per
    image, the labels to average over, in class order. Every level is scored at once:
    which side of the cut a pixel falls on depends only on how many levels lie below
    its best score, so one histogram of (winning label, reference label, that count) per
    image holds every level's IoUs as exact integer counts.
    """
    predicted, best = first_max(scores, labels)
    width, count = scores.shape[1] + 1, len(levels)
    chosen, agreements = [], []
    for i, image_classes in enumerate(classes):
        below = levels_below(best[i].flatten(), levels)
        # float32 index arithmetic: exact below 2**24, and cheaper than int64 here
        pair = predicted[i].flatten().float() * width + reference[i].flatten()
        index = (pair * (count + 1) + below).long()
        counts = torch.bincount(index, minlength=width * width * (count + 1))
        counts = counts.view(width, width, count + 1).cpu().numpy()
        cumulative = counts.cumsum(axis=-1)
        joint = cumulative[..., -1:] - cumulative[..., :count]  # kept at level j
        joint[0] += cumulative[..., :count].sum(axis=0)  # cut to background at level j
        ious = []
        for c in [0, *image_classes]:
            inter = joint[c, c]
            union = joint[c].sum(axis=0) + joint[:, c].sum(axis=0) - inter
            ious.append(np.where(union > 0, inter / np.maximum(union, 1), 1.0))
        ious = np.stack(ious)
        # np.mean per level, as the per-level loop it replaces rounded its mean
        per_level = [float(np.mean(ious[:, j])) for j in range(count)]
        top = int(np.argmax(per_level))
        chosen.append(float(levels[top]))
        agreements.append(per_level[top])
    return chosen, agreements


def apply_band(
    mask: Array, scores: Array, level: float | torch.Tensor, width: float
) -> torch.Tensor:
    """Label 255 where the winning score is within width/2 of the level: those pixels
    could go either way."""
    mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    if width <= 0:
        return mask
    best = best_score(as_tensor(scores))
    uncertain = (best - _per_map(level)).abs() < width / 2
    return mask | uncertain.to(torch.uint8) * IGNORE  # 255 | anything = 255


def remove_small_components(
    mask: Array, min_pixels: int, class_ids: Sequence[int] | None = None
) -> np.ndarray:
    """Relabel as background every class component smaller than `min_pixels` (4-connected).
    On the CPU, at mask size: scipy's labelling is cheap there, and cheaper still on the
    box around the class's pixels. class_ids: the values to clean (default: every value
    in the mask but 0 and 255)."""
    from scipy import ndimage

    mask = np.asarray(mask)
    if min_pixels <= 1:
        return mask
    if class_ids is None:
        class_ids = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    out = mask
    for class_id in sorted(set(int(c) for c in class_ids) - {0, IGNORE}):
        inside = mask == class_id
        rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
        if not len(rows):
            continue
        box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        components, count = ndimage.label(inside[box])
        if count == 1:
            sizes = np.array([0, np.count_nonzero(components)])
        else:
            sizes = np.bincount(components.ravel(), minlength=count + 1)
        keep = (sizes >= min_pixels).astype(np.uint8)
        keep[0] = 1  # not this class
        if not keep.all():  # the relabelling pass costs more than the labelling
            out = out.copy() if out is mask else out
            out[box] *= keep[components]
    return out


def quality_score(mask: Array, scores: Array, ids: Sequence[int]) -> float:
    """How clearly the attention separates each class from the rest, in [0, 1].

    For every class of the prompt: mean score inside its region minus mean score over
    the other labelled pixels (0 if the class got no pixels), averaged over classes,
    then multiplied by the share of pixels that are not 255. Crisp, confident maps score
    near 1; flat or contradictory maps, or masks that lost a class, near 0.
    (On the CPU, where the cleaned mask is: counts by comparison, sums as dot products
    with the class's pixels, several times cheaper than a histogram by mask value.)
    """
    mask = np.asarray(mask).ravel()
    scores = np.asarray(as_tensor(scores, "cpu")).reshape(len(ids), -1)
    unlabelled = mask == IGNORE
    labelled = mask.size - np.count_nonzero(unlabelled)
    separations = []
    for score, class_id in zip(scores, ids, strict=True):
        in_class = mask == class_id
        inside = np.count_nonzero(in_class)
        outside = labelled - inside
        if not inside or not outside:
            separations.append(0.0)
            continue
        within = float(np.dot(score, in_class.astype(np.float32)))
        total = float(score.sum(dtype=np.float64)) - float(
            np.dot(score, unlabelled.astype(np.float32))
        )
        separations.append(within / inside - (total - within) / outside)
    separation = float(np.clip(np.mean(separations), 0.0, 1.0))
    return round(separation * labelled / mask.size, 6)


# -- chains, batched over images ---------------------------------------------------------


@dataclass
class Cut:
    """A batch's masks as cut on the device, moved to the CPU: what `finish` completes.
    One entry per image in each list."""

    masks: list[torch.Tensor]  # [H, W] uint8, banded, before cleanup
    scores: list[torch.Tensor]  # [classes, H, W] float32, what the masks were cut from
    # [classes, H, W]: the attention's own scores, before the colour step, which the
    # quality reads: after it every mask looks confident (on the shapes benchmark the
    # quality ranked masks by their IoU at Spearman 0.31 from the smoothed scores, 0.49
    # from these)
    evidence: list[torch.Tensor]
    classes: list[list[str]]
    ids: list[list[int]]
    chains: list[list[dict[str, Any]]]
    min_pixels: int

    @staticmethod
    def join(parts: Sequence[Cut]) -> Cut:
        return Cut(
            *(sum((getattr(p, name) for p in parts), []) for name in CUT_LISTS),
            min_pixels=parts[0].min_pixels,
        )


CUT_LISTS = ("masks", "scores", "evidence", "classes", "ids", "chains")


def _cut(
    scores: torch.Tensor,
    classes: list[list[str]],
    ids: list[list[int]],
    levels: list[float],
    params: Refinement,
    chains: list[list[dict[str, Any]]],
    evidence: torch.Tensor | None = None,
) -> Cut:
    table = _ids(_padded(ids, scores.shape[1]), scores.device)
    level = torch.tensor(levels, dtype=torch.float32, device=scores.device)
    masks = apply_band(label(scores, table, level), scores, level, params.band)
    height, width = masks.shape[-2:]
    min_pixels = int(round(params.min_area * height * width))
    for chain, value in zip(chains, levels, strict=True):
        chain.append({"step": "threshold", "value": value})
        chain.append({"step": "band", "width": params.band})
        chain.append({"step": "cleanup", "min_area": params.min_area, "min_pixels": min_pixels})
    masks, cpu = masks.cpu(), scores.cpu()
    evidence = cpu if evidence is None or evidence is scores else evidence.cpu()
    scores = [s[: len(names)] for s, names in zip(cpu, classes, strict=True)]
    evidence = [e[: len(names)] for e, names in zip(evidence, classes, strict=True)]
    return Cut(list(masks), scores, evidence, classes, ids, chains, min_pixels)


def finish(cut: Cut) -> list[Refined]:
    """The CPU part: small components dropped, quality scored, one Refined per image."""
    refined = []
    lists = (getattr(cut, n) for n in CUT_LISTS)
    for mask, scores, evidence, names, ids, chain in zip(*lists, strict=True):
        mask = remove_small_components(mask.numpy(), cut.min_pixels, ids)
        attention = {name: scores[j].numpy() for j, name in enumerate(names)}
        refined.append(Refined(mask, attention, quality_score(mask, evidence, ids), chain))
    return refined


def _padded(rows: list[list[int]], width: int) -> list[list[int]]:
    return [row + [0] * (width - len(row)) for row in rows]


def _stack(
    class_maps: Sequence[Mapping[str, Mapping[Size, Array]]], device
) -> dict[Size, torch.Tensor]:
    """{(h, w): [images, classes, h, w]}, classes padded with zero maps."""
    sizes = list(next(iter(class_maps[0].values()), {}))
    width = max(len(maps) for maps in class_maps)
    stacked = {}
    for size in sizes:
        rows = []
        for maps in class_maps:
            row = [as_tensor(m[size], device) for m in maps.values()]
            row += [torch.zeros_like(row[0])] * (width - len(row))
            rows.append(torch.stack(row))
        stacked[tuple(size)] = torch.stack(rows)
    return stacked


def _check_maps(class_maps: Sequence[Mapping[str, Mapping[Size, Array]]]) -> None:
    if not class_maps or any(not maps for maps in class_maps):
        raise DiffuMaskError("no attention maps to aggregate")
    sizes = {tuple(sorted(m)) for maps in class_maps for m in maps.values()}
    if len(sizes) != 1:
        raise DiffuMaskError(
            f"the class maps of one batch come at different sizes {sorted(sizes)}; give every "
            "class its maps at the same sizes (as one capture makes them)"
        )
    if not next(iter(sizes)):
        raise DiffuMaskError("no attention maps to aggregate")


def check_class_ids(classes: list[list[str]], class_ids: Mapping[str, int]) -> list[list[int]]:
    """Each image's class ids, checked: every class has one, a mask value in 1..254."""
    unknown = sorted({n for names in classes for n in names if n not in class_ids})
    if unknown:
        raise DiffuMaskError(f"class(es) {unknown} have no id; known: {sorted(class_ids)}")
    for name in {n for names in classes for n in names}:
        value = class_ids[name]
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            value = None
        if value is None or not 1 <= value <= 254:
            raise DiffuMaskError(
                f"class {name!r} has id {class_ids[name]!r}; class ids are mask values, "
                "integers in 1..254 (0 is background, 255 ignore)"
            )
    return [[int(class_ids[n]) for n in names] for names in classes]


def cut_masks(
    class_maps: Sequence[Mapping[str, Mapping[Size, Array]]],
    class_ids: Mapping[str, int],
    size: Size,
    params: Refinement | None = None,
    affinity: Array | None = None,
    affinity_size: Size | None = None,
    device: torch.device | str | None = None,
    chunk: int | None = None,
    images: Array | None = None,
) -> Cut:
    """The device part of refining a batch: scores, per-image level, banded masks.

    class_maps: per image, {class name: {(h, w): mean cross-attention map}}.
    affinity: [images, Q, Q]. device: where to compute (default: where the first map is).
    images: [images, 3, H, W] at `size`, any range: the colour step (params.colour_steps)
    reads them; without them it does not run, and the chain says so by its absence.
    chunk: images computed together; default all on an accelerator, one on the CPU,
    where a 512 px image's maps fit the cache and a batch's do not (3x slower per image
    at batch 8, measured).
    """
    params = params or Refinement()
    _check_maps(class_maps)
    if device is None:
        device = as_tensor(next(iter(next(iter(class_maps[0].values())).values()))).device
    if chunk is None:
        chunk = 1 if torch.device(device).type == "cpu" else len(class_maps)
    if len(class_maps) > chunk:
        parts = range(0, len(class_maps), chunk)
        return Cut.join(
            [
                cut_masks(
                    class_maps[i : i + chunk],
                    class_ids,
                    size,
                    params,
                    None if affinity is None else affinity[i : i + chunk],
                    affinity_size,
                    device,
                    chunk,
                    None if images is None else images[i : i + chunk],
                )
                for i in parts
            ]
        )
    classes = [list(maps) for maps in class_maps]
    ids = check_class_ids(classes, class_ids)
    cross = _stack(class_maps, device)
    size = (int(size[0]), int(size[1]))
    chains = [
        [
            {
                "step": "aggregate",
                "sizes": [list(s) for s in sorted({tuple(s) for m in maps.values() for s in m})],
                "upsample": "bicubic",
                "normalise": "max",
            }
        ]
        for maps in class_maps
    ]
    smooth = _colour_step(images, size, params.colour_steps, device)
    if params.method == "threshold":
        raw = aggregate(cross, size)
        scores = smooth(raw, chains)
        return _cut(scores, classes, ids, [params.threshold] * len(ids), params, chains, raw)
    if affinity is None or affinity_size is None:
        raise DiffuMaskError(
            f"refinement method {params.method!r} needs the self-attention affinity; "
            "capture it (DiffuMask does so for this method) or use method='threshold'"
        )
    walked = propagate(
        aggregate(cross, affinity_size), as_tensor(affinity, device), params.affinity_power
    )
    propagated = resize(normalise_minmax(walked), size).clamp(0.0, 1.0)
    steps = [
        {"step": "aggregate", "size": list(affinity_size), "normalise": "max"},
        {"step": "propagate", "power": params.affinity_power, "size": list(affinity_size)},
        {"step": "normalise", "kind": "minmax"},
        {"step": "upsample", "mode": "bicubic", "size": list(size)},
    ]
    for chain in chains:
        chain.extend(dict(s) for s in steps)
    unsmoothed, propagated = propagated, smooth(propagated, chains)
    if params.method == "affinity":
        levels = [params.threshold] * len(ids)
        return _cut(propagated, classes, ids, levels, params, chains, unsmoothed)
    if params.method == "separate" or params.classes_from == "coarsest":
        names = class_names_maps(cross, size, params.classes_from)
        for chain in chains:
            chain.append({"step": "classes", "from": "cross", "sizes": names.sizes})
    if params.method == "separate":
        scores = separate_scores(propagated, smooth(names.maps))
        evidence = separate_scores(unsmoothed, names.maps)
        levels = [params.threshold] * len(ids)
        return _cut(scores, classes, ids, levels, params, chains, evidence)
    raw = aggregate(cross, size)
    scores = smooth(raw)  # the reference's step, recorded once
    # the sweep compares labels: 1 + the first position of the class's id (two names
    # with one id are one class, as in the id mask)
    classes_as_labels = [[i.index(c) + 1 for c in i] for i in ids]
    labels = _ids(_padded(classes_as_labels, scores.shape[1]), device)
    if params.classes_from == "coarsest":
        # the foreground as the paper cuts it, its pixels named by the coarsest maps;
        # the reference the level is chosen against is named the same way (separate's)
        named = smooth(names.maps)
        scores, raw = separate_scores(scores, named), separate_scores(raw, names.maps)
        propagated = separate_scores(propagated, named)
    reference = label(propagated, labels, params.threshold)
    levels, agreements = adaptive_threshold(
        scores, labels, reference, gamma_sweep(*params.gammas), classes_as_labels
    )
    for chain, level, agreement in zip(chains, levels, agreements, strict=True):
        chain.append({"step": "reference", "threshold": params.threshold})
        chain.append(
            {
                "step": "adaptive",
                "gammas": list(params.gammas),
                "chosen": level,
                "agreement": round(agreement, 6),
            }
        )
    return _cut(scores, classes, ids, levels, params, chains, raw)


@dataclass(frozen=True)
class ClassNames:
    """The maps that name each pixel's class, and the resolutions they came from."""

    maps: torch.Tensor  # [images, classes, H, W]: the maps that name the classes
    sizes: list[list[int]]  # the resolutions they came from


def class_names_maps(
    cross: Mapping[Size, torch.Tensor], size: Size, classes_from: str
) -> ClassNames:
    """The maps that name each pixel's class: the coarsest resolution's ("coarsest"), or
    every resolution's aggregated ("all"), at `size`."""
    chosen = [min(cross, key=lambda s: s[0] * s[1])] if classes_from == "coarsest" else list(cross)
    return ClassNames(
        aggregate({s: cross[s] for s in chosen}, size), [list(s) for s in sorted(chosen)]
    )


def _colour_step(images: Array | None, size: Size, steps: int, device):
    """The colour-guided smoothing of score maps at image size, as a function of (scores,
    chains to record it in); the identity where it is off or has no images."""
    if images is None or steps == 0:
        return lambda scores, chains=(): scores
    images = as_tensor(images, device)
    if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != tuple(size):
        raise DiffuMaskError(
            f"images of shape {tuple(images.shape)} do not fit the colour step: give "
            f"[images, 3, {size[0]}, {size[1]}], the generated images at mask size"
        )
    weights = colour_weights(images)

    def smooth(scores: torch.Tensor, chains=()) -> torch.Tensor:
        for chain in chains:
            chain.append({"step": "colour", "steps": steps, "dilations": list(COLOUR_DILATIONS)})
        return colour_smooth(scores, weights, steps)

    return smooth


def refine_batch(
    class_maps: Sequence[Mapping[str, Mapping[Size, Array]]],
    class_ids: Mapping[str, int],
    size: Size,
    params: Refinement | None = None,
    affinity: Array | None = None,
    affinity_size: Size | None = None,
    device: torch.device | str | None = None,
    chunk: int | None = None,
    images: Array | None = None,
) -> list[Refined]:
    """Mask, per-class scores, quality and chain for each image of a batch (see cut_masks)."""
    cut = cut_masks(
        class_maps, class_ids, size, params, affinity, affinity_size, device, chunk, images
    )
    return finish(cut)


def refine(
    class_maps: Mapping[str, Mapping[Size, Array]],
    class_ids: Mapping[str, int],
    size: Size,
    params: Refinement | None = None,
    affinity: Array | None = None,
    affinity_size: Size | None = None,
    image: Array | None = None,
) -> Refined:
    """Mask, per-class scores, quality and chain for one image.

    class_maps: {class name: {(h, w): mean cross-attention map}} for the prompt's classes.
    affinity: [Q, Q]. image: [3, H, W] at `size`, for the colour step (see cut_masks).
    """
    batched = None if affinity is None else as_tensor(affinity)[None]
    images = None if image is None else as_tensor(image)[None]
    return refine_batch(
        [class_maps], class_ids, size, params, batched, affinity_size, images=images
    )[0]


def rethreshold(
    attention: Mapping[str, Array],
    class_ids: Mapping[str, int],
    threshold: float,
    band: float = 0.0,
    min_area: float = 0.0,
    size: Size | None = None,
) -> tuple[np.ndarray, float, list[dict[str, Any]]]:
    """Recompute a mask from stored per-class scores with another threshold, band and
    cleanup. Maps are resized to `size` (default: the largest map's size). The stored
    scores are those the mask was cut from (after the colour step), and the quality here
    reads them: it ranks masks less sharply than the quality made at generation, which
    reads the attention before that step (not stored)."""
    if not attention:
        raise DiffuMaskError("no attention maps to re-threshold")
    names = list(attention)
    ids = check_class_ids([names], class_ids)
    params = Refinement(method="threshold", threshold=threshold, band=band, min_area=min_area)
    size = size or max((tuple(m.shape) for m in attention.values()), key=lambda s: s[0] * s[1])
    scores = torch.stack([resize(attention[n], size).clamp(0.0, 1.0) for n in names])
    cut = _cut(scores[None], [names], ids, [threshold], params, [[{"step": "stored"}]])
    refined = finish(cut)[0]
    return refined.mask, refined.quality, refined.chain
