"""The prompt plan: a definition and a few numbers -> a deterministic list of prompts.

Index i of a plan is always the same prompt, classes and seed for the same inputs, which
is what makes a generated dataset resumable and shardable: any worker can make any index.

Images are laid out class by class (indices 0..n-1 show the first chosen class, n..2n-1
the second, ...). Within a class the sub-classes are used in a seeded random order, each
once before any repeats, so 50 images of "bird" name 50 different species when the
definition has that many ("Photo of a {sub-class} {class}", the paper's prompt diversity).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from diffumask_datasets.definitions import ClassDef, Definition, render
from diffumask_datasets.errors import DiffuMaskError


@dataclass(frozen=True)
class PlanItem:
    """One image of a prompt plan: its index, prompt, the ids and names of the classes the
    prompt names (main class first), and its diffusion seed."""

    index: int
    prompt: str
    class_ids: tuple[int, ...]  # the classes the prompt names, main class first
    seed: int  # the diffusion seed of this image
    class_names: tuple[str, ...]


def _sample_seed(base: int, index: int) -> int:
    # Imported here: generate.py brings torch in, and a plan is often made without it.
    from diffumask_datasets.generate import sample_seed

    return int(sample_seed(base, index))


def _rng(seed: int, *stream: int) -> np.random.Generator:
    # One independent stream per (seed, purpose, class): adding a class to the selection
    # never changes the prompts of the others.
    return np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, *stream])


def _cycled_permutation(rng: np.random.Generator, items: Sequence[str], count: int) -> list[str]:
    """`count` items: whole shuffled passes over `items`, so each appears once per pass."""
    if not items:
        return [""] * count
    out: list[str] = []
    while len(out) < count:
        out.extend(items[j] for j in rng.permutation(len(items)))
    return out[:count]


def make_plan(
    definition: Definition,
    images_per_class: int,
    classes: Iterable[str] | str | None = None,
    seed: int = 0,
    two_classes: float | bool = 0.0,
) -> list[PlanItem]:
    """The plan for `images_per_class` images of each chosen class (all when None).

    two_classes: the fraction of images whose prompt also names a second, randomly chosen
    class among the chosen ones (True means all of them).
    """
    if isinstance(images_per_class, bool) or not isinstance(images_per_class, int):
        raise DiffuMaskError(f"images_per_class must be an integer, got {images_per_class!r}")
    if images_per_class < 1:
        raise DiffuMaskError(f"images_per_class must be at least 1, got {images_per_class}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DiffuMaskError(f"seed must be a non-negative integer, got {seed!r}")
    fraction = float(two_classes)
    if not 0.0 <= fraction <= 1.0:
        raise DiffuMaskError(
            f"two_classes must be a fraction in [0, 1] or a bool, got {two_classes!r}"
        )
    chosen = definition.select(classes)
    if fraction > 0 and len(chosen) < 2:
        raise DiffuMaskError(
            f"two_classes={two_classes!r} needs at least two classes, but only "
            f"{[c.name for c in chosen]} were chosen"
        )

    plan: list[PlanItem] = []
    for cls in chosen:
        rng = _rng(seed, 1, cls.id)
        sub_classes = _cycled_permutation(rng, cls.sub_classes, images_per_class)
        templates = definition.templates_for(cls)
        others = [c for c in chosen if c.id != cls.id]
        for j in range(images_per_class):
            index = len(plan)
            template = templates[int(rng.integers(len(templates)))]
            pair = fraction > 0 and rng.random() < fraction
            if pair:
                other = others[int(rng.integers(len(others)))]
                pair_template = definition.pair_templates[
                    int(rng.integers(len(definition.pair_templates)))
                ]
                prompt = render(pair_template, cls, sub_classes[j], other)
                members: tuple[ClassDef, ...] = (cls, other)
            else:
                prompt = render(template, cls, sub_classes[j])
                members = (cls,)
            plan.append(
                PlanItem(
                    index=index,
                    prompt=prompt,
                    class_ids=tuple(c.id for c in members),
                    seed=_sample_seed(seed, index),
                    class_names=tuple(c.name for c in members),
                )
            )
    return plan
