"""The Hugging Face Datasets builder: `load_dataset("diffumask-voc", ...)`.

    from datasets import load_dataset
    ds = load_dataset("diffumask-voc", model="builtin:tiny-random", classes=["bird", "dog"],
                      images_per_class=2, num_inference_steps=3, resolution=64, seed=0,
                      split="train")

One builder serves every definition: `diffumask-voc`, `diffumask-cityscapes`,
`diffumask-shapes`, and `diffumask` with `data_files="my_dataset.yaml"`. The names are
registered when `datasets` is imported (see _diffumask_datasets_hook.py), so no import of
this package is needed. Generation runs into a resumable shard store inside the datasets cache
(`<cache>/diffumask_stores/<definition>-<fingerprint>`), which is then read into Arrow:
an interrupted `load_dataset` resumes where it stopped, and a second `load_dataset` with
another cache_dir but the same settings gives the same samples. With streaming=True the
samples are yielded batch by batch as they are generated (and still stored). num_proc
splits the shards between processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

import _diffumask_datasets_hook as _hook
from diffumask_datasets.build import check_model_available, prepare
from diffumask_datasets.cards import CITATION, PAPER, model_license, render_card
from diffumask_datasets.config import GenerationConfig
from diffumask_datasets.definitions import Definition, definition_path, load_definition
from diffumask_datasets.errors import DiffuMaskError
from diffumask_datasets.shards import iter_store, plan_for
from diffumask_datasets.store import Store, record_to_row, store_features

STORES_FOLDER = "diffumask_stores"
HOMEPAGE = PAPER
BUILDER_MODULE = _hook.BUILDER_MODULE


def dataset_module(name: str, data_dir: str | None, data_files: Any, download_config: Any):
    """The DatasetModule for one of our names (called by the patched packaged factory).

    A built-in definition takes no data files; `diffumask` takes exactly one definition
    file. Nothing else in the working directory is ever looked at.
    """
    from datasets.data_files import DataFilesDict, sanitize_patterns
    from datasets.load import DatasetModule

    builtin = _hook.NAMES[name]
    if builtin is not None:
        if data_files is not None or data_dir is not None:
            raise DiffuMaskError(
                f"{name!r} generates its own data and takes no data_files or data_dir; for "
                "your own definition use load_dataset('diffumask', data_files='my_dataset.yaml')"
            )
        patterns = {"train": [definition_path(builtin).resolve().as_posix()]}
        base_path = None
    else:
        if data_files is None:
            raise DiffuMaskError(
                "load_dataset('diffumask') needs your definition file: "
                "load_dataset('diffumask', data_files='my_dataset.yaml') "
                f"(docs/guide/definitions.md); the built-in ones load by name: "
                f"{', '.join(n for n in _hook.NAMES if _hook.NAMES[n])}"
            )
        patterns = sanitize_patterns(data_files)
        base_path = Path(data_dir or "").expanduser().resolve().as_posix()
    try:
        files = DataFilesDict.from_patterns(
            patterns, download_config=download_config, base_path=base_path
        )
    except FileNotFoundError as exc:
        raise DiffuMaskError(f"definition file not found for {name!r}: {exc}") from None
    found = [f for split_files in files.values() for f in split_files]
    if len(found) != 1 or not str(found[0]).endswith((".yaml", ".yml")):
        raise DiffuMaskError(
            f"{name!r} needs exactly one definition .yaml in data_files, got {found}"
        )
    digest = _registered_hash(name)
    return DatasetModule(BUILDER_MODULE, digest, {"data_files": files, "dataset_name": name})


def _registered_hash(name: str) -> str:
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    entry = _PACKAGED_DATASETS_MODULES.get(name)
    return entry[1] if entry else _hook.module_hash()


@dataclass
class DiffuMaskConfig(datasets.BuilderConfig):
    """Every field is a load_dataset keyword; None takes the definition's default."""

    model: str | None = None
    classes: list[str] | str | None = None
    images_per_class: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    resolution: int | None = None
    seed: int | None = None
    refinement: str | dict | None = None
    batch_size: int | None = None
    device: str | None = None
    dtype: str | None = None
    shard_size: int | None = None
    two_classes: float | bool | None = None
    negative_prompt: str | None = None
    attention_size: int | None = None

    def generation_config(self) -> GenerationConfig:
        classes = self.classes
        if isinstance(classes, str):
            classes = [c.strip() for c in classes.split(",") if c.strip()]
        return GenerationConfig(
            model=self.model,
            classes=list(classes) if classes is not None else None,
            images_per_class=self.images_per_class,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            resolution=self.resolution,
            seed=self.seed,
            refinement=self.refinement,
            batch_size=self.batch_size,
            device=self.device,
            dtype=self.dtype,
            shard_size=self.shard_size,
            two_classes=self.two_classes,
            negative_prompt=self.negative_prompt,
            attention_size=self.attention_size,
        )


