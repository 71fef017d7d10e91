"""Capture the joint attention of MMDiT transformers (SD3, SD3.5, FLUX.1) while they denoise.

Text and image tokens attend together in one sequence: SD3 puts the image first, then its
77 CLIP and its T5 tokens; FLUX.1 puts its T5 tokens first, then the image, and applies
RoPE to both. An image query's probabilities for the class tokens are normalised over the
whole joint row (text and image keys), as the model computes them, and kept only for the
class columns; they come from the attention kernel's own log-sum-exp where that kernel is
the stock one (CPU), else from a chunked float32 pass (see sums.attend_keeping_columns).

Each layer's map of a kept token is normalised over the image before it is added (per-token
spatial normalisation): T5's padding tokens soak up much of every row's attention in
FLUX.1 (attention sinks), unevenly across layers, so raw probabilities would weigh layers
by how little the sinks took. The affinity is the image-to-image part of the joint
attention, renormalised over the image keys, at a chosen set of joint blocks.

map_kind "concept" (SD3, SD3.5, FLUX.1): ConceptAttention (Helbling et al., arXiv
2502.04320; written for FLUX.1, run on SD3's joint blocks the same way). Each prompt's
class names and "background" are embedded by T5 alone and run as an extra token stream
through the joint (double-stream) blocks with the text stream's weights (modulation,
projections, feed-forward; SD3's last, text-pre-only block ends the stream). Concept
queries attend to the concept and image keys; image and text tokens never attend to the
concepts, so the image is unchanged. A pixel's map is the softmax over its prompt's
concepts of the dot products of its attention output with theirs (both before the output
projection), averaged over the chosen blocks and steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    _get_qkv_projections,
)

from ..errors import DiffuMaskError
from .sums import (
    Capture,
    CaptureOptions,
    RunningSums,
    attend_keeping_columns,
    mean_attention,
    to_heads,
)

SUPPORTED = (SD3Transformer2DModel, FluxTransformer2DModel)
# The stock processors CaptureProcessor reproduces exactly; anything else (fused
# projections, PAG, IP-Adapter, custom) is refused rather than silently read wrong.
WRAPPABLE = {
    SD3Transformer2DModel: (JointAttnProcessor2_0,),
    FluxTransformer2DModel: (FluxAttnProcessor,),
}


BACKGROUND = "background"  # the concept every prompt has besides its classes


@dataclass
class Concepts:
    """ConceptAttention's concepts for one batch: per prompt its classes, then background."""

    embeddings: torch.Tensor  # [P, C, T5 width], zeros where padded
    valid: torch.Tensor  # [P, C] bool
    of_column: torch.Tensor  # [P, kept columns]: the concept each kept token column reads


