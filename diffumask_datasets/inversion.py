"""Where labelling starts: the noise a given image's own inversion implies.

Image-to-image labelling noises an image's latent to the strength's level and reads the
attention while the model denoises it. With random noise the model denoises towards an
image of its own that resembles the given one; with the noise found by inversion it
denoises back into (nearly) the given image, so its attention is about that image's
objects. Inversion runs the model backwards from the clean latent, up the same timesteps
the labelling pass will come down, with the prompt and no guidance: DDIM inversion for the
UNet families' schedulers (any with `alphas_cumprod`, epsilon or v prediction), the Euler
step of rectified flow for SD3 and FLUX.1's.

The family's own image-to-image pipeline runs both passes, so every model input (added
conditions, packing, positions) is the pipeline's: the inverse pass with its scheduler
turned round (`turned_round`), the labelling pass with the found noise in place of its
random draw (`given_noise`). Both are given the image's latent (`clean_latents`), so the
labelling pass starts exactly where the inversion ended.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch

from .errors import DiffuMaskError

STARTS = ("inversion", "noise")
DEFAULT_START = "inversion"  # shapes benchmark (d): BENCHMARKS.md, "Labelling given images"


def check_start(start: str) -> str:
    """`start` if it is one of STARTS, else a one-line error naming it."""
    if start not in STARTS:
        raise DiffuMaskError(
            f"start={start!r} is unknown; use 'inversion' (the noise the image's own "
            "inversion implies) or 'noise' (random noise)"
        )
    return start


@torch.no_grad()
def clean_latents(image_pipe, images, height: int, width: int) -> torch.Tensor:
    """The images' latents as the pipeline would start from them, but the autoencoder's
    mean rather than a draw from it: both passes must start from one latent, and a draw
    adds the autoencoder's spread (small for real models, not for builtin:shapes')."""
    vae = image_pipe.vae
    pixels = image_pipe.image_processor.preprocess(images, height=height, width=width)
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:  # as SDXL's pipelines do: its autoencoder overflows in half precision
        vae.to(torch.float32)
    try:
        mean = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
    finally:
        if upcast:
            vae.to(torch.float16)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (mean - shift) * vae.config.scaling_factor


def _is_flow(scheduler) -> bool:
    """A flow-matching scheduler (SD3, FLUX.1): no noise schedule of alphas."""
    return getattr(scheduler, "alphas_cumprod", None) is None


def _levels(scheduler) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(signal, noise) coefficients of a timestep, x_t = signal * x_0 + noise * eps, in the
    variance-preserving form the UNet families' models see, or rectified flow's."""
    if not _is_flow(scheduler):
        alphas = scheduler.alphas_cumprod

        def vp(t):
            a = alphas[int(t)].double()
            return a.sqrt(), (1 - a).sqrt()

        return vp
    if hasattr(scheduler, "scale_noise"):
        total = scheduler.config.num_train_timesteps

        def flow(t):
            s = torch.as_tensor(float(t) / total, dtype=torch.float64)
            return 1 - s, s

        return flow
    raise DiffuMaskError(
        f"{type(scheduler).__name__} is neither a noise-schedule (alphas_cumprod) nor a "
        "flow-matching scheduler, so images cannot be inverted with it; label with "
        "start='noise'"
    )


def _as_noise(scheduler, output: torch.Tensor, latents: torch.Tensor, t) -> torch.Tensor:
    """The model's output as the noise it predicts (VP schedulers) or as-is (flow)."""
    if _is_flow(scheduler):
        return output  # a velocity: the flow step uses it as it is
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind == "epsilon":
        return output
    if kind == "v_prediction":
        signal, noise = (c.to(output.dtype) for c in _levels(scheduler)(t))
        return signal * output + noise * latents
    raise DiffuMaskError(
        f"a model predicting {kind!r} cannot be inverted; label with start='noise'"
    )


