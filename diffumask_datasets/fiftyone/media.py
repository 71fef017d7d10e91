"""The media folder FiftyOne reads: generated samples as files, written once and reused.

FiftyOne samples point at media on disk, while the store keeps samples in Parquet
shards. This module writes a store (or a Hugging Face `Dataset`, or any iterable of
records) out once as plain files:

```
MEDIA/
  diffumask.json         the index: source fingerprint, class ids, one entry per sample
  data/000000.png        images (lossless)
  labels/000000.png      masks: mode L, 0 background, 1..N class ids, 255 ignore
  attention.bin          soft attention maps: each a zlib-compressed .npy float32 array
                         (the encoding FiftyOne stores array fields in, so an import
                         hands the bytes to the database as they are); the index keeps
                         each map's offset and length
  refined/<field>/...    masks recomputed later by the FiftyOne plugin
```

`data/` + `labels/` is also FiftyOne's own `ImageSegmentationDirectory` layout, so
FiftyOne's built-in importer reads the same folder (the benchmark relies on that).

The index is written last, by rename, so a folder with an index is complete. A folder
whose index names the same source fingerprint is reused as is; nothing here imports
fiftyone.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import DiffuMaskError
from ..sample import IGNORE
from ..store import StoredRecord

INDEX_NAME = "diffumask.json"
MARKER_NAME = ".diffumask-media"  # written first: this folder is ours to fill
FORMAT = "diffumask-fiftyone-media"
VERSION = 2
IMAGES_DIR, MASKS_DIR, REFINED_DIR = "data", "labels", "refined"
ATTENTION_FILE = "attention.bin"


def class_slug(name: str) -> str:
    """A class name as a field-name fragment: `traffic light` -> `traffic_light`."""
    slug = re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()
    if not slug:
        raise DiffuMaskError(f"class name {name!r} has no letters or digits to name a field with")
    return slug


def sample_stem(index: int) -> str:
    """The file stem of a sample in the media folder: its store index, zero-padded."""
    return f"{index:06d}"


def mask_targets(class_names: Mapping[int, str]) -> dict[int, str]:
    """FiftyOne mask targets for a mask with our conventions."""
    targets = {0: "background"}
    targets.update({int(k): str(v) for k, v in sorted(class_names.items())})
    targets[IGNORE] = "ignore"
    return targets


def pixel_fractions(mask: np.ndarray, class_names: Mapping[int, str]) -> dict[str, float]:
    """Share of the image each class covers, by class name (only classes with pixels)."""
    counts = np.bincount(mask.ravel(), minlength=256)
    total = float(mask.size)
    return {
        class_names[i]: round(float(counts[i]) / total, 6)
        for i in sorted(class_names)
        if 0 < i < IGNORE and counts[i] > 0
    }


@dataclass(frozen=True)
class MediaSample:
    """One sample of the index: relative file names plus the scalar metadata."""

    index: int
    image: str
    mask: str
    attention: dict[str, list[int]]  # class name -> [offset, length] in attention.bin
    width: int
    height: int
    prompt: str
    seed: int
    model: str
    classes: list[str]
    quality: float
    mask_area: float  # share of pixels with a class (not background, not ignore)
    ignore_area: float  # share of pixels labelled 255
    class_areas: dict[str, float]  # class slug -> share of pixels
    refinement: dict[str, Any]
    extra: dict[str, Any]  # negative prompt, steps, guidance: shown as fields too

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MediaSample:
        return cls(**data)


@dataclass
class MediaIndex:
    """A complete media folder, read back."""

    root: Path
    fingerprint: str
    source: str
    name: str  # the dataset's definition name, or the source folder's name
    class_names: dict[int, str]  # id -> name (the definition's classes)
    samples: list[MediaSample]
    _attention: mmap.mmap | None = field(default=None, repr=False, compare=False)

    @property
    def class_ids(self) -> dict[str, int]:
        return {name: i for i, name in self.class_names.items()}

    @property
    def class_slugs(self) -> dict[str, str]:
        return {name: class_slug(name) for name in self.class_names.values()}

    @property
    def attention_classes(self) -> list[str]:
        """Class names with an attention map in at least one sample, in id order."""
        present = {name for s in self.samples for name in s.attention}
        return [name for name in self.class_names.values() if name in present]

    @property
    def mask_targets(self) -> dict[int, str]:
        return mask_targets(self.class_names)

    def path(self, relative: str) -> str:
        return os.path.join(self.root, relative)

    def missing_files(self) -> list[str]:
        """Files the index names that are not on disk (absolute paths)."""
        missing = []
        for sample in self.samples:
            for rel in (sample.image, sample.mask):
                if not os.path.isfile(self.path(rel)):
                    missing.append(self.path(rel))
        needed = max((o + n for s in self.samples for o, n in s.attention.values()), default=0)
        attention = self.path(ATTENTION_FILE)
        if needed and (not os.path.isfile(attention) or os.path.getsize(attention) < needed):
            missing.append(attention)
        return missing

    def attention_blob(self, offset: int, length: int) -> bytes:
        """One encoded map from attention.bin (mapped once, read in slices)."""
        if self._attention is None:
            with open(self.path(ATTENTION_FILE), "rb") as f:
                self._attention = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._attention[offset : offset + length]


def is_media_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a media folder written by diffumask (it holds the index file)."""
    return os.path.isfile(os.path.join(path, INDEX_NAME))


