"""Agreement with a re-labelling: a third piece of evidence about each sample's mask.

Each sample's own image is labelled again by a diffusion model (`DiffuMask.label`: the
image noised to a fraction of the steps and denoised with the sample's prompt, its
attention captured and cut by the sample's refinement), and the sample's `agreement` is
the mean IoU between its mask and that re-labelling over background and the classes of
its prompt (pixels either marks ignore left out). A mask that went wrong after the
attention (taken from another image, shrunk, grown, a class lost or swapped) disagrees
with what the model's attention says about the image itself; an error the attention
itself makes when it generates is likely to be made again, so this score is blind to it,
as the attention's `quality` is.

Cheaper than noise learning's trainings: one image-to-image pass per sample at
`strength` 0.3 runs 30% of the steps (benchmarks/label_cost.py measured 0.28x the cost of
generating).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from diffumask_datasets.errors import DiffuMaskError

from .metrics import IGNORE, sample_iou

# What a re-labelling runs when a sample's meta does not say (a store of given masks).
RELABEL_STEPS = 20
RELABEL_GUIDANCE = 4.0


def generating_model(records: Sequence[Any]) -> str | None:
    """The one model every record's meta names (the model that generated them), or None
    (none named, or several)."""
    named = {r.meta.get("model") for r in records}
    return named.pop() if len(named) == 1 and None not in named else None


def relabelling_model(records: Sequence[Any], model: str | None) -> str:
    """`model` (given, or `generating_model`'s) as the model to re-label with; one line
    naming the fix when there is none."""
    if model is None:
        named = {r.meta.get("model") for r in records}
        shown = sorted(str(m) for m in named)
        raise DiffuMaskError(
            f"the samples name {len(named)} generating models ({', '.join(shown)}), so the "
            "model to re-label with is not known; pass one, e.g. --relabel-model builtin:shapes"
        )
    return model


def relabelled_masks(
    dm,
    records: Sequence[Any],
    class_ids: Mapping[str, int],
    refinement: Any = None,
    strength: float = 0.3,
    batch_size: int = 8,
    progress: bool = True,
) -> list[np.ndarray]:
    """Each record's image labelled again by `dm` (a DiffuMask) with the record's prompt,
    classes, seed, steps, guidance and refinement as its meta records them (where it
    records none: RELABEL_STEPS, RELABEL_GUIDANCE and `refinement`, e.g. the store's
    definition's; steps raised where `strength` of them would run none). Records are
    grouped by those settings, so a store made by one command runs in batches."""
    from tqdm.auto import tqdm

    def settings(record) -> tuple[tuple, Mapping | None]:
        """(the grouping key, the recorded refinement parameters)."""
        meta = record.meta
        recorded = meta.get("refinement")
        params = recorded.get("params") if isinstance(recorded, Mapping) else None
        steps = int(meta.get("num_inference_steps") or RELABEL_STEPS)
        key = (
            # at least one denoising step at this strength (a store made in 2 steps)
            max(steps, math.ceil(1 / strength)),
            float(meta.get("guidance_scale") or RELABEL_GUIDANCE),
            repr(sorted(params.items())) if params else None,
        )
        return key, params

    groups: dict[tuple, tuple[Mapping | None, list[int]]] = {}
    for i, record in enumerate(records):
        key, params = settings(record)
        groups.setdefault(key, (params, []))[1].append(i)
    masks: list[np.ndarray | None] = [None] * len(records)
    bar = tqdm(total=len(records), desc="re-label", unit="img", disable=not progress)
    for (steps, guidance, _), (params, members) in groups.items():
        for start in range(0, len(members), batch_size):
            batch = [records[i] for i in members[start : start + batch_size]]
            samples = dm.label(
                [r.image for r in batch],
                classes=[list(r.classes) for r in batch],
                prompts=[r.prompt for r in batch],
                seed=[r.seed for r in batch],
                strength=strength,
                # random noise, not inversion: inverting a generated image walks back to
                # (nearly) its own trajectory, so the re-labelling would repeat the mask,
                # bad or good; a fresh draw is a second opinion
                start="noise",
                num_inference_steps=steps,
                guidance_scale=guidance,
                class_ids=class_ids,
                refinement=params or refinement,
                batch_size=batch_size,
            )
            for i, sample in zip(members[start : start + batch_size], samples, strict=True):
                masks[i] = sample.mask
            bar.update(len(batch))
    bar.close()
    return masks  # type: ignore[return-value]


def agreement_of(
    masks: Sequence[np.ndarray],
    relabelled: Sequence[np.ndarray],
    classes: Sequence[Sequence[int]],
) -> np.ndarray:
    """Each sample's mean IoU between its mask and its re-labelling over background and its
    classes; pixels the re-labelling leaves uncertain (255) are left out too."""
    scores = []
    for mask, other, ids in zip(masks, relabelled, classes, strict=True):
        mask = np.where(np.asarray(other) == IGNORE, IGNORE, np.asarray(mask))
        scores.append(sample_iou(mask, other, [0, *ids]))
    return np.array(scores)
