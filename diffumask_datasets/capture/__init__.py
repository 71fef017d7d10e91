"""Capture a diffusion model's attention while it denoises.

One module per architecture family over one shared set of running sums: `unet` (SD 1.x,
2.x, SDXL: cross-attention layers) and `mmdit` (SD3, SD3.5, FLUX.1: joint attention).
`trace` chooses by the pipeline's denoiser (`pipe.unet` or `pipe.transformer`).

    with trace(pipe, tokens=[[5, 6]]) as cap:
        pipe("a photo of a sparrow bird", ...)
    cap.result().cross   # {(h, w): float32 [prompts, tokens, h, w]}, mean over heads,
                         # layers and steps
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from ..errors import DiffuMaskError
from .sums import Capture, Captured, CaptureOptions

__all__ = ["Capture", "CaptureOptions", "Captured", "default_affinity_factor", "denoiser", "trace"]


def denoiser(pipe_or_model):
    """The model that denoises: a pipeline's `unet` or `transformer`, or the model itself."""
    for name in ("unet", "transformer"):
        model = getattr(pipe_or_model, name, None)
        if model is not None:
            return model
    return pipe_or_model


def _family(model):
    """The capture module that reads `model`; an architecture none reads is refused."""
    from diffusers import UNet2DConditionModel

    if isinstance(model, UNet2DConditionModel):
        from . import unet

        return unet
    from . import mmdit

    if isinstance(model, mmdit.SUPPORTED):
        return mmdit
    readable = ", ".join(["UNet2DConditionModel", *(c.__name__ for c in mmdit.SUPPORTED)])
    raise DiffuMaskError(
        f"capture cannot read a {type(model).__name__}: it reads {readable}; use a pipeline "
        "whose denoiser is one of these (SD 1.x, 2.x, SDXL, SD3, SD3.5, FLUX.1)"
    )


def default_affinity_factor(pipe_or_model) -> int:
    """The resolution factor at which the affinity is taken by default (see the family's
    module)."""
    model = denoiser(pipe_or_model)
    return _family(model).default_affinity_factor(model)


@contextlib.contextmanager
def trace(
    pipe_or_model,
    tokens: Sequence[Sequence[int]],
    options: CaptureOptions | None = None,
    concepts=None,
) -> Iterator[Capture]:
    """Capture attention of every pipeline call made inside the block.

    tokens: for each prompt of the (one) pipeline call, the text-token positions whose
    maps to keep, as positions in the text sequence the denoiser attends to (see
    tokens.find_class_tokens and families). The denoiser's original processors come
    back on exit, on error too. concepts: for map_kind "concept" (SD3, FLUX.1; see
    families.SD3Family.concepts).
    """
    model = denoiser(pipe_or_model)
    with _family(model).trace(model, tokens, options or CaptureOptions(), concepts) as cap:
        yield cap
