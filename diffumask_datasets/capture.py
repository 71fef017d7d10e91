"""Capture a diffusers UNet's attention while it denoises.

Cross-attention processors compute the output exactly as diffusers' AttnProcessor2_0
does and, beside it, the attention probabilities of the conditional half of the guidance
batch for the requested token columns only (float32), added into one running sum per
resolution. Nothing is kept per step. Self-attention stays on the original processor
except at the one resolution where an affinity matrix is asked for.

    with trace(pipe, tokens=[[5, 6]]) as cap:
        pipe("a photo of a sparrow bird", ...)
    cap.result().cross   # {(h, w): float32 [prompts, tokens, h, w]}, mean over heads,
                         # layers and steps
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from .errors import DiffuMaskError

# Processors whose computation CaptureProcessor reproduces exactly. Anything else
# (xformers, sliced, custom) is refused rather than silently capturing nothing.
WRAPPABLE = (AttnProcessor, AttnProcessor2_0)
DEFAULT_MAX_FACTOR = 4  # cross maps at latent/1, /2, /4: 64, 32, 16 for SD at 512 px
# The CPU kernel of scaled_dot_product_attention, which also returns the log-sum-exp.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _scale(query: torch.Tensor) -> float:
    # scaled_dot_product_attention's default, which the plain processor relies on
    return query.shape[-1] ** -0.5


@dataclass(frozen=True)
class CaptureOptions:
    """What to keep.

    cross_factors: downsampling factors, relative to the latent, of the cross-attention
        maps to keep (SD at 512 px: 1 -> 64x64, 2 -> 32x32, 4 -> 16x16, 8 -> 8x8).
        None keeps every factor up to 4.
    steps: (start, stop) denoising-step indices to accumulate, stop exclusive; None: all.
    affinity_factor: the factor at which to keep self-attention as an affinity matrix
        (heads, layers and steps averaged); None keeps none.
    conditional_half: with classifier-free guidance the UNet batch is [uncond, cond];
        only the conditional half is read.
    """

    cross_factors: tuple[int, ...] | None = None
    steps: tuple[int, int] | None = None
    affinity_factor: int | None = None
    conditional_half: bool = True


@dataclass
class Captured:
    """Averaged maps, on the CPU as numpy arrays."""

    cross: dict[tuple[int, int], np.ndarray]  # (h, w) -> [prompts, columns, h, w]
    tokens: list[list[int]]  # per prompt, the token position of each column
    affinity: np.ndarray | None = None  # [prompts, h*w, h*w], rows sum to 1
    affinity_size: tuple[int, int] | None = None
    steps: int = 0
    layers: dict[tuple[int, int], int] = field(default_factory=dict)

    def token_maps(
        self, prompt: int, positions: Sequence[int]
    ) -> dict[tuple[int, int], np.ndarray]:
        """{(h, w): mean map of the given token positions} for one prompt."""
        columns = [self.tokens[prompt].index(p) for p in positions]
        return {size: maps[prompt, columns].mean(axis=0) for size, maps in self.cross.items()}


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


class _Store:
    """Running sums shared by all processors of one capture."""

    def __init__(self, tokens: Sequence[Sequence[int]], options: CaptureOptions):
        if not tokens or any(len(t) == 0 for t in tokens):
            raise DiffuMaskError("capture needs at least one token position for every prompt")
        self.options = options
        self.tokens = [list(t) for t in tokens]
        width = max(len(t) for t in tokens)
        # Pad with the first column: gathered, then never read.
        padded = [t + [t[0]] * (width - len(t)) for t in self.tokens]
        self.columns = torch.tensor(padded, dtype=torch.long)  # [prompts, width]
        self.step = -1
        self.latent_size: tuple[int, int] | None = None
        self.cross: dict[tuple[int, int], torch.Tensor] = {}
        self.cross_adds: dict[tuple[int, int], int] = {}
        self.affinity: torch.Tensor | None = None
        self.affinity_size: tuple[int, int] | None = None
        self.affinity_adds = 0
        self.steps_seen: set[int] = set()

    def begin_step(self, sample: torch.Tensor) -> None:
        self.step += 1
        self.latent_size = tuple(sample.shape[-2:])

    @property
    def active(self) -> bool:
        steps = self.options.steps
        return steps is None or steps[0] <= self.step < steps[1]

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

    def _split(self, batch: int) -> int:
        """Where the conditional rows of the UNet batch start."""
        prompts = len(self.tokens)
        if self.options.conditional_half:
            if batch != 2 * prompts:
                raise DiffuMaskError(
                    f"the UNet batch has {batch} rows, not 2 x {prompts} prompts; with "
                    "guidance_scale <= 1 there is no unconditional half: capture with "
                    "conditional_half=False"
                )
            return prompts
        if batch != prompts:
            raise DiffuMaskError(
                f"the UNet batch has {batch} rows but {prompts} prompts were given"
            )
        return 0

    def attend(self, query, key, value, mask, cross: bool) -> torch.Tensor:
        """The attention output of the whole batch, exactly as the plain processor gives
        it, keeping what is asked of the conditional rows."""
        split = self._split(query.shape[0])
        if cross and mask is None and query.device.type == "cpu" and _CPU_FLASH is not None:
            # The CPU kernel behind scaled_dot_product_attention also returns each query's
            # log-sum-exp over the keys: the kept columns' probabilities then cost one
            # (queries x kept columns) product, not a second pass over all the keys.
            out, lse = _CPU_FLASH(query, key, value, 0.0, False)
            columns = self._gather_keys(key[split:])  # [P, heads, kept, dim]
            logits = torch.matmul(query[split:].float(), columns.float().mT * _scale(query))
            self._add_cross(torch.exp(logits - lse[split:, ..., None].float()))
            return out
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        # float32 whatever the pipeline's dtype: fp16 loses the small probabilities that
        # make up most of an object's map
        scores = torch.matmul(query[split:].float() * _scale(query), key[split:].float().mT)
        if mask is not None:
            scores = scores + mask[split:].float()
        probs = scores.softmax(dim=-1)  # [P, heads, Q, keys]
        if cross:
            index = self.columns.to(probs.device)[:, None, None, :]
            self._add_cross(probs.gather(-1, index.expand(*probs.shape[:3], index.shape[-1])))
        else:
            self._add_self(probs)
        return out

    def _gather_keys(self, key: torch.Tensor) -> torch.Tensor:
        index = self.columns.to(key.device)[:, None, :, None]  # [P, 1, kept, 1]
        return key.gather(2, index.expand(key.shape[0], key.shape[1], index.shape[2], key.shape[3]))

    def _add_cross(self, picked: torch.Tensor) -> None:
        """Add the kept columns' probabilities [P, heads, Q, kept], averaged over heads."""
        picked = picked.mean(dim=1)  # [P, Q, kept]
        size = self.map_size(picked.shape[1])
        if size in self.cross:
            self.cross[size] += picked
        else:
            self.cross[size] = picked
        self.cross_adds[size] = self.cross_adds.get(size, 0) + 1
        self.steps_seen.add(self.step)

    def _add_self(self, probs: torch.Tensor) -> None:
        probs = probs.mean(dim=1)  # [P, Q, Q]
        self.affinity = probs if self.affinity is None else self.affinity + probs
        self.affinity_size = self.map_size(probs.shape[1])
        self.affinity_adds += 1

    def result(self) -> Captured:
        if not self.cross:
            raise DiffuMaskError(
                "no cross-attention was captured: the pipeline never ran inside the capture, "
                "or the step range or factors selected nothing"
            )
        cross = {}
        layers = {}
        steps = max(len(self.steps_seen), 1)
        for size, total in self.cross.items():
            mean = (total / self.cross_adds[size]).transpose(1, 2)  # [P, cols, Q]
            cross[size] = mean.reshape(*mean.shape[:2], *size).cpu().numpy()
            layers[size] = self.cross_adds[size] // steps
        affinity = None
        if self.affinity is not None:
            affinity = (self.affinity / self.affinity_adds).cpu().numpy()
        return Captured(
            cross=cross,
            tokens=self.tokens,
            affinity=affinity,
            affinity_size=self.affinity_size,
            steps=len(self.steps_seen),
            layers=layers,
        )


