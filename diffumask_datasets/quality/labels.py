"""A store's masks scored against ground truth: how good a model's masks are.

    from diffumask_datasets.quality.labels import score_masks
    report = score_masks("out/labelled", "VOCdevkit/VOC2012")
    print(report.describe())

LABELS is a VOC-layout folder (its masks in SegmentationClass/) or a store of exact masks.
A stored sample meets its ground truth by name (a VOC folder: the file stem of the image
it was labelled from, `meta["source"]`, e.g. `diffumask label` of that folder) or by
index (a store). Classes meet by name: pixels of a ground-truth class the store does not
know are left out (ignored), as are 255 pixels on either side. Scores: IoU per class with
intersections and unions summed over images (quality.metrics), mIoU over background and
the store's classes, the confusion matrix, and the same by the number of classes the
reference shows (one object of each class, as in the shapes scenes: objects).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffumask_datasets.errors import DiffuMaskError

from .data import VOC_PARTS, find_voc_root, voc_class_names
from .metrics import IGNORE, confusion, iou_per_class, mean_iou


@dataclass
class MaskScore:
    """A store's masks against ground truth: IoU per class, mIoU, the confusion matrix
    and the same by the number of classes an image shows (`describe`, `to_dict`)."""

    store: str
    labels: str
    class_names: dict[int, str]  # ids of the scores (0 background)
    images: int  # images scored
    unmatched: int  # stored samples without ground truth
    miou: float
    per_class: dict[str, float]
    confusion: list[list[int]]  # rows: reference class, columns: predicted class
    by_objects: dict[int, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (an undefined IoU is None, not NaN)."""

        def clean(value: Any) -> Any:
            if isinstance(value, dict):
                return {str(k): clean(v) for k, v in value.items()}
            if isinstance(value, float) and value != value:
                return None
            return value

        return clean({k: getattr(self, k) for k in self.__dataclass_fields__})

    def describe(self) -> str:
        names = list(self.per_class)
        width = max(11, *(len(n) + 2 for n in names))
        lines = [
            f"{self.images} masks of {self.store} scored against {self.labels}"
            + (f" ({self.unmatched} without ground truth left out)" if self.unmatched else ""),
            f"{'images':<14}{'n':>5}{'mIoU':>7}" + "".join(f"{n:>{width}}" for n in names),
        ]
        rows = [("all", {"images": self.images, "miou": self.miou, "per_class": self.per_class})]
        rows += [(f"{k} object(s)", row) for k, row in sorted(self.by_objects.items())]
        for label, row in rows:
            cells = "".join(f"{row['per_class'][n]:>{width}.3f}" for n in names)
            lines.append(f"{label:<14}{row['images']:>5}{row['miou']:>7.3f}{cells}")
        lines.append("confusion (rows: reference, columns: predicted; share of the row's pixels)")
        lines.append(f"{'':<14}" + "".join(f"{n:>{width}}" for n in names))
        matrix = np.asarray(self.confusion, dtype=np.float64)
        shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
        for i, name in enumerate(names):
            lines.append(f"{name:<14}" + "".join(f"{v:>{width}.3f}" for v in shares[i]))
        return "\n".join(lines)


def _voc_truth(path: Path) -> tuple[dict[str, Path], dict[int, str]]:
    """{image stem: mask file} of a VOC folder, and its class names."""
    root = find_voc_root(path)
    if root is None and (path / "JPEGImages").is_dir():
        root = path
    if root is None:
        raise DiffuMaskError(
            f"LABELS {str(path)!r} is neither a DiffuMask dataset (no manifest.json) nor a VOC "
            f"folder ({', '.join(VOC_PARTS)}); give one with masks"
        )
    masks = {p.stem: p for p in sorted((root / "SegmentationClass").glob("*.png"))}
    if not masks:
        raise DiffuMaskError(
            f"LABELS {str(path)!r} has no masks (no PNG in SegmentationClass/): a VOC folder "
            "without segmentation labels cannot score masks; give one with SegmentationClass/"
        )
    return masks, voc_class_names(root)


def _lookup(ids: dict[int, str], to: dict[str, int]) -> np.ndarray:
    """A 256-entry table from ids named by `ids` to the ids of the same names in `to`;
    anything else to 255."""
    table = np.full(256, IGNORE, dtype=np.uint8)
    table[0] = 0
    for i, name in ids.items():
        if i and name in to:
            table[i] = to[name]
    return table


def score_masks(store_path: str | Path, labels: str | Path) -> MaskScore:
    """Score the masks of the store at `store_path` against LABELS (see module doc)."""
    from PIL import Image

    from diffumask_datasets.store import MANIFEST, open_store

    store = open_store(store_path)
    names = dict(store.class_names)
    labels = Path(labels).expanduser()
    by_index = (labels / MANIFEST).is_file()
    if by_index:
        truth_store = open_store(labels)
        truth_ids = dict(truth_store.class_names)
        truth = {r.index: r.mask for r in truth_store.records()}
    else:
        files, truth_ids = _voc_truth(labels)
    wanted = {name: i for i, name in names.items()}
    table = _lookup(truth_ids, wanted)
    size = max(names) + 1
    total = np.zeros((size, size), dtype=np.int64)
    per_count: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    scored = unmatched = 0
    for record in store.records():
        if by_index:
            reference = truth.get(record.index)
        else:
            source = record.meta.get("source")
            path = files.get(Path(source).stem) if source else None
            reference = None
            if path is not None:
                with Image.open(path) as mask:
                    reference = np.asarray(mask, dtype=np.uint8)
        if reference is None:
            unmatched += 1
            continue
        if reference.shape != record.mask.shape:
            raise DiffuMaskError(
                f"sample {record.index}'s mask is {record.mask.shape[1]}x{record.mask.shape[0]} "
                f"but its ground truth is {reference.shape[1]}x{reference.shape[0]}; score masks "
                "labelled from these very images (`diffumask label`)"
            )
        reference = table[reference]
        matrix = confusion(record.mask, reference, size)
        total += matrix
        shown = len(set(np.unique(reference).tolist()) - {0, IGNORE})
        per_count[shown] = per_count.get(shown, 0) + matrix
        counts[shown] = counts.get(shown, 0) + 1
        scored += 1
    if not scored:
        raise DiffuMaskError(
            f"no sample of {str(store_path)!r} has ground truth in {str(labels)!r}: samples meet "
            "a VOC folder by the file name they were labelled from and a store by index; label "
            "that folder's images (`diffumask label`)"
        )
    ids = sorted(names)

    def scores(matrix: np.ndarray) -> tuple[float, dict[str, float]]:
        ious = iou_per_class(matrix)
        return mean_iou(matrix, ids), {names[i]: float(ious[i]) for i in ids}

    miou, per_class = scores(total)
    by_objects = {}
    for k in sorted(per_count):
        k_miou, k_per_class = scores(per_count[k])
        by_objects[k] = {"images": counts[k], "miou": k_miou, "per_class": k_per_class}
    return MaskScore(
        store=str(store_path),
        labels=str(labels),
        class_names=names,
        images=scored,
        unmatched=unmatched,
        miou=miou,
        per_class=per_class,
        confusion=total[np.ix_(ids, ids)].tolist(),
        by_objects=by_objects,
    )
