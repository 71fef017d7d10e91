"""COCO instances export, as pycocotools and detectron2 read it.

```
DEST/
  annotations/instances_train.json, instances_val.json
  images/train/<name>.png, images/val/<name>.png      the generated images, lossless
  semantic/train/<name>.png, semantic/val/<name>.png  mode-L id masks, 255 ignore
```

Each connected region (8-connected) of each class becomes one annotation: RLE
segmentation from pycocotools, bbox, area, iscrowd 0. The union of a class's
annotations is exactly that class's pixels in the mask; ignore pixels (255) are in no
annotation and stay 255 in the semantic PNGs. Category ids and names are the
definition's class ids and names, so they are the same in every export of a definition.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .common import (
    SPLITS,
    ExportSummary,
    RecordLike,
    assign_splits,
    export_run,
    sample_name,
    split_names,
)

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def class_components(mask: np.ndarray, class_id: int) -> list[np.ndarray]:
    """The 8-connected regions of one class, as boolean HxW arrays (disjoint; their
    union is `mask == class_id`)."""
    from scipy import ndimage

    labels, count = ndimage.label(mask == class_id, structure=EIGHT_CONNECTED)
    return [labels == k for k in range(1, count + 1)]


def encode_region(region: np.ndarray) -> dict[str, Any]:
    """One binary region as COCO fields: compressed RLE (JSON-ready), bbox, area."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(region.astype(np.uint8)))
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    area = int(mask_utils.area(rle))
    return {
        "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode()},
        "bbox": bbox,
        "area": area,
    }


def mask_annotations(mask: np.ndarray, class_ids: Iterable[int]) -> list[dict[str, Any]]:
    """COCO annotations (without ids) for every region of every class in the mask."""
    present = set(np.unique(mask).tolist())
    annotations = []
    for class_id in sorted(class_ids):
        if class_id not in present:
            continue
        for region in class_components(mask, class_id):
            annotations.append({"category_id": class_id, "iscrowd": 0, **encode_region(region)})
    return annotations


def coco_categories(class_names: Mapping[int, str]) -> list[dict[str, Any]]:
    """The COCO `categories` list: one entry per class id, named as in the definition."""
    return [{"id": i, "name": name, "supercategory": "object"} for i, name in class_names.items()]


def export_coco(
    records: Iterable[RecordLike],
    class_names: Mapping[int, str],
    dest: str | os.PathLike,
    **options: Any,
) -> ExportSummary:
    """Write `records` as a COCO instances dataset (plus semantic PNGs) under `dest`;
    `options`: the fields of `ExportOptions`."""
    with export_run("coco", records, class_names, dest, options) as run:
        root, class_names, source = run.root, run.class_names, run.options.source
        # Files are written flat while streaming (the split needs every index), then
        # moved into their split folders by rename.
        flat_images, flat_semantic = root / "images" / ".all", root / "semantic" / ".all"
        flat_images.mkdir(parents=True)
        flat_semantic.mkdir(parents=True)
        images: dict[int, dict[str, Any]] = {}
        annotations: dict[int, list[dict[str, Any]]] = {}
        for record, mask in run.records:
            name = sample_name(record.index)
            record.image.convert("RGB").save(flat_images / f"{name}.png")
            Image.fromarray(mask).save(flat_semantic / f"{name}.png")
            width, height = record.image.size
            images[record.index] = {
                # COCO tools treat id 0 as "no image" in places; ids start at 1.
                "id": record.index + 1,
                "file_name": f"{name}.png",
                "width": width,
                "height": height,
                "diffumask_index": record.index,
                "prompt": record.prompt,
                "seed": int(record.seed),
                "quality": float(record.quality),
            }
            annotations[record.index] = mask_annotations(mask, class_names)

        split_of = assign_splits(list(images), run.options.val_fraction)
        splits = split_names(split_of)
        created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        n_annotations = 0
        (root / "annotations").mkdir()
        for split in SPLITS:
            (root / "images" / split).mkdir()
            (root / "semantic" / split).mkdir()
            split_images, split_annotations = [], []
            for index in sorted(i for i in images if split_of[i] == split):
                entry = images[index]
                for folder in ("images", "semantic"):
                    (root / folder / ".all" / entry["file_name"]).rename(
                        root / folder / split / entry["file_name"]
                    )
                split_images.append(entry)
                for annotation in annotations[index]:
                    n_annotations += 1
                    split_annotations.append(
                        {"id": n_annotations, "image_id": entry["id"], **annotation}
                    )
            document = {
                "info": {
                    "description": "DiffuMask synthetic segmentation dataset",
                    "version": "1.0",
                    "date_created": created,
                    "source": str(source) if source is not None else None,
                },
                "licenses": [],
                "images": split_images,
                "annotations": split_annotations,
                "categories": coco_categories(class_names),
            }
            with open(root / "annotations" / f"instances_{split}.json", "w") as f:
                json.dump(document, f)
        flat_images.rmdir()
        flat_semantic.rmdir()
    return ExportSummary("coco", Path(dest).resolve(), splits, {"annotations": n_annotations})
