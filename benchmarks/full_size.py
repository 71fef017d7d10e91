"""The full-size architectures the benchmarks time, built with random weights from their
configurations (realistic cost, nothing downloaded): SD 1.5, SDXL, SD3-medium, FLUX.1-dev.

    from full_size import sd15_pipeline
    pipe = sd15_pipeline("cuda", torch.float16)

The parts they share (the autoencoder, the CLIP and T5 text encoders) are built once here.
"""

from __future__ import annotations

import torch


def vae(latent_channels: int = 4, **flow):
    """Stable Diffusion's autoencoder; `flow`: the SD3 / FLUX.1 settings (16 latent
    channels, no quantisation convolutions, a scale and a shift of the latents)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        **flow,
    )


def flow_vae(scaling: float, shift: float):
    return vae(
        16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=scaling,
        shift_factor=shift,
    )


def clip_text(
    hidden: int, layers: int, heads: int, ff: int, projection: int | None = None, act="gelu"
):
    """A CLIP text encoder (with a projection when `projection` is given)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=ff,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        hidden_act=act,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def clip_l():
    """CLIP ViT-L/14's text encoder, as SD 1.5 and SDXL use it."""
    return clip_text(768, 12, 12, 3072, act="quick_gelu")


def t5_xxl():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=32128,
            d_model=4096,
            d_ff=10240,
            d_kv=64,
            num_heads=64,
            num_layers=24,
            feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=32,
        )
    )


def sd15_pipeline(device, dtype):
    """Stable Diffusion 1.5's architecture with random weights, built on `device`."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from diffumask_datasets.models import _scheduler, clip_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        autoencoder = vae()
        text = clip_l()
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=autoencoder,
        text_encoder=text,
        tokenizer=clip_tokenizer(),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe.to(device=device, dtype=dtype)


def sdxl_pipeline(device, dtype):
    """SDXL's architecture (UNet 2.57 B parameters, CLIP-L and bigG) with random weights."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from diffumask_datasets.models import _scheduler, clip_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        autoencoder = vae()
        text = clip_l()
        text_2 = clip_text(1280, 32, 20, 5120, projection=1280)
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=autoencoder,
        text_encoder=text,
        text_encoder_2=text_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        scheduler=_scheduler(),
    )
    return pipe.to(device=device, dtype=dtype)


def sd3_medium():
    """SD3-medium's architecture with random weights (build it under `torch.device`)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    from diffumask_datasets.models import clip_tokenizer, t5_tokenizer

    transformer = SD3Transformer2DModel(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=192,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=flow_vae(1.5305, 0.0609),
        text_encoder=clip_text(768, 12, 12, 3072, 768),
        tokenizer=clip_tokenizer(),
        text_encoder_2=clip_text(1280, 32, 20, 5120, 1280),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_xxl(),
        tokenizer_3=t5_tokenizer(),
    )


def flux_dev():
    """FLUX.1-dev's architecture with random weights (build it under `torch.device`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from diffumask_datasets.models import clip_tokenizer, t5_tokenizer

    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=flow_vae(0.3611, 0.1159),
        text_encoder=clip_text(768, 12, 12, 3072),
        tokenizer=clip_tokenizer(),
        text_encoder_2=t5_xxl(),
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )
