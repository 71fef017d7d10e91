"""The shard store: where generated samples live on disk, resumably and safely.

Layout of a store directory:

    manifest.json                          definition, generation config, fingerprint, sizes
    data/train-00000-of-00012.parquet      shard 0: samples [0, shard_size)
    data/train-00001-of-00012.parquet      shard 1: samples [shard_size, 2 * shard_size) ...
    .work/                                 lock files and shards being written

Each shard is a Parquet file with the Hugging Face `datasets` features in its schema
metadata, so `load_dataset("parquet", data_dir=store)` reads it with image, mask and
attention columns typed. A shard is written under .work/ and renamed into data/ when it is
complete, so a shard in data/ is always whole. A process makes a shard only while it holds
that shard's lock (an OS file lock, released by the kernel when the process dies, so a
kill -9 leaves no stale claim); two processes filling one store split the shards between
them and never write the same file.

A store is complete when its manifest exists and every shard of it is in data/. A store
made by `write_store` gets its manifest last, so a half-written one is never mistaken for
a complete one.

    digests.json                           sha256 and size of each shard, as written

Each shard's digest is taken from the bytes its writer wrote (before the rename) and
recorded in digests.json by whoever owns the run: the writing process itself, or the
driver of a distributed run that receives (shard, digest) from its workers. A shard that
was torn or changed on disk afterwards (a network filesystem, a bad disk) no longer
matches: `verify` finds it, `open_store` refuses a shard whose size changed, and a resumed
generation remakes it. Stores written before digests existed have no digests.json; they
open as before, and their shards are checked for readability only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import os
import re
import socket
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffumask_datasets.definitions import Definition
from diffumask_datasets.errors import DiffuMaskError, one_line

MANIFEST = "manifest.json"
DIGESTS = "digests.json"
DATA_DIR = "data"
WORK_DIR = ".work"
SPLIT = "train"
FORMAT = "diffumask-store"
FORMAT_VERSION = 1
_SHARD_PATTERN = re.compile(r"^train-(\d{5})-of-(\d{5})\.parquet$")


@dataclass
class Record:
    """One stored sample, as readers see it."""

    index: int
    image: Image.Image  # RGB
    mask: np.ndarray  # uint8 HxW: 0 background, class ids, 255 ignore
    prompt: str
    seed: int
    classes: list[str]  # class names the prompt names, main class first
    quality: float
    # class name -> float32 low-resolution map in [0, 1]; empty where a source has none
    attention: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_sample(cls, index: int, sample: Any, attention_size: int) -> Record:
        """A Record from the engine's Sample, with its attention reduced to
        attention_size x attention_size (area averaging)."""
        meta = dict(sample.meta)
        classes = list(meta.get("classes") or sample.attention.keys())
        attention = {
            name: downsample(np.asarray(sample.attention[name], np.float32), attention_size)
            for name in classes
            if name in sample.attention
        }
        return cls(
            index=index,
            image=sample.image.convert("RGB"),
            mask=np.asarray(sample.mask, dtype=np.uint8),
            prompt=str(meta.get("prompt", "")),
            seed=int(meta.get("seed", 0)),
            classes=classes,
            quality=float(sample.quality),
            attention=attention,
            meta=meta,
        )


def downsample(attention: np.ndarray, size: int) -> np.ndarray:
    """A map in [0, 1] averaged over boxes down to size x size (never enlarged)."""
    height, width = attention.shape
    if height <= size and width <= size:
        return attention.astype(np.float32)
    image = Image.fromarray(attention.astype(np.float32), mode="F")
    return np.asarray(image.resize((size, size), Image.Resampling.BOX), dtype=np.float32)


# -- features and rows --------------------------------------------------------------------


def label_names(class_names: dict[int, str]) -> list[str]:
    """ClassLabel names indexed by class id; ids a definition leaves unused get a
    placeholder so that label index == mask value."""
    top = max(class_names)
    return [class_names.get(i, f"unused_{i}") for i in range(top + 1)]


def store_features(class_names: dict[int, str], attention_size: int):
    """The `datasets.Features` of a store (also the columns of the HF builder)."""
    import datasets

    return datasets.Features(
        {
            "index": datasets.Value("int64"),
            "image": datasets.Image(),
            "mask": datasets.Image(),  # mode L: class ids, 0 background, 255 ignore
            "prompt": datasets.Value("string"),
            "seed": datasets.Value("int64"),
            "classes": datasets.List(datasets.ClassLabel(names=label_names(class_names))),
            "quality": datasets.Value("float32"),
            # one map per entry of `classes`, in the same order
            "attention": datasets.Array3D(
                shape=(None, attention_size, attention_size), dtype="float16"
            ),
            "meta": datasets.Value("string"),  # JSON: model, steps, refinement chain, ...
        }
    )


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def record_to_row(record: Record, class_ids: dict[str, int], attention_size: int) -> dict:
    """A Record as a row of the store's features (images as PNG bytes)."""
    maps = []
    for name in record.classes:
        attention = record.attention.get(name)
        if attention is None:
            attention = np.zeros((attention_size, attention_size), np.float32)
        attention = downsample(np.asarray(attention, np.float32), attention_size)
        if attention.shape != (attention_size, attention_size):
            attention = np.asarray(
                Image.fromarray(attention, mode="F").resize(
                    (attention_size, attention_size), Image.Resampling.BILINEAR
                )
            )
        maps.append(np.clip(attention, 0.0, 1.0).astype(np.float16))
    stacked = np.stack(maps) if maps else np.zeros((0, attention_size, attention_size), np.float16)
    unknown = [n for n in record.classes if n not in class_ids]
    if unknown:
        raise DiffuMaskError(f"sample {record.index} names class {unknown[0]!r}, unknown here")
    return {
        "index": int(record.index),
        "image": {"bytes": _png(record.image.convert("RGB")), "path": None},
        "mask": {
            "bytes": _png(Image.fromarray(np.asarray(record.mask, np.uint8), "L")),
            "path": None,
        },
        "prompt": record.prompt,
        "seed": int(record.seed),
        "classes": [class_ids[n] for n in record.classes],
        "quality": float(record.quality),
        "attention": stacked,
        "meta": json.dumps(record.meta, default=_json_default, sort_keys=True),
    }


