"""Where evaluate and clean read their samples: a store, or a folder in the VOC layout.

A VOC folder is our VOC export (`diffumask export --format voc`, `diffumask shapes
render`) or a user's own VOC2012 download: `JPEGImages/`, `SegmentationClass/` (palette
PNGs whose pixel values are class ids, 255 ignore) and `ImageSets/Segmentation/<split>.txt`,
at the folder itself, under `VOC2012/` or under `VOCdevkit/VOC2012/`. Class names come
from our export's `diffumask.json`, else they are the 20 PASCAL VOC classes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffumask_datasets.errors import DiffuMaskError

from .metrics import IGNORE

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
VOC_PARTS = ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation")


@dataclass
class LabelledSet:
    """Images with id masks and the names of the ids (0 background)."""

    images: list[Any]  # PIL RGB
    masks: list[np.ndarray]  # uint8 HxW
    class_names: dict[int, str]
    source: str

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_labels(self) -> int:
        return max(self.class_names) + 1


def find_voc_root(path: str | Path) -> Path | None:
    """The folder holding the VOC parts: path, path/VOC2012 or path/VOCdevkit/VOC2012."""
    path = Path(path).expanduser()
    for candidate in (path, path / "VOC2012", path / "VOCdevkit" / "VOC2012"):
        if all((candidate / part).is_dir() for part in VOC_PARTS):
            return candidate
    return None


def voc_class_names(root: Path) -> dict[int, str]:
    """The class names by id of a VOC folder: from our export's `diffumask.json` when it is
    there, else the 20 PASCAL VOC classes."""
    info = root / "diffumask.json"
    if info.is_file():
        classes = json.loads(info.read_text()).get("classes", {})
        return {0: "background", **{int(k): str(v) for k, v in classes.items()}}
    return dict(enumerate(VOC_CLASSES))


def voc_splits(root: Path) -> list[str]:
    """The split names of a VOC folder (the files of `ImageSets/Segmentation/`)."""
    return sorted(p.stem for p in (root / "ImageSets" / "Segmentation").glob("*.txt"))


def load_voc(path: str | Path, split: str, what: str = "REAL") -> LabelledSet:
    """The images and masks of one split of a VOC-layout folder."""
    from PIL import Image

    root = find_voc_root(path)
    if root is None:
        raise DiffuMaskError(
            f"{what} {str(path)!r} has no VOC layout: expected {', '.join(VOC_PARTS)} under "
            "it (or under VOCdevkit/VOC2012); write one with `diffumask export STORE --format "
            "voc --to DIR` or `diffumask shapes render --count N --to DIR`"
        )
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise DiffuMaskError(
            f"{what} {str(path)!r} has no split {split!r} (no {listing.name}); its splits: "
            f"{', '.join(voc_splits(root)) or 'none'}; pick one with --split"
        )
    names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    if not names:
        raise DiffuMaskError(f"{what} split {split!r} of {str(path)!r} lists no images")
    images, masks = [], []
    for name in names:
        image_path = root / "JPEGImages" / f"{name}.jpg"
        mask_path = root / "SegmentationClass" / f"{name}.png"
        if not image_path.is_file() or not mask_path.is_file():
            raise DiffuMaskError(
                f"{what} {str(path)!r}: split {split!r} lists {name!r} but "
                f"{image_path.name} or {mask_path.name} is missing; fix the listing"
            )
        with Image.open(image_path) as image:
            images.append(image.convert("RGB"))
        with Image.open(mask_path) as mask:
            masks.append(np.asarray(mask, dtype=np.uint8).copy())
    return LabelledSet(images, masks, voc_class_names(root), str(path))


def load_training(path: str | Path, split: str = "trainval") -> LabelledSet:
    """TRAIN: a store (every sample) or a VOC-layout folder (its `split`)."""
    from diffumask_datasets.store import MANIFEST, open_store

    path = Path(path).expanduser()
    if (path / MANIFEST).is_file():
        store = open_store(path)
        images, masks = [], []
        for record in store.records():
            images.append(record.image)
            masks.append(record.mask)
        return LabelledSet(images, masks, dict(store.class_names), str(path))
    if find_voc_root(path) is not None:
        return load_voc(path, split, what="TRAIN")
    raise DiffuMaskError(
        f"TRAIN {str(path)!r} is neither a DiffuMask dataset (no manifest.json) nor a VOC "
        "export; give a folder made by `diffumask generate` or `diffumask export --format voc`"
    )


def align_classes(train: LabelledSet, real: LabelledSet) -> tuple[LabelledSet, LabelledSet]:
    """Both sets in REAL's ids: TRAIN's masks relabelled by class name; REAL's pixels of
    classes TRAIN lacks become 255 (the segmenter never learned them). A TRAIN class that
    REAL lacks is refused."""
    real_ids = {name: i for i, name in real.class_names.items()}
    lookup = np.full(256, IGNORE, dtype=np.uint8)
    lookup[0] = 0
    for train_id, name in train.class_names.items():
        if train_id == 0:
            continue
        if name not in real_ids:
            raise DiffuMaskError(
                f"class {name!r} of TRAIN is not a class of REAL {real.source!r} (its classes: "
                f"{', '.join(n for i, n in sorted(real.class_names.items()) if i)}); keep "
                "TRAIN's samples of REAL's classes (`diffumask filter --classes`) or rename it"
            )
        lookup[train_id] = real_ids[name]
    used = set(lookup[lookup != IGNORE].tolist())
    real_lookup = np.array([i if i in used else IGNORE for i in range(256)], dtype=np.uint8)
    names = {i: real.class_names[i] for i in sorted(used)}
    return (
        LabelledSet(train.images, [lookup[m] for m in train.masks], names, train.source),
        LabelledSet(real.images, [real_lookup[m] for m in real.masks], names, real.source),
    )