def read_media(root: str | os.PathLike) -> MediaIndex:
    """Read a media folder's index (errors name the folder or the file)."""
    root = Path(root).resolve()
    index_path = root / INDEX_NAME
    if not index_path.is_file():
        raise DiffuMaskError(
            f"{root} is not a DiffuMask media folder: {INDEX_NAME} is missing; give a "
            "generated dataset folder (diffumask generate ... --out DIR) or a folder "
            "written by to_fiftyone"
        )
    try:
        data = json.loads(index_path.read_text())
    except (OSError, ValueError) as error:
        raise DiffuMaskError(f"{index_path} is unreadable ({error}); delete the folder") from error
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise DiffuMaskError(
            f"{index_path} is format {data.get('format')!r} version {data.get('version')!r}; "
            f"this version reads {FORMAT!r} version {VERSION}: delete the folder to rewrite it"
        )
    try:
        return MediaIndex(
            root=root,
            fingerprint=data["fingerprint"],
            source=data["source"],
            name=data["name"],
            class_names={int(k): v for k, v in data["class_names"].items()},
            samples=[MediaSample.from_json(s) for s in data["samples"]],
        )
    except (KeyError, TypeError, ValueError) as error:
        raise DiffuMaskError(
            f"{index_path} is corrupt ({type(error).__name__}: {error}); delete the folder "
            "to have it rewritten"
        ) from error


# -- sources ------------------------------------------------------------------------


# What the media writer needs of one sample, whatever its source: a Record, with the
# sample's PNG files as stored when the source has them (written as they are, no decoding
# and re-encoding; `image` may then be None).
SourceRecord = StoredRecord


@dataclass
class Source:
    """Samples to write, with what identifies them."""

    fingerprint: str
    description: str  # shown in errors and stored in the index
    name: str
    class_names: dict[int, str]
    records: Iterable[Any]  # objects with SourceRecord's attributes
    total: int | None


