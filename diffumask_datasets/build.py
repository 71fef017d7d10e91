"""plan -> DiffuMask -> store: making a whole dataset, resumably.

    from diffumask_datasets.build import GenerationConfig, build_dataset
    store = build_dataset("out/birds", "voc", GenerationConfig(
        model="builtin:tiny-random", classes=["bird", "dog"], images_per_class=2,
        num_inference_steps=3, resolution=64))

Settings left as None take the definition's `defaults`, then the package's fallbacks.
Everything that changes a sample (model, classes, sizes, steps, guidance, seed,
refinement, dtype, the definition itself) is in the fingerprint; batch_size and device
are not (a sample never depends on its batch), so a run may resume with another batch
size or on another machine.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffumask_datasets.definitions import DEFAULT_KEYS, Definition, load_definition
from diffumask_datasets.errors import DiffuMaskError
from diffumask_datasets.overlap import overlapped
from diffumask_datasets.prompts import PlanItem, make_plan
from diffumask_datasets.store import Record, Store, create_store, make_manifest, open_store

# Used when neither the caller nor the definition sets a value.
FALLBACKS: dict[str, Any] = {
    "model": "CompVis/stable-diffusion-v1-4",
    "images_per_class": 10,
    "num_inference_steps": 50,
    "guidance_scale": 7.5,
    "resolution": 512,
    "refinement": None,  # the engine's default method
    "batch_size": 4,
    "shard_size": 64,
    "two_classes": 0.0,
    "seed": 0,
    "attention_size": None,  # resolution // 8: the size of the largest attention map
}
# Settings that never change a sample: left out of the fingerprint.
NOT_FINGERPRINTED = ("batch_size", "device")
DTYPES = (None, "float32", "float16", "bfloat16")


@dataclass
class GenerationConfig:
    model: str | None = None  # hub id, local folder or builtin:<alias>
    classes: list[str] | None = None  # class names of the definition; None: all
    images_per_class: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    resolution: int | None = None  # square images, pixels (a multiple of 8)
    seed: int | None = None  # base seed; sample i gets generate.sample_seed(seed, i)
    refinement: str | dict | None = None  # threshold | adaptive | affinity, or parameters
    batch_size: int | None = None
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # None: the engine's choice for the device
    shard_size: int | None = None  # samples per stored shard
    two_classes: float | bool | None = None  # fraction of images naming a second class
    negative_prompt: str | None = None  # None: the definition's
    attention_size: int | None = None  # side of the stored attention maps

    @classmethod
    def from_definition(cls, definition: Definition | str, **given: Any) -> GenerationConfig:
        """A config with the caller's values (None ignored) over the definition's defaults."""
        definition = load_definition(definition)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in given if k not in fields]
        if unknown:
            raise DiffuMaskError(
                f"unknown generation setting {unknown[0]!r}; settings: {', '.join(sorted(fields))}"
            )
        return cls(**{k: v for k, v in given.items() if v is not None}).resolve(definition)

    def resolve(self, definition: Definition) -> GenerationConfig:
        """Every None filled in (caller, then definition defaults, then FALLBACKS), the
        classes put in definition order, and each value checked."""
        values = dataclasses.asdict(self)
        for key, value in values.items():
            if value is None:
                if key in definition.defaults:
                    values[key] = definition.defaults[key]
                elif key in FALLBACKS:
                    values[key] = FALLBACKS[key]
        if values["negative_prompt"] is None:
            values["negative_prompt"] = definition.negative_prompt
        values["classes"] = [c.name for c in definition.select(values["classes"])]
        if self.two_classes is None and len(values["classes"]) < 2:
            # The definition's pairing default cannot apply to a single chosen class; only
            # a caller asking for pairs explicitly gets the error.
            values["two_classes"] = 0.0
        resolved = GenerationConfig(**values)
        resolved._check()
        if resolved.attention_size is None:
            resolved.attention_size = max(8, resolved.resolution // 8)
        resolved.two_classes = float(resolved.two_classes)
        return resolved

    def _check(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DiffuMaskError(f"{name}={value!r} must be a positive integer")

        for name in ("images_per_class", "num_inference_steps", "resolution", "batch_size"):
            positive(name)
        positive("shard_size")
        if self.attention_size is not None:
            positive("attention_size")
        if self.resolution % 8:
            raise DiffuMaskError(
                f"resolution={self.resolution} must be a multiple of 8 (e.g. "
                f"{max(8, round(self.resolution / 8) * 8)})"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise DiffuMaskError(f"seed={self.seed!r} must be a non-negative integer")
        if not isinstance(self.guidance_scale, (int, float)) or isinstance(
            self.guidance_scale, bool
        ):
            raise DiffuMaskError(f"guidance_scale={self.guidance_scale!r} must be a number")
        if self.dtype not in DTYPES:
            raise DiffuMaskError(f"dtype={self.dtype!r} must be one of {DTYPES[1:]} or None")
        if not isinstance(self.model, str) or not self.model:
            raise DiffuMaskError(
                f"model={self.model!r} must be a hub id, a local folder or builtin:<alias>; "
                "pass a ready pipeline to build_dataset(engine=...) instead"
            )
        if self.refinement is not None and not isinstance(self.refinement, (str, dict)):
            raise DiffuMaskError(
                f"refinement={self.refinement!r} must be a method name or a dict of parameters"
            )
        two = self.two_classes
        if not isinstance(two, (bool, int, float)) or not 0 <= float(two) <= 1:
            raise DiffuMaskError(f"two_classes={two!r} must be a bool or a fraction in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, definition: Definition) -> str:
        """A hash of the definition and of every setting that changes a sample, the
        refinement by its resolved parameters: a changed default changes the hash, so a
        dataset is never resumed with masks cut two ways."""
        from diffumask_datasets.refine import Refinement  # torch: only when a run starts

        settings = {k: v for k, v in self.to_dict().items() if k not in NOT_FINGERPRINTED}
        settings["refinement"] = Refinement.from_any(self.refinement).to_dict()
        blob = json.dumps(
            {"definition": definition.fingerprint(), "settings": settings},
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(blob.encode()).hexdigest()


assert set(DEFAULT_KEYS) <= {f.name for f in dataclasses.fields(GenerationConfig)}


def plan_for(definition: Definition, config: GenerationConfig) -> list[PlanItem]:
    return make_plan(
        definition,
        config.images_per_class,
        classes=config.classes,
        seed=config.seed,
        two_classes=config.two_classes,
    )


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
    store = create_store(out_dir, manifest, resume=resume)
    if resume:
        store.remove_stale_temporaries()
        for check in store.discard_corrupt_shards():
            warnings.warn(f"{check.describe()}; regenerating it", CorruptShardWarning, stacklevel=3)
    return store, plan, definition, config


class CorruptShardWarning(UserWarning):
    """A resumed generation found a shard that no longer matches its digest."""


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


class EngineHolder:
    """Loads the DiffuMask engine on first use only: a fully generated store needs none."""

    def __init__(self, config: GenerationConfig, engine: Any = None):
        self.config = config
        self._engine = engine

    def __call__(self) -> Any:
        if self._engine is None:
            from diffumask_datasets.generate import DiffuMask

            self._engine = DiffuMask(
                self.config.model, device=self.config.device, dtype=self.config.dtype
            )
        return self._engine


def _record(item: PlanItem, sample: Any, config: GenerationConfig) -> Record:
    sample.meta["index"] = item.index
    return Record.from_sample(item.index, sample, config.attention_size)


def _batch_jobs(
    items: Sequence[PlanItem],
    definition: Definition,
    config: GenerationConfig,
    engine: Callable[[], Any],
    complete: Callable[[PlanItem, Any], Any],
) -> Iterator[Callable[[], list[Any]]]:
    """The engine's batches (see DiffuMask.batches), each job completed per sample with
    `complete(item, sample)`, so that it runs in the background worker too."""
    synonyms = {c.name: list(c.words) for c in definition.classes}
    jobs = engine().batches(
        [item.prompt for item in items],
        classes=[list(item.class_names) for item in items],
        seed=[item.seed for item in items],
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        height=config.resolution,
        width=config.resolution,
        batch_size=config.batch_size,
        negative_prompt=config.negative_prompt,
        class_ids=definition.class_ids,
        synonyms=synonyms,
        refinement=config.refinement,
    )
    for start, job in zip(range(0, len(items), config.batch_size), jobs, strict=True):
        batch = items[start : start + config.batch_size]
        yield lambda batch=batch, job=job: [
            complete(item, sample) for item, sample in zip(batch, job(), strict=True)
        ]


def generate_records(
    items: Sequence[PlanItem],
    definition: Definition,
    config: GenerationConfig,
    engine: Callable[[], Any],
) -> Iterator[list[Record]]:
    """Generate the plan items batch by batch; yields each batch's Records when done.
    A batch's CPU part runs in a background thread while the next batch generates."""
    complete = functools.partial(_record, config=config)
    yield from overlapped(_batch_jobs(items, definition, config, engine, complete))


