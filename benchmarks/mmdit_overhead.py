"""What capture + refinement cost on top of the plain diffusers pipeline, for MMDiT models.

The real-size SD3-medium and FLUX.1-dev architectures (transformer, VAE, CLIP encoders,
T5-XXL) are built with random weights from their configurations, so the cost is real and
nothing is downloaded. Same prompts, seeds (hence latents), steps and size; plain and
DiffuMask runs alternate in one process and the medians are compared, by wall time and (on
the CPU, where a shared machine makes wall time noisy) by the process's CPU time. Extra
memory: the
growth of torch's peak allocation on a GPU (of the process's peak RSS on the CPU) when the
DiffuMask run follows the plain one.

    python benchmarks/mmdit_overhead.py --tiny          # the tiny built-ins on the CPU
    python benchmarks/mmdit_overhead.py                 # sd3-medium, flux-dev: 1024 px,
                                                        # 28 steps, batch 2, bfloat16, cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from diffumask_datasets import DiffuMask

PROMPTS = ["a photo of a bird on a branch", "a photo of a dog on the grass"]
CLASSES = [["bird"], ["dog"]]


def _clip(hidden: int, layers: int, heads: int, ff: int, projection: int | None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=ff,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        hidden_act="gelu",
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5_xxl():
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


def _vae(scaling: float, shift: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=scaling,
        shift_factor=shift,
    )


def sd3_medium():
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
        vae=_vae(1.5305, 0.0609),
        text_encoder=_clip(768, 12, 12, 3072, 768),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_clip(1280, 32, 20, 5120, 1280),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5_xxl(),
        tokenizer_3=t5_tokenizer(),
    )


def flux_dev():
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
        vae=_vae(0.3611, 0.1159),
        text_encoder=_clip(768, 12, 12, 3072, None),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_t5_xxl(),
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )


REAL = {"sd3-medium": sd3_medium, "flux-dev": flux_dev}
TINY = {"sd3-tiny": "builtin:tiny-random-sd3", "flux-tiny": "builtin:tiny-random-flux"}


def engine(config: str, device: str, dtype: str) -> DiffuMask:
    if config in TINY:
        return DiffuMask(TINY[config])
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: seconds, not minutes
        pipe = REAL[config]()
    return DiffuMask(pipe.to(dtype=getattr(torch, dtype)))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_plain(dm: DiffuMask, args) -> None:
    settings = {
        "negative_prompt": None,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "height": args.size,
        "width": args.size,
    }
    seeds = list(range(len(PROMPTS)))
    latents = dm._latents(seeds, args.size, args.size)
    dm.pipe(**dm.family.call_arguments(PROMPTS, latents, settings))


def run_ours(dm: DiffuMask, args) -> None:
    dm(
        PROMPTS,
        classes=CLASSES,
        seed=list(range(len(PROMPTS))),
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        height=args.size,
        width=args.size,
        batch_size=len(PROMPTS),
        refinement=args.method,
    )


def peak(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(config: str, args) -> dict:
    dm = engine(config, args.device, args.dtype)
    sync(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run_plain(dm, args)  # warm-up, and the plain peak
    sync(args.device)
    plain_peak = peak(args.device)
    run_ours(dm, args)
    sync(args.device)
    ours_peak = peak(args.device)
    times: dict[str, list[tuple[float, float]]] = {"plain": [], "diffumask": []}
    for _ in range(args.repeats):
        for name, fn in (("plain", run_plain), ("diffumask", run_ours)):
            start, cpu = time.perf_counter(), time.process_time()
            fn(dm, args)
            sync(args.device)
            times[name].append((time.perf_counter() - start, time.process_time() - cpu))
    plain, ours = (statistics.median(t for t, _ in times[n]) for n in ("plain", "diffumask"))
    cpu_plain, cpu_ours = (statistics.median(c for _, c in times[n]) for n in times)
    return {
        "config": config,
        "device": args.device,
        "dtype": "float32" if config in TINY else args.dtype,
        "size": args.size,
        "steps": args.steps,
        "batch": len(PROMPTS),
        "method": args.method,
        "plain_s": round(plain, 4),
        "diffumask_s": round(ours, 4),
        "ratio": round(ours / plain, 3),
        "cpu_ratio": round(cpu_ours / cpu_plain, 3),
        "extra_peak_mb": round(ours_peak - plain_peak, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny built-ins on the CPU")
    parser.add_argument("--configs", default=None, help="sd3-medium,flux-dev (default)")
    parser.add_argument("--size", type=int, default=None, help="1024; --tiny: 128")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--method", default="adaptive")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    if args.tiny:
        args.configs = args.configs or ",".join(TINY)
        args.size = args.size or 128
        args.device = args.device or "cpu"
    else:
        args.configs = args.configs or ",".join(REAL)
        args.size = args.size or 1024
        args.device = args.device or "cuda"
    for config in args.configs.split(","):
        print(json.dumps(measure(config, args)), flush=True)


if __name__ == "__main__":
    main()
