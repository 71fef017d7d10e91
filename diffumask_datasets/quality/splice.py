"""Splicing augmentation: several samples pasted into one image, masks alike.

The paper splices generated images into mosaics so that the segmenter sees several
objects, at smaller scales, in one image. `mosaic` is the one implementation, over torch
tensors: the trainer splices batches on the fly with it (`splice_batch`), and
`splice_store` writes a derived store of mosaics with it. Each tile is the source shrunk
to its cell (image by area averaging, mask by nearest neighbour, so 255 stays 255); the
mosaic has the size of its first source.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffumask_datasets.errors import DiffuMaskError

MAX_GRID = 8


def parse_grid(text: str) -> tuple[int, int]:
    """'2x2' -> (2, 2): rows x columns, each 1..8, at least two cells."""
    parts = str(text).lower().split("x")
    try:
        rows, cols = (int(p) for p in parts)
    except ValueError:
        rows = cols = 0
    if not (1 <= rows <= MAX_GRID and 1 <= cols <= MAX_GRID) or rows * cols < 2:
        raise DiffuMaskError(
            f"--grid {text!r} is not a grid of rows x columns with at least two cells "
            f"(each 1..{MAX_GRID}); write e.g. 2x2, 1x2 or 2x1"
        )
    return rows, cols


def _edges(length: int, parts: int) -> list[int]:
    return [round(length * k / parts) for k in range(parts + 1)]


def mosaic(images, masks, grid: tuple[int, int], size: tuple[int, int] | None = None):
    """Splice rows*cols samples into one, row by row.

    images: float tensor (rows*cols, C, H, W); masks: integer tensor (rows*cols, H, W);
    size: (height, width) of the result, default the sources'. Returns (C, h, w), (h, w).
    """
    import torch.nn.functional as F

    rows, cols = grid
    if len(images) != rows * cols or len(masks) != rows * cols:
        raise ValueError(f"a {rows}x{cols} mosaic needs {rows * cols} samples, got {len(images)}")
    height, width = size if size is not None else tuple(images.shape[-2:])
    ys, xs = _edges(height, rows), _edges(width, cols)
    image = images.new_zeros((images.shape[1], height, width))
    mask = masks.new_zeros((height, width))
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        cell = (ys[r + 1] - ys[r], xs[c + 1] - xs[c])
        tile = F.interpolate(images[k : k + 1].float(), size=cell, mode="area")[0]
        tile_mask = F.interpolate(masks[k : k + 1, None].float(), size=cell, mode="nearest")
        image[:, ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = tile.to(image.dtype)
        mask[ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = tile_mask[0, 0].to(mask.dtype)
    return image, mask


def splice_batch(images, masks, pool_images, pool_masks, share: float, generator):
    """Replace a random `share` of a training batch by 2x2 mosaics of pool samples."""
    import torch

    images, masks = images.clone(), masks.clone()
    chosen = torch.rand(len(images), generator=generator) < share
    for i in torch.nonzero(chosen).flatten().tolist():
        picks = torch.randint(0, len(pool_images), (4,), generator=generator)
        images[i], masks[i] = mosaic(pool_images[picks], pool_masks[picks], (2, 2))
    return images, masks


# -- a derived store of mosaics --------------------------------------------------------------


def splice_plan(n_sources: int, count: int, grid: tuple[int, int], seed: int) -> list[list[int]]:
    """Which source positions each of `count` mosaics takes: seeded, sources drawn
    without repeats inside a mosaic when the store has enough of them."""
    cells = grid[0] * grid[1]
    if n_sources < 1:
        raise DiffuMaskError("the store holds no samples to splice; generate some first")
    if count < 1:
        raise DiffuMaskError(f"--count {count} is too small; ask for at least 1 mosaic")
    rng = np.random.default_rng(seed)
    return [
        rng.choice(n_sources, size=cells, replace=n_sources < cells).tolist() for _ in range(count)
    ]


def _tensor(image, mask):
    import torch

    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
    return pixels, torch.from_numpy(np.asarray(mask, dtype=np.int64))


def splice_records(records: Sequence[Any], plan: list[list[int]], grid, source: str):
    """The mosaics of `plan` over `records` (store Records), as new Records."""
    import torch
    from PIL import Image

    from diffumask_datasets.store import Record

    for index, picks in enumerate(plan):
        parts = [_tensor(records[p].image, records[p].mask) for p in picks]
        height, width = parts[0][1].shape
        # Sources of another size are first brought to the first one's (one mosaic size).
        image, mask = mosaic(
            torch.stack([_resize(x, (height, width)) for x, _ in parts]),
            torch.stack([_resize(m, (height, width), nearest=True) for _, m in parts]),
            grid,
        )
        classes = list(dict.fromkeys(c for p in picks for c in records[p].classes))
        yield Record(
            index=index,
            image=Image.fromarray(image.round().clamp(0, 255).byte().permute(1, 2, 0).numpy()),
            mask=mask.numpy().astype(np.uint8),
            prompt=" | ".join(records[p].prompt for p in picks),
            seed=int(index),
            classes=classes,
            quality=float(np.mean([records[p].quality for p in picks])),
            meta={
                "splice": {
                    "grid": list(grid),
                    "sources": [int(records[p].index) for p in picks],
                    "source_store": source,
                },
                "prompts": [records[p].prompt for p in picks],
            },
        )


def _resize(x, size, nearest: bool = False):
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if nearest:
        return F.interpolate(x[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return F.interpolate(x[None], size=size, mode="area")[0]


def splice_store(
    store: Any,
    dest: str | os.PathLike,
    grid: tuple[int, int] | str = (2, 2),
    count: int = 100,
    seed: int = 0,
    progress: bool = True,
):
    """Write `count` mosaics of the samples of `store` (a Store or its path) as a new
    store at `dest`; the source is only read. Returns the new Store."""
    from diffumask_datasets.export import progress_bar, staged_destination
    from diffumask_datasets.store import open_store, write_store

    if isinstance(store, (str, os.PathLike)):
        store = open_store(store)
    if isinstance(grid, str):
        grid = parse_grid(grid)
    plan = splice_plan(len(store), count, grid, seed)
    records = list(progress_bar(store.records(), total=len(store), desc="read", enabled=progress))
    manifest = dict(store.manifest)
    manifest["splice"] = {
        "source": str(Path(store.path).resolve()),
        "grid": list(grid),
        "count": count,
        "seed": seed,
    }
    mosaics = splice_records(records, plan, grid, str(Path(store.path).resolve()))
    mosaics = progress_bar(mosaics, total=count, desc="splice", enabled=progress)
    with staged_destination(Path(dest), False, Path(store.path)) as staging:
        write_store(staging, mosaics, manifest)
    return open_store(dest)
