"""Noise learning: find the samples whose masks a segmenter cannot reproduce, drop them.

K-fold cross-validation (the paper's noise learning, whose code was never released): the
samples are split into K seeded folds; a segmenter trained on the other K-1 folds predicts
each held-out fold, and each sample's `consistency` is the mean IoU between its mask and
that prediction over background and the classes of its prompt (pixels its mask ignores are
left out). A mask that disagrees with what the rest of the data teaches is likely wrong.
`clean_store` keeps the top fraction by its ranking score, after ruling out masks that show
no object and those the definition's per-class priors (e.g. `prior: {area: [0.05, 0.5]}`)
find of implausible size.

Scores a cleaned sample carries: `consistency` (above), the attention's own `quality`
(from generation; blind to a mask that went wrong after the attention, e.g. one swapped or
taken from another image), its `agreement` with a re-labelling of its own image by the
model that made it (quality/agreement.py; where that model is known), and
`combined_score` (`combine_scores`): the rank average of consistency and agreement, or,
without a re-labelling, of consistency and quality. By default clean re-labels when the
samples name their model and ranks by the combined score: on the noise benchmark
(benchmarks/noise.py, BENCHMARKS.md) consistency and agreement together found more of
every kind of bad mask than either alone, except masks from another image and swapped
classes, which agreement alone found as well or better.
Which to trust is measured by benchmarks/noise.py against masks made bad on purpose
(quality/corruptions.py).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffumask_datasets.errors import DiffuMaskError

from .agreement import agreement_of, generating_model, relabelled_masks, relabelling_model
from .metrics import IGNORE, sample_iou
from .segmenter import FCN, TrainSettings, train_segmenter


def check_keep(keep: float) -> float:
    """`keep` as a float, or a DiffuMaskError when it is outside (0, 1]."""
    if not 0.0 < keep <= 1.0:
        raise DiffuMaskError(
            f"--keep {keep} is outside (0, 1]; give the share of samples to keep, e.g. 0.7"
        )
    return float(keep)


RANK_BY = ("consistency", "combined", "agreement")


def check_rank_by(rank_by: str | None, relabel: bool = False) -> str | None:
    """rank_by if clean can rank by it (None: its default; consistency, combined, or with
    relabel agreement); else a one-line error."""
    if rank_by is None:
        return None
    if rank_by not in RANK_BY:
        raise DiffuMaskError(
            f"--rank-by {rank_by!r} is not a score clean ranks by; use consistency (the "
            "default), combined or agreement"
        )
    if rank_by == "agreement" and not relabel:
        raise DiffuMaskError(
            "--rank-by agreement needs the re-labelling that makes that score; add --relabel"
        )
    return rank_by


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


# What `clean` trains unless told otherwise, chosen on the noise benchmark
# (benchmarks/noise.py, BENCHMARKS.md): the small FCN learns the data in a CPU budget where
# the from-scratch SegFormer does not, so its disagreement with a mask speaks of the mask;
# at 64 px it found clearly more partial and bleeding masks than at 32 px, for about three
# times the compute (minutes for 256 samples on a 2-core CPU).
CLEAN_SETTINGS = TrainSettings(segmenter=FCN, steps=600, size=64, learning_rate=3e-3)

# the folder of a cleaned store that holds the held-out predictions (held_out_path)
HELD_OUT_DIR = "held_out"


def held_out_predictions(
    images: Sequence[Any],
    masks: Sequence[np.ndarray],
    classes: Sequence[Sequence[int]],
    num_labels: int,
    folds: int = 3,
    settings: TrainSettings = CLEAN_SETTINGS,
    progress: bool = True,
    known_classes: bool = False,
    teaches: Sequence[bool] | None = None,
) -> list[np.ndarray]:
    """Each sample's mask as predicted by a segmenter trained on the other folds (see
    consistency_scores); with progress, one bar over all K trainings and, once the first
    steps are timed, a line with the estimated time of the whole run. With `teaches`, the
    segmenters learn only from the samples it marks (every sample is still predicted);
    a fold whose others include none learns from them all."""
    check_folds(folds, len(images))
    assignment = fold_of(len(images), folds, settings.seed)
    teaches = np.ones(len(images), bool) if teaches is None else np.asarray(teaches, bool)
    on_step = None
    if progress:
        on_step = RunClock(folds * settings.steps, describe(settings, folds))
    predictions: list[np.ndarray | None] = [None] * len(images)
    for k in range(folds):
        held = np.flatnonzero(assignment == k)
        rest = np.flatnonzero((assignment != k) & teaches)
        if not len(rest):
            rest = np.flatnonzero(assignment != k)
        segmenter = train_segmenter(
            [images[i] for i in rest],
            [masks[i] for i in rest],
            num_labels,
            settings,
            progress=False,
            on_step=on_step,
        )
        only = [[0, *classes[i]] for i in held] if known_classes else None
        for i, pred in zip(
            held, segmenter.predict([images[i] for i in held], only=only), strict=True
        ):
            predictions[i] = pred
    if on_step is not None:
        on_step.close()
    return predictions  # type: ignore[return-value]


def consistency_scores(
    images: Sequence[Any],
    masks: Sequence[np.ndarray],
    classes: Sequence[Sequence[int]],
    num_labels: int,
    folds: int = 3,
    settings: TrainSettings = CLEAN_SETTINGS,
    progress: bool = True,
    known_classes: bool = False,
) -> np.ndarray:
    """Each sample's consistency (see module doc); `classes[i]` are the class ids of
    sample i's prompt. With known_classes, the held-out prediction chooses each pixel
    among background and the prompt's classes only: the prompt says which classes the
    image shows, so the segmenter's confusions with other classes (which say nothing
    about the mask) do not count against it. Off by default: on the shapes ablation it
    ranked masks no better and found fewer corrupted samples (BENCHMARKS.md)."""
    predictions = held_out_predictions(
        images, masks, classes, num_labels, folds, settings, progress, known_classes
    )
    return consistency_of(masks, predictions, classes)


def consistency_of(
    masks: Sequence[np.ndarray],
    predictions: Sequence[np.ndarray],
    classes: Sequence[Sequence[int]],
) -> np.ndarray:
    """Each sample's mean IoU between its mask and its held-out prediction over
    background and its classes (pixels the mask ignores left out)."""
    return np.array(
        [
            sample_iou(mask, pred, [0, *ids])
            for mask, pred, ids in zip(masks, predictions, classes, strict=True)
        ]
    )


def combine_scores(scores: Sequence[np.ndarray]) -> np.ndarray:
    """Several per-sample scores (higher better) as one: the mean of their ranks, each
    scaled to [0, 1] (0 the worst sample, 1 the best; ties share their mean rank). No
    weights to fit, and a score's scale never matters, only its order."""
    from scipy.stats import rankdata

    if not scores:
        raise DiffuMaskError("combine_scores needs at least one score")
    ranks = []
    for score in scores:
        score = np.asarray(score, dtype=np.float64)
        scale = max(len(score) - 1, 1)
        ranks.append((rankdata(np.nan_to_num(score, nan=-np.inf)) - 1) / scale)
    return np.mean(ranks, axis=0)