def _hash(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def source_from_records(
    records: Iterable[Any],
    class_names: Mapping[int, str],
    *,
    fingerprint: str,
    name: str = "diffumask",
    description: str = "records",
    total: int | None = None,
) -> Source:
    """A Source over any iterable of records (store records or rows of a Hugging Face
    dataset), with the class names and a fingerprint that names its media folder."""
    return Source(
        fingerprint=fingerprint,
        description=description,
        name=name,
        class_names={int(k): str(v) for k, v in class_names.items()},
        records=records,
        total=total,
    )


# -- writing ------------------------------------------------------------------------


def default_media_dir(fingerprint: str, name: str) -> Path:
    """Where media go when no folder is chosen: FiftyOne's dataset folder if set, else
    ~/fiftyone, one sub-folder per source fingerprint (so a rerun finds it)."""
    base = os.environ.get("FIFTYONE_DEFAULT_DATASET_DIR") or os.path.join(
        os.path.expanduser("~"), "fiftyone"
    )
    return Path(base) / "diffumask" / f"{class_slug(name)}-{fingerprint}"


def _write_atomic(path: Path, write) -> None:
    # a half-written file never carries the final name
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def encode_map(array: np.ndarray) -> bytes:
    """A map as float32 .npy bytes, zlib-compressed: how FiftyOne stores array fields
    (`fiftyone.core.utils.serialize_numpy_array`)."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, dtype=np.float32), allow_pickle=False)
    return zlib.compress(buffer.getvalue())


def decode_map(blob: bytes) -> np.ndarray:
    """An attention map back from its stored bytes (a compressed `.npy`)."""
    return np.load(io.BytesIO(zlib.decompress(blob)), allow_pickle=False)


class _AttentionWriter:
    """Appends encoded maps to a temporary file renamed to attention.bin at the end."""

    def __init__(self, root: Path):
        self.path = root / ATTENTION_FILE
        fd, self.tmp = tempfile.mkstemp(dir=root, prefix=f".{ATTENTION_FILE}.", suffix=".tmp")
        self.file = os.fdopen(fd, "wb")
        self.offset = 0

    def add(self, array: np.ndarray) -> list[int]:
        # the store keeps maps as float16 in [0, 1]; the same values go to FiftyOne
        blob = encode_map(np.clip(np.asarray(array, dtype=np.float32), 0.0, 1.0))
        self.file.write(blob)
        start, self.offset = self.offset, self.offset + len(blob)
        return [start, len(blob)]

    def commit(self) -> None:
        self.file.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.file.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def _save_bytes(data: bytes, path: Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    _write_atomic(path, write)


def _save_png(image: Image.Image, path: Path) -> None:
    # compress_level 1: several times faster than the default, files ~10 % larger
    _write_atomic(path, lambda tmp: image.save(tmp, format="PNG", compress_level=1))


def _media_sample(
    record: Any, class_names: Mapping[int, str], root: Path, attention_out: _AttentionWriter
) -> MediaSample:
    stem = sample_stem(int(record.index))
    image_png = getattr(record, "image_png", None)
    mask_png = getattr(record, "mask_png", None)
    image = record.image if image_png is None else None
    if image_png is not None:
        with Image.open(io.BytesIO(image_png)) as header:  # reads the header only
            size, rgb_png = header.size, header.format == "PNG" and header.mode == "RGB"
        if not rgb_png:  # anything but an RGB PNG is decoded and written as one
            image, image_png = Image.open(io.BytesIO(image_png)).convert("RGB"), None
    if image is not None:
        size = image.size
    mask = np.asarray(record.mask, dtype=np.uint8)
    if mask_png is not None:
        with Image.open(io.BytesIO(mask_png)) as header:
            if header.format != "PNG" or header.mode != "L":  # ids must read back as ids
                mask_png = None
    if mask.ndim != 2:
        raise DiffuMaskError(f"sample {record.index}: mask has shape {mask.shape}, expected HxW")
    if (mask.shape[1], mask.shape[0]) != tuple(size):
        raise DiffuMaskError(
            f"sample {record.index}: mask {mask.shape[1]}x{mask.shape[0]} does not match "
            f"image {size[0]}x{size[1]}"
        )
    rel_image = f"{IMAGES_DIR}/{stem}.png"
    rel_mask = f"{MASKS_DIR}/{stem}.png"
    attention = {str(k): np.asarray(v) for k, v in (record.attention or {}).items()}
    known = set(class_names.values())
    for name in [*attention, *record.classes]:
        if name not in known:
            raise DiffuMaskError(
                f"sample {record.index} names class {name!r}, which the definition lacks "
                f"(classes: {', '.join(sorted(known))})"
            )
    if image_png is not None:
        _save_bytes(image_png, root / rel_image)
    else:
        _save_png(image.convert("RGB"), root / rel_image)
    if mask_png is not None:
        _save_bytes(mask_png, root / rel_mask)
    else:
        _save_png(Image.fromarray(mask, mode="L"), root / rel_mask)
    order = list(class_names.values())
    offsets = {
        name: attention_out.add(attention[name]) for name in sorted(attention, key=order.index)
    }
    meta = dict(record.meta or {})
    counts = np.bincount(mask.ravel(), minlength=256)
    labelled = int(counts[1:IGNORE].sum())
    fractions = pixel_fractions(mask, class_names)
    extra = {
        key: meta[key]
        for key in (
            "negative_prompt",
            "num_inference_steps",
            "guidance_scale",
            "consistency",
            "combined_score",
            "agreement",
        )
        if meta.get(key) is not None
    }
    return MediaSample(
        index=int(record.index),
        image=rel_image,
        mask=rel_mask,
        attention=offsets,
        width=int(size[0]),
        height=int(size[1]),
        prompt=str(record.prompt),
        seed=int(record.seed),
        model=str(meta.get("model", "")),
        classes=[str(c) for c in record.classes],
        quality=float(record.quality),
        mask_area=round(labelled / mask.size, 6),
        ignore_area=round(float(counts[IGNORE]) / mask.size, 6),
        class_areas={class_slug(name): value for name, value in fractions.items()},
        refinement=_jsonable(meta.get("refinement") or {}),
        extra=_jsonable(extra),
    )


def _jsonable(value: Any) -> Any:
    def default(v: Any) -> Any:
        return v.tolist() if hasattr(v, "tolist") else str(v)

    return json.loads(json.dumps(value, default=default))


def _progress(
    iterable: Iterable[Any], total: int | None, enabled: bool, what: str
) -> Iterator[Any]:
    if not enabled:
        yield from iterable
        return
    from tqdm.auto import tqdm

    yield from tqdm(iterable, total=total, desc=what, unit="sample")


def _prepare_folder(root: Path, source: Source) -> str:
    """'reuse', 'write' (empty or ours, incomplete), or an error for anything else."""
    if is_media_dir(root):
        try:
            existing = read_media(root)
        except DiffuMaskError:
            if (root / MARKER_NAME).exists():
                return "write"  # ours, but unreadable (older format, damage): rewrite
            raise
        if existing.fingerprint == source.fingerprint and not existing.missing_files():
            return "reuse"
        if existing.fingerprint != source.fingerprint:
            raise DiffuMaskError(
                f"media folder {root} holds media of another dataset ({existing.source}, "
                f"fingerprint {existing.fingerprint}); choose another media_dir or delete it"
            )
        return "write"  # same source, files lost: rewrite them
    if root.exists() and any(root.iterdir()) and not (root / MARKER_NAME).exists():
        raise DiffuMaskError(
            f"media folder {root} is not empty and was not written by diffumask; "
            "choose an empty or new folder as media_dir"
        )
    return "write"


def write_media(source: Source, media_dir: str | os.PathLike, progress: bool = True) -> MediaIndex:
    """Write `source` as a media folder, or reuse the folder if it already holds it."""
    root = Path(media_dir).resolve()
    if _prepare_folder(root, source) == "reuse":
        return read_media(root)
    for sub in (IMAGES_DIR, MASKS_DIR):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / MARKER_NAME).write_text(f"{FORMAT} {source.fingerprint}\n")
    index_path = root / INDEX_NAME
    if index_path.exists():
        index_path.unlink()  # incomplete until rewritten at the end
    attention_out = _AttentionWriter(root)
    try:
        samples = [
            _media_sample(record, source.class_names, root, attention_out)
            for record in _progress(source.records, source.total, progress, "writing media")
        ]
    except BaseException:
        attention_out.discard()
        raise
    attention_out.commit()
    samples.sort(key=lambda s: s.index)
    indices = [s.index for s in samples]
    if len(set(indices)) != len(indices):
        raise DiffuMaskError(f"{source.description} has duplicate sample indices")
    index = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": source.fingerprint,
        "source": source.description,
        "name": source.name,
        "class_names": {str(k): v for k, v in sorted(source.class_names.items())},
        "samples": [s.to_json() for s in samples],
    }
    _write_atomic(index_path, lambda tmp: Path(tmp).write_text(json.dumps(index)))
    return read_media(root)


def remove_media(media_dir: str | os.PathLike) -> None:
    """Delete a media folder this module wrote (refuses any other folder)."""
    root = Path(media_dir)
    if not (root / MARKER_NAME).exists():
        raise DiffuMaskError(f"{root} was not written by diffumask; not deleting it")
    shutil.rmtree(root)


def load_attention(index: MediaIndex, sample: MediaSample) -> dict[str, np.ndarray]:
    """A sample's attention maps, float32, by class name (in class id order)."""
    return {
        name: decode_map(index.attention_blob(offset, length))
        for name, (offset, length) in sample.attention.items()
    }
