"""Masks for given images: the engine's capture and refinement on images it did not draw.

Each image is taken to the noise level `strength` (by its inversion, `inversion`, or by
random noise) and denoised with its prompt by the pipeline's own image-to-image route
(diffusers' img2img pipeline of the model's family, built from the loaded pipeline's
components), under the same capture as generation. The masks are cut by the same
refinement, at the image's own size and against its own pixels; the Sample's image is the
given one, unchanged. The image-to-image output is never decoded, so labelling an image
costs its encoding plus `strength` of the steps (twice from the inversion: the inverse
pass runs them too, without guidance).

    dm = DiffuMask("builtin:shapes")
    samples = dm.label(["scene.png"], classes=["circle", "square"], num_inference_steps=20)

Used through `DiffuMask.label` (and `label_batches` for batch-wise consumers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import DiffuMaskError, one_line
from .inversion import (
    DEFAULT_START,
    check_start,
    clean_latents,
    found_noise,
    given_noise,
    turned_round,
)
from .sample import Sample

# The noise level images are labelled at by default, as a share of the steps: on the shapes
# benchmark's rendered scenes 0.15 and 0.3 scored alike and 0.5 lower (BENCHMARKS.md,
# shapes-quality (d)); 0.3 keeps more steps of a short schedule.
DEFAULT_STRENGTH = 0.3
ROUTE = "image-to-image"


def read_image(image: Any, where: str = "image") -> tuple[Image.Image, str | None]:
    """One input image as an RGB PIL image and its source (the path, or None for an image
    given in memory). A PIL image already in RGB is kept as it is, so its pixels are the
    Sample's byte for byte; other modes are converted to RGB."""
    if isinstance(image, str | Path):
        path = Path(image)
        try:
            with Image.open(path) as opened:
                opened.load()
                loaded = opened.convert("RGB") if opened.mode != "RGB" else opened.copy()
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DiffuMaskError(
                f"{where} {str(path)!r} cannot be read as an image "
                f"({one_line(err) or type(err).__name__}); give a PNG, JPEG or another file "
                "PIL opens"
            ) from None
        return loaded, str(path)
    if isinstance(image, Image.Image):
        return (image if image.mode == "RGB" else image.convert("RGB")), None
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3):
        if image.ndim == 2 or image.shape[-1] in (3, 4):
            return Image.fromarray(image).convert("RGB"), None
    raise DiffuMaskError(
        f"{where} of type {type(image).__name__} is not an image; give a path, a PIL image "
        "or a uint8 HxW(x3) array"
    )


def image_list(images: Any) -> list:
    """One image (a path, PIL image or array) or many, as a list."""
    if isinstance(images, str | Path | Image.Image | np.ndarray):
        return [images]
    return list(images)


def label_prompt(classes: Sequence[str]) -> str:
    """The prompt an image is labelled with when none is given: every class named,
    'a photo of a dog and a cat' (words every built-in model's vocabulary holds)."""
    return "a photo of " + " and ".join(f"a {name}" for name in classes)


def _class_lists(classes: Any, count: int) -> list[list[str]]:
    """`classes` as one list of names per image: a flat list of names (or one name) is
    every image's; a list of lists is one per image."""
    if isinstance(classes, str):
        classes = [classes]
    classes = list(classes) if classes is not None else []
    if classes and all(isinstance(c, str) for c in classes):
        lists = [list(classes)] * count
    elif classes and all(isinstance(c, list | tuple) for c in classes):
        if len(classes) != count:
            raise DiffuMaskError(
                f"classes has {len(classes)} lists for {count} images; give one list per "
                'image, or one list of names for every image, e.g. classes=["dog", "cat"]'
            )
        lists = [list(c) for c in classes]
    else:
        raise DiffuMaskError(
            f"classes={classes!r} must name at least one class: a list of names for every "
            'image (classes=["dog", "cat"]) or one list per image'
        )
    for names in lists:
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise DiffuMaskError(f"classes {names!r} must be non-empty class names")
        if len(set(names)) != len(names):
            raise DiffuMaskError(f"classes {names!r} name a class twice; name each once")
    return lists


def _prompt_list(prompts: Any, class_lists: list[list[str]]) -> list[str]:
    if prompts is None:
        return [label_prompt(names) for names in class_lists]
    prompts = [prompts] * len(class_lists) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(class_lists):
        raise DiffuMaskError(
            f"prompts has {len(prompts)} entries for {len(class_lists)} images; give one "
            "prompt per image, one prompt for all, or None to make them from the classes"
        )
    return [str(p) for p in prompts]


def working_size(size: tuple[int, int], step: int, resolution: int | None) -> tuple[int, int]:
    """(height, width) the model denoises an image of `size` (height, width) at: its own
    size, or with its longer side scaled to `resolution` (aspect kept), each side rounded
    to a multiple of `step` (the model's latent scale)."""
    height, width = size
    if resolution is not None:
        scale = resolution / max(height, width)
        height, width = height * scale, width * scale
    return tuple(max(step, int(round(side / step)) * step) for side in (height, width))


def image_pipeline(pipe):
    """The image-to-image pipeline of `pipe`'s family (SD 1.x/2.x, SDXL, SD3, FLUX.1),
    sharing its components: nothing is loaded or copied."""
    from .models import quiet_libraries

    try:
        with quiet_libraries():  # its first import brings pipelines that advise torchvision
            from diffusers import AutoPipelineForImage2Image

            image_pipe = AutoPipelineForImage2Image.from_pipe(pipe)
    except (ValueError, TypeError, KeyError) as err:
        raise DiffuMaskError(
            f"{type(pipe).__name__} has no image-to-image counterpart in diffusers "
            f"({one_line(err)}); label images with an SD 1.x/2.x, SDXL, SD3/SD3.5 or FLUX.1 "
            "pipeline"
        ) from None
    image_pipe.set_progress_bar_config(disable=True)
    return image_pipe


