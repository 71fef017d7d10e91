"""Segmentation scores as small pure functions over id masks (255 is ignored).

IoU per class comes from a confusion matrix summed over images (the usual protocol: a
class's intersection and union are summed before dividing); `sample_iou` is one image's
mean IoU over the classes it should show, the score noise learning ranks samples by.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

IGNORE = 255


def confusion(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> np.ndarray:
    """num_classes x num_classes counts, rows the reference, columns the prediction;
    pixels ignored in either (255) or with ids >= num_classes are left out."""
    pred = np.asarray(pred, dtype=np.int64).ravel()
    ref = np.asarray(ref, dtype=np.int64).ravel()
    valid = (ref < num_classes) & (pred < num_classes)
    flat = ref[valid] * num_classes + pred[valid]
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_per_class(matrix: np.ndarray) -> np.ndarray:
    """IoU of each class from a confusion matrix; NaN for a class absent from both."""
    inter = np.diag(matrix).astype(np.float64)
    union = matrix.sum(0) + matrix.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def mean_iou(matrix: np.ndarray, classes: Iterable[int] | None = None) -> float:
    """Mean IoU over `classes` (default: every class present in reference or prediction)."""
    ious = iou_per_class(matrix)
    if classes is not None:
        ious = ious[list(classes)]
    return float(np.nanmean(ious)) if np.isfinite(ious).any() else float("nan")


def sample_iou(mask: np.ndarray, pred: np.ndarray, classes: Iterable[int]) -> float:
    """Mean IoU between one sample's mask and a prediction over `classes` (its prompt's
    classes and background); pixels the mask ignores are left out. A class that neither
    shows scores 1 (nothing to disagree on)."""
    mask, pred = np.asarray(mask), np.asarray(pred)
    valid = mask != IGNORE
    scores = []
    for c in classes:
        a, b = (mask == c) & valid, (pred == c) & valid
        union = np.logical_or(a, b).sum()
        scores.append(np.logical_and(a, b).sum() / union if union else 1.0)
    return float(np.mean(scores)) if scores else float("nan")
