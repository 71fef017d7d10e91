"""Hugging Face Datasets export: typed columns, a train/validation split, the dataset card.

Two layouts:

```
parquet (default, Hub-ready)              disk (Dataset.save_to_disk)
DEST/README.md        the dataset card      DEST/README.md
DEST/data/train-00000-of-00001-<digest>.parquet   DEST/dataset_dict.json
DEST/data/validation-00000-of-00001-<digest>.parquet   DEST/train/...
                                                       DEST/validation/...
```

`load_dataset("DEST")` reads the parquet layout (the card's YAML names the splits and
the Parquet schema carries the features: image and mask come back as PIL images);
`load_from_disk("DEST")` reads the disk layout. The columns are the store's: index,
image, mask (mode L: class ids, 0 background, 255 ignore), prompt, seed, classes
(ClassLabel ids whose label index equals the mask value), quality, attention (one
low-resolution map per entry of classes), meta (JSON).

`push_to_hub="user/name"` uploads the parquet layout with its card (network and a
Hugging Face token needed; not exercised by the tests, which run offline).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import DiffuMaskError
from .common import (
    ExportSummary,
    RecordLike,
    assign_splits,
    export_run,
    split_names,
)

HF_LAYOUTS = ("parquet", "disk")
HF_SPLITS = {"train": "train", "val": "validation"}
ROWS_PER_PARQUET_FILE = 2000  # a few hundred MB at 512 px: the size the Hub likes


def _attention_size(first: RecordLike, fallback: int = 8) -> int:
    maps = list(getattr(first, "attention", {}).values())
    return int(max(maps[0].shape)) if maps else fallback


def card_configs(split_files: Mapping[str, str]) -> list[dict[str, Any]]:
    """The card's `configs:` entry, which tells `load_dataset` which files are which split."""
    data_files = [{"split": split, "path": pattern} for split, pattern in split_files.items()]
    return [{"config_name": "default", "data_files": data_files}]


def with_configs(card: str, configs: list[dict[str, Any]]) -> str:
    """The card with its YAML header's `configs` set to `configs` (a header is added
    when the card has none; the card's body is kept as it is)."""
    import yaml

    header: dict[str, Any] = {}
    body = card
    if card.startswith("---\n"):
        end = card.find("\n---", 3)
        if end < 0:
            raise DiffuMaskError("the dataset card's YAML header is not closed with '---'")
        header = yaml.safe_load(card[4:end]) or {}
        body = card[end + 4 :].lstrip("\n")
    header["configs"] = configs
    dumped = yaml.safe_dump(header, sort_keys=False, allow_unicode=True)
    return f"---\n{dumped}---\n\n{body}"


def render_dataset_card(store: Any, splits: Mapping[str, int]) -> str:
    """The definition's dataset card with the store's real figures (cards.render_card)."""
    from ..cards import render_card

    return render_card(store, splits=dict(splits))


