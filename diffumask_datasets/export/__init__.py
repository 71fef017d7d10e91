"""Exports of a generated store into layouts that training toolkits already read.

`export_store(store, "voc" | "coco" | "hf", dest)` is the one entry point; each format
module also has a pure function over an iterable of records (`export_voc`, `export_coco`,
`export_hf`) so the formats can be used and tested without a store on disk.

Every export is written into a hidden staging folder next to `dest` and renamed into
place only when complete, so an interrupted export never leaves a folder that looks
finished, and `--overwrite` replaces the old export only after the new one is whole.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import DiffuMaskError
from .common import (
    DEFAULT_VAL_FRACTION,
    EXPORT_FORMATS,
    SPLITS,
    ExportOptions,
    ExportRun,
    ExportSummary,
    RecordLike,
    assign_splits,
    check_class_names,
    check_destination,
    check_mask,
    check_val_fraction,
    checked_records,
    export_run,
    progress_bar,
    sample_name,
    split_names,
    staged_destination,
)


def export_store(
    store: Any,
    format: str,
    dest: str | os.PathLike,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    overwrite: bool = False,
    progress: bool = True,
    **options: Any,
) -> ExportSummary:
    """Export a store (an opened `Store` or its path) as `format` into `dest`.

    Options by format: hf takes `layout` ("parquet" or "disk") and `push_to_hub`
    (a repo id; needs network and a Hugging Face token).
    """
    if format not in EXPORT_FORMATS:
        raise DiffuMaskError(
            f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}"
        )
    check_val_fraction(val_fraction)
    if isinstance(store, (str, os.PathLike)):
        from ..store import open_store

        store = open_store(store)
    # Fail on a bad destination before reading a single record.
    check_destination(Path(dest), overwrite, Path(store.path))
    common = dict(
        val_fraction=val_fraction,
        overwrite=overwrite,
        total=len(store),
        progress=progress,
        source=Path(store.path),
    )
    if format == "voc":
        from .voc import export_voc

        return export_voc(store.records(), store.class_names, dest, **common, **options)
    if format == "coco":
        from .coco import export_coco

        return export_coco(store.records(), store.class_names, dest, **common, **options)
    from .hf import export_hf

    return export_hf(store.records(), store.class_names, dest, store=store, **common, **options)


__all__ = [
    "DEFAULT_VAL_FRACTION",
    "EXPORT_FORMATS",
    "SPLITS",
    "ExportOptions",
    "ExportRun",
    "ExportSummary",
    "RecordLike",
    "assign_splits",
    "check_class_names",
    "check_destination",
    "check_mask",
    "check_val_fraction",
    "checked_records",
    "export_run",
    "export_store",
    "progress_bar",
    "sample_name",
    "split_names",
    "staged_destination",
]
