"""A PNG grid of images with their masks laid over them, for looking at a dataset."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffumask_datasets.errors import DiffuMaskError
from diffumask_datasets.sample import IGNORE

MIN_TILE = 128  # pixels a side: the smallest cell in which a mask can be judged

# Distinct, saturated overlay colours for class ids 1, 2, ...; 255 (ignore) is white.
PALETTE = np.array(
    [
        (230, 25, 75),
        (60, 180, 75),
        (0, 130, 200),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
        (250, 190, 212),
        (0, 128, 128),
        (170, 110, 40),
        (128, 0, 0),
        (170, 255, 195),
        (128, 128, 0),
        (0, 0, 128),
        (255, 225, 25),
    ],
    dtype=np.float32,
)


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend class colours into an RGB uint8 image where the mask is non-zero, and draw a
    one-pixel outline around each class region so thin parts stay visible."""
    rgb = np.asarray(image, dtype=np.float32)[..., :3].copy()
    mask = np.asarray(mask)
    if mask.shape != rgb.shape[:2]:
        raise DiffuMaskError(
            f"mask shape {mask.shape} does not match image shape {rgb.shape[:2]}; "
            "resize the mask to the image first"
        )
    colours = np.zeros_like(rgb)
    labelled = mask != 0
    ids = mask.astype(np.int64)
    colours[labelled] = PALETTE[(ids[labelled] - 1) % len(PALETTE)]
    colours[mask == IGNORE] = 255.0
    rgb[labelled] = (1 - alpha) * rgb[labelled] + alpha * colours[labelled]
    # Outline: a pixel whose right or lower neighbour carries a different label.
    edge = np.zeros(mask.shape, dtype=bool)
    edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    edge[:-1, :] |= mask[:-1, :] != mask[1:, :]
    edge &= labelled
    rgb[edge] = colours[edge]
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def contact_sheet(
    images: Sequence,
    masks: Sequence,
    path: str | Path,
    columns: int = 8,
    tile: int | None = None,
    alpha: float = 0.5,
    gap: int = 2,
) -> Path:
    """Write a PNG grid: each cell shows an image with its mask overlaid.

    images: PIL images or HxWx3 uint8 arrays; masks: HxW integer arrays (0 background,
    1..N class ids, 255 ignore), one per image. `tile` sets the cell side in pixels,
    MIN_TILE (128) or more so that a mask can be judged at a glance (default: the first
    image's width, at least MIN_TILE; small images are scaled up with nearest-neighbour so
    they stay sharp). Returns the written path.
    """
    if len(images) != len(masks):
        raise DiffuMaskError(f"{len(images)} images but {len(masks)} masks; pass one mask each")
    if not images:
        raise DiffuMaskError("contact_sheet needs at least one image")
    if columns < 1:
        raise DiffuMaskError(f"columns must be at least 1, got {columns}")
    if tile is not None and tile < MIN_TILE:
        raise DiffuMaskError(
            f"tile={tile} px is too small to judge a mask; give {MIN_TILE} or more (or leave "
            "it out)"
        )
    arrays = [np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images]
    side = tile or max(arrays[0].shape[1], MIN_TILE)
    cells = []
    for image, mask in zip(arrays, masks, strict=True):
        blended = Image.fromarray(overlay(image, np.asarray(mask), alpha))
        cells.append(blended.resize((side, side), Image.NEAREST))
    columns = min(columns, len(cells))
    rows = -(-len(cells) // columns)
    sheet = Image.new(
        "RGB", (columns * side + (columns + 1) * gap, rows * side + (rows + 1) * gap), "white"
    )
    for i, cell in enumerate(cells):
        r, c = divmod(i, columns)
        sheet.paste(cell, (gap + c * (side + gap), gap + r * (side + gap)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    sheet.save(tmp)
    tmp.replace(path)
    return path


def write_contact_sheet(store: Any, limit: int = 32) -> Path:
    """A PNG grid of the store's first `limit` samples with their masks overlaid, written
    beside the shards as contact_sheet.png; returns its path."""
    records = list(islice(store.records(), limit))
    path = Path(store.path) / "contact_sheet.png"
    return contact_sheet([r.image for r in records], [r.mask for r in records], path)
