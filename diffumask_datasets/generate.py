"""The engine: prompts in, samples (image, mask, attention, quality) out, batched.

Per batch, on the pipeline's device: generation with the capture, then the masks cut from
the attention (refine.cut_masks). On the CPU, in one background thread while the next
batch generates (overlap.overlapped): small-component cleanup, quality, the Samples.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .capture import CaptureOptions, default_affinity_factor, trace
from .errors import DiffuMaskError
from .families import family_of
from .models import load_pipeline, model_name
from .overlap import overlapped
from .refine import Cut, Refinement, check_class_ids, cut_masks, finish
from .sample import Sample


def sample_seed(base: int, index: int) -> int:
    """The seed of sample `index` of a run with base seed `base`: a hash, so that runs with
    neighbouring base seeds share no samples, and below 2**63 for torch.Generator."""
    digest = hashlib.sha256(f"diffumask:{int(base)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def best_device() -> str:
    """The device generation runs on when none is given: cuda, else mps, else cpu."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def _as_class_lists(prompts: Sequence[str], classes: Sequence[Any]) -> list[list[str]]:
    if len(classes) != len(prompts):
        raise DiffuMaskError(
            f"classes has {len(classes)} entries for {len(prompts)} prompts; give one list of "
            'class names per prompt, e.g. classes=[["bird"]] for one prompt'
        )
    lists = [[c] if isinstance(c, str) else list(c) for c in classes]
    for prompt, names in zip(prompts, lists, strict=True):
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise DiffuMaskError(f"prompt {prompt!r} needs at least one class name, got {names!r}")
    return lists


def _seeds(seed: int | Sequence[int], count: int) -> list[int]:
    if isinstance(seed, int | np.integer):
        return [sample_seed(int(seed), i) for i in range(count)]
    seeds = [int(s) for s in seed]
    if len(seeds) != count:
        raise DiffuMaskError(f"seed has {len(seeds)} values for {count} prompts; give one each")
    return seeds


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise DiffuMaskError(f"{name}={value!r} must be a positive integer")
    return int(value)


@dataclass(frozen=True)
class BatchPlan:
    """What every batch of a run shares (DiffuMask.plan_batches), checked before any
    batch runs."""

    token_indices: list[dict[str, list[int]]]  # per prompt: {class: token positions}
    class_ids: dict[str, int]
    options: CaptureOptions
    params: Refinement
    settings: dict[str, Any]  # recorded in each sample's meta


@dataclass
class BatchMaps:
    """One batch's generated images and captured attention, before refinement."""

    images: list  # PIL images
    class_maps: list[dict[str, dict[tuple[int, int], np.ndarray]]]  # per image, per class
    affinity: np.ndarray | None  # [images, Q, Q] or None
    affinity_size: tuple[int, int] | None
    prompts: list[str]
    seeds: list[int]
    token_indices: list[dict[str, list[int]]]
    class_ids: dict[str, int]
    meta: dict[str, Any]  # model and generation settings, recorded in each sample
    options: CaptureOptions  # what was captured

    def check(self, params: Refinement) -> None:
        """Refuse a refinement that reads other maps than the batch captured."""
        wanted = {
            "cross_factors": params.cross_factors,
            "steps": params.steps,
            "cross_blocks": params.cross_blocks,
            "concept_blocks": params.concept_blocks,
        }
        if params.needs_affinity:
            if self.options.affinity_factor is None:
                raise DiffuMaskError(
                    f"refinement method {params.method!r} needs the self-attention affinity, "
                    "which this batch did not capture; capture with a refinement that needs it"
                )
            wanted["affinity_steps"] = params.affinity_steps
            wanted["affinity_blocks"] = params.affinity_blocks
            if params.affinity_factor is not None:
                wanted["affinity_factor"] = params.affinity_factor
        differ = {k: v for k, v in wanted.items() if getattr(self.options, k) != v}
        if differ:
            captured = {k: getattr(self.options, k) for k in differ}
            raise DiffuMaskError(
                f"refinement capture options {differ} differ from the batch's {captured}; "
                "refine with the options it was captured with, or capture again"
            )

    def cut(self, params: Refinement, device) -> Cut:
        """The device part of refining the batch (refine.cut_masks)."""
        return cut_masks(
            self.class_maps,
            self.class_ids,
            (self.meta["height"], self.meta["width"]),
            params,
            affinity=self.affinity,
            affinity_size=self.affinity_size,
            device=device,  # the capture's maps move there if they are not yet
            images=pixels(self.images) if params.colour_steps else None,
        )