def describe(settings: TrainSettings, folds: int) -> str:
    """One line naming what noise learning will train: segmenter, size, steps, folds, device."""
    from .segmenter import pick_device

    name = settings.segmenter or "small SegFormer"
    size = f"{settings.size} px" if settings.size else "image size"
    return (
        f"noise learning: {folds} trainings of {name} at {size}, {settings.steps} steps "
        f"each, on {pick_device(settings.device)}"
    )


class RunClock:
    """A progress bar over every step of a run of trainings, which also prints one line
    with the estimated time of the whole run once `warmup` steps after the first `skip`
    are timed (the first steps pay for building the model and are not typical)."""

    def __init__(self, total: int, what: str, skip: int = 5, warmup: int = 20):
        import time

        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="noise learning", unit="step", dynamic_ncols=True)
        self.what, self.total, self.done = what, total, 0
        self.skip, self.report_at = min(skip, total - 1), min(skip + warmup, total)
        self.began = self.timed_from = time.monotonic()

    def __call__(self) -> None:
        import time

        self.done += 1
        self.bar.update(1)
        now = time.monotonic()
        if self.done == self.skip:
            self.timed_from = now
        if self.done == self.report_at:
            per_step = (now - self.timed_from) / max(self.done - max(self.skip, 0), 1)
            estimate = format_seconds(now - self.began + per_step * (self.total - self.done))
            self.bar.write(f"{self.what}: about {estimate}", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def format_seconds(seconds: float) -> str:
    """Seconds as a person reads an estimate: '40 s' or '3 min'."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


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


def held_out_path(store_dir: str | os.PathLike, index: int) -> Path:
    """Where a cleaned store keeps sample `index`'s held-out prediction: an id PNG (the
    mask's conventions) under `held_out/`, beside the store's own files."""
    return Path(store_dir) / HELD_OUT_DIR / f"{index:06d}.png"


def write_held_out(
    store_dir: str | os.PathLike, indices: Sequence[int], predictions: Sequence[np.ndarray]
) -> None:
    """Each sample's held-out prediction as `held_out/<index:06d>.png` (class ids)."""
    from PIL import Image

    for index, prediction in zip(indices, predictions, strict=True):
        path = held_out_path(store_dir, int(index))
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.asarray(prediction, np.uint8), mode="L").save(path, compress_level=1)