def export_hf(
    records: Iterable[RecordLike],
    class_names: Mapping[int, str],
    dest: str | os.PathLike,
    *,
    store: Any = None,
    layout: str = "parquet",
    push_to_hub: str | None = None,
    card: str | None = None,
    **options: Any,
) -> ExportSummary:
    """Write `records` as a Hugging Face dataset (train + validation) under `dest`.

    `card` overrides the dataset card (default: the store's definition card, which needs
    `store`); `options`: the fields of `ExportOptions`.
    """
    import datasets

    from ..store import record_to_row, store_features

    if layout not in HF_LAYOUTS:
        raise DiffuMaskError(f"unknown hf layout {layout!r}; choose one of {', '.join(HF_LAYOUTS)}")
    if push_to_hub and layout != "parquet":
        raise DiffuMaskError(
            "--push-to-hub uploads the parquet layout; export with --hf-layout parquet"
        )
    if card is None and store is None:
        raise DiffuMaskError("export_hf needs a store (for its dataset card) or a card text")
    was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # our own bar counts the samples
    try:
        with export_run("hf", records, class_names, dest, options) as run:
            objects, root = run.class_names, run.root
            with_background = {0: dict(class_names).get(0, "background"), **objects}
            class_ids = {name: class_id for class_id, name in objects.items()}
            first = next(run.records, None)
            if first is None:
                raise DiffuMaskError("the dataset has no samples; there is nothing to export")
            attention_size = (
                store.attention_size if store is not None else _attention_size(first[0])
            )
            features = store_features(with_background, attention_size)

            def rows():
                for record, _ in itertools.chain([first], run.records):
                    yield record_to_row(record, class_ids, attention_size)

            cache = root / ".cache"
            # An explicit fingerprint: datasets would otherwise try to hash (pickle) the
            # generator, whose closure holds the store's record iterator.
            try:
                full = datasets.Dataset.from_generator(
                    rows,
                    features=features,
                    cache_dir=str(cache),
                    keep_in_memory=False,
                    fingerprint=f"diffumask-export-{uuid.uuid4().hex}",
                )
            except datasets.exceptions.DatasetGenerationError as exc:
                # datasets wraps what the record loop refused; the refusal says the fix
                if isinstance(exc.__cause__, DiffuMaskError):
                    raise exc.__cause__ from None
                raise
            indices = [int(i) for i in full["index"]]
            split_of = assign_splits(indices, run.options.val_fraction)
            names = split_names(split_of)
            parts = {}
            for split, hf_split in HF_SPLITS.items():
                rows_of = [r for r, i in enumerate(indices) if split_of[i] == split]
                if rows_of:
                    parts[hf_split] = full.select(rows_of)
            dataset = datasets.DatasetDict(parts)
            counts = {split: len(part) for split, part in dataset.items()}
            if layout == "parquet":
                split_files = _write_parquet(dataset, root)
            else:
                dataset.save_to_disk(str(root / "dataset"))
                split_files = {}
            text = card if card is not None else render_dataset_card(store, counts)
            if split_files:
                text = with_configs(text, card_configs(split_files))
            del dataset, parts, full
            shutil.rmtree(cache, ignore_errors=True)
            if layout == "disk":
                for item in (root / "dataset").iterdir():
                    item.rename(root / item.name)
                (root / "dataset").rmdir()
            (root / "README.md").write_text(text, encoding="utf-8")
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    if push_to_hub:
        _push(Path(dest), push_to_hub, layout)
    return ExportSummary("hf", Path(dest).resolve(), names, {"layout": layout})


def _write_parquet(dataset: Any, root: Path) -> dict[str, str]:
    """Write each split as Parquet files; returns {split: glob pattern for the card}.

    The file names end in a digest of the files' contents, and so do the card's patterns:
    `datasets` keys its cache for a local folder on the folder's name and the card's
    data_files strings, not on the files, so with fixed patterns a second export into a
    folder of the same name would load the first one's cached rows.
    """
    data = root / "data"
    data.mkdir()
    written: dict[str, list[Path]] = {}
    for split, part in dataset.items():
        count = max(1, -(-len(part) // ROWS_PER_PARQUET_FILE))
        written[split] = []
        for k in range(count):
            path = data / f"{split}-{k:05d}-of-{count:05d}.parquet"
            part.shard(num_shards=count, index=k, contiguous=True).to_parquet(str(path))
            written[split].append(path)
    digest = hashlib.sha256()
    for paths in written.values():
        for path in paths:
            digest.update(path.name.encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    token = digest.hexdigest()[:12]
    for paths in written.values():
        for path in paths:
            path.rename(path.with_name(f"{path.stem}-{token}.parquet"))
    return {split: f"data/{split}-*-{token}.parquet" for split in written}


def _push(dest: Path, repo_id: str, layout: str) -> None:
    """Upload the export to the Hub (network and a token needed)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", exist_ok=True)
    api.upload_folder(folder_path=str(dest), repo_id=repo_id, repo_type="dataset")
