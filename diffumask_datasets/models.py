"""Resolve a model spec to a diffusers pipeline: built-in aliases, hub ids, folders, objects.

The built-in tiny models are built offline from configs with seeded random weights, so
every code path of the engine (sub-word tokens, SD 1.x and SDXL UNets) runs with no
download. They draw noise; `builtin:shapes` is the trained model that draws something.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import DiffuMaskError
from .resources import PACKAGE_DIR, data_file

SHAPES_WEIGHTS = PACKAGE_DIR / "weights" / "shapes"
MAX_TOKENS = 77  # CLIP's context length, as in Stable Diffusion


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's BPE works on a reversible byte -> printable-character table: printable
    # Latin-1 bytes map to themselves, the rest to code points from 256 upwards. The
    # vocabulary's first 256 entries follow this insertion order.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {byte: chr(byte) for byte in printable}
    others = [byte for byte in range(256) if byte not in table]
    table.update({byte: chr(256 + n) for n, byte in enumerate(others)})
    return table


@functools.cache
def clip_tokenizer():
    """The real CLIP BPE tokenizer (49,408 tokens), built from the vocabulary shipped in
    the package, so class words split into the same sub-word pieces as on Stable Diffusion."""
    from transformers import CLIPTokenizer

    with gzip.open(data_file("bpe_simple_vocab_16e6.txt.gz"), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    symbols += [s + "</w>" for s in symbols]
    symbols += ["".join(m) for m in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {s: i for i, s in enumerate(symbols)}
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=MAX_TOKENS,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def _tiny_text_encoder(seed: int, projection: bool = False):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=32,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    return model.eval()


def _tiny_vae(seed: int):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # Four blocks: a downsampling factor of 8, as in Stable Diffusion, so image sizes
    # behave the same (multiples of 8) on the tiny models as on real ones.
    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    ).eval()


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _tiny_unet(**architecture):
    """A seeded random UNet2DConditionModel at the tiny size: two levels, 8x8 latents."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        in_channels=4,
        out_channels=4,
        norm_num_groups=8,
        **architecture,
    ).eval()


def _tiny_sd():
    from diffusers import StableDiffusionPipeline

    unet = _tiny_unet(
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=_tiny_vae(1),
        text_encoder=_tiny_text_encoder(2),
        tokenizer=clip_tokenizer(),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_sdxl():
    from diffusers import StableDiffusionXLPipeline

    unet = _tiny_unet(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        # six time ids of 8 dims each, plus the pooled projection of the second encoder
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,  # both encoders' hidden states, concatenated
    )
    return StableDiffusionXLPipeline(
        unet=unet,
        vae=_tiny_vae(1),
        text_encoder=_tiny_text_encoder(2),
        text_encoder_2=_tiny_text_encoder(3, projection=True),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        scheduler=_scheduler(),
    )


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """diffusers' and transformers' loading bars and advice (install accelerate,
    torchvision, ...) are noise for the small models shipped with the package; errors
    still show."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [
        (lib, lib.get_verbosity(), lib.is_progress_bar_enabled())
        for lib in (diffusers_logging, transformers_logging)
    ]
    try:
        for lib, _, _ in saved:
            lib.set_verbosity_error()
            lib.disable_progress_bar()
        yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


def _shapes():
    from diffusers import StableDiffusionPipeline

    if not (SHAPES_WEIGHTS / "model_index.json").is_file():
        raise DiffuMaskError(
            f"the built-in shapes model is missing from {SHAPES_WEIGHTS}; reinstall the "
            "package, or use builtin:tiny-random"
        )
    return StableDiffusionPipeline.from_pretrained(
        SHAPES_WEIGHTS, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )


BUILTINS: dict[str, Callable[[], Any]] = {
    "builtin:tiny-random": _tiny_sd,
    "builtin:tiny-random-xl": _tiny_sdxl,
    "builtin:shapes": _shapes,
}


def _make_builtin(name: str):
    # quiet from the first import of diffusers' pipelines (transformers' notices about
    # torchvision) to the last weight loaded
    with _quiet_libraries():
        return BUILTINS[name]()


@functools.cache
def _builtin(name: str):
    return _make_builtin(name)


def _from_pretrained(spec: str, dtype):
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(spec, use_safetensors=True, torch_dtype=dtype)
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        where = (
            "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
            if offline
            else "it could not be downloaded or read"
        )
        raise DiffuMaskError(
            f"model {spec!r} cannot be loaded: {where} ({type(err).__name__}). Download it "
            "once with network access (or point to a local diffusers folder with safetensors "
            f"weights), or use a built-in model: {', '.join(BUILTINS)}"
        ) from err


def load_pipeline(spec: Any = "builtin:tiny-random", device: str | None = None, dtype=None):
    """A diffusers pipeline from a built-in alias, a hub id, a local folder or an object.

    Built-ins are cached in-process and returned as the same object; `device` and `dtype`
    (a torch dtype or its name: "float32", "float16", "bfloat16") move it.
    """
    import torch

    if isinstance(dtype, str):
        if dtype not in ("float32", "float16", "bfloat16"):
            raise DiffuMaskError(
                f"dtype {dtype!r} is not supported; use float32, float16 or bfloat16"
            )
        dtype = getattr(torch, dtype)
    if isinstance(spec, str | Path):
        spec = str(spec)
        if spec.startswith("builtin:"):
            if spec not in BUILTINS:
                raise DiffuMaskError(
                    f"unknown built-in model {spec!r}; the built-ins are {', '.join(BUILTINS)}"
                )
            # the cached instance is shared: moving it would move every user's copy
            moved = device is not None or dtype is not None
            pipe = _make_builtin(spec) if moved else _builtin(spec)
        else:
            pipe = _from_pretrained(spec, dtype)
    elif hasattr(spec, "unet") and hasattr(spec, "tokenizer"):
        pipe = spec
    else:
        raise DiffuMaskError(
            f"model {type(spec).__name__!r} is not a diffusers UNet pipeline; pass a built-in "
            f"alias ({', '.join(BUILTINS)}), a hub id, a local folder or a pipeline object"
        )
    if device is not None or dtype is not None:
        pipe = pipe.to(device=device, dtype=dtype)
    return pipe


def model_name(spec: Any) -> str:
    """How a model is named in a sample's metadata."""
    if isinstance(spec, str | Path):
        return str(spec)
    return getattr(getattr(spec, "config", None), "_name_or_path", None) or type(spec).__name__