@dataclass
class StoredRecord(Record):
    """A Record that also carries its image and mask as PNG bytes, as a shard holds them,
    for writers that copy the files as they are; `image` is None then (`decoded()` reads
    it)."""

    image_png: bytes | None = None
    mask_png: bytes | None = None

    def decoded(self) -> Record:
        """The plain Record, its image decoded."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(Record)}
        if values["image"] is None:
            image = Image.open(io.BytesIO(self.image_png))
            image.load()
            values["image"] = image.convert("RGB")
        return Record(**values)


def _decode_mask(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.uint8)


def _stored_rows(table, id_to_name: dict[int, str]) -> Iterator[StoredRecord]:
    columns = {
        name: table.column(name).to_pylist() for name in table.column_names if name != "attention"
    }
    # Nested lists whether or not `datasets` has registered its Array3D extension type
    # with pyarrow in this process: the column reads the same either way.
    maps = table.column("attention").to_pylist()
    for row in range(table.num_rows):
        names = [id_to_name[i] for i in columns["classes"][row]]
        stacked = np.asarray(maps[row], dtype=np.float32)
        yield StoredRecord(
            index=int(columns["index"][row]),
            image=None,
            mask=_decode_mask(columns["mask"][row]["bytes"]),
            prompt=columns["prompt"][row],
            seed=int(columns["seed"][row]),
            classes=names,
            quality=float(columns["quality"][row]),
            attention={name: stacked[j] for j, name in enumerate(names)},
            meta=json.loads(columns["meta"][row]),
            image_png=columns["image"][row]["bytes"],
            mask_png=columns["mask"][row]["bytes"],
        )


# -- locks and atomic files ---------------------------------------------------------------


@contextlib.contextmanager
def file_lock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive OS lock on `path`; yields False when non-blocking and taken.

    The kernel drops the lock when the holder exits, however it exits.
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _writer_tag() -> str:
    """Unique to this process among all machines writing to a shared folder."""
    return f"{socket.gethostname()}.{os.getpid()}"


def _writer_gone(tag: str) -> bool:
    """True when the writer `_writer_tag()` named ran on this host and its process has
    ended (a zombie counts as ended); a writer on another host is never judged."""
    host, _, pid = tag.rpartition(".")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state == "Z"
    except (OSError, IndexError):
        pass
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{_writer_tag()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Digest:
    """What a shard file was when it was written."""

    sha256: str
    size: int  # bytes

    def to_dict(self) -> dict:
        return {"sha256": self.sha256, "bytes": self.size}


def file_digest(path: Path) -> Digest:
    """The sha256 and size of a file, read in 1 MB chunks."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    return Digest(sha.hexdigest(), size)


