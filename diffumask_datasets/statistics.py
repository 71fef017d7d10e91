"""Figures of a dataset: samples and pixels per class, background and ignore shares, the
quality spread and the image sizes; and the summary of a store's shard checks.

    from diffumask_datasets.statistics import dataset_statistics, store_statistics
    stats = store_statistics(open_store("out/birds"))
    stats["classes"]["bird"]["pixel_share"], stats["quality"]["median"]

One function, `dataset_statistics`, is behind `diffumask info`, the dataset card and the
FiftyOne class statistics, so all three show the same figures under the same keys:

- `samples`, `image_sizes` ({"WxH": count}), `background_share`, `ignore_share`;
- `quality`: count, mean, min, p25, median, p75, max, and a 10-bin `histogram` over [0, 1];
- `classes`: by class name, for every class of the definition (id 0 left out):
  `id`, `name`, `prompted_images` (samples whose prompt names it), `images_with_pixels`
  (samples whose mask shows it), `pixels`, `pixel_share` (of all pixels), `mean_area`,
  `min_area`, `max_area` (its share of the image, over the samples that show it) and
  `mean_quality` (of the samples naming it; None when none does).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffumask_datasets.errors import DiffuMaskError

BACKGROUND = 0
IGNORE = 255  # the mask value of uncertain pixels (sample.IGNORE)


@dataclass(frozen=True)
class MaskFigures:
    """What the statistics need of one sample."""

    classes: Sequence[str]  # the classes its prompt names
    quality: float | None  # None where a source has no score
    pixels: Mapping[int, float]  # mask value -> pixels (0 background, 255 ignore)
    size: tuple[int, int]  # width, height

    @classmethod
    def of_mask(cls, mask: np.ndarray, classes: Sequence[str], quality: float) -> MaskFigures:
        counts = np.bincount(np.asarray(mask, dtype=np.uint8).reshape(-1), minlength=256)
        pixels = {int(value): int(counts[value]) for value in np.flatnonzero(counts)}
        height, width = np.asarray(mask).shape[:2]
        return cls(list(classes), float(quality), pixels, (int(width), int(height)))


def _quality(qualities: list[float]) -> dict[str, Any]:
    q = np.asarray(qualities, dtype=np.float64)
    if not len(q):
        zero = dict.fromkeys(("mean", "min", "p25", "median", "p75", "max"), 0.0)
        return {"count": 0, **zero, "histogram": [0] * 10}
    return {
        "count": len(q),
        "mean": float(q.mean()),
        "min": float(q.min()),
        "p25": float(np.quantile(q, 0.25)),
        "median": float(np.median(q)),
        "p75": float(np.quantile(q, 0.75)),
        "max": float(q.max()),
        "histogram": np.histogram(q, bins=10, range=(0.0, 1.0))[0].tolist(),
    }


def dataset_statistics(
    samples: Iterable[MaskFigures], class_names: Mapping[int, str]
) -> dict[str, Any]:
    """The figures of `samples` (see the module's docstring for the keys); `class_names`
    maps the definition's class ids to names."""
    names = {int(i): str(n) for i, n in class_names.items() if int(i) != BACKGROUND}
    ids = {name: i for i, name in names.items()}
    pixels: dict[int, float] = {}
    areas: dict[int, list[float]] = {i: [] for i in names}
    prompted = dict.fromkeys(names, 0)
    named_quality: dict[int, list[float]] = {i: [] for i in names}
    qualities: list[float] = []
    num_samples = 0
    sizes: dict[str, int] = {}
    for sample in samples:
        width, height = sample.size
        area = float(width * height) or 1.0
        for value, count in sample.pixels.items():
            pixels[value] = pixels.get(value, 0) + count
            if value in areas and count > 0:
                areas[value].append(count / area)
        for name in sample.classes:
            if name in ids:
                prompted[ids[name]] += 1
                if sample.quality is not None:
                    named_quality[ids[name]].append(sample.quality)
        if sample.quality is not None:
            qualities.append(sample.quality)
        num_samples += 1
        key = f"{width}x{height}"
        sizes[key] = sizes.get(key, 0) + 1
    total = float(sum(pixels.values())) or 1.0

    def row(class_id: int) -> dict[str, Any]:
        shown, named = areas[class_id], named_quality[class_id]
        return {
            "id": class_id,
            "name": names[class_id],
            "prompted_images": prompted[class_id],
            "images_with_pixels": len(shown),
            "pixels": int(round(pixels.get(class_id, 0))),
            "pixel_share": pixels.get(class_id, 0) / total,
            "mean_area": float(np.mean(shown)) if shown else 0.0,
            "min_area": float(np.min(shown)) if shown else 0.0,
            "max_area": float(np.max(shown)) if shown else 0.0,
            "mean_quality": float(np.mean(named)) if named else None,
        }

    return {
        "samples": num_samples,
        "image_sizes": sizes,
        "classes": {names[i]: row(i) for i in sorted(names)},
        "background_share": pixels.get(BACKGROUND, 0) / total,
        "ignore_share": pixels.get(IGNORE, 0) / total,
        "quality": _quality(qualities),
    }


def class_rows(stats: Mapping[str, Any], also: Iterable[str] = ()) -> list[dict[str, Any]]:
    """The class rows of `stats` a dataset has: prompted for or shown by a sample, or
    named in `also` (e.g. the classes it was made for)."""
    wanted = set(also)
    return [
        row
        for name, row in stats["classes"].items()
        if row["prompted_images"] or row["images_with_pixels"] or name in wanted
    ]


def store_statistics(
    store: Any, masks: Iterable[tuple[np.ndarray, Sequence[str], float]] | None = None
) -> dict[str, Any]:
    """`dataset_statistics` of an opened store; reads only the masks, classes and quality
    (no images, no attention). `masks`: `store.masks()` itself, e.g. behind a progress bar."""
    rows = store.masks() if masks is None else masks
    figures = (MaskFigures.of_mask(mask, classes, quality) for mask, classes, quality in rows)
    return dataset_statistics(figures, store.class_names)


def shard_summary(store: Any, checks: list[Any]) -> dict[str, Any]:
    """Counts of the intact shards among `checks` (Store.verify); a DiffuMaskError listing
    the damaged or missing ones and how to remake them."""
    bad = [check for check in checks if not check.ok]
    if bad:
        listed = "; ".join(check.describe() for check in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DiffuMaskError(
            f"{store.path}: {len(bad)} of {len(checks)} shards are damaged ({listed}{more}); "
            f"`diffumask generate ... --out {store.path} --resume` with the same settings "
            "remakes them"
        )
    verified = sum(check.verified for check in checks)
    return {"total": len(checks), "sha256_verified": verified, "no_digest": len(checks) - verified}
