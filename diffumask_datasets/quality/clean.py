"""Noise learning: find the samples whose masks a segmenter cannot reproduce, drop them.

K-fold cross-validation (the paper's noise learning, whose code was never released): the
samples are split into K seeded folds; a segmenter trained on the other K-1 folds predicts
each held-out fold, and each sample's `consistency` is the mean IoU between its mask and
that prediction over background and the classes of its prompt (pixels its mask ignores are
left out). A mask that disagrees with what the rest of the data teaches is likely wrong.
`clean_store` keeps the top fraction by consistency, after the definition's per-class
priors (e.g. `prior: {area: [0.05, 0.5]}`) have ruled out masks of implausible size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffumask_datasets.errors import DiffuMaskError

from .metrics import IGNORE, sample_iou
from .segmenter import TrainSettings, train_segmenter


def check_keep(keep: float) -> float:
    """`keep` as a float, or a DiffuMaskError when it is outside (0, 1]."""
    if not 0.0 < keep <= 1.0:
        raise DiffuMaskError(
            f"--keep {keep} is outside (0, 1]; give the share of samples to keep, e.g. 0.7"
        )
    return float(keep)


def check_folds(folds: int, samples: int) -> int:
    """`folds`, or a DiffuMaskError when there are fewer than 2 folds or fewer samples than
    folds."""
    if folds < 2:
        raise DiffuMaskError(
            f"--folds {folds} is too few: cross-validation needs at least 2 folds, e.g. 3"
        )
    if samples < folds:
        raise DiffuMaskError(
            f"{samples} samples are too few for {folds} folds (each fold needs at least one); "
            f"use --folds {max(2, samples)} or fewer, or clean a larger dataset"
            if samples >= 2
            else f"{samples} samples are too few for {folds} folds; clean a dataset of at "
            "least 2 samples"
        )
    return folds


def fold_of(samples: int, folds: int, seed: int) -> np.ndarray:
    """Each position's fold: a seeded permutation dealt round-robin (sizes differ by 1)."""
    order = np.random.default_rng(seed).permutation(samples)
    assignment = np.empty(samples, dtype=np.int64)
    assignment[order] = np.arange(samples) % folds
    return assignment


def consistency_scores(
    images: Sequence[Any],
    masks: Sequence[np.ndarray],
    classes: Sequence[Sequence[int]],
    num_labels: int,
    folds: int = 3,
    settings: TrainSettings = TrainSettings(),
    progress: bool = True,
    known_classes: bool = False,
) -> np.ndarray:
    """Each sample's consistency (see module doc); `classes[i]` are the class ids of
    sample i's prompt. With known_classes, the held-out prediction chooses each pixel
    among background and the prompt's classes only: the prompt says which classes the
    image shows, so the segmenter's confusions with other classes (which say nothing
    about the mask) do not count against it. Off by default: on the shapes ablation it
    ranked masks no better and found fewer corrupted samples (BENCHMARKS.md)."""
    check_folds(folds, len(images))
    assignment = fold_of(len(images), folds, settings.seed)
    scores = np.full(len(images), np.nan)
    for k in range(folds):
        held = np.flatnonzero(assignment == k)
        rest = np.flatnonzero(assignment != k)
        segmenter = train_segmenter(
            [images[i] for i in rest],
            [masks[i] for i in rest],
            num_labels,
            settings,
            progress,
            f"fold {k + 1}/{folds}",
        )
        only = [[0, *classes[i]] for i in held] if known_classes else None
        predictions = segmenter.predict([images[i] for i in held], only=only)
        for i, pred in zip(held, predictions, strict=True):
            scores[i] = sample_iou(masks[i], pred, [0, *classes[i]])
    return scores


def area_fraction(mask: np.ndarray, class_id: int) -> float:
    """The share of the labelled (not ignored) pixels that show class_id."""
    mask = np.asarray(mask)
    labelled = int((mask != IGNORE).sum())
    return int((mask == class_id).sum()) / labelled if labelled else 0.0


def prior_violation(
    mask: np.ndarray, classes: Sequence[str], class_ids: Mapping[str, int], priors: Mapping
) -> str | None:
    """Why the mask breaks its classes' priors (e.g. 'circle covers 0.62 > 0.5'), or None."""
    for name in classes:
        prior = priors.get(name) or {}
        if "area" in prior:
            low, high = prior["area"]
            share = area_fraction(mask, class_ids[name])
            if not low <= share <= high:
                side = f"< {low}" if share < low else f"> {high}"
                return f"{name} covers {share:.2f} {side}"
    return None


def choose_kept(scores: np.ndarray, allowed: np.ndarray, keep: float) -> np.ndarray:
    """Positions kept: the ceil(keep * n) best by score among the allowed ones (ties by
    position), returned in position order."""
    wanted = math.ceil(keep * len(scores) - 1e-9)
    ranked = sorted(np.flatnonzero(allowed).tolist(), key=lambda i: (-scores[i], i))
    return np.array(sorted(ranked[:wanted]), dtype=np.int64)


def clean_store(
    store: Any,
    dest: str | os.PathLike,
    folds: int = 3,
    keep: float = 0.7,
    settings: TrainSettings = TrainSettings(),
    use_priors: bool = True,
    progress: bool = True,
):
    """Noise learning on a store (a Store or its path): writes the kept samples, each with
    its `consistency` in meta, as a new store at `dest`; the source is only read. The new
    manifest's `clean` entry records the settings and every sample's consistency.
    Returns (new Store, summary dict)."""
    from diffumask_datasets.export import check_destination, progress_bar, staged_destination
    from diffumask_datasets.store import open_store, write_store

    check_keep(keep)
    if isinstance(store, (str, os.PathLike)):
        store = open_store(store)
    check_folds(folds, len(store))
    check_destination(Path(dest), False, Path(store.path))
    records = list(progress_bar(store.records(), total=len(store), desc="read", enabled=progress))
    class_ids = store.definition.class_ids
    scores = consistency_scores(
        [r.image for r in records],
        [r.mask for r in records],
        [[class_ids[c] for c in r.classes] for r in records],
        max(store.class_names) + 1,
        folds,
        settings,
        progress,
    )
    priors = store.definition.priors if use_priors else {}
    violations = [prior_violation(r.mask, r.classes, class_ids, priors) for r in records]
    kept = choose_kept(scores, np.array([v is None for v in violations]), keep)
    summary = {
        "source": str(Path(store.path).resolve()),
        "folds": folds,
        "keep": keep,
        "priors": {k: dict(v) for k, v in priors.items()},
        "segmenter": settings.to_dict(),
        "samples": len(records),
        "kept": len(kept),
        "prior_rejected": sum(v is not None for v in violations),
        "consistency": {
            str(r.index): round(float(s), 4) for r, s in zip(records, scores, strict=True)
        },
    }
    manifest = {**store.manifest, "clean": summary}

    def annotated():
        for i in kept:
            record = records[i]
            record.meta = {**record.meta, "consistency": round(float(scores[i]), 4)}
            yield record

    with staged_destination(Path(dest), False, Path(store.path)) as staging:
        write_store(staging, annotated(), manifest)
    return open_store(dest), summary