class CaptureProcessor:
    """An attention processor that computes what AttnProcessor2_0 computes, letting the
    capture's store attend for the rows it reads (see _Store.attend)."""

    def __init__(self, store: _Store, cross: bool):
        self.store = store
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
        key = attn.to_k(context)
        value = attn.to_v(context)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if self.store.active:
            out = self.store.attend(query, key, value, attention_mask, self.cross)
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


class Capture:
    """A live capture; `result()` gives the averaged maps once the pipeline has run."""

    def __init__(self, store: _Store, wrapped: dict[str, int]):
        self._store = store
        self.wrapped = wrapped  # processor name -> factor, the layers being captured

    def result(self) -> Captured:
        return self._store.result()


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
    pipe_or_unet, tokens: Sequence[Sequence[int]], options: CaptureOptions | None = None
) -> Iterator[Capture]:
    """Capture attention of every pipeline call made inside the block.

    tokens: for each prompt of the (one) pipeline call, the text-token positions whose
    cross-attention maps to keep (see tokens.find_class_tokens). The UNet's original
    processors come back on exit, on error too.
    """
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    options = options or CaptureOptions()
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
    store = _Store(tokens, options)
    processors = dict(originals)
    for name, (_, cross) in selected.items():
        processors[name] = CaptureProcessor(store, cross)
    hook = unet.register_forward_pre_hook(
        lambda module, args, kwargs: store.begin_step(args[0] if args else kwargs["sample"]),
        with_kwargs=True,
    )
    try:
        unet.set_attn_processor(processors)
        yield Capture(store, {n: f for n, (f, _) in selected.items()})
    finally:
        hook.remove()
        # set_attn_processor consumes the dict it is given
        unet.set_attn_processor(dict(originals))
