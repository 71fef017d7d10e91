"""Keep the good samples of a dataset: a new store with the samples that pass a filter.

    from diffumask_datasets.filtering import filter_store
    kept = filter_store(open_store("out/birds"), "out/birds-good", min_quality=0.5)

The result is a dataset like any other (info, export and the FiftyOne importer read it);
its manifest's "filter" entry says where it came from and with which settings.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from diffumask_datasets.export import check_destination, progress_bar, staged_destination
from diffumask_datasets.store import Record, Store, open_store, write_store


def filter_records(
    records: Iterable[Record], min_quality: float, classes: Sequence[str] | None = None
) -> Iterator[Record]:
    """Records with quality >= min_quality and, when classes are given, prompted for at
    least one of them."""
    wanted = set(classes or ())
    for record in records:
        if float(record.quality) < min_quality:
            continue
        if wanted and not wanted.intersection(record.classes):
            continue
        yield record


def filter_store(
    store: Store,
    dest: str | Path,
    min_quality: float,
    classes: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Store:
    """Copy the samples of `store` that pass the filter into a new store at `dest`.

    A class name the definition lacks is refused (with close matches). The new store is
    written in a staging folder and renamed into place when whole, so a half-written
    result never sits at `dest`; overwrite=True replaces an existing `dest` then.
    """
    dest = Path(dest)
    if classes:
        known = set(store.class_names.values())
        unknown = [c for c in classes if c not in known]
        if unknown:
            store.definition.select(unknown)  # raises with close matches
    check_destination(dest, overwrite, Path(store.path))
    manifest: dict[str, Any] = dict(store.manifest)
    manifest["filter"] = {
        "source": str(store.path),
        "min_quality": min_quality,
        "classes": list(classes) if classes else None,
    }
    records = progress_bar(store.records(), total=len(store), desc="filter", enabled=progress)
    with staged_destination(dest, overwrite, Path(store.path)) as staging:
        write_store(staging, filter_records(records, min_quality, classes), manifest)
    return open_store(dest)
