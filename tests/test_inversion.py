"""Labelling from the image's inversion (DiffuMask.label(start="inversion"))."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from diffumask_datasets import DiffuMask
from diffumask_datasets.errors import DiffuMaskError
from diffumask_datasets.inversion import (
    _as_noise,
    _levels,
    clean_latents,
    given_noise,
    inverse_step,
)

SMALL = {"num_inference_steps": 4, "strength": 0.5}


def noise_image(seed: int, side: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def test_an_inverse_step_is_undone_by_the_forward_step():
    """The DDIM step up and the DDIM step down with one noise prediction are inverses, as
    are the flow's Euler steps with one velocity."""
    g = torch.Generator().manual_seed(0)
    latents, output = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    vp = lambda a: (torch.tensor(a).sqrt(), torch.tensor(1 - a).sqrt())  # noqa: E731
    up = inverse_step(False, output, latents, vp(0.9), vp(0.6))
    down = inverse_step(False, output, up, vp(0.6), vp(0.9))  # the same formula, downwards
    torch.testing.assert_close(down, latents)
    assert not torch.allclose(up, latents)
    flow = lambda s: (torch.tensor(1 - s), torch.tensor(s))  # noqa: E731
    up = inverse_step(True, output, latents, flow(0.2), flow(0.5))
    torch.testing.assert_close(up, latents + 0.3 * output)


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler"])
def test_the_labelling_pass_starts_where_inversion_by_hand_ends(tiny, scheduler):
    """SD 1.x: the UNet's input at the labelling pass's first step is the DDIM inversion of
    the image's latent up the pass's own timesteps, computed here step by step; the same
    with a scheduler whose latents are not variance-preserving (Euler's: x0 + sigma eps,
    scaled for the UNet), since the found noise is added by the scheduler itself."""
    import diffusers

    pipe, image_pipe = tiny.pipe, tiny.image_pipeline()
    original = pipe.scheduler
    pipe.scheduler = image_pipe.scheduler = getattr(diffusers, scheduler).from_config(
        original.config
    )
    images, prompts = [noise_image(0), noise_image(1)], ["a photo of a dog", "a cat"]
    seen = []
    hook = image_pipe.unet.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    try:
        tiny.label(
            images, classes=[["dog"], ["cat"]], prompts=prompts, num_inference_steps=10,
            strength=0.3, guidance_scale=7.5, refinement="adaptive", batch_size=2,
        )  # fmt: skip
        scheduler = pipe.scheduler
        scheduler.set_timesteps(10)
        window = scheduler.timesteps[-3:]  # int(10 * 0.3) steps, descending
    finally:
        hook.remove()
        pipe.scheduler = image_pipe.scheduler = original
    assert [len(x) for x in seen] == [2, 2, 2, 4, 4, 4]  # inverse pass, then with guidance
    clean = clean_latents(image_pipe, images, 32, 32)
    text = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    by_hand, before = clean, (torch.tensor(1.0), torch.tensor(0.0))
    with torch.no_grad():
        for t in window.flip(0):
            eps = pipe.unet(by_hand, t, encoder_hidden_states=text).sample
            a = scheduler.alphas_cumprod[int(t)]
            x0 = (by_hand - before[1] * eps) / before[0]
            by_hand = a.sqrt() * x0 + (1 - a).sqrt() * eps
            before = (a.sqrt(), (1 - a).sqrt())
    torch.testing.assert_close(seen[3][:2], by_hand, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "model",
    [
        "builtin:tiny-random",
        "builtin:tiny-random-xl",
        "builtin:tiny-random-sd3",
        "builtin:tiny-random-flux",
    ],
)
def test_every_family_labels_from_the_inversion(model):
    """The labelling pass starts from the found noise, not a random draw: the captured
    attention differs from the noise start's, the image is the given one, and the
    scheduler is left as it was."""
    dm = DiffuMask(model)
    given = noise_image(4)
    scheduler = dm.image_pipeline().scheduler
    before = {
        n for n in ("add_noise", "scale_noise", "step", "set_timesteps") if n in vars(scheduler)
    }
    inverted = dm.label(given, classes=["dog"], seed=0, **SMALL)[0]
    noised = dm.label(given, classes=["dog"], seed=0, start="noise", **SMALL)[0]
    assert inverted.meta["start"] == "inversion" and noised.meta["start"] == "noise"
    assert inverted.image.tobytes() == given.tobytes()
    assert np.abs(inverted.attention["dog"] - noised.attention["dog"]).max() > 1e-4
    assert {
        n for n in ("add_noise", "scale_noise", "step", "set_timesteps") if n in vars(scheduler)
    } == before


def test_an_inverted_sample_does_not_depend_on_its_batch_or_seed(tiny, one_thread):
    images = [noise_image(i) for i in range(3)]
    together = tiny.label(images, classes=["bird"], seed=7, batch_size=3, **SMALL)
    one_by_one = tiny.label(images, classes=["bird"], seed=7, batch_size=1, **SMALL)
    other_seed = tiny.label(images[:1], classes=["bird"], seed=8, **SMALL)[0]
    for a, b in zip(together, one_by_one, strict=True):
        np.testing.assert_allclose(a.attention["bird"], b.attention["bird"], atol=1e-4)
    # the start is the image's, not the seed's: nothing random is left
    np.testing.assert_allclose(
        together[0].attention["bird"], other_seed.attention["bird"], atol=1e-4
    )


def test_a_given_noise_replaces_the_draw_only_inside_the_context(tiny):
    scheduler = tiny.image_pipeline().scheduler
    scheduler.set_timesteps(4)
    clean, noise = torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2)
    t = scheduler.timesteps[:1]
    with given_noise(scheduler, noise):
        inside = scheduler.add_noise(clean, torch.zeros_like(noise), t)
    outside = scheduler.add_noise(clean, torch.zeros_like(noise), t)
    torch.testing.assert_close(inside, _levels(scheduler)(t)[1].float() * noise)
    assert outside.abs().max() == 0


def test_a_bad_start_or_scheduler_is_one_line_naming_it(tiny):
    with pytest.raises(DiffuMaskError, match=r"start='reverse' is unknown; use 'inversion'"):
        tiny.label(noise_image(0), classes=["dog"], start="reverse", **SMALL)

    class Neither:
        pass

    with pytest.raises(DiffuMaskError, match=r"Neither is neither .* start='noise'"):
        _levels(Neither())

    class Predicting:
        alphas_cumprod = torch.linspace(0.99, 0.01, 1000)

        def __init__(self, kind):
            self.config = SimpleNamespace(prediction_type=kind)

    x, out = torch.full((1, 4), 2.0), torch.full((1, 4), 3.0)
    a = Predicting.alphas_cumprod[500].double()
    torch.testing.assert_close(_as_noise(Predicting("epsilon"), out, x, 500), out)
    # v = sqrt(a) eps - sqrt(1 - a) x0 and x = sqrt(a) x0 + sqrt(1 - a) eps give
    # eps = sqrt(a) v + sqrt(1 - a) x
    expected = (a.sqrt() * 3.0 + (1 - a).sqrt() * 2.0).float()
    torch.testing.assert_close(_as_noise(Predicting("v_prediction"), out, x, 500)[0, 0], expected)
    with pytest.raises(DiffuMaskError, match=r"a model predicting 'sample' cannot be inverted"):
        _as_noise(Predicting("sample"), out, x, 500)