def _write_parquet_atomic(rows: list[dict], features, destination: Path, work_dir: Path) -> Digest:
    """Write rows to `destination` through a temporary file; returns the digest of the
    bytes written (taken before the rename, so it is the writer's word for them)."""
    import datasets

    work_dir.mkdir(parents=True, exist_ok=True)
    # Unique per host and process: a retried shard on another machine, or a worker Ray
    # thought dead that is still writing, never shares a temporary file with another.
    tmp = work_dir / f"{destination.name}.{_writer_tag()}.tmp"
    import pyarrow.parquet as pq

    # The table datasets builds carries its Features in the schema metadata
    # ("huggingface"), which is what lets `load_dataset("parquet")` type the columns.
    table = datasets.Dataset.from_list(rows, features=features).data.table
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        digest = file_digest(tmp)
        os.replace(tmp, destination)
    except BaseException:
        # A part-written file would only take up the space a retry needs.
        tmp.unlink(missing_ok=True)
        raise
    return digest


@dataclass(frozen=True)
class ShardCheck:
    """The state of one shard on disk."""

    shard: int
    path: Path
    problem: str | None  # None: intact
    verified: bool  # its bytes matched a recorded digest (False: none was recorded)

    @property
    def ok(self) -> bool:
        return self.problem is None

    def describe(self) -> str:
        if self.problem is None:
            how = "sha256 matches" if self.verified else "readable; no digest recorded"
            return f"shard {self.shard} ({self.path.name}): ok ({how})"
        return f"shard {self.shard} ({self.path.name}): {self.problem}"


# -- the store ------------------------------------------------------------------------------