class DiffuMask:
    """Generate images with a diffusion pipeline and masks from its cross-attention.

    dm = DiffuMask("builtin:tiny-random")
    samples = dm(["a photo of a bird"], classes=[["bird"]], seed=0,
                 num_inference_steps=4, height=64, width=64)
    """

    def __init__(self, model: Any = "builtin:tiny-random", device: str | None = None, dtype=None):
        """device None: a model given by name goes to the best device (CUDA, then MPS,
        else it stays on the CPU) in float16 there unless `dtype` says otherwise; a
        pipeline object stays where it is."""
        self.model = model_name(model)
        if device is None and isinstance(model, str):
            device = best_device()
            if device == "cpu":
                device = None  # where built and loaded models already are
            elif dtype is None:
                dtype = "float16"
        self.pipe = load_pipeline(model, device=device, dtype=dtype)
        self.pipe.set_progress_bar_config(disable=True)
        self.family = family_of(self.pipe)  # UNet, SD3 or FLUX.1: sizes, noise, call

    def refinement(self, value: Refinement | Mapping[str, Any] | str | None) -> Refinement:
        """`value`'s parameters, the method this model's family defaults to where it names
        none (UNet: "adaptive", SD3 and FLUX.1: "separate"; families.py)."""
        return Refinement.from_any(value, self.family.default_method)

    @property
    def latent_scale(self) -> int:
        """Image sides are multiples of this (SD3 and FLUX.1: the latent scale times
        their 2x2 patches)."""
        return self.family.size_step

    def default_size(self) -> int:
        return self.family.default_size()

    def __call__(
        self,
        prompts: str | Sequence[str],
        classes: Sequence[Any],
        seed: int | Sequence[int] = 0,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        batch_size: int = 4,
        negative_prompt: str | None = None,
        class_ids: Mapping[str, int] | None = None,
        synonyms: Mapping[str, Sequence[str]] | None = None,
        refinement: Refinement | Mapping[str, Any] | str | None = None,
        progress: bool = False,
        true_cfg_scale: float = 1.0,
        map_kind: str = "cross",
    ) -> list[Sample]:
        """Samples for the prompts, generated `batch_size` at a time; each batch's CPU
        part runs while the next batch generates (see `batches`).

        true_cfg_scale: FLUX.1 only (guidance-distilled): above 1, with a negative
        prompt, the negative runs as a second pass and the two are mixed.
        map_kind: "cross" (attention to the class tokens) or, SD3 and FLUX.1, "concept"
        (ConceptAttention; recorded in each sample's meta)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        jobs = self.batches(
            prompts,
            classes,
            seed,
            num_inference_steps,
            guidance_scale,
            height,
            width,
            batch_size,
            negative_prompt,
            class_ids,
            synonyms,
            refinement,
            true_cfg_scale,
            map_kind,
        )
        return _collect(jobs, len(prompts), progress, "generating")

    def label(
        self,
        images: Any,
        classes: Any,
        prompts: str | Sequence[str] | None = None,
        seed: int | Sequence[int] = 0,
        strength: float | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        resolution: int | None = None,
        batch_size: int = 4,
        negative_prompt: str | None = None,
        class_ids: Mapping[str, int] | None = None,
        synonyms: Mapping[str, Sequence[str]] | None = None,
        refinement: Refinement | Mapping[str, Any] | str | None = None,
        progress: bool = False,
        map_kind: str = "cross",
        start: str | None = None,
    ) -> list[Sample]:
        """Samples for given images: each Sample's image is the given one (its own size,
        its pixels unchanged), its masks come from the model's attention while it denoises
        that image (noised to `strength` of the steps, the pipeline family's image-to-image
        route) and are cut by the same refinement as generation's, against its pixels.
        start: where the denoising starts, "inversion" (the default: the noise the
        image's own inversion implies, so the model denoises back into this image) or
        "noise" (random noise, cheaper by the inverse pass); see `inversion`.

        images: paths, PIL images or uint8 arrays (or one of them).
        classes: names every image is labelled with (["dog", "cat"]), or one list per image.
        prompts: one per image, or one for all; None makes "a photo of a dog and a cat"
            from each image's classes. Each class must be named in its prompt.
        strength: None: label.DEFAULT_STRENGTH. resolution: None denoises each image at its
            own size (sides rounded to the latent scale); a number scales its longer side
            to it. The masks are always at the image's own size.
        seed: base seed (image i's noise from sample_seed(seed, i)) or one seed per image;
            a sample never depends on its batch. See `label` (module) for the rest."""
        from .inversion import DEFAULT_START
        from .label import DEFAULT_STRENGTH, image_list, label_batches

        images = image_list(images)
        steps = _check_positive_int("num_inference_steps", num_inference_steps)
        if resolution is not None:
            resolution = _check_positive_int("resolution", resolution)
        jobs = label_batches(
            self,
            images,
            classes,
            prompts,
            _seeds(seed, len(images)),
            DEFAULT_STRENGTH if strength is None else strength,
            steps,
            guidance_scale,
            resolution,
            _check_positive_int("batch_size", batch_size),
            negative_prompt,
            class_ids,
            synonyms,
            refinement,
            map_kind,
            DEFAULT_START if start is None else start,
        )
        return _collect(jobs, len(images), progress, "labelling")

    def image_pipeline(self):
        """The model's image-to-image pipeline (built once, sharing the loaded components)."""
        if getattr(self, "_image_pipe", None) is None:
            from .label import image_pipeline

            self._image_pipe = image_pipeline(self.pipe)
        return self._image_pipe

    def batches(
        self,
        prompts: str | Sequence[str],
        classes: Sequence[Any],
        seed: int | Sequence[int] = 0,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        batch_size: int = 4,
        negative_prompt: str | None = None,
        class_ids: Mapping[str, int] | None = None,
        synonyms: Mapping[str, Sequence[str]] | None = None,
        refinement: Refinement | Mapping[str, Any] | str | None = None,
        true_cfg_scale: float = 1.0,
        map_kind: str = "cross",
    ) -> Iterator[Callable[[], list[Sample]]]:
        """What __call__ makes, batch by batch: for each batch of `batch_size` prompts,
        once its device part has run (pipeline, capture, masks cut), a callable that
        completes it on the CPU and returns its Samples. Call them in order, e.g. in a
        background thread with overlap.overlapped. Everything is checked before the first
        batch generates."""
        params = self.refinement(refinement)
        for maps in self.captures(
            prompts,
            classes,
            seed,
            num_inference_steps,
            guidance_scale,
            height,
            width,
            batch_size,
            negative_prompt,
            class_ids,
            synonyms,
            params,
            true_cfg_scale,
            map_kind,
        ):
            yield self._refine_later(maps, params)

    def captures(
        self,
        prompts: str | Sequence[str],
        classes: Sequence[Any],
        seed: int | Sequence[int] = 0,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        batch_size: int = 4,
        negative_prompt: str | None = None,
        class_ids: Mapping[str, int] | None = None,
        synonyms: Mapping[str, Sequence[str]] | None = None,
        refinement: Refinement | Mapping[str, Any] | str | None = None,
        true_cfg_scale: float = 1.0,
        map_kind: str = "cross",
    ) -> Iterator[BatchMaps]:
        """The images and captured attention of each batch, before any mask is cut: what
        `refine_captured` turns into Samples with any refinement whose capture options
        (cross_factors, steps, affinity_factor, affinity_steps) match `refinement`'s, so
        one generation can be refined many ways. Arguments as for __call__."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise DiffuMaskError("no prompts given")
        class_lists = _as_class_lists(prompts, classes)
        seeds = _seeds(seed, len(prompts))
        steps = _check_positive_int("num_inference_steps", num_inference_steps)
        batch_size = _check_positive_int("batch_size", batch_size)
        height = _check_positive_int("height", height or self.default_size())
        width = _check_positive_int("width", width or self.default_size())
        for name, value in (("height", height), ("width", width)):
            if value % self.latent_scale:
                raise DiffuMaskError(
                    f"{name}={value} is not a multiple of {self.latent_scale}, the model's "
                    "latent scale; round it to one"
                )
        plan = self.plan_batches(
            prompts, class_lists, steps, guidance_scale, class_ids, synonyms, refinement, map_kind
        )
        settings = {
            "negative_prompt": negative_prompt,
            **plan.settings,
            "height": height,
            "width": width,
        }
        if true_cfg_scale != 1.0:
            settings["true_cfg_scale"] = float(true_cfg_scale)
        if map_kind != "cross":
            settings["map_kind"] = map_kind
        self.family.check(settings)
        meta = {"model": self.model, **settings}
        for start in range(0, len(prompts), batch_size):
            batch = slice(start, start + batch_size)
            yield self._capture(
                prompts[batch],
                plan.token_indices[batch],
                seeds[batch],
                plan.class_ids,
                plan.options,
                meta,
            )

    def plan_batches(
        self,
        prompts: Sequence[str],
        class_lists: Sequence[Sequence[str]],
        steps: int,
        guidance_scale: float,
        class_ids: Mapping[str, int] | None,
        synonyms: Mapping[str, Sequence[str]] | None,
        refinement: Refinement | Mapping[str, Any] | str | None,
        map_kind: str,
    ) -> BatchPlan:
        """What every batch of a run shares, checked before anything runs: the class ids,
        each prompt's class tokens, the refinement and what capture keeps."""
        params = self.refinement(refinement)
        ids = dict(class_ids) if class_ids is not None else {}
        for names in class_lists:
            for name in names:
                if class_ids is None:
                    ids.setdefault(name, len(ids) + 1)
                elif name not in ids:
                    raise DiffuMaskError(
                        f"class {name!r} has no id in class_ids; known: {sorted(ids)}"
                    )
        check_class_ids(class_lists, ids)  # mask values, before anything is generated
        # Every prompt's class tokens are found before anything is generated, so a
        # misspelt class fails in a second, not after an hour of sampling.
        token_indices = [
            self.family.token_positions(p, names, synonyms)
            for p, names in zip(prompts, class_lists, strict=True)
        ]
        options = CaptureOptions(
            cross_factors=params.cross_factors,
            steps=params.steps,
            affinity_factor=(params.affinity_factor or default_affinity_factor(self.pipe))
            if params.needs_affinity
            else None,
            affinity_steps=params.affinity_steps,
            affinity_blocks=params.affinity_blocks if params.needs_affinity else None,
            cross_blocks=params.cross_blocks,
            concept_blocks=params.concept_blocks,
            conditional_half=self.family.conditional_half(guidance_scale),
            map_kind=map_kind,
        )
        settings = {"num_inference_steps": steps, "guidance_scale": float(guidance_scale)}
        return BatchPlan(token_indices, ids, options, params, settings)

    def _latents(self, seeds: Sequence[int], height: int, width: int):
        # drawn on the CPU per sample from its own seed (see families)
        return self.family.latents(seeds, height, width)

    def _capture(self, prompts, token_indices, seeds, class_ids, options, meta) -> BatchMaps:
        latents = self._latents(seeds, meta["height"], meta["width"])
        settings = {k: v for k, v in meta.items() if k != "model"}

        def run():
            return self.pipe(**self.family.call_arguments(prompts, latents, settings)).images

        return self._traced(run, prompts, token_indices, seeds, class_ids, options, meta)

    def _traced(self, run, prompts, token_indices, seeds, class_ids, options, meta) -> BatchMaps:
        """The batch's attention captured while `run()` calls a pipeline and returns the
        batch's images (generated ones, or the given ones for `label`), at meta's size."""
        tokens = [sorted({p for positions in t.values() for p in positions}) for t in token_indices]
        concepts = self.family.concepts(token_indices, tokens) if "map_kind" in meta else None
        with trace(self.pipe, tokens, options, concepts) as cap:
            images = run()
        captured = cap.result()
        return BatchMaps(
            images=images,
            class_maps=[
                {name: captured.token_maps(i, p) for name, p in positions.items()}
                for i, positions in enumerate(token_indices)
            ],
            affinity=captured.affinity,
            affinity_size=captured.affinity_size,
            prompts=list(prompts),
            seeds=list(seeds),
            token_indices=list(token_indices),
            class_ids=class_ids,
            meta=meta,
            options=options,
        )

    def _refine_later(self, maps: BatchMaps, params: Refinement) -> Callable[[], list[Sample]]:
        """Cuts the batch's masks now (the device part) and returns the CPU part (finish,
        Samples) as a callable, to run while the next batch runs."""
        return functools.partial(_samples, maps, maps.cut(params, self.pipe.device), params)

    def refine_captured(
        self, maps: BatchMaps, refinement: Refinement | Mapping[str, Any] | str | None = None
    ) -> list[Sample]:
        """The Samples of one captured batch (see `captures`) with `refinement`: the same
        as generating them with it, without generating again."""
        params = self.refinement(refinement)
        maps.check(params)
        return _samples(maps, maps.cut(params, self.pipe.device), params)


def _collect(jobs, total: int, progress: bool, desc: str) -> list[Sample]:
    """Every batch's Samples, each batch's CPU part run while the next one's device part
    runs (overlap.overlapped)."""
    samples: list[Sample] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit="image")
    try:
        for batch in overlapped(jobs):
            samples += batch
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return samples


def pixels(images) -> np.ndarray:
    """PIL images as one float32 [images, 3, H, W] array in [0, 1]: the colour step's input."""
    rgb = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return rgb.transpose(0, 3, 1, 2) / 255.0


def _samples(maps: BatchMaps, cut: Cut, params: Refinement) -> list[Sample]:
    """The CPU part of a batch: masks finished (refine.finish) and Samples made."""
    class_ids, meta = maps.class_ids, maps.meta
    samples = []
    for image, refined, prompt, seed, positions in zip(
        maps.images, finish(cut), maps.prompts, maps.seeds, maps.token_indices, strict=True
    ):
        sample_meta = {
            "prompt": prompt,
            "seed": seed,
            **meta,
            "classes": list(positions),
            "class_ids": {name: class_ids[name] for name in positions},
            "token_indices": positions,
            "refinement": {
                "method": params.method,
                "params": params.to_dict(),
                "chain": refined.chain,
            },
        }
        samples.append(
            Sample(
                image=image.convert("RGB"),
                mask=refined.mask,
                attention=refined.attention,
                quality=refined.quality,
                meta=sample_meta,
            )
        )
    return samples