def shard_items(store: Store, plan: Sequence[PlanItem], shard: int) -> list[PlanItem]:
    return [plan[i] for i in store.shard_range(shard)]


def make_shard(
    store: Store,
    shard: int,
    plan: Sequence[PlanItem],
    definition: Definition,
    config: GenerationConfig,
    engine: Callable[[], Any],
) -> Iterator[Record]:
    """Generate shard `shard` and write it; yields its records as batches finish.

    The caller holds the shard's claim. The shard reaches disk only after its last record
    was yielded, so a consumer that stops early leaves no partial shard behind. Each
    batch's CPU part, encoding its rows (PNG) included, runs in a background thread
    while the next batch generates.
    """

    def complete(item: PlanItem, sample: Any) -> tuple[Record, dict]:
        record = _record(item, sample, config)
        return record, store.encode(record)

    rows = []
    items = shard_items(store, plan, shard)
    for batch in overlapped(_batch_jobs(items, definition, config, engine, complete)):
        for record, row in batch:
            rows.append(row)
            yield record
    store.write_rows(shard, rows)


def iter_store(
    store: Store,
    plan: Sequence[PlanItem],
    definition: Definition,
    config: GenerationConfig,
    shards: Iterable[int] | None = None,
    engine: Any = None,
) -> Iterator[Record]:
    """Every record of `shards` (all by default) in index order, generating the missing
    shards on the way (a shard another process is making is waited for, then read)."""
    holder = engine if isinstance(engine, EngineHolder) else EngineHolder(config, engine)
    for shard in range(store.num_shards) if shards is None else shards:
        if store.has_shard(shard):
            yield from store.shard_records(shard)
            continue
        with store.claim(shard, blocking=True):
            if store.has_shard(shard):  # made by another process while we waited
                yield from store.shard_records(shard)
            else:
                yield from make_shard(store, shard, plan, definition, config, holder)


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