class DiffuMaskBuilder(datasets.GeneratorBasedBuilder):
    """Synthetic segmentation data generated on demand by a diffusion model."""

    BUILDER_CONFIG_CLASS = DiffuMaskConfig
    VERSION = datasets.Version("1.0.0")
    DEFAULT_WRITER_BATCH_SIZE = 64

    # -- resolved once per builder -----------------------------------------------------
    def _definition(self) -> Definition:
        cached = getattr(self, "_diffumask_definition", None)
        if cached is None:
            files = self.config.data_files
            if not files:
                raise DiffuMaskError(
                    "no definition: load this builder by name, e.g. load_dataset('diffumask-voc') "
                    "or load_dataset('diffumask', data_files='my_dataset.yaml')"
                )
            paths = [str(f) for split_files in files.values() for f in split_files]
            cached = load_definition(paths[0])
            self._diffumask_definition = cached
        return cached

    def _generation_config(self) -> GenerationConfig:
        cached = getattr(self, "_diffumask_config", None)
        if cached is None:
            cached = self.config.generation_config().resolve(self._definition())
            self._diffumask_config = cached
        return cached

    def store_dir(self) -> Path:
        """Where this configuration's shard store lives (inside the datasets cache)."""
        definition, config = self._definition(), self._generation_config()
        root = Path(self._cache_dir_root) / STORES_FOLDER
        return root / f"{definition.name}-{config.fingerprint(definition)[:20]}"

    # -- the three builder methods ----------------------------------------------------
    def _info(self) -> datasets.DatasetInfo:
        definition, config = self._definition(), self._generation_config()
        return datasets.DatasetInfo(
            description=definition.description or definition.title,
            features=store_features(definition.class_names, config.attention_size),
            citation=CITATION,
            homepage=HOMEPAGE,
            license=model_license(config.model),
        )

    def _split_generators(self, dl_manager):
        definition, config = self._definition(), self._generation_config()
        store, _, _, _ = prepare(self.store_dir(), definition, config, resume=True)
        if not store.is_complete():
            # A clear error now, instead of one wrapped in DatasetGenerationError later.
            check_model_available(config.model)
        return [
            datasets.SplitGenerator(
                name=datasets.Split.TRAIN,
                # A list per shard: num_proc hands each process a run of shards.
                gen_kwargs={"shards": list(range(store.num_shards)), "store_dir": str(store.path)},
            )
        ]

    def _generate_examples(self, shards: list[int], store_dir: str):
        definition, config = self._definition(), self._generation_config()
        store = _open_for_generation(store_dir)
        plan = plan_for(definition, config)
        class_ids = definition.class_ids
        # Keys number this job's shards from 0, as datasets counts examples per shard.
        local = {shard: position for position, shard in enumerate(shards)}
        for record in iter_store(store, plan, definition, config, shards=shards):
            shard = record.index // store.shard_size
            row = record_to_row(record, class_ids, config.attention_size)
            yield _key(local[shard], record.index - shard * store.shard_size), row


def _open_for_generation(store_dir: str) -> Store:
    from diffumask_datasets.store import open_store

    return open_store(store_dir, allow_incomplete=True)


def _key(shard: int, index: int):
    try:
        from datasets.builder import Key

        return Key(original_shard_id=shard, item_or_batch_id=index)
    except ImportError:  # older datasets: plain keys
        return index


# Importing this module registers the names too (where the .pth hook is not installed).
_hook.register()

__all__ = ["DiffuMaskBuilder", "DiffuMaskConfig", "dataset_module", "render_card"]
