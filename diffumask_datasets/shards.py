"""Making one shard: its plan items through the engine, batch by batch, into the store.

    from diffumask_datasets.shards import EngineHolder, make_shard, plan_for
    plan = plan_for(definition, config)
    for record in make_shard(store, 0, plan, definition, config, EngineHolder(config)):
        ...

Used by the single-process build (build.py), the Ray workers (distributed.py) and the
`load_dataset` builder (datasets_builder.py); any of them can make any shard.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from diffumask_datasets.config import GenerationConfig
from diffumask_datasets.definitions import Definition
from diffumask_datasets.overlap import overlapped
from diffumask_datasets.prompts import PlanItem, make_plan
from diffumask_datasets.store import Record, Store


def plan_for(definition: Definition, config: GenerationConfig) -> list[PlanItem]:
    """The prompt plan of `definition` under `config`: every image's index, prompt, classes
    and seed."""
    return make_plan(
        definition,
        config.images_per_class,
        classes=config.classes,
        seed=config.seed,
        two_classes=config.two_classes,
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
    """The plan items that make shard number `shard` of `store`."""
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