def text_heads(attn, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The text stream's query, key and value ([batch, heads, tokens, d]) through the
    layer's text-side projections and norms (the concepts take the same)."""
    return to_heads(
        attn.add_q_proj(text),
        attn.add_k_proj(text),
        attn.add_v_proj(text),
        attn.heads,
        attn.norm_added_q,
        attn.norm_added_k,
    )


class ConceptStream:
    """The concept tokens' residual stream through the joint (double-stream) blocks, with
    the text stream's weights; restarted at every transformer call that is read."""

    def __init__(self, concepts: Concepts):
        self.concepts = concepts
        self.state: torch.Tensor | None = None
        self.modulation: tuple[torch.Tensor, ...] | None = None
        self.update: torch.Tensor | None = None

    def start(self, model) -> None:
        embeddings = self.concepts.embeddings.to(device=model.device, dtype=model.dtype)
        self.state = model.context_embedder(embeddings)

    def before_block(self, block, temb: torch.Tensor) -> None:
        temb = temb[-self.state.shape[0] :]
        if getattr(block, "context_pre_only", False):  # SD3's last block: no update follows
            self.modulation = (block.norm1_context(self.state, temb),)
        else:
            self.modulation = block.norm1_context(self.state, emb=temb)

    def attend(self, attn, image_key: torch.Tensor, image_value: torch.Tensor) -> torch.Tensor:
        """The concepts' attention output [P, C, inner] (before the output projection)
        over their own keys and the image's (the read rows' image keys and values, [P,
        heads, image tokens, d]; FLUX.1's with RoPE applied: concept positions are text
        positions, whose rotation is none)."""
        query, own_key, own_value = text_heads(attn, self.modulation[0])
        keys = torch.cat([own_key, image_key], dim=2)
        values = torch.cat([own_value, image_value], dim=2)
        valid = self.concepts.valid.to(keys.device)
        images = valid.new_ones(valid.shape[0], image_key.shape[2])
        mask = torch.cat([valid, images], dim=1)[:, None, None, :]
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask)
        out = out.transpose(1, 2).flatten(2, 3)
        out_projection = getattr(attn, "to_add_out", None)
        self.update = out_projection(out) if out_projection is not None else None
        return out

    def after_block(self, block) -> None:
        if self.update is None:
            return  # the stream ends at a text-pre-only block
        _, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation
        state = self.state + gate_msa.unsqueeze(1) * self.update
        normed = block.norm2_context(state) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        state = state + gate_mlp.unsqueeze(1) * block.ff_context(normed)
        self.state = state.clip(-65504, 65504) if state.dtype == torch.float16 else state

    def maps(self, image_out: torch.Tensor, concept_out: torch.Tensor) -> torch.Tensor:
        """Softmax over each prompt's concepts of <image output, concept output>, read at
        the kept columns: [P, image tokens, kept] float32."""
        scores = torch.matmul(image_out.float(), concept_out.float().mT)  # [P, N, C]
        valid = self.concepts.valid.to(scores.device)
        probs = scores.masked_fill(~valid[:, None, :], float("-inf")).softmax(dim=-1)
        index = self.concepts.of_column.to(scores.device)[:, None, :]
        return probs.gather(-1, index.expand(probs.shape[0], probs.shape[1], index.shape[-1]))


class _Sums(RunningSums):
    """The shared running sums, placed on the transformer's grid of image tokens."""

    def __init__(
        self,
        tokens: Sequence[Sequence[int]],
        options: CaptureOptions,
        family: str,
        concepts: Concepts | None = None,
    ):
        super().__init__(tokens, options)
        self.family = family
        self.stream = ConceptStream(concepts) if concepts is not None else None
        self.grid: tuple[int, int] | None = None  # image tokens, rows x columns
        self.text = 0  # text tokens in the joint sequence
        self.timestep: float | None = None
        self.reading = False

    def begin_call(self, timestep, grid: tuple[int, int], text: int) -> None:
        """One transformer call. The first call at a timestep is the positive pass; a
        second at the same timestep is FLUX.1's separate negative pass (true CFG): not
        read."""
        timestep = float(torch.as_tensor(timestep).flatten()[0])
        self.reading = timestep != self.timestep
        if not self.reading:
            return
        self.timestep = timestep
        self.step += 1
        self.grid = grid
        self.text = text
        last = int(self.columns.max())
        if last >= text:
            raise DiffuMaskError(
                f"token position {last} is past the {text} text tokens the {self.family} "
                "transformer attends to; find positions with families.family_of(pipe)"
                ".token_positions or raise max_sequence_length"
            )

    @property
    def active(self) -> bool:
        return self.reading and super().active

    @property
    def rows(self) -> int:
        return 0 if not self.options.conditional_half else len(self.tokens)

    def attend(
        self, query, key, value, image: slice, text: slice, affinity: bool, cross=True, **kwargs
    ):
        """The attention output of the whole batch, exactly as the stock processor gives
        it; query, key, value [batch, heads, joint sequence, dim]. Keeps the image rows'
        probabilities of the class columns (in the text at `text`; map_kind "cross") and,
        where asked, the image-to-image affinity."""
        rows = self.split(query.shape[0], "transformer")
        if self.stream is None and cross:
            columns = self.columns + text.start
            out, picked = attend_keeping_columns(
                query, key, value, rows, columns, queries=image, **kwargs
            )
            self.add_cross(spatially_normalised(picked.mean(dim=1)), self.grid)
        elif kwargs.get("plain") is not None:
            out = kwargs["plain"]()
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=kwargs.get("mask"))
        if affinity and self.affinity_active:
            self.add_affinity(
                mean_attention(query[rows:, :, image], key[rows:, :, image]), self.grid
            )
        return out

    def attend_concepts(self, attn, out, key, value, image: slice, keep: bool) -> None:
        """The concept stream's attention in this layer (out, key, value: the whole batch,
        [batch, heads, joint sequence, dim]); keep: its maps are kept."""
        rows = self.rows
        concept_out = self.stream.attend(attn, key[rows:, :, image], value[rows:, :, image])
        if keep:
            image_out = out[rows:, :, image].transpose(1, 2).flatten(2, 3)
            self.add_cross(self.stream.maps(image_out, concept_out), self.grid)