class Store:
    """A store directory. Use `open_store` for a complete one."""

    def __init__(self, path: str | Path, manifest: dict, record_digests: bool = True):
        self.path = Path(path)
        self.manifest = manifest
        # False in a distributed worker: it returns each digest to the driver, which alone
        # writes digests.json (see distributed.py).
        self.record_digests = record_digests
        self.written: dict[int, Digest] = {}  # digests of the shards this object wrote
        self._definition: Definition | None = None
        self._features = None

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, {len(self)} samples, {self.num_shards} shards)"

    # manifest views
    @property
    def definition(self) -> Definition:
        if self._definition is None:
            self._definition = Definition.from_dict(
                self.manifest["definition"], source=str(self.path / MANIFEST)
            )
        return self._definition

    @property
    def class_names(self) -> dict[int, str]:
        """{id: name}, background (0) included."""
        return self.definition.class_names

    @property
    def config(self) -> dict:
        return self.manifest.get("config", {})

    @property
    def fingerprint(self) -> str:
        return self.manifest.get("fingerprint", "")

    @property
    def num_shards(self) -> int:
        return int(self.manifest["num_shards"])

    @property
    def shard_size(self) -> int:
        return int(self.manifest["shard_size"])

    @property
    def attention_size(self) -> int:
        return int(self.manifest["attention_size"])

    @property
    def features(self):
        if self._features is None:
            self._features = store_features(self.class_names, self.attention_size)
        return self._features

    def __len__(self) -> int:
        return int(self.manifest["num_samples"])

    # shards
    def shard_path(self, shard: int) -> Path:
        return self.path / DATA_DIR / f"{SPLIT}-{shard:05d}-of-{self.num_shards:05d}.parquet"

    def shard_range(self, shard: int) -> range:
        """The positions (row numbers across the store) shard `shard` holds."""
        start = shard * self.shard_size
        return range(start, min(start + self.shard_size, len(self)))

    def has_shard(self, shard: int) -> bool:
        return self.shard_path(shard).is_file()

    def complete_shards(self) -> list[int]:
        return [k for k in range(self.num_shards) if self.has_shard(k)]

    def is_complete(self) -> bool:
        return all(self.has_shard(k) for k in range(self.num_shards))

    def data_files(self) -> list[str]:
        """The shard files, in order (for `load_dataset("parquet", data_files=...)`)."""
        return [str(self.shard_path(k)) for k in range(self.num_shards)]

    @contextlib.contextmanager
    def claim(self, shard: int, blocking: bool = False) -> Iterator[bool]:
        """Hold the right to write shard `shard` (see module doc)."""
        with file_lock(self.path / WORK_DIR / f"shard-{shard:05d}.lock", blocking) as held:
            yield held

    def write_shard(self, shard: int, records: Sequence[Record]) -> Digest:
        """Write shard `shard` atomically and record its digest (unless this store's
        owner records them); call it while holding `claim(shard)`."""
        return self.write_rows(shard, [self.encode(r) for r in records])

    def encode(self, record: Record) -> dict:
        """A record as a row of this store (PNG encoding: most of a write's work)."""
        return record_to_row(record, self.definition.class_ids, self.attention_size)

    def write_rows(self, shard: int, rows: Sequence[dict]) -> Digest:
        """write_shard for rows already encoded (`encode`)."""
        expected = len(self.shard_range(shard))
        if len(rows) != expected:
            raise ValueError(f"shard {shard} needs {expected} records, got {len(rows)}")
        try:
            (self.path / DATA_DIR).mkdir(parents=True, exist_ok=True)
            digest = _write_parquet_atomic(
                rows, self.features, self.shard_path(shard), self.path / WORK_DIR
            )
            self.written[shard] = digest
            if self.record_digests:
                self.record_digest(shard, digest)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            kept = len(self.complete_shards())
            raise DiffuMaskError(
                f"no space left on the device while writing shard {shard} to "
                f"{self.shard_path(shard)}; free some space there, then run the same command "
                f"with --resume (or the same load_dataset call) to continue: the finished "
                f"shards ({kept} of {self.num_shards}) are kept"
            ) from exc
        return digest

    # digests
    def digests(self) -> dict[int, Digest]:
        """The recorded digest of each shard that has one."""
        path = self.path / DIGESTS
        if not path.is_file():
            return {}
        try:
            entries = json.loads(path.read_text())["shards"]
            by_name = {
                name: Digest(str(e["sha256"]), int(e["bytes"])) for name, e in entries.items()
            }
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DiffuMaskError(
                f"{str(path)!r} is corrupt ({exc}); delete it: the shards are then checked "
                "for readability only, and a resumed generation records their digests again"
            ) from None
        return {
            k: by_name[self.shard_path(k).name]
            for k in range(self.num_shards)
            if self.shard_path(k).name in by_name
        }

    def record_digest(self, shard: int, digest: Digest | None) -> None:
        """Set (or with None, forget) the digest of shard `shard` in digests.json.

        Several processes filling one store take turns through the store lock."""
        with file_lock(self.path / WORK_DIR / "store.lock"):
            digests = self.digests()
            if digest is None:
                digests.pop(shard, None)
            else:
                digests[shard] = digest
            shards = {self.shard_path(k).name: d.to_dict() for k, d in sorted(digests.items())}
            _write_json_atomic(self.path / DIGESTS, {"algorithm": "sha256", "shards": shards})

    def check_shard(self, shard: int, recorded: Digest | None = None) -> ShardCheck:
        """Check shard `shard` on disk: against its recorded digest (reading every byte)
        when there is one, else by reading its Parquet footer and row count."""
        path = self.shard_path(shard)

        def result(problem: str | None, verified: bool = False) -> ShardCheck:
            return ShardCheck(shard, path, problem, verified)

        if not path.is_file():
            return result("missing")
        if recorded is not None:
            actual = file_digest(path)
            if actual.size != recorded.size:
                return result(f"corrupt: {actual.size} bytes on disk, {recorded.size} when written")
            if actual.sha256 != recorded.sha256:
                return result("corrupt: its sha256 differs from the one recorded when written")
            return result(None, verified=True)
        return result(self._footer_problem(shard))

    def _footer_problem(self, shard: int) -> str | None:
        import pyarrow.parquet as pq

        try:
            rows = pq.read_metadata(self.shard_path(shard)).num_rows
        except Exception as exc:  # a truncated or foreign file
            return f"corrupt: unreadable as Parquet ({one_line(exc)})"
        expected = len(self.shard_range(shard))
        if rows != expected:
            return f"corrupt: it holds {rows} samples, expected {expected}"
        return None

    def verify(self, progress: bool = False) -> list[ShardCheck]:
        """Every shard checked (see check_shard), in order."""
        digests = self.digests()
        shards: Iterable[int] = range(self.num_shards)
        if progress:
            from tqdm.auto import tqdm

            shards = tqdm(shards, desc="verifying", unit="shard")
        return [self.check_shard(k, digests.get(k)) for k in shards]

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary shard files of writers on this host that died mid-write
        (kill -9, a killed Ray worker); returns them."""
        removed = []
        for tmp in (self.path / WORK_DIR).glob("*.parquet.*.tmp"):
            tag = tmp.name[: -len(".tmp")].split(".parquet.", 1)[1]
            if _writer_gone(tag):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
        return removed

    def discard_corrupt_shards(self) -> list[ShardCheck]:
        """Delete the shards whose bytes no longer match their digest (or that cannot be
        read), so that generation makes them again; returns their checks."""
        digests = self.digests()
        discarded = []
        for shard in self.complete_shards():
            check = self.check_shard(shard, digests.get(shard))
            if not check.ok:
                with self.claim(shard, blocking=True):
                    self.shard_path(shard).unlink(missing_ok=True)
                if shard in digests:
                    self.record_digest(shard, None)
                discarded.append(check)
        return discarded

    def record_missing_digests(self) -> None:
        """Record the digest of each readable shard that has none: one a distributed
        worker renamed into place after its driver stopped listening (killed, or gone
        before the worker finished)."""
        digests = self.digests()
        for shard in self.complete_shards():
            if shard not in digests and self._footer_problem(shard) is None:
                self.record_digest(shard, file_digest(self.shard_path(shard)))

    def _read_shard(self, shard: int, columns: Sequence[str] | None = None):
        import pyarrow.parquet as pq

        path = self.shard_path(shard)
        if not path.is_file():
            raise DiffuMaskError(
                f"store {str(self.path)!r} lacks shard {shard} ({path.name}); it is incomplete: "
                "resume its generation (diffumask generate ... --resume)"
            )
        return pq.read_table(path, columns=None if columns is None else list(columns))

    def shard_records(self, shard: int) -> Iterator[Record]:
        for stored in _stored_rows(self._read_shard(shard), self.class_names):
            yield stored.decoded()

    def stored_records(self) -> Iterator[StoredRecord]:
        """Every sample in order with its image and mask as stored PNG bytes (no image
        decoded): for writers that copy the files as they are."""
        for shard in range(self.num_shards):
            yield from _stored_rows(self._read_shard(shard), self.class_names)

    def masks(self) -> Iterator[tuple[np.ndarray, list[str], float]]:
        """Every sample's (mask, class names its prompt names, quality), in order; reads
        only those columns (no image, no attention decoded)."""
        names = self.class_names
        for shard in range(self.num_shards):
            table = self._read_shard(shard, ("mask", "classes", "quality"))
            for cell, classes, quality in zip(
                table.column("mask").to_pylist(),
                table.column("classes").to_pylist(),
                table.column("quality").to_pylist(),
                strict=True,
            ):
                yield _decode_mask(cell["bytes"]), [names[i] for i in classes], float(quality)

    def records(self) -> Iterator[Record]:
        """Every sample, in order."""
        for shard in range(self.num_shards):
            yield from self.shard_records(shard)


def _read_manifest(path: Path) -> dict:
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise DiffuMaskError(f"dataset directory {str(path)!r} does not exist")
    if not manifest_path.is_file():
        raise DiffuMaskError(
            f"{str(path)!r} is not a DiffuMask dataset: it has no {MANIFEST} "
            "(make one with `diffumask generate`)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DiffuMaskError(f"{str(manifest_path)!r} is corrupt ({exc}); regenerate it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DiffuMaskError(f"{str(manifest_path)!r} is not a {FORMAT} manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise DiffuMaskError(
            f"{str(path)!r} was written by a newer diffumask-datasets "
            f"(store format {manifest['format_version']}); upgrade the package to read it"
        )
    missing = [
        k for k in ("definition", "num_samples", "num_shards", "shard_size") if k not in manifest
    ]
    if missing:
        raise DiffuMaskError(f"{str(manifest_path)!r} is corrupt: it lacks {missing[0]!r}")
    return manifest


def open_store(path: str | Path, allow_incomplete: bool = False) -> Store:
    """Open a complete store (or any store with allow_incomplete=True).

    Raises DiffuMaskError naming the path when it is missing, not a store, corrupt or
    incomplete.
    """
    path = Path(path).expanduser()
    store = Store(path, _read_manifest(path))
    if allow_incomplete:
        return store
    missing = [k for k in range(store.num_shards) if not store.has_shard(k)]
    if missing:
        raise DiffuMaskError(
            f"dataset {str(path)!r} is incomplete: {len(missing)} of {store.num_shards} shards "
            f"are missing (first: {store.shard_path(missing[0]).name}). Finish it with "
            "`diffumask generate ... --resume` using the same settings"
        )
    digests = store.digests()
    for shard in range(store.num_shards):
        # Cheap checks only (size, footer); `verify` reads every byte.
        path = store.shard_path(shard)
        recorded = digests.get(shard)
        problem = store._footer_problem(shard)
        if problem is None and recorded is not None and path.stat().st_size != recorded.size:
            problem = f"corrupt: {path.stat().st_size} bytes on disk, {recorded.size} when written"
        if problem is not None:
            raise DiffuMaskError(
                f"shard {str(path)!r} is {problem}; `diffumask generate ... --resume` with the "
                "same settings remakes it (`diffumask verify` checks every shard)"
            )
    return store


def _package_version() -> str:
    from diffumask_datasets import __version__

    return __version__


def _manifest(definition, config, fingerprint, num_samples, shard_size, attention_size, extra):
    if shard_size < 1:
        raise DiffuMaskError(f"shard_size must be at least 1, got {shard_size}")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": definition.name,
        "split": SPLIT,
        "definition": definition.to_dict(),
        "config": config,
        "fingerprint": fingerprint,
        "num_samples": int(num_samples),
        "shard_size": int(shard_size),
        "num_shards": -(-int(num_samples) // int(shard_size)),
        "attention_size": int(attention_size),
        "package_version": _package_version(),
    }
    manifest.update(extra)
    return manifest


def make_manifest(
    definition: Definition,
    config: dict,
    fingerprint: str,
    num_samples: int,
    shard_size: int,
    attention_size: int,
    **extra: Any,
) -> dict:
    """A manifest for a store about to be filled (build_dataset, the HF builder)."""
    return _manifest(
        definition, config, fingerprint, num_samples, shard_size, attention_size, extra
    )


def _config_differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [
        f"{k}: {old.get(k)!r} stored, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k)
    ]


class CorruptShardWarning(UserWarning):
    """A resumed run found a shard that no longer matches its digest."""


def start_run(path: str | Path, manifest: dict, resume: bool = False) -> Store:
    """The store a run (generation or labelling) writes into: created, or on resume the
    one there with its stale temporaries removed and every shard that no longer matches
    its digest discarded, with a CorruptShardWarning, so that the run makes it again."""
    store = create_store(path, manifest, resume=resume)
    if resume:
        store.remove_stale_temporaries()
        for check in store.discard_corrupt_shards():
            warnings.warn(f"{check.describe()}; regenerating it", CorruptShardWarning, stacklevel=4)
    return store


def create_store(path: str | Path, manifest: dict, resume: bool = False) -> Store:
    """Start a store at `path`, or (resume=True) continue the one there.

    Refuses a directory that holds other files, a store made with a different definition
    or config (naming what differs), and an existing store when resume is False.
    """
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    had_work_dir = (path / WORK_DIR).exists()
    with file_lock(path / WORK_DIR / "store.lock"):
        manifest_path = path / MANIFEST
        if manifest_path.is_file():
            existing = _read_manifest(path)
            if existing.get("fingerprint") != manifest["fingerprint"]:
                what = _config_differences(existing.get("config", {}), manifest["config"])
                if existing.get("definition") != manifest["definition"]:
                    what.insert(0, "the dataset definition differs")
                raise DiffuMaskError(
                    f"{str(path)!r} holds a dataset made with different settings ("
                    + "; ".join(
                        what
                        or [
                            "the same settings resolve to other samples in this version, "
                            "e.g. a changed refinement default"
                        ]
                    )
                    + "). Use another output directory, or the stored settings to resume it"
                )
            if not resume:
                state = "complete" if Store(path, existing).is_complete() else "incomplete"
                raise DiffuMaskError(
                    f"{str(path)!r} already holds a {state} dataset with these settings; pass "
                    "resume=True (--resume) to continue it, or choose another directory"
                )
            return Store(path, existing)
        others = [p.name for p in path.iterdir() if p.name not in (WORK_DIR,)]
        if others:
            if not had_work_dir:  # leave the user's folder as it was
                (path / WORK_DIR / "store.lock").unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    (path / WORK_DIR).rmdir()
            raise DiffuMaskError(
                f"{str(path)!r} is not empty and not a DiffuMask dataset (it holds "
                f"{others[0]!r}); choose an empty or new directory"
            )
        _write_json_atomic(manifest_path, manifest)
        return Store(path, manifest)


def write_store(dest: str | Path, records: Iterable[Record], manifest: dict) -> Store:
    """Write a complete store at `dest` from `records` (e.g. a filtered copy of another).

    `manifest` is the source's manifest (or one from make_manifest); its counts are
    replaced by the real ones. Rows keep their own `index`. The manifest is written last,
    so an interrupted write never leaves a store that opens as complete.
    """
    dest = Path(dest).expanduser()
    if dest.exists() and any(dest.iterdir()):
        raise DiffuMaskError(f"{str(dest)!r} exists and is not empty; choose a new directory")
    manifest = json.loads(json.dumps(manifest, default=_json_default))
    shard_size = int(manifest.get("shard_size") or 64)
    attention_size = int(manifest["attention_size"])
    staging = Store(dest, {**manifest, "num_samples": 0, "num_shards": 0})
    features = staging.features
    class_ids = staging.definition.class_ids
    work = dest / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    parts: list[Path] = []
    part_digests: list[Digest] = []
    buffer: list[dict] = []

    def flush() -> None:
        part = work / f"part-{len(parts):05d}.parquet"
        part_digests.append(_write_parquet_atomic(buffer, features, part, work))
        parts.append(part)
        buffer.clear()

    count = 0
    for record in records:
        buffer.append(record_to_row(record, class_ids, attention_size))
        count += 1
        if len(buffer) == shard_size:
            flush()
    if buffer:
        flush()
    manifest.update(num_samples=count, num_shards=len(parts), shard_size=shard_size)
    store = Store(dest, manifest)
    (dest / DATA_DIR).mkdir(parents=True, exist_ok=True)
    for k, part in enumerate(parts):
        os.replace(part, store.shard_path(k))
    shards = {store.shard_path(k).name: d.to_dict() for k, d in enumerate(part_digests)}
    _write_json_atomic(dest / DIGESTS, {"algorithm": "sha256", "shards": shards})
    _write_json_atomic(dest / MANIFEST, manifest)
    store = open_store(dest)
    from diffumask_datasets.cards import write_card

    write_card(store)
    return store
