"""Mask quality you can act on: the synthetic-to-real protocol, noise learning, splicing.

    from diffumask_datasets.quality import evaluate, clean_store, splice_store
    evaluate("out/shapes", "out/shapes-real", split="val", real_train="train")
    clean_store("out/shapes", "out/shapes-clean", folds=3, keep=0.7)
    splice_store("out/shapes", "out/shapes-spliced", grid=(2, 2), count=200)

One segmenter trainer (segmenter.py) serves all three; data.py reads stores and VOC
folders; metrics.py holds the IoU arithmetic; agreement.py scores a mask against a
re-labelling of its own image (clean's second signal); corruptions.py makes masks bad on
purpose (the kinds clean is measured against, benchmarks/noise.py).
"""

from __future__ import annotations

from . import corruptions
from .agreement import agreement_of, relabelled_masks
from .clean import CLEAN_SETTINGS, clean_store, combine_scores, consistency_scores
from .data import LabelledSet, load_training, load_voc
from .evaluate import Evaluation, evaluate
from .segmenter import Segmenter, TrainSettings, train_segmenter
from .splice import mosaic, splice_store

__all__ = [
    "CLEAN_SETTINGS",
    "Evaluation",
    "LabelledSet",
    "Segmenter",
    "TrainSettings",
    "agreement_of",
    "clean_store",
    "combine_scores",
    "consistency_scores",
    "corruptions",
    "evaluate",
    "load_training",
    "load_voc",
    "mosaic",
    "relabelled_masks",
    "splice_store",
    "train_segmenter",
]
