"""Where samples come from before they become media: a store, or a Hugging Face Dataset."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import DiffuMaskError
from ..sample import IGNORE
from .media import (
    MediaIndex,
    Source,
    SourceRecord,
    _hash,
    default_media_dir,
    is_media_dir,
    read_media,
    write_media,
)


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
        records=store.stored_records(),
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


def _encoded(value: Any) -> bytes | None:
    """An undecoded `datasets` Image value ({"bytes", "path"}) as file bytes."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path") and Path(value["path"]).is_file():
            return Path(value["path"]).read_bytes()
    return None


def _hf_records(dataset: Any, names: list[str]) -> Iterator[SourceRecord]:
    import datasets

    # undecoded images: their PNG bytes go to disk as they are
    for column in ("image", "mask"):
        if isinstance(dataset.features[column], datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
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
        image_png, mask_png = _encoded(row["image"]), _encoded(row["mask"])
        image, mask = row["image"], row["mask"]
        if image_png is not None:
            image = None
        elif not isinstance(image, Image.Image):
            raise DiffuMaskError(f"row {position}: the image column holds no image")
        if mask_png is not None:
            with Image.open(io.BytesIO(mask_png)) as decoded:
                mask = np.asarray(decoded, dtype=np.uint8)
        yield SourceRecord(
            index=int(row.get("index", position)),
            image=image.convert("RGB") if image is not None else None,
            mask=np.asarray(mask, dtype=np.uint8),
            prompt=row["prompt"],
            seed=int(row["seed"]),
            classes=classes,
            quality=float(row["quality"]),
            attention=attention,
            meta=meta,
            image_png=image_png,
            mask_png=mask_png,
        )


# -- a source written out as media -----------------------------------------------------


def _source(source: Any) -> Source:
    if _is_hf_dataset(source):
        return source_from_hf(source)
    if isinstance(source, (str, os.PathLike)):
        from ..store import open_store

        return source_from_store(open_store(source))
    if hasattr(source, "records") and hasattr(source, "manifest"):
        return source_from_store(source)
    raise DiffuMaskError(
        f"cannot load {type(source).__name__} into FiftyOne; give a generated dataset "
        "folder (diffumask generate ... --out DIR), an opened Store or a datasets.Dataset"
    )


def _is_hf_dataset(source: Any) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover
        return False
    return isinstance(source, datasets.Dataset)


def materialize(
    source: Any, media_dir: str | os.PathLike | None = None, progress: bool | None = None
) -> MediaIndex:
    """Write `source`'s samples as files FiftyOne can show (once: a folder that already
    holds this source is reused). Returns the folder's index.

    `source`: a generated dataset folder, an opened `Store`, a `datasets.Dataset`, or a
    media folder written before (returned as is). `media_dir` defaults to a folder per
    source fingerprint under FiftyOne's dataset directory (~/fiftyone).
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise DiffuMaskError(
                f"{path} does not exist; give a generated dataset folder "
                "(diffumask generate ... --out DIR)"
            )
        if is_media_dir(path):
            return read_media(path)
    src = _source(source)
    target = (
        Path(media_dir) if media_dir is not None else default_media_dir(src.fingerprint, src.name)
    )
    return write_media(src, target, progress=True if progress is None else bool(progress))