def _check_strength(strength: Any, steps: int) -> float:
    if isinstance(strength, bool) or not isinstance(strength, int | float | np.floating):
        raise DiffuMaskError(f"strength={strength!r} must be a number in (0, 1]")
    if not 0 < strength <= 1:
        raise DiffuMaskError(
            f"strength={strength} must be in (0, 1]: the share of the denoising steps the "
            f"image is noised to, e.g. {DEFAULT_STRENGTH}"
        )
    if int(steps * strength) < 1:
        raise DiffuMaskError(
            f"strength={strength} of num_inference_steps={steps} runs no denoising step; "
            f"raise either so that their product is at least 1"
        )
    return float(strength)


def _runs(sizes: Sequence[tuple[int, int]], batch_size: int) -> Iterator[slice]:
    """Consecutive images of one size, at most `batch_size` at a time (a pipeline call
    takes one size)."""
    start = 0
    for end in range(1, len(sizes) + 1):
        if end == len(sizes) or sizes[end] != sizes[start] or end - start == batch_size:
            yield slice(start, end)
            start = end


def label_batches(
    dm,
    images: list,
    classes: Any,
    prompts: Any,
    seeds: list[int],
    strength: float,
    steps: int,
    guidance_scale: float,
    resolution: int | None,
    batch_size: int,
    negative_prompt: str | None = None,
    class_ids: Mapping[str, int] | None = None,
    synonyms: Mapping[str, Sequence[str]] | None = None,
    refinement: Any = None,
    map_kind: str = "cross",
    start: str = DEFAULT_START,
) -> Iterator[Callable[[], list[Sample]]]:
    """What `DiffuMask.label` makes, batch by batch (as `DiffuMask.batches` does for
    generation), from its checked numbers (seeds, steps, batch size). Everything else,
    every image read included, is checked before the first batch runs."""
    import torch

    if not images:
        raise DiffuMaskError("no images given")
    class_lists = _class_lists(classes, len(images))
    prompt_list = _prompt_list(prompts, class_lists)
    strength = _check_strength(strength, steps)
    start = check_start(start)
    loaded = [read_image(image, f"image {i}") for i, image in enumerate(images)]
    plan = dm.plan_batches(
        prompt_list, class_lists, steps, guidance_scale, class_ids, synonyms, refinement, map_kind
    )
    settings = {
        **plan.settings,
        "negative_prompt": negative_prompt,
        "strength": strength,
        "route": ROUTE,
        "start": start,
    }
    if resolution is not None:
        settings["resolution"] = resolution
    if map_kind != "cross":
        settings["map_kind"] = map_kind
    dm.family.check(settings)
    image_pipe = dm.image_pipeline()
    sizes = [(image.height, image.width) for image, _ in loaded]
    for run in _runs(sizes, batch_size):
        batch = loaded[run]
        height, width = sizes[run.start]
        denoised = working_size((height, width), dm.latent_scale, resolution)
        given = [image for image, _ in batch]
        inputs = [
            image if (image.height, image.width) == denoised else image.resize(denoised[::-1])
            for image in given
        ]
        generators = [torch.Generator().manual_seed(s) for s in seeds[run]]
        batch_settings = {
            **settings,
            "height": height,
            "width": width,
            "denoised_size": list(denoised),
        }
        arguments = dm.family.image_call_arguments(
            prompt_list[run], inputs, generators, batch_settings
        )
        noise = None
        if start == "inversion":
            arguments["image"] = clean_latents(image_pipe, inputs, *denoised)
            noise = inverted_noise(dm, image_pipe, arguments, seeds[run], batch_settings)

        def denoise(arguments=arguments, given=given, noise=noise):
            noising = nullcontext() if noise is None else given_noise(image_pipe.scheduler, noise)
            with noising:
                image_pipe(**arguments)  # output_type "latent": nothing decoded
            return given

        maps = dm._traced(
            denoise,
            prompt_list[run],
            plan.token_indices[run],
            seeds[run],
            plan.class_ids,
            plan.options,
            {"model": dm.model, **batch_settings},
        )
        done = dm._refine_later(maps, plan.params)
        yield _with_sources(done, [source for _, source in batch])


def inverted_noise(dm, image_pipe, arguments: dict, seeds: list[int], settings: dict):
    """The inverse pass of one batch (outside any capture): the noise that takes each
    image's latent (given as the call's image) to where its inversion ends."""
    import torch

    record: dict = {}
    inverse = {
        **dm.family.inversion_arguments(arguments),
        "generator": [torch.Generator().manual_seed(s) for s in seeds],
    }
    with turned_round(image_pipe, settings["num_inference_steps"], settings["strength"], record):
        image_pipe(**inverse)
    height, width = settings["denoised_size"]
    return found_noise(
        record, image_pipe.scheduler, lambda latents: dm.family.unpacked(latents, height, width)
    )


def _with_sources(done: Callable[[], list[Sample]], sources: list[str | None]):
    def complete() -> list[Sample]:
        samples = done()
        for sample, source in zip(samples, sources, strict=True):
            sample.meta["source"] = source
        return samples

    return complete