def inverse_step(flow: bool, output, latents, before, after) -> torch.Tensor:
    """One step up from noise level `before` to `after` ((signal, noise) pairs): the DDIM
    step run backwards (output: the predicted noise), or the flow's Euler step run
    forwards in time (output: the velocity noise - x_0)."""
    if flow:
        return latents + (after[1] - before[1]).to(latents.dtype) * output
    (signal_before, noise_before), (signal, noise) = before, after
    clean = (latents - noise_before.to(latents.dtype) * output) / signal_before.to(latents.dtype)
    return signal.to(latents.dtype) * clean + noise.to(latents.dtype) * output


@contextlib.contextmanager
def _patched(scheduler, **methods) -> Iterator[None]:
    """The scheduler with some methods shadowed by instance attributes, for one call."""
    for name, method in methods.items():
        setattr(scheduler, name, method)
    try:
        yield
    finally:
        for name in methods:
            delattr(scheduler, name)


@contextlib.contextmanager
def turned_round(image_pipe, steps: int, strength: float, record: dict) -> Iterator[None]:
    """The image-to-image pipeline's next call runs its timesteps upwards: it starts from
    the clean latent (recorded as record["clean"]), walks its window of timesteps in
    ascending order with inverse steps, and leaves the last latents in record["ended"]."""
    scheduler = image_pipe.scheduler
    levels = _levels(scheduler)
    flow = _is_flow(scheduler)
    real_set_timesteps = type(scheduler).set_timesteps.__get__(scheduler)
    one = torch.tensor(1.0, dtype=torch.float64)
    state = {"level": (one, torch.zeros_like(one))}  # clean: all signal, no noise

    @functools.wraps(real_set_timesteps)  # pipelines read its signature (sigmas=, mu=)
    def set_timesteps(*args, **kwargs):
        real_set_timesteps(*args, **kwargs)
        window, _ = image_pipe.get_timesteps(steps, strength, scheduler.timesteps.device)
        head = scheduler.timesteps[: len(scheduler.timesteps) - len(window)]
        scheduler.timesteps = torch.cat([head, window.flip(0)])
        record["start"] = window[0]

    def start_clean(original, *args, **kwargs):
        record["clean"] = original
        return original

    def step(output, t, latents, *args, **kwargs):
        after = levels(t)
        noise = _as_noise(scheduler, output, latents, t)
        latents = inverse_step(flow, noise, latents, state["level"], after)
        state["level"] = after
        record["ended"] = latents
        return (latents,)

    noising = {"scale_noise" if flow else "add_noise": start_clean}
    with _patched(
        scheduler,
        set_timesteps=set_timesteps,
        step=step,
        scale_model_input=lambda sample, *args, **kwargs: sample,
        **noising,
    ):
        yield


def found_noise(record: dict, scheduler, unpack: Callable) -> torch.Tensor:
    """The noise that takes the clean latent to where the inversion ended, at the
    labelling pass's first timestep: (ended - signal * clean) / noise."""
    signal, noise = _levels(scheduler)(record["start"])
    clean = record["clean"]
    ended = unpack(record["ended"]).to(clean.dtype)
    return (ended - signal.to(clean.dtype) * clean) / noise.to(clean.dtype)


@contextlib.contextmanager
def given_noise(scheduler, noise: torch.Tensor) -> Iterator[None]:
    """The image-to-image pipeline's next call noises its latents with `noise` instead of
    its random draw."""
    if _is_flow(scheduler):
        real = type(scheduler).scale_noise.__get__(scheduler)

        def scale_noise(sample, timestep, _drawn=None, *args, **kwargs):
            return real(sample, timestep, noise.to(sample.device, sample.dtype))

        patch = {"scale_noise": scale_noise}
    else:
        real = type(scheduler).add_noise.__get__(scheduler)

        def add_noise(original, _drawn, timesteps, *args, **kwargs):
            return real(original, noise.to(original.device, original.dtype), timesteps)

        patch = {"add_noise": add_noise}
    with _patched(scheduler, **patch):
        yield