def shows_object(mask: np.ndarray) -> bool:
    """Whether a mask labels any pixel as an object (neither background nor ignored)."""
    mask = np.asarray(mask)
    return bool(((mask != 0) & (mask != IGNORE)).any())


def check_has_objects(empty: np.ndarray, source: str) -> None:
    """Refuse a dataset none of whose masks shows an object (`empty`: each mask's flag):
    nothing to learn from."""
    if empty.all():
        raise DiffuMaskError(
            f"{source!r} has no masks to clean: every mask is background or ignore; "
            "clean a dataset made by `diffumask generate` (or check its refinement)"
        )


def clean_store(
    store: Any,
    dest: str | os.PathLike,
    folds: int = 3,
    keep: float = 0.7,
    settings: TrainSettings = CLEAN_SETTINGS,
    use_priors: bool = True,
    progress: bool = True,
    rank_by: str | None = None,
    relabel: bool | None = None,
    relabel_model: str | None = None,
):
    """Noise learning on a store (a Store or its path): writes the kept samples, each with
    its `consistency` and `combined_score` in meta, as a new store at `dest`; the source is
    only read. With `relabel`, each sample's image is also labelled again by
    `relabel_model` (None: the one model the samples' meta names, the one that generated
    them) and its `agreement` with that is stored too (quality/agreement.py); relabel
    None (the default) re-labels when there is such a model or `relabel_model` is given,
    and says so when there is none. `rank_by` chooses the score that decides what is
    kept: "combined" (the default with a re-labelling: the rank average of consistency and
    agreement, `combine_scores`; without one, of consistency and the attention's quality),
    "consistency" (the default without a re-labelling) or "agreement". The new
    manifest's `clean` entry records the settings and every sample's scores; each
    kept sample's held-out prediction is saved beside the store (`held_out_path`), which
    is what FiftyOne evaluates the masks against. Returns (new Store, summary dict)."""
    from diffumask_datasets.export import check_destination, progress_bar, staged_destination
    from diffumask_datasets.store import open_store, write_store

    check_keep(keep)
    check_rank_by(rank_by, relabel is not False)
    if isinstance(store, (str, os.PathLike)):
        store = open_store(store)
    check_folds(folds, len(store))
    check_destination(Path(dest), False, Path(store.path))
    records = list(progress_bar(store.records(), total=len(store), desc="read", enabled=progress))
    masks = [r.mask for r in records]
    # An empty mask is never kept, however it ranks: its prompt asked for an object, and a
    # re-labelling that finds none "agrees" with it perfectly. Nor does it teach the
    # segmenters: where many are empty they learn to find little, and the masks that show
    # least agree best (the noise benchmark's natural rows, a model with 58 of 192 empty).
    empty = np.array([not shows_object(m) for m in masks])
    check_has_objects(empty, str(store.path))
    class_ids = store.definition.class_ids
    classes = [[class_ids[c] for c in r.classes] for r in records]
    agreement, model = None, relabel_model or generating_model(records)  # None: not known
    if relabel is None:
        relabel = model is not None
        if not relabel and progress:
            print(
                "clean: the samples name no generating model, so none re-labels them; "
                "ranking without agreement (pass --relabel-model MODEL to add it)",
                file=sys.stderr,
            )
    check_rank_by(rank_by, relabel)
    rank_by = rank_by or ("combined" if relabel else "consistency")
    if relabel:  # first: a model that cannot load fails before the trainings' minutes
        from diffumask_datasets import DiffuMask

        model = relabelling_model(records, model)
        others = relabelled_masks(
            DiffuMask(model),
            records,
            class_ids,
            refinement=store.definition.defaults.get("refinement"),
            progress=progress,
        )
        agreement = agreement_of(masks, others, classes)
    predictions = held_out_predictions(
        [r.image for r in records],
        masks,
        classes,
        max(store.class_names) + 1,
        folds,
        settings,
        progress,
        teaches=~empty,
    )
    consistency = consistency_of(masks, predictions, classes)
    second = agreement if relabel else np.array([r.quality for r in records])
    combined = combine_scores([consistency, second])
    scores = {"consistency": consistency, "combined": combined, "agreement": agreement}[rank_by]
    priors = store.definition.priors if use_priors else {}
    violations = [
        None if e else prior_violation(r.mask, r.classes, class_ids, priors)
        for r, e in zip(records, empty, strict=True)
    ]
    allowed = ~empty & np.array([v is None for v in violations])
    kept = choose_kept(scores, allowed, keep)
    summary = {
        "source": str(Path(store.path).resolve()),
        "folds": folds,
        "keep": keep,
        "priors": {k: dict(v) for k, v in priors.items()},
        "segmenter": settings.to_dict(),
        "samples": len(records),
        "kept": len(kept),
        "kept_indices": [records[i].index for i in kept],  # the source's, in the new order
        "empty_rejected": int(empty.sum()),
        "prior_rejected": sum(v is not None for v in violations),
        "rank_by": rank_by,
        "consistency": {
            str(r.index): round(float(s), 4) for r, s in zip(records, consistency, strict=True)
        },
        "combined_score": {
            str(r.index): round(float(s), 4) for r, s in zip(records, combined, strict=True)
        },
    }
    if relabel:
        summary["relabel_model"] = model
        summary["agreement"] = {
            str(r.index): round(float(s), 4) for r, s in zip(records, agreement, strict=True)
        }
    manifest = {**store.manifest, "clean": summary}

    def annotated():
        for i in kept:
            record = records[i]
            record.meta = {
                **record.meta,
                "consistency": round(float(consistency[i]), 4),
                "combined_score": round(float(combined[i]), 4),
                **({"agreement": round(float(agreement[i]), 4)} if relabel else {}),
            }
            yield record

    with staged_destination(Path(dest), False, Path(store.path)) as staging:
        write_store(staging, annotated(), manifest)
        write_held_out(staging, [records[i].index for i in kept], [predictions[i] for i in kept])
    return open_store(dest), summary
