"""Where samples come from before they become media: a store, or a Hugging Face Dataset."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DiffuMaskError
from ..sample import IGNORE
from .media import Source, SourceRecord, _hash


def foreground_classes(class_names: Mapping[int, str]) -> dict[int, str]:
    """Class ids that label objects: not background (0), not ignore (255), not the
    placeholders a definition's unused ids get in the ClassLabel feature."""
    return {
        int(i): str(n)
        for i, n in class_names.items()
        if 0 < int(i) < IGNORE and not str(n).startswith("unused_")
    }


def source_from_store(store: Any) -> Source:
    """An opened `diffumask_datasets.store.Store`. Its fingerprint covers the manifest
    and the shard files, so a filtered copy or a regenerated store gets new media."""
    shards = [(Path(p).name, Path(p).stat().st_size) for p in store.data_files()]
    return Source(
        fingerprint=_hash(store.manifest, shards),
        description=str(store.path),
        name=str(store.manifest.get("name") or store.path.name),
        class_names=foreground_classes(store.class_names),
        records=store.records(),
        total=len(store),
    )


def source_from_hf(dataset: Any) -> Source:
    """A `datasets.Dataset` with the store's columns (what `load_dataset("diffumask-...")`
    returns): image, mask, prompt, seed, classes (ClassLabel ids), quality, attention
    (one map per class, in `classes` order), meta (JSON) and optionally index."""
    required = ("image", "mask", "prompt", "seed", "classes", "quality")
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        raise DiffuMaskError(
            f"the datasets.Dataset lacks column(s) {missing}; give one loaded with "
            "load_dataset('diffumask-voc', ...) or from a generated folder's Parquet shards"
        )
    names = _label_names(dataset)
    class_names = foreground_classes(dict(enumerate(names)))
    fingerprint = getattr(dataset, "_fingerprint", None) or _hash(
        str(dataset.features), len(dataset)
    )
    split = getattr(dataset, "split", None)
    label = f"{dataset.info.dataset_name or ''}{f'[{split}]' if split else ''}"
    return Source(
        fingerprint=_hash("hf", fingerprint),
        description=f"datasets.Dataset {label} ({len(dataset)} rows)",
        name=str(dataset.info.dataset_name or dataset.info.config_name or "diffumask-hf"),
        class_names=class_names,
        records=_hf_records(dataset, names),
        total=len(dataset),
    )


def _label_names(dataset: Any) -> list[str]:
    feature = dataset.features["classes"]
    inner = getattr(feature, "feature", None)
    names = getattr(inner, "names", None)
    if not names:
        raise DiffuMaskError(
            "the datasets.Dataset's 'classes' column is not a list of ClassLabel; its class "
            "names are needed for the mask targets"
        )
    return list(names)


def _hf_records(dataset: Any, names: list[str]) -> Iterator[SourceRecord]:
    for position, row in enumerate(dataset):
        classes = [names[i] if isinstance(i, int) else str(i) for i in row["classes"]]
        maps = row.get("attention")
        attention: dict[str, np.ndarray] = {}
        if maps is not None:
            stacked = [np.asarray(m, dtype=np.float32) for m in maps]
            attention = dict(zip(classes, stacked, strict=False))
        meta = row.get("meta") or {}
        if isinstance(meta, str):
            meta = json.loads(meta) if meta else {}
        yield SourceRecord(
            index=int(row.get("index", position)),
            image=row["image"].convert("RGB"),
            mask=np.asarray(row["mask"], dtype=np.uint8),
            prompt=row["prompt"],
            seed=int(row["seed"]),
            classes=classes,
            quality=float(row["quality"]),
            attention=attention,
            meta=meta,
        )
