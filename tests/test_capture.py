import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, SlicedAttnProcessor

from diffumask_datasets.capture import CaptureOptions, trace
from diffumask_datasets.capture.unet import CaptureProcessor, _Sums, layer_factors
from diffumask_datasets.errors import DiffuMaskError
from diffumask_datasets.models import load_pipeline


@pytest.fixture(scope="module")
def pipe():
    pipe = load_pipeline("builtin:tiny-random")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, prompts, latents, **kwargs):
    kwargs = {"num_inference_steps": 3, "height": 64, "width": 64, "output_type": "np", **kwargs}
    return pipe(prompt=prompts, latents=latents.clone(), **kwargs).images


def latents(n, seed=0):
    return torch.randn((n, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kernel", ["cpu-log-sum-exp", "generic"])
def test_probabilities_equal_reference_softmax(pipe, kernel, monkeypatch):
    if kernel == "generic":  # the path used on GPUs and with attention masks
        monkeypatch.setattr("diffumask_datasets.capture.sums._CPU_FLASH", None)
    attn = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    torch.manual_seed(0)
    prompts, queries = 2, 64
    hidden = torch.randn(2 * prompts, queries, attn.query_dim)
    context = torch.randn(2 * prompts, 77, attn.cross_attention_dim)
    columns = [[1, 2], [5]]
    sums = _Sums(columns, CaptureOptions())
    sums.begin_step(torch.zeros(1, 4, 8, 8))
    with torch.no_grad():
        CaptureProcessor(sums, cross=True)(attn, hidden, context)
        q = attn.to_q(hidden[prompts:])
        k = attn.to_k(context[prompts:])
    heads, dim = attn.heads, q.shape[-1] // attn.heads
    q = q.view(prompts, queries, heads, dim).transpose(1, 2)
    k = k.view(prompts, 77, heads, dim).transpose(1, 2)
    reference = torch.softmax(q @ k.transpose(-1, -2) * dim**-0.5, dim=-1).mean(dim=1)
    got = sums.result().cross[(8, 8)]  # [prompts, columns, 8, 8]
    for p, cols in enumerate(columns):
        for c, token in enumerate(cols):
            expected = reference[p, :, token].reshape(8, 8).numpy()
            np.testing.assert_allclose(got[p, c], expected, rtol=1e-5, atol=1e-7)


def test_affinity_equals_reference_self_attention(pipe):
    attn = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    torch.manual_seed(1)
    hidden = torch.randn(2, 64, attn.query_dim)
    sums = _Sums([[5]], CaptureOptions())
    sums.begin_step(torch.zeros(1, 4, 8, 8))
    with torch.no_grad():
        out = CaptureProcessor(sums, cross=False)(attn, hidden)
        expected_out = AttnProcessor2_0()(attn, hidden)
        q = attn.to_q(hidden[1:]).view(1, 64, attn.heads, -1).transpose(1, 2)
        k = attn.to_k(hidden[1:]).view(1, 64, attn.heads, -1).transpose(1, 2)
    reference = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1).mean(1)
    affinity = (sums.affinity / sums.affinity_adds).numpy()
    np.testing.assert_allclose(affinity, reference.numpy(), rtol=1e-5, atol=1e-7)
    assert torch.equal(out, expected_out)


def test_capture_does_not_change_the_image(pipe):
    noise = latents(2)
    prompts = ["a photo of a bird", "a photo of a dog"]
    plain = run(pipe, prompts, noise)
    with trace(pipe, [[5], [5]], CaptureOptions(affinity_factor=1)) as cap:
        captured = run(pipe, prompts, noise)
    assert np.abs(plain - captured).max() == 0
    result = cap.result()
    assert result.steps == 3
    assert set(result.cross) == {(8, 8), (4, 4)}
    assert result.cross[(8, 8)].shape == (2, 1, 8, 8)
    # per resolution: one layer on the way down, two on the way up; the mid block's
    # layer works at the coarsest one
    assert result.layers == {(8, 8): 3, (4, 4): 4}
    assert result.affinity.shape == (2, 64, 64)
    np.testing.assert_allclose(result.affinity.sum(axis=-1), 1.0, rtol=1e-4)


def test_maps_are_averages_of_probabilities(pipe):
    with trace(pipe, [[1, 5]]) as cap:
        run(pipe, ["a photo of a bird"], latents(1))
    for maps in cap.result().cross.values():
        assert maps.dtype == np.float32
        assert (maps >= 0).all() and (maps <= 1).all()


def test_step_range_accumulates_only_those_steps(pipe):
    with trace(pipe, [[5]], CaptureOptions(steps=(1, 2))) as cap:
        run(pipe, ["a photo of a bird"], latents(1))
    assert cap.result().steps == 1


def test_affinity_steps_take_the_affinity_from_those_steps_alone(pipe):
    """affinity_steps narrows the affinity's steps, not the cross-attention's: its affinity
    is that of a capture of those steps only, its maps those of every step, its image
    the plain pipeline's."""
    noise, prompts = latents(1), ["a photo of a bird"]
    plain = run(pipe, prompts, noise)
    with trace(pipe, [[5]], CaptureOptions(affinity_factor=1, affinity_steps=(1, 3))) as late:
        image = run(pipe, prompts, noise)
    with trace(pipe, [[5]], CaptureOptions(affinity_factor=1, steps=(1, 3))) as only:
        run(pipe, prompts, noise)
    with trace(pipe, [[5]], CaptureOptions(affinity_factor=1)) as every:
        run(pipe, prompts, noise)
    assert np.abs(plain - image).max() == 0
    late, only, every = late.result(), only.result(), every.result()
    np.testing.assert_array_equal(late.affinity, only.affinity)
    assert np.abs(late.affinity - every.affinity).max() > 1e-4
    for size, maps in every.cross.items():
        np.testing.assert_array_equal(late.cross[size], maps)
    with pytest.raises(DiffuMaskError, match=r"affinity_steps=\[5, 9\] selected none of the 3"):
        with trace(pipe, [[5]], CaptureOptions(affinity_factor=1, affinity_steps=(5, 9))) as cap:
            run(pipe, prompts, noise)
        cap.result()


def test_resolution_selection(pipe):
    with trace(pipe, [[5]], CaptureOptions(cross_factors=(2,))) as cap:
        run(pipe, ["a photo of a bird"], latents(1))
    assert set(cap.result().cross) == {(4, 4)}
    with pytest.raises(DiffuMaskError, match=r"no cross-attention at factor\(s\) \[8\]"):
        with trace(pipe, [[5]], CaptureOptions(cross_factors=(8,))):
            pass


def test_without_guidance_the_whole_batch_is_read(pipe):
    with trace(pipe, [[5]], CaptureOptions(conditional_half=False)) as cap:
        run(pipe, ["a photo of a bird"], latents(1), guidance_scale=1.0)
    assert cap.result().cross[(8, 8)].shape == (1, 1, 8, 8)


def test_processors_restored_after_success_and_error(pipe):
    before = dict(pipe.unet.attn_processors)
    with trace(pipe, [[5]]):
        assert any(isinstance(p, CaptureProcessor) for p in pipe.unet.attn_processors.values())
    assert dict(pipe.unet.attn_processors) == before
    with pytest.raises(RuntimeError, match="boom"):
        with trace(pipe, [[5]]):
            raise RuntimeError("boom")
    assert dict(pipe.unet.attn_processors) == before
    assert not pipe.unet._forward_pre_hooks


def test_unwrappable_processor_is_refused(pipe):
    name = next(n for n in pipe.unet.attn_processors if ".attn2." in n)
    originals = dict(pipe.unet.attn_processors)
    pipe.unet.set_attn_processor({**originals, name: SlicedAttnProcessor(2)})
    try:
        with pytest.raises(DiffuMaskError, match=rf"{name}.*SlicedAttnProcessor"):
            with trace(pipe, [[5]]):
                pass
    finally:
        pipe.unet.set_attn_processor({**originals})
    assert isinstance(pipe.unet.attn_processors[name], AttnProcessor2_0)


def test_layer_factors_follow_the_block_structure(pipe):
    factors = layer_factors(pipe.unet)
    assert factors["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"] == 1
    assert factors["down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"] == 2
    assert factors["up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"] == 2
    assert factors["up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"] == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_pipelines(dtype):
    pipe = load_pipeline("builtin:tiny-random", dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    try:
        with trace(pipe, [[5]]) as cap:
            run(pipe, ["a photo of a bird"], latents(1).to(dtype), num_inference_steps=2)
    except RuntimeError as err:  # some CPU builds lack half kernels for convolutions
        pytest.skip(f"{dtype} not runnable on this CPU: {err}")
    maps = cap.result().cross[(8, 8)]
    assert maps.dtype == np.float32 and np.isfinite(maps).all() and maps.max() > 0


def test_sdxl_unet():
    pipe = load_pipeline("builtin:tiny-random-xl")
    pipe.set_progress_bar_config(disable=True)
    with trace(pipe, [[5]], CaptureOptions(affinity_factor=2)) as cap:
        pipe(
            prompt="a photo of a bird",
            latents=latents(1),
            num_inference_steps=2,
            height=64,
            width=64,
        )
    result = cap.result()
    assert set(result.cross) == {(4, 4)}
    assert result.affinity.shape == (1, 16, 16)


def test_sd2_style_unet():
    """SD 2.x: linear projections, per-block head dims, upcast attention, v-prediction."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tiny = load_pipeline("builtin:tiny-random")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=8,
    ).eval()
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=tiny.vae,
        text_encoder=tiny.text_encoder,
        tokenizer=tiny.tokenizer,
        scheduler=DDIMScheduler(prediction_type="v_prediction", steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    plain = run(pipe, ["a photo of a bird"], latents(1))
    with trace(pipe, [[5]], CaptureOptions(affinity_factor=1)) as cap:
        captured = run(pipe, ["a photo of a bird"], latents(1))
    assert np.abs(plain - captured).max() == 0
    result = cap.result()
    assert set(result.cross) == {(8, 8), (4, 4)} and result.affinity.shape == (1, 64, 64)


def test_only_cross_attention_unet_reads_both_text_layers():
    """With only_cross_attention, `attn1` attends to the text too: it is captured as
    cross-attention and there is no self-attention for an affinity."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
        only_cross_attention=True,
    ).eval()
    with torch.no_grad(), trace(unet, [[5]], CaptureOptions(conditional_half=False)) as cap:
        unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 77, 32))
    # attn1 and attn2 of one down and two up blocks; the mid block keeps plain attn2
    assert cap.result().layers == {(8, 8): 6, (4, 4): 1}
    with pytest.raises(DiffuMaskError, match="no self-attention at factor 1"):
        with trace(unet, [[5]], CaptureOptions(affinity_factor=1)):
            pass


