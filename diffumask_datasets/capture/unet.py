"""Capture a diffusers UNet's attention while it denoises (SD 1.x, 2.x, SDXL).

Cross-attention processors compute the output exactly as diffusers' AttnProcessor2_0
does and, beside it, the attention probabilities of the conditional half of the guidance
batch for the requested token columns only (float32), added into one running sum per
resolution. Nothing is kept per step. Self-attention stays on the original processor
except at the one resolution where an affinity matrix is asked for.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from ..errors import DiffuMaskError
from .sums import (
    Capture,
    CaptureOptions,
    RunningSums,
    attend_keeping_columns,
    attention_with_lse,
    mean_attention,
    to_heads,
)

# Processors whose computation CaptureProcessor reproduces exactly. Anything else
# (xformers, sliced, custom) is refused rather than silently capturing nothing.
WRAPPABLE = (AttnProcessor, AttnProcessor2_0)
DEFAULT_MAX_FACTOR = 4  # cross maps at latent/1, /2, /4: 64, 32, 16 for SD at 512 px


def layer_factors(unet) -> dict[str, int]:
    """Downsampling factor of every attention processor of a UNet2DConditionModel,
    read from its block structure (down block i works at 2**i, up block j mirrors it)."""
    depth = len(unet.config.block_out_channels)
    factors = {}
    for name in unet.attn_processors:
        if m := re.match(r"down_blocks\.(\d+)\.", name):
            factors[name] = 2 ** int(m.group(1))
        elif m := re.match(r"up_blocks\.(\d+)\.", name):
            factors[name] = 2 ** (depth - 1 - int(m.group(1)))
        elif name.startswith("mid_block."):
            factors[name] = 2 ** (depth - 1)
    return factors


def cross_attention_layers(unet) -> set[str]:
    """Processor names of the layers that attend to the text. Read from each Attention
    module, not from its name: with only_cross_attention, `attn1` attends to text too."""
    return {
        name
        for name in unet.attn_processors
        if unet.get_submodule(name.removesuffix(".processor")).is_cross_attention
    }


class _Sums(RunningSums):
    """The shared running sums, placed on the UNet's resolutions."""

    def __init__(self, tokens: Sequence[Sequence[int]], options: CaptureOptions):
        super().__init__(tokens, options)
        self.latent_size: tuple[int, int] | None = None

    def begin_step(self, sample: torch.Tensor) -> None:
        self.step += 1
        self.latent_size = tuple(sample.shape[-2:])

    def map_size(self, queries: int) -> tuple[int, int]:
        # Each UNet downsampling halves a side, rounding up (stride-2 conv, padding 1).
        h, w = self.latent_size
        factor = 1
        while factor <= max(h, w):
            size = (-(-h // factor), -(-w // factor))
            if size[0] * size[1] == queries:
                return size
            factor *= 2
        raise DiffuMaskError(f"cannot place {queries} attention queries on a {h}x{w} latent")

    def attend(self, query, key, value, mask, cross: bool) -> torch.Tensor:
        """The attention output of the whole batch, exactly as the plain processor gives
        it, keeping what is asked of the conditional rows."""
        split = self.split(query.shape[0])
        if cross:
            out, picked = attend_keeping_columns(query, key, value, split, self.columns, mask=mask)
            self.add_cross(picked.mean(dim=1), self.map_size(picked.shape[2]))
            return out
        if not self.affinity_active:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        if mask is None:
            out, lse = attention_with_lse(query, key, value)
        else:
            out, lse = F.scaled_dot_product_attention(query, key, value, attn_mask=mask), None
            mask = mask[split:] if mask.shape[0] > 1 else mask
        probs = mean_attention(
            query[split:], key[split:], mask, None if lse is None else lse[split:]
        )
        self.add_affinity(probs, self.map_size(probs.shape[1]))
        return out


class CaptureProcessor:
    """An attention processor that computes what AttnProcessor2_0 computes, letting the
    capture's running sums attend for the rows it reads (see _Sums.attend)."""

    def __init__(self, sums: _Sums, cross: bool):
        self.sums = sums
        self.cross = cross

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key, value = to_heads(
            query, attn.to_k(context), attn.to_v(context), attn.heads, attn.norm_q, attn.norm_k
        )
        head_dim = key.shape[-1]

        if self.sums.active:
            out = self.sums.attend(query, key, value, attention_mask, self.cross)
        else:
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _select_layers(unet, options: CaptureOptions) -> dict[str, tuple[int, bool]]:
    """{processor name: (factor, is cross)} of the layers to wrap, checked against what
    the UNet has."""
    factors = layer_factors(unet)
    text = cross_attention_layers(unet)
    cross = {n: f for n, f in factors.items() if n in text}
    if not cross:
        raise DiffuMaskError(
            f"{type(unet).__name__} has no cross-attention layers: there is nothing to capture"
        )
    wanted = options.cross_factors
    available = sorted(set(cross.values()))
    if wanted is None:
        wanted = tuple(f for f in available if f <= DEFAULT_MAX_FACTOR) or (available[0],)
    missing = sorted(set(wanted) - set(available))
    if missing:
        raise DiffuMaskError(
            f"the UNet has no cross-attention at factor(s) {missing}; it has {available}"
        )
    selected = {n: (f, True) for n, f in cross.items() if f in wanted}
    if options.affinity_factor is not None:
        selfs = {n: f for n, f in factors.items() if n not in text}
        if options.affinity_factor not in selfs.values():
            raise DiffuMaskError(
                f"the UNet has no self-attention at factor {options.affinity_factor}; it has "
                f"{sorted(set(selfs.values()))}"
            )
        selected.update({n: (f, False) for n, f in selfs.items() if f == options.affinity_factor})
    return selected


def default_affinity_factor(unet) -> int:
    """The finest self-attention at or below half the latent resolution (32x32 for SD at
    512 px): fine enough to follow object boundaries, small enough to keep (Q x Q)."""
    text = cross_attention_layers(unet)
    factors = sorted({f for n, f in layer_factors(unet).items() if n not in text})
    if not factors:
        raise DiffuMaskError("the UNet has no self-attention layers to take an affinity from")
    return next((f for f in factors if f >= 2), factors[-1])


@contextlib.contextmanager
def trace(
    unet, tokens: Sequence[Sequence[int]], options: CaptureOptions, concepts=None
) -> Iterator[Capture]:
    """Capture the attention of every call of `unet` made inside the block; its original
    processors come back on exit, on error too."""
    if options.map_kind != "cross":
        raise DiffuMaskError(
            f"map_kind={options.map_kind!r} needs an MMDiT transformer (SD3, FLUX.1); "
            f"{type(unet).__name__} gives map_kind='cross'"
        )
    for name in ("cross_blocks", "affinity_blocks", "concept_blocks"):
        if getattr(options, name) is not None:
            raise DiffuMaskError(
                f"{name}={list(getattr(options, name))} chooses blocks of an MMDiT transformer "
                f"(SD3, SD3.5, FLUX.1); a {type(unet).__name__} chooses its maps by "
                "resolution: use cross_factors / affinity_factor and leave it None"
            )
    originals = dict(unet.attn_processors)
    selected = _select_layers(unet, options)
    for name in selected:
        processor = originals[name]
        if type(processor) not in WRAPPABLE:
            raise DiffuMaskError(
                f"attention layer {name!r} uses {type(processor).__name__}, which capture "
                "cannot read; call pipe.unet.set_attn_processor(AttnProcessor2_0()) "
                "(or pipe.unet.set_default_attn_processor()) before generating"
            )
    sums = _Sums(tokens, options)
    processors = dict(originals)
    for name, (_, cross) in selected.items():
        processors[name] = CaptureProcessor(sums, cross)
    hook = unet.register_forward_pre_hook(
        lambda module, args, kwargs: sums.begin_step(args[0] if args else kwargs["sample"]),
        with_kwargs=True,
    )
    try:
        unet.set_attn_processor(processors)
        yield Capture(sums, {n: f for n, (f, _) in selected.items()})
    finally:
        hook.remove()
        # set_attn_processor consumes the dict it is given
        unet.set_attn_processor(dict(originals))
