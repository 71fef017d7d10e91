"""Resolve a model spec to a diffusers pipeline: built-in aliases, hub ids, folders, objects.

The built-in tiny models are built offline from configs with seeded random weights, so
every code path of the engine (sub-word tokens, SD 1.x and SDXL UNets, the SD3 and FLUX.1
transformers with T5) runs with no download. They draw noise; `builtin:shapes` (a UNet,
SD 1.x's architecture) and `builtin:shapes-mmdit` (SD3's) are trained models of the
shapes world that draw something.
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
SHAPES_MMDIT_WEIGHTS = PACKAGE_DIR / "weights" / "shapes-mmdit"
MAX_TOKENS = 77  # CLIP's context length, as in Stable Diffusion
T5_MAX_TOKENS = 512  # T5's context length in FLUX.1 (SD3 reads 256 by default)
T5_MERGES = 16_000  # CLIP merges whose words become T5 pieces: ~27k pieces, T5 has 32k


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

    merges = _clip_merges()
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


def _clip_merges() -> list[tuple[str, str]]:
    with gzip.open(data_file("bpe_simple_vocab_16e6.txt.gz"), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]


@functools.cache
def t5_tokenizer():
    """An in-memory T5 (sentencepiece Unigram) tokenizer, no file needed: the pieces are
    the words of CLIP's most frequent BPE merges, each both word-initial ("▁plane") and
    inside a word ("plane"), scored by merge rank; single characters cover the rest. So, as
    with T5's real vocabulary, common words are one piece and others split into sub-words
    ("aeroplane" -> "▁aero" + "plane", "sparrow" -> "▁spar" + "row"), with offsets.

    (T5Tokenizer(vocab_file=...) would silently ignore the file and give <unk>s.)
    """
    from transformers import T5TokenizerFast

    scores: dict[str, float] = {}
    merges = _clip_merges()[:T5_MERGES]
    for rank, (left, right) in enumerate(merges):
        word = (left + right).removesuffix("</w>")
        score = -5.0 - 5.0 * rank / len(merges)
        for piece, penalty in (("▁" + word, 0.0), (word, 1.0)):
            scores[piece] = max(scores.get(piece, -1e9), score - penalty)
    for char in map(chr, range(33, 127)):
        for piece in ("▁" + char, char):
            scores.setdefault(piece, -12.0)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += sorted(scores.items(), key=lambda item: (-item[1], item[0]))
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_TOKENS)


def _tiny_t5(seed: int, width: int):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(t5_tokenizer()),
        d_model=width,
        d_ff=37,
        d_kv=8,
        num_heads=4,
        num_layers=2,
        relative_attention_num_buckets=8,
    )
    return T5EncoderModel(config).eval()


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


def _tiny_vae(seed: int, **flow):
    """flow: the settings of the SD3 / FLUX.1 autoencoders (no quantisation convolutions,
    a shift and a scale of the latents)."""
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
        **flow,
    ).eval()


FLOW_VAE = {
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "shift_factor": 0.0609,
    "scaling_factor": 1.5035,
}


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


def _tiny_sd3():
    """SD3's architecture, tiny: a joint-attention transformer (patch 2, two blocks, the
    last text-pre-only), two CLIP encoders with projections and T5."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16,  # latent side: 128 px by default, 8x8 image tokens
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,  # T5's width; the two CLIPs' 32 + 32 are padded to it
        pooled_projection_dim=64,  # the two CLIP projections, concatenated
        out_channels=4,
        pos_embed_max_size=32,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(1, **FLOW_VAE),
        text_encoder=_tiny_text_encoder(2, projection=True),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_tiny_text_encoder(3, projection=True),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=_tiny_t5(4, width=64),
        tokenizer_3=t5_tokenizer(),
    )


def _tiny_flux():
    """FLUX.1-dev's architecture, tiny: guidance-distilled, two double-stream and two
    single-stream blocks with RoPE, latents packed 2x2, CLIP (pooled) and T5."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x 2x2 packing
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,  # T5's width
        pooled_projection_dim=32,  # CLIP's width
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),  # sums to the head dimension
    ).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=_tiny_vae(1, **FLOW_VAE),
        text_encoder=_tiny_text_encoder(2),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_tiny_t5(4, width=64),
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )
    pipe.default_sample_size = 16  # 128 px by default, 8x8 image tokens
    return pipe


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """diffusers' and transformers' loading bars and advice (install accelerate,
    torchvision, ...) are noise for the small models shipped with the package, and where
    nothing is loaded (a pipeline's image-to-image counterpart); errors still show."""
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


def _shipped(folder: Path, **options):
    """A pipeline shipped in the package's weights folder, loaded offline."""
    from diffusers import DiffusionPipeline

    if not (folder / "model_index.json").is_file():
        raise DiffuMaskError(
            f"the built-in model folder {folder} is missing; reinstall the package, or use "
            "builtin:tiny-random"
        )
    return DiffusionPipeline.from_pretrained(folder, local_files_only=True, **options)


def _shapes():
    return _shipped(SHAPES_WEIGHTS, safety_checker=None, requires_safety_checker=False)


def _shapes_mmdit():
    return _shipped(SHAPES_MMDIT_WEIGHTS)


BUILTINS: dict[str, Callable[[], Any]] = {
    "builtin:tiny-random": _tiny_sd,
    "builtin:tiny-random-xl": _tiny_sdxl,
    "builtin:tiny-random-sd3": _tiny_sd3,
    "builtin:tiny-random-flux": _tiny_flux,
    "builtin:shapes": _shapes,
    "builtin:shapes-mmdit": _shapes_mmdit,
}


def _make_builtin(name: str):
    # quiet from the first import of diffusers' pipelines (transformers' notices about
    # torchvision) to the last weight loaded
    with quiet_libraries():
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
    elif (hasattr(spec, "unet") or hasattr(spec, "transformer")) and hasattr(spec, "tokenizer"):
        pipe = spec
    else:
        raise DiffuMaskError(
            f"model {type(spec).__name__!r} is not a diffusers text-to-image pipeline (a UNet "
            "or an MMDiT transformer with its tokenizers); pass a built-in "
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