def test_attention_with_lse_is_sdpa_bit_for_bit_plus_the_log_sum_exp():
    from diffumask_datasets.capture.sums import attention_with_lse

    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 3, 40, 16) for _ in range(3))
    out, lse = attention_with_lse(q, k, v)
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    reference = torch.logsumexp(q @ k.mT * 16**-0.5, dim=-1)
    assert lse.shape == (2, 3, 40) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, reference, rtol=1e-6, atol=1e-6)


def test_the_log_sum_exp_kernel_is_taken_only_where_sdpa_runs_it():
    from torch.nn.attention import SDPBackend

    from diffumask_datasets.capture.sums import lse_kernel

    assert lse_kernel("cpu", SDPBackend.FLASH_ATTENTION) is not None
    assert lse_kernel("cuda", SDPBackend.CUDNN_ATTENTION) is not None
    assert lse_kernel("cuda", SDPBackend.FLASH_ATTENTION) is not None
    # SDPA runs these without a log-sum-exp, or they do not exist: the chunked pass then
    for device, backend in [
        ("cuda", SDPBackend.EFFICIENT_ATTENTION),
        ("cuda", SDPBackend.MATH),
        ("cpu", SDPBackend.MATH),
        ("mps", SDPBackend.FLASH_ATTENTION),
    ]:
        assert lse_kernel(device, backend) is None