def spatially_normalised(maps: torch.Tensor) -> torch.Tensor:
    """maps [P, image tokens, columns] -> each column a distribution over the image."""
    return maps / maps.sum(dim=1, keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)


class JointCaptureProcessor:
    """Computes what SD3's JointAttnProcessor2_0 computes (image first, then text), letting
    the running sums attend for the rows it reads. SD3.5's image-only `attn2` layers keep their
    own processor."""

    def __init__(self, sums: _Sums, affinity: bool, concept_map: bool = False, cross=True):
        self.sums = sums
        self.affinity = affinity
        self.concept_map = concept_map  # map_kind "concept": this block's maps are kept
        self.cross = cross  # map_kind "cross": this block's maps are kept
        self.stock = JointAttnProcessor2_0()

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *a, **kw
    ):
        # (the stock processor ignores attention_mask; so does this one)
        if encoder_hidden_states is None or not self.sums.active:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, *a, **kw)
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        image, text = hidden_states, encoder_hidden_states
        query, key, value = to_heads(
            attn.to_q(image),
            attn.to_k(image),
            attn.to_v(image),
            attn.heads,
            attn.norm_q,
            attn.norm_k,
        )
        head_dim = key.shape[-1]
        context_query, context_key, context_value = text_heads(attn, text)
        query = torch.cat([query, context_query], dim=2)
        key = torch.cat([key, context_key], dim=2)
        value = torch.cat([value, context_value], dim=2)

        image = slice(0, residual.shape[1])
        hidden_states = self.sums.attend(
            query, key, value, image, slice(image.stop, None), self.affinity, self.cross
        )
        if self.sums.stream is not None:
            self.sums.attend_concepts(attn, hidden_states, key, value, image, self.concept_map)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states, encoder_hidden_states = (
            hidden_states[:, image],
            hidden_states[:, image.stop :],
        )
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states, encoder_hidden_states


def _native_backend(processor) -> bool:
    """Whether dispatch_attention_fn runs plain SDPA for this processor."""
    from diffusers.models import attention_dispatch as dispatch

    if processor._parallel_config is not None:
        return False
    backend = processor._attention_backend
    if backend is None:
        backend, _ = dispatch._AttentionBackendRegistry.get_active_backend()
    return dispatch.AttentionBackendName(backend) == dispatch.AttentionBackendName.NATIVE


class FluxCaptureProcessor:
    """Computes what FLUX.1's FluxAttnProcessor computes (text first, then image, RoPE on
    both), letting the running sums attend for the rows it reads. Double-stream blocks hand the
    text in separately; single-stream blocks hand one joined sequence, whose text length
    the running sums were told at the start of the transformer call."""

    def __init__(
        self,
        sums: _Sums,
        stock: FluxAttnProcessor,
        affinity: bool,
        concept_map: bool = False,
        cross: bool = True,
    ):
        self.sums = sums
        self.stock = stock
        self.affinity = affinity
        self.concept_map = concept_map  # map_kind "concept": this block's maps are kept
        self.cross = cross  # map_kind "cross": this block's maps are kept

    @property
    def _attention_backend(self):
        return self.stock._attention_backend

    @property
    def _parallel_config(self):
        return self.stock._parallel_config

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb=None,
    ) -> torch.Tensor:
        if not self.sums.active:
            return self.stock(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
            )
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        text = (
            encoder_hidden_states.shape[1] if encoder_hidden_states is not None else self.sums.text
        )
        plain = mask = None
        if attention_mask is not None or not _native_backend(self.stock):
            # another backend (or a mask): its own output, the probabilities in chunks
            def plain():
                return dispatch_attention_fn(
                    query,
                    key,
                    value,
                    attn_mask=attention_mask,
                    backend=self.stock._attention_backend,
                    parallel_config=self.stock._parallel_config,
                ).transpose(1, 2)

            if attention_mask is not None:
                mask = attention_mask if attention_mask.ndim == 4 else attention_mask[:, None, None]
        # [batch, heads, sequence, dim] views, as the native backend hands them to SDPA
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        out = self.sums.attend(
            q,
            k,
            v,
            slice(text, None),
            slice(0, text),
            self.affinity,
            self.cross,
            mask=mask,
            plain=plain,
        )
        if self.sums.stream is not None:
            self.sums.attend_concepts(attn, out, k, v, slice(text, None), self.concept_map)
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [
                    encoder_hidden_states.shape[1],
                    hidden_states.shape[1] - encoder_hidden_states.shape[1],
                ],
                dim=1,
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


