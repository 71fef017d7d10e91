"""What the three export formats share: the split, sample names, checks, the staged
destination, the progress bar, and the one checked loop over a store's records."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ..errors import DiffuMaskError

EXPORT_FORMATS = ("voc", "coco", "hf")
SPLITS = ("train", "val")
DEFAULT_VAL_FRACTION = 0.1


class RecordLike(Protocol):
    """What an exporter reads from a stored sample (`diffumask_datasets.store.Record`)."""

    index: int
    image: Image.Image
    mask: np.ndarray
    prompt: str
    seed: int
    classes: list[str]
    quality: float


@dataclass
class ExportSummary:
    """What an export wrote, for the CLI to print and for tests to check."""

    format: str
    dest: Path
    splits: dict[str, list[str]]  # split -> sample names, in index order
    details: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        counts = ", ".join(f"{split} {len(names)}" for split, names in self.splits.items())
        extra = "".join(f", {key} {value}" for key, value in self.details.items())
        return f"{self.format} export in {self.dest}: {counts}{extra}"


def sample_name(index: int) -> str:
    """The file stem of a sample in every export: its store index, zero padded."""
    return f"{index:06d}"


def _split_rank(index: int) -> bytes:
    # A hash of the index alone, so a sample's rank never depends on the other samples,
    # the batch size or the order in which the store yields records.
    return hashlib.blake2b(str(index).encode(), digest_size=8, person=b"diffumask-val").digest()


def check_val_fraction(val_fraction: float) -> float:
    """`val_fraction` as a float, or a DiffuMaskError when it is outside [0, 1)."""
    if not 0.0 <= val_fraction < 1.0:
        raise DiffuMaskError(
            f"--val-fraction {val_fraction} is outside [0, 1); give the share of samples "
            "for the val split, e.g. 0.1"
        )
    return float(val_fraction)


def assign_splits(indices: Sequence[int], val_fraction: float) -> dict[int, str]:
    """Deterministic train/val split: the `round(n * val_fraction)` samples whose index
    hashes lowest go to val (at least one when the fraction is positive and n >= 2, never
    all of them). The same indices and fraction always give the same split."""
    check_val_fraction(val_fraction)
    n = len(indices)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    ranked = sorted(indices, key=lambda i: (_split_rank(i), i))
    val = set(ranked[:n_val])
    return {i: ("val" if i in val else "train") for i in indices}


def split_names(split_of: Mapping[int, str]) -> dict[str, list[str]]:
    """The sample names of each split (train, val), in index order, from a map of sample
    index to split."""
    return {
        split: [sample_name(i) for i in sorted(split_of) if split_of[i] == split]
        for split in SPLITS
    }


def check_class_names(class_names: Mapping[int, str]) -> dict[int, str]:
    """The object classes {id: name}, sorted by id; background (0) is dropped when given.
    Class ids must fit a uint8 mask next to background 0 and ignore 255."""
    checked = {}
    for class_id, name in class_names.items():
        class_id = int(class_id)
        if class_id == 0:
            continue
        if not 1 <= class_id <= 254:
            raise DiffuMaskError(
                f"class id {class_id} ({name!r}) does not fit a uint8 mask; "
                "class ids must lie in 1..254"
            )
        checked[class_id] = str(name)
    return dict(sorted(checked.items()))


def check_mask(record: RecordLike, class_names: Mapping[int, str]) -> np.ndarray:
    """The record's mask as uint8 HxW at the image size, with only known ids."""
    mask = np.asarray(record.mask)
    width, height = record.image.size
    if mask.dtype != np.uint8 or mask.shape != (height, width):
        raise DiffuMaskError(
            f"sample {record.index}: mask {mask.dtype} {mask.shape} does not match its "
            f"{width}x{height} image; the store is corrupt, regenerate it"
        )
    unknown = sorted(set(np.unique(mask).tolist()) - set(class_names) - {0, 255})
    if unknown:
        raise DiffuMaskError(
            f"sample {record.index}: mask holds class ids {unknown} that the definition "
            f"does not name (known: {sorted(class_names)}); the store is corrupt"
        )
    return mask


def progress_bar(iterable: Iterable[Any], *, total: int | None, desc: str, enabled: bool):
    """A tqdm bar with count, rate and ETA on stderr; a plain iterator when disabled."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", dynamic_ncols=True)


def _is_within(path: Path, parent: Path) -> bool:
    try:
        path.relative_to(parent)
        return True
    except ValueError:
        return False


def check_destination(dest: Path, overwrite: bool, source: Path | None = None) -> Path:
    """Refuse a destination that would lose data: a file, a non-empty folder without
    `overwrite`, or a folder that holds (or is inside) the store being exported."""
    dest = Path(dest).expanduser().resolve()
    if source is not None:
        source = Path(source).expanduser().resolve()
        if _is_within(source, dest) or _is_within(dest, source):
            raise DiffuMaskError(
                f"export destination {dest} overlaps the store {source}; "
                "choose a folder outside the store"
            )
    if dest.exists() and not dest.is_dir():
        raise DiffuMaskError(f"export destination {dest} is a file; choose a folder")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise DiffuMaskError(
            f"export destination {dest} is not empty; choose an empty folder "
            "or pass --overwrite to replace it"
        )
    return dest


@contextmanager
def staged_destination(dest: Path, overwrite: bool, source: Path | None = None) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `dest` in one rename."""
    dest = check_destination(dest, overwrite, source)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        dest.rename(old)
    staging.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def checked_records(
    records: Iterable[RecordLike],
    class_names: Mapping[int, str],
    *,
    total: int | None = None,
    progress: bool = False,
    desc: str = "export",
) -> Iterator[tuple[RecordLike, np.ndarray]]:
    """Each record with its checked mask (`check_mask`), behind a progress bar; a sample
    index seen twice is refused, so no export writes one file over another."""
    seen: set[int] = set()
    for record in progress_bar(records, total=total, desc=desc, enabled=progress):
        mask = check_mask(record, class_names)
        if record.index in seen:
            raise DiffuMaskError(
                f"sample {record.index} appears twice in the records; give each sample once"
            )
        seen.add(record.index)
        yield record, mask


@dataclass(frozen=True)
class ExportOptions:
    """The keyword options every format takes (export_voc, export_coco, export_hf)."""

    val_fraction: float = DEFAULT_VAL_FRACTION  # share of the samples in the val split
    overwrite: bool = False  # replace a destination that is not empty
    total: int | None = None  # how many records there are, for the progress bar
    progress: bool = False  # a progress bar on stderr
    source: Path | None = None  # the store exported: a destination inside it is refused


@dataclass
class ExportRun:
    """One export under way: its options, its checked class names, the staging folder it
    writes into (renamed to the destination when the run ends well), and its records
    through the one checked loop."""

    options: ExportOptions
    class_names: dict[int, str]
    root: Path
    records: Iterator[tuple[RecordLike, np.ndarray]]


@contextmanager
def export_run(
    fmt: str,
    records: Iterable[RecordLike],
    class_names: Mapping[int, str],
    dest: str | os.PathLike,
    options: Mapping[str, Any],
) -> Iterator[ExportRun]:
    """The frame of every format: options and class names checked, a staging folder that
    replaces `dest` only when the format's writing ends without an error."""
    settings = ExportOptions(**options)
    check_val_fraction(settings.val_fraction)
    names = check_class_names(class_names)
    with staged_destination(Path(dest), settings.overwrite, settings.source) as root:
        checked = checked_records(
            records, names, total=settings.total, progress=settings.progress, desc=f"export {fmt}"
        )
        yield ExportRun(settings, names, root, checked)
