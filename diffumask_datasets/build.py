"""plan -> DiffuMask -> store: making a whole dataset, resumably.

    from diffumask_datasets.build import GenerationConfig, build_dataset
    store = build_dataset("out/birds", "voc", GenerationConfig(
        model="builtin:tiny-random", classes=["bird", "dog"], images_per_class=2,
        num_inference_steps=3, resolution=64))

The settings are a `GenerationConfig` (config.py, re-exported here); each shard is made
by shards.py, in this process or on Ray workers (distributed.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from diffumask_datasets.config import FALLBACKS, GenerationConfig
from diffumask_datasets.definitions import Definition, load_definition
from diffumask_datasets.errors import DiffuMaskError
from diffumask_datasets.prompts import PlanItem
from diffumask_datasets.shards import EngineHolder, make_shard, plan_for
from diffumask_datasets.store import (
    CorruptShardWarning,
    Record,
    Store,
    make_manifest,
    open_store,
    start_run,
)

__all__ = [
    "FALLBACKS",
    "CorruptShardWarning",
    "GenerationConfig",
    "build_dataset",
    "check_model_available",
    "complete_store",
    "prepare",
]


def prepare(
    out_dir: str | Path, definition: Definition | str, config: GenerationConfig, resume: bool
) -> tuple[Store, list[PlanItem], Definition, GenerationConfig]:
    """Resolve the config, make the plan, and create (or reopen) the store for it."""
    definition = load_definition(definition)
    config = config.resolve(definition)
    plan = plan_for(definition, config)
    manifest = make_manifest(
        definition,
        config.to_dict(),
        config.fingerprint(definition),
        num_samples=len(plan),
        shard_size=config.shard_size,
        attention_size=config.attention_size,
    )
    store = start_run(out_dir, manifest, resume=resume)
    return store, plan, definition, config


def complete_store(out_dir: str | Path, fingerprint: str) -> Store | None:
    """The store at `out_dir` when it is complete and made with the settings of
    `fingerprint`, else None (then build_dataset decides: continue it, or refuse other
    settings)."""
    if not (Path(out_dir) / "manifest.json").is_file():
        return None
    try:
        store = open_store(out_dir)
    except DiffuMaskError:
        return None
    return store if store.fingerprint == fingerprint else None


def check_model_available(model: str) -> None:
    """Fail fast, before any work, on a model that cannot be loaded here: an unknown
    built-in alias, or a hub id missing from the local cache while HF_HUB_OFFLINE is set.
    (Loading itself can still fail later; this catches the common cases in a second.)"""
    from diffumask_datasets.models import BUILTINS

    if model.startswith("builtin:"):
        if model not in BUILTINS:
            raise DiffuMaskError(
                f"unknown built-in model {model!r}; the built-ins are {', '.join(BUILTINS)}"
            )
        return
    if Path(model).expanduser().is_dir():
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(
        try_to_load_from_cache(model, "model_index.json"), str
    ):
        raise DiffuMaskError(
            f"model {model!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
            "set; download it once with network access, pass a local diffusers folder, or use "
            f"a built-in model ({', '.join(BUILTINS)})"
        )


def build_dataset(
    out_dir: str | Path,
    definition: Definition | str,
    config: GenerationConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    engine: Any = None,
    workers: int | None = None,
    ray_address: str | None = None,
    gpus_per_worker: float | None = None,
) -> Store:
    """Generate the dataset `definition` x `config` into the store at `out_dir`.

    resume=True continues a store made with the same settings (complete shards are kept,
    a shard that no longer matches its digest is made again with a CorruptShardWarning)
    and refuses one made with other settings. Several processes may run this on one
    directory at once: they share the shards out through the store's locks. `engine`
    may be a ready DiffuMask (to reuse a loaded pipeline). Returns the complete store.

    workers=N or ray_address ("auto", "ray://host:10001", "host:6379") runs the shards on
    N Ray actors instead (see distributed.py): a local Ray instance when no address is
    given, else the cluster there. gpus_per_worker (fractions allowed) defaults to 1 where
    the cluster has GPUs, else 0. The store is the same, byte for byte, as this process
    would make with the workers' thread count (OMP_NUM_THREADS, 1 when unset).
    """
    distributed = workers is not None or ray_address is not None
    if distributed:
        from diffumask_datasets.distributed import check_options, require_ray

        require_ray()  # before anything is written
        check_options(workers, gpus_per_worker)
        if engine is not None:
            raise DiffuMaskError(
                "engine= cannot be sent to Ray workers (each loads config.model itself); "
                "leave engine out, or leave workers and ray_address out"
            )
    elif gpus_per_worker is not None:
        raise DiffuMaskError(
            f"gpus_per_worker={gpus_per_worker} needs workers=N or ray_address=...: it sizes "
            "Ray workers"
        )
    store, plan, definition, config = prepare(
        out_dir, definition, config or GenerationConfig(), resume
    )
    if distributed:
        from diffumask_datasets.distributed import run_on_ray

        run_on_ray(
            store,
            definition,
            config,
            workers=workers,
            address=ray_address,
            gpus_per_worker=gpus_per_worker,
            progress=progress,
        )
    else:
        _build_here(store, plan, definition, config, engine, progress)
    store.record_missing_digests()
    store = open_store(store.path)
    if not (store.path / "README.md").is_file():
        from diffumask_datasets.cards import write_card

        write_card(store)
    return store


def _build_here(
    store: Store,
    plan: Sequence[PlanItem],
    definition: Definition,
    config: GenerationConfig,
    engine: Any,
    progress: bool,
) -> None:
    """Make the missing shards in this process (see build_dataset)."""
    holder = EngineHolder(config, engine)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        done = sum(len(store.shard_range(k)) for k in store.complete_shards())
        bar = tqdm(
            total=len(store), initial=done, desc=f"generating {definition.name}", unit="image"
        )
    try:
        # First pass: every free shard. Second pass: wait for shards that other processes
        # were making (or that a dead one left unfinished) and make those still missing.
        for blocking in (False, True):
            for shard in range(store.num_shards):
                if store.has_shard(shard):
                    continue
                with store.claim(shard, blocking=blocking) as held:
                    if not held or store.has_shard(shard):
                        continue
                    for batch in _batches(
                        make_shard(store, shard, plan, definition, config, holder)
                    ):
                        if bar is not None:
                            bar.update(batch)
    finally:
        if bar is not None:
            bar.close()


def _batches(records: Iterator[Record]) -> Iterator[int]:
    for _ in records:
        yield 1
