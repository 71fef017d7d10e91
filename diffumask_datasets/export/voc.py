"""Pascal VOC 2012 segmentation layout, as torchvision and mmsegmentation read it.

```
DEST/VOCdevkit/VOC2012/
  JPEGImages/<name>.jpg
  SegmentationClass/<name>.png          palette (mode P) PNG, VOC colour map, 255 ignore
  ImageSets/Segmentation/{train,val,trainval}.txt
  diffumask.json                        class names by id, mmsegmentation class tuple
```

`torchvision.datasets.VOCSegmentation(root=DEST, year="2012", image_set="train")`
reads it as is; mmsegmentation's `PascalVOCDataset` takes
`data_root=DEST/VOCdevkit/VOC2012`. The pixel values of a mask PNG are the class ids of
the definition (0 background, 255 ignore), exactly as in the store.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .common import ExportSummary, RecordLike, assign_splits, export_run, sample_name, split_names

VOC_SUBDIR = Path("VOCdevkit") / "VOC2012"
JPEG_QUALITY = 95


def voc_colormap(n: int = 256) -> np.ndarray:
    """The Pascal VOC colour map: the bits of a class id are spread, three at a time,
    over the high bits of R, G and B (1 -> dark red, 2 -> dark green, 255 -> cream)."""
    ids = np.arange(n)
    colours = np.zeros((n, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            colours[:, channel] |= ((ids >> (3 * bit + channel)) & 1) << (7 - bit)
    return colours.astype(np.uint8)


def palette_png(mask: np.ndarray) -> Image.Image:
    """A uint8 id mask as a mode-P image with the VOC palette; pixel values stay ids."""
    image = Image.fromarray(mask)
    image.putpalette(voc_colormap().reshape(-1).tolist())
    return image


def mmseg_classes(class_names: Mapping[int, str]) -> list[str]:
    """mmsegmentation's `classes` tuple is indexed by pixel value: background at 0, then
    every id up to the largest (ids the definition skips get a placeholder name)."""
    top = max(class_names, default=0)
    return ["background"] + [class_names.get(i, f"unused_{i}") for i in range(1, top + 1)]


def export_voc(
    records: Iterable[RecordLike],
    class_names: Mapping[int, str],
    dest: str | os.PathLike,
    **options: Any,
) -> ExportSummary:
    """Write `records` as a VOC 2012 segmentation dataset under `dest`; `options`: the
    fields of `ExportOptions` (val_fraction, overwrite, total, progress, source)."""
    with export_run("voc", records, class_names, dest, options) as run:
        root, class_names, source = run.root, run.class_names, run.options.source
        voc = root / VOC_SUBDIR
        images_dir = voc / "JPEGImages"
        masks_dir = voc / "SegmentationClass"
        sets_dir = voc / "ImageSets" / "Segmentation"
        for folder in (images_dir, masks_dir, sets_dir):
            folder.mkdir(parents=True)
        indices: list[int] = []
        for record, mask in run.records:
            name = sample_name(record.index)
            # 4:4:4 chroma keeps thin structures' colours next to the exact masks.
            record.image.convert("RGB").save(
                images_dir / f"{name}.jpg", quality=JPEG_QUALITY, subsampling=0
            )
            palette_png(mask).save(masks_dir / f"{name}.png")
            indices.append(record.index)
        val_fraction = run.options.val_fraction
        split_of = assign_splits(indices, val_fraction)
        splits = split_names(split_of)
        for split, names in splits.items():
            (sets_dir / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
        trainval = [sample_name(i) for i in sorted(indices)]
        (sets_dir / "trainval.txt").write_text("".join(f"{n}\n" for n in trainval))
        info = {
            "format": "voc2012-segmentation",
            "classes": {str(i): name for i, name in class_names.items()},
            "mmseg_classes": mmseg_classes(class_names),
            "ignore_index": 255,
            "val_fraction": val_fraction,
            "splits": {split: len(names) for split, names in splits.items()},
            "source": str(source) if source is not None else None,
        }
        (voc / "diffumask.json").write_text(json.dumps(info, indent=2) + "\n")
    return ExportSummary("voc", Path(dest).resolve(), splits)
