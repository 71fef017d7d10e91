"""FiftyOne's own segmentation evaluation on a cleaned dataset.

`diffumask clean` saves each kept sample's held-out prediction (what a segmenter trained
on the other folds sees in its image) beside the store. Loaded into FiftyOne, it becomes
the `held_out` Segmentation field next to `ground_truth`, and FiftyOne's
`evaluate_segmentations` compares the two under the evaluation key `held_out`: the App's
evaluation panel shows the confusion matrix and per-class scores, and each sample gets
`held_out_accuracy`, `held_out_precision` and `held_out_recall`, to sort by as with any
model's predictions (lowest first: the masks least like what the rest of the data
teaches). Pixels a mask ignores (255) are left out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..quality.clean import HELD_OUT_DIR, held_out_path
from .importer import GROUND_TRUTH
from .media import IGNORE

HELD_OUT_FIELD = "held_out"


def has_held_out(store_dir: str | os.PathLike) -> bool:
    """Whether a cleaned store holds held-out predictions (its `held_out/` folder)."""
    return (Path(store_dir) / HELD_OUT_DIR).is_dir()


def add_held_out(dataset: Any, store_dir: str | os.PathLike, eval_key: str = HELD_OUT_FIELD):
    """Set `held_out` on each sample of `dataset` (imported from the cleaned store at
    `store_dir`) whose prediction is saved, and run `evaluate_segmentations` against
    `ground_truth` under `eval_key`. Returns FiftyOne's results."""
    import fiftyone as fo

    paths = [held_out_path(store_dir, int(i)) for i in dataset.values("index")]
    dataset.set_values(
        HELD_OUT_FIELD,
        [fo.Segmentation(mask_path=str(p)) if p.is_file() else None for p in paths],
    )
    targets = dict(dataset.mask_targets.get(GROUND_TRUTH) or dataset.default_mask_targets)
    dataset.mask_targets = {**dataset.mask_targets, HELD_OUT_FIELD: targets}
    dataset.save()
    # keys as ints (stored targets may come back as strings); 255 is left out
    scored = {int(k): v for k, v in targets.items() if int(k) != IGNORE}
    view = dataset.exists(HELD_OUT_FIELD)
    return view.evaluate_segmentations(
        HELD_OUT_FIELD, gt_field=GROUND_TRUTH, eval_key=eval_key, mask_targets=scored
    )