def text_layers(model) -> dict[str, int]:
    """{processor name: block index} of the layers that attend to the text: every joint
    (double-stream) block's `attn`, then FLUX.1's single-stream blocks, numbered on after
    the joint ones. SD3.5's image-only `attn2` is left out."""
    layers = {}
    for name in model.attn_processors:
        parts = name.split(".")
        if parts[0] in ("transformer_blocks", "single_transformer_blocks") and parts[2] == "attn":
            offset = 0 if parts[0] == "transformer_blocks" else len(model.transformer_blocks)
            layers[name] = offset + int(parts[1])
    return layers


def default_affinity_blocks(model) -> tuple[int, ...]:
    """The middle third of the joint blocks: past the first blocks, whose attention is
    mostly positional, and before the last, which turn towards the output."""
    n = len(model.transformer_blocks)
    return tuple(range(n // 3, max(n // 3 + 1, 2 * n // 3)))


def default_affinity_factor(model) -> int:
    """The resolution an MMDiT model's affinity is kept at: 1, its one grid of image tokens."""
    return 1  # one resolution: the grid of image tokens


def default_concept_blocks(model) -> tuple[int, ...]:
    """The second half of the double-stream blocks (ConceptAttention found the later
    blocks' output space the most telling)."""
    n = len(model.transformer_blocks)
    return tuple(range(n // 2, n))


def _blocks(name: str, wanted, joint: int, kind: str) -> set[int]:
    blocks = set(wanted)
    if not blocks or not blocks <= set(range(joint)):
        raise DiffuMaskError(
            f"{name}={sorted(blocks)}: {kind} has blocks 0..{joint - 1} for these maps; "
            "choose among them"
        )
    return blocks


def _select_layers(model, options: CaptureOptions, concepts) -> dict[str, tuple[bool, bool, bool]]:
    """{processor name: (keeps the affinity, keeps concept maps, keeps cross maps)} of the
    layers to wrap."""
    kind = type(model).__name__
    if options.cross_factors not in (None, (1,)):
        raise DiffuMaskError(
            f"cross_factors={list(options.cross_factors)}: {kind} attends at one resolution, "
            "the grid of image tokens; use cross_factors=None or (1,)"
        )
    if options.affinity_factor not in (None, 1):
        raise DiffuMaskError(
            f"affinity_factor={options.affinity_factor}: {kind} attends at one resolution; "
            "use affinity_factor=1 (and affinity_blocks to choose the blocks)"
        )
    joint = len(model.transformer_blocks)
    affinity = set()
    if options.affinity_factor is not None:
        wanted = options.affinity_blocks or default_affinity_blocks(model)
        affinity = _blocks("affinity_blocks", wanted, joint, kind)
    if options.map_kind not in ("cross", "concept"):
        raise DiffuMaskError(f"map_kind={options.map_kind!r} is unknown; use 'cross' or 'concept'")
    concept = set()
    if options.map_kind != "concept" and options.concept_blocks is not None:
        raise DiffuMaskError(
            f"concept_blocks={list(options.concept_blocks)} chooses map_kind 'concept' maps; "
            "pass map_kind='concept', or with map_kind='cross' choose cross_blocks"
        )
    if options.map_kind == "concept":
        if concepts is None:
            raise DiffuMaskError(
                f"map_kind='concept' needs the concepts of the batch ({kind} got none: see "
                "families.SD3Family.concepts); use map_kind='cross'"
            )
        wanted = options.concept_blocks or default_concept_blocks(model)
        concept = _blocks("concept_blocks", wanted, joint, kind)
    layers = text_layers(model)
    cross = set()
    if options.map_kind == "cross":
        every = len(set(layers.values()))
        cross = _blocks("cross_blocks", options.cross_blocks or range(every), every, kind)
    elif options.cross_blocks is not None:
        raise DiffuMaskError(
            f"cross_blocks={list(options.cross_blocks)} chooses map_kind 'cross' maps; with "
            "map_kind='concept' choose concept_blocks"
        )
    selected = {}
    for name, index in layers.items():
        joint_block = name.startswith("transformer_blocks.")
        # the concept stream flows through every double block up to the last one read
        streams = bool(concept) and joint_block and index <= max(concept)
        if index in cross or streams or (joint_block and index in affinity):
            selected[name] = (
                joint_block and index in affinity,
                joint_block and index in concept,
                index in cross,
            )
    return selected


def _grid(model, args, kwargs) -> tuple[tuple[int, int], int]:
    """(image token grid, text tokens) of one transformer call, from its inputs."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
    if isinstance(model, SD3Transformer2DModel):
        patch = model.config.patch_size
        return (hidden.shape[-2] // patch, hidden.shape[-1] // patch), text.shape[1]
    ids = kwargs.get("img_ids")
    if ids is None:
        raise DiffuMaskError(
            "the FLUX.1 transformer was called without img_ids, so the image grid is unknown; "
            "call it through a FluxPipeline (or pass img_ids)"
        )
    ids = ids.reshape(-1, ids.shape[-1])
    rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    if rows * cols != hidden.shape[1]:
        raise DiffuMaskError(
            f"the FLUX.1 image ids span a {rows}x{cols} grid but {hidden.shape[1]} image tokens "
            "came in; use row-major ids as FluxPipeline makes them"
        )
    return (rows, cols), text.shape[1]


@contextlib.contextmanager
def trace(
    model,
    tokens: Sequence[Sequence[int]],
    options: CaptureOptions,
    concepts: Concepts | None = None,
) -> Iterator[Capture]:
    """Capture the joint attention of every call of `model` made inside the block; the
    original processors come back on exit, on error too. concepts: for map_kind
    "concept" (see families.SD3Family.concepts)."""
    originals = dict(model.attn_processors)
    selected = _select_layers(model, options, concepts)
    wrappable = WRAPPABLE[next(c for c in SUPPORTED if isinstance(model, c))]
    for name in selected:
        processor = originals[name]
        if type(processor) not in wrappable:
            raise DiffuMaskError(
                f"attention layer {name!r} uses {type(processor).__name__}, which capture "
                f"cannot reproduce; call pipe.transformer.set_attn_processor("
                f"{wrappable[0].__name__}()) (and unfuse projections) before generating"
            )
    flux = isinstance(model, FluxTransformer2DModel)
    concepts = concepts if options.map_kind == "concept" else None
    sums = _Sums(tokens, options, "FLUX.1" if flux else "SD3", concepts)
    processors = dict(originals)
    for name, (affinity, concept_map, cross) in selected.items():
        if flux:
            processors[name] = FluxCaptureProcessor(
                sums, originals[name], affinity, concept_map, cross
            )
        else:
            processors[name] = JointCaptureProcessor(sums, affinity, concept_map, cross)

    def begin_call(module, args, kwargs):
        sums.begin_call(kwargs["timestep"], *_grid(module, args, kwargs))
        if sums.stream is not None and sums.active:
            sums.stream.start(module)

    def before_block(block, args, kwargs):
        if sums.active:
            sums.stream.before_block(block, kwargs["temb"])

    def after_block(block, args, output):
        if sums.active:
            sums.stream.after_block(block)

    hooks = [model.register_forward_pre_hook(begin_call, with_kwargs=True)]
    if sums.stream is not None:
        streamed = {int(name.split(".")[1]) for name in selected if name.startswith("transformer_")}
        for index in sorted(streamed):
            block = model.transformer_blocks[index]
            hooks.append(block.register_forward_pre_hook(before_block, with_kwargs=True))
            hooks.append(block.register_forward_hook(after_block))
    try:
        model.set_attn_processor(processors)
        yield Capture(sums, {name: 1 for name in selected})
    finally:
        for hook in hooks:
            hook.remove()
        # set_attn_processor consumes the dict it is given
        model.set_attn_processor(dict(originals))
