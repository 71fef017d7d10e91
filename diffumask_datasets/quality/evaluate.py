"""The paper's synthetic-to-real protocol: train a segmenter on TRAIN, test it on REAL.

`evaluate(train, real)` trains on every sample of TRAIN (a store or a VOC export), tests on
one split of REAL (a VOC-layout folder) and returns IoU per class and mIoU over background
and TRAIN's classes. With `real_train="train"` it also trains the same segmenter on that
split of REAL and reports synthetic_over_real = mIoU(TRAIN) / mIoU(REAL's own split).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .data import LabelledSet, align_classes, load_training, load_voc
from .metrics import confusion, iou_per_class, mean_iou
from .segmenter import Segmenter, TrainSettings, train_segmenter


@dataclass
class Score:
    """A segmenter's test score: mIoU over background and the training classes, and the IoU
    of each class."""

    miou: float
    per_class: dict[str, float]  # class name -> IoU (NaN: absent from test and prediction)


@dataclass
class Evaluation:
    """What `evaluate` measured: the score of the segmenter trained on the synthetic data
    and, with `real_train`, of the one trained on real data (`synthetic_over_real`), with
    the settings, image counts and seconds."""

    train: str
    real: str
    split: str
    test_images: int
    train_images: int
    synthetic: Score
    real_train: str | None = None
    real_trained: Score | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def synthetic_over_real(self) -> float | None:
        if self.real_trained is None or not self.real_trained.miou > 0:
            return None
        return self.synthetic.miou / self.real_trained.miou

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: an IoU that is undefined (class in neither test nor
        prediction) is None, not NaN (which strict JSON readers refuse)."""

        def clean(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, float) and value != value:
                return None
            return value

        return clean({**asdict(self), "synthetic_over_real": self.synthetic_over_real})

    def describe(self) -> str:
        names = list(self.synthetic.per_class)
        rows = [("TRAIN", self.synthetic)]
        if self.real_trained is not None:
            rows.append((f"REAL {self.real_train}", self.real_trained))
        width = max(10, *(len(n) + 2 for n in names))
        lines = [
            f"trained on {self.train_images} images of {self.train}, tested on "
            f"{self.test_images} images of {self.real} ({self.split})",
            f"{'trained on':<14}{'mIoU':>7}" + "".join(f"{n:>{width}}" for n in names),
        ]
        for label, score in rows:
            cells = "".join(f"{score.per_class[n]:>{width}.3f}" for n in names)
            lines.append(f"{label:<14}{score.miou:>7.3f}{cells}")
        if self.synthetic_over_real is not None:
            lines.append(f"synthetic_over_real={self.synthetic_over_real:.3f}")
        return "\n".join(lines)


def score_segmenter(segmenter: Segmenter, test: LabelledSet) -> Score:
    """IoU per class of `test`'s classes, intersections and unions summed over images."""
    matrix = np.zeros((test.num_labels, test.num_labels), dtype=np.int64)
    for pred, ref in zip(segmenter.predict(test.images), test.masks, strict=True):
        matrix += confusion(pred, ref, test.num_labels)
    ious = iou_per_class(matrix)
    ids = sorted(test.class_names)
    return Score(
        miou=mean_iou(matrix, ids),
        per_class={test.class_names[i]: float(ious[i]) for i in ids},
    )


def evaluate(
    train: str | Path | LabelledSet,
    real: str | Path | LabelledSet,
    split: str = "val",
    real_train: str | None = None,
    settings: TrainSettings = TrainSettings(),
    progress: bool = True,
) -> Evaluation:
    """Train on TRAIN, test on REAL's `split` (see module doc)."""
    timings: dict[str, float] = {}
    start = time.time()
    train_set = train if isinstance(train, LabelledSet) else load_training(train)
    test_set = real if isinstance(real, LabelledSet) else load_voc(real, split)
    train_set, test_set = align_classes(train_set, test_set)
    own = None
    if real_train is not None:
        own = load_voc(real if not isinstance(real, LabelledSet) else real.source, real_train)
        own = align_classes(train_set_named(train_set, test_set), own)[1]
    timings["load"] = time.time() - start

    start = time.time()
    segmenter = train_segmenter(
        train_set.images, train_set.masks, test_set.num_labels, settings, progress, "train TRAIN"
    )
    synthetic = score_segmenter(segmenter, test_set)
    timings["train"] = time.time() - start
    real_score = None
    if own is not None:
        start = time.time()
        segmenter = train_segmenter(
            own.images, own.masks, test_set.num_labels, settings, progress, "train REAL"
        )
        real_score = score_segmenter(segmenter, test_set)
        timings["train_real"] = time.time() - start
    return Evaluation(
        train=train_set.source,
        real=test_set.source,
        split=split,
        test_images=len(test_set),
        train_images=len(train_set),
        synthetic=synthetic,
        real_train=real_train,
        real_trained=real_score,
        settings=settings.to_dict(),
        seconds={k: round(v, 1) for k, v in timings.items()},
    )


def train_set_named(train: LabelledSet, test: LabelledSet) -> LabelledSet:
    """An empty set carrying the aligned class names (REAL's ids), to align REAL's
    training split the same way as its test split."""
    return LabelledSet([], [], test.class_names, train.source)