def test_no_kernel_log_sum_exp_falls_back_to_sdpa(monkeypatch):
    from diffumask_datasets.capture import sums

    monkeypatch.setattr(sums, "lse_kernel", lambda *args: None)
    q, k, v = (torch.randn(1, 2, 8, 8) for _ in range(3))
    out, lse = sums.attention_with_lse(q, k, v)
    assert lse is None
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_affinity_from_the_kernels_log_sum_exp_in_chunks(dtype, monkeypatch):
    """The lean affinity (kernel log-sum-exp, products in the inputs' precision, chunks of
    queries) against a float32 softmax: equal in float32, within 2% in bfloat16."""
    from diffumask_datasets.capture import sums

    torch.manual_seed(3)
    q, k = torch.randn(2, 4, 64, 16), torch.randn(2, 4, 64, 16)
    reference = torch.softmax(q @ k.mT * 16**-0.5, dim=-1).mean(dim=1)
    monkeypatch.setattr(sums, "CHUNK_ELEMENTS", 2 * 4 * 64 * 5)  # 5 queries a chunk
    q, k = q.to(dtype), k.to(dtype)
    _, lse = sums.attention_with_lse(q, k, k)
    got = sums.mean_attention(q, k, lse=lse)
    assert got.dtype == torch.float32 and got.shape == (2, 64, 64)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, reference, rtol=tolerance, atol=tolerance / 64)
