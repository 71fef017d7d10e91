"""What every capture shares: its options, the float32 running sums, the result, and the
one function that attends while keeping the probabilities of chosen key columns.

Nothing here knows an architecture: the UNet and MMDiT modules hand in query, key and value
tensors laid out [batch, heads, sequence, head_dim] and say which rows, queries and key
columns they read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from ..errors import DiffuMaskError

# Kernels behind scaled_dot_product_attention that also return each query's log-sum-exp
# over the keys, by (device type, the backend SDPA picks). Only those whose output is the
# one SDPA gives for that pick: cuDNN (what SDPA picks on H100/H200 for the SD and SDXL
# head dims, checked equal bit for bit), FlashAttention (SDPA always asks it for the
# log-sum-exp) and the CPU's flash kernel. The memory-efficient kernel is left out: SDPA
# runs it without the log-sum-exp, and asking for it is not checked to leave the output be.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_LSE_KERNELS = {
    ("cpu", int(SDPBackend.FLASH_ATTENTION)): lambda q, k, v: _CPU_FLASH(q, k, v, 0.0, False)[:2],
    ("cuda", int(SDPBackend.CUDNN_ATTENTION)): lambda q, k, v: (
        torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False)[:2]
    ),
    ("cuda", int(SDPBackend.FLASH_ATTENTION)): lambda q, k, v: (
        torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False)[:2]
    ),
}
# float32 scores materialised at once where no kernel gives the log-sum-exp (256 MB): a
# full joint attention matrix of FLUX.1 at 1024 px is ~2 GB per layer and image.
CHUNK_ELEMENTS = 2**26


def _scale(query: torch.Tensor) -> float:
    # scaled_dot_product_attention's default, which the stock processors rely on
    return query.shape[-1] ** -0.5


@dataclass(frozen=True)
class CaptureOptions:
    """What to keep.

    cross_factors: downsampling factors, relative to the latent, of the cross-attention
        maps to keep (SD at 512 px: 1 -> 64x64, 2 -> 32x32, 4 -> 16x16, 8 -> 8x8).
        None keeps every factor up to 4. MMDiT models attend at one resolution: factor 1.
    steps: (start, stop) denoising-step indices to accumulate, stop exclusive; None: all.
    affinity_factor: the factor at which to keep self-attention as an affinity matrix
        (heads, layers and steps averaged); None keeps none. MMDiT models: 1, taken from
        the image-to-image part of the joint attention of `affinity_blocks`.
    affinity_steps: (start, stop) step indices whose self-attention makes the affinity,
        within `steps`; None: every step read. Self-attention outside it runs plain.
    conditional_half: with classifier-free guidance the denoiser's batch is
        [uncond, cond]; only the conditional half is read.
    affinity_blocks: MMDiT only: indices of the joint (double-stream) blocks whose
        image-to-image attention makes the affinity; None: the middle third.
    cross_blocks: MMDiT only, map_kind "cross": indices of the blocks whose image-to-text
        attention makes the class maps (FLUX.1's single-stream blocks numbered on after its
        double-stream ones); None: every block.
    map_kind: "cross" (attention of image tokens to the class tokens) or, MMDiT only,
        "concept" (ConceptAttention: class and background concepts as an extra stream,
        maps from the attention-output space; see capture.mmdit).
    concept_blocks: MMDiT, map_kind "concept": the joint (double-stream) blocks whose
        maps are averaged; None: the second half.
    """

    cross_factors: tuple[int, ...] | None = None
    steps: tuple[int, int] | None = None
    affinity_factor: int | None = None
    affinity_steps: tuple[int, int] | None = None
    conditional_half: bool = True
    affinity_blocks: tuple[int, ...] | None = None
    map_kind: str = "cross"
    concept_blocks: tuple[int, ...] | None = None
    cross_blocks: tuple[int, ...] | None = None


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


def _gather_keys(key: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """key [P, heads, keys, dim] at columns [P, kept] -> [P, heads, kept, dim]."""
    index = columns.to(key.device)[:, None, :, None]
    return key.gather(2, index.expand(key.shape[0], key.shape[1], index.shape[2], key.shape[3]))


def _additive(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))


def _query_chunks(query: torch.Tensor, keys: int) -> list[slice]:
    rows, heads, queries = query.shape[:3]
    step = max(1, CHUNK_ELEMENTS // max(1, rows * heads * keys))
    return [slice(start, start + step) for start in range(0, queries, step)]


def _chunk_scores(query, key_t, mask, chunk: slice) -> torch.Tensor:
    """float32 scaled scores of one chunk of queries [P, heads, chunk, keys]."""
    # float32 whatever the pipeline's dtype: fp16 loses the small probabilities that
    # make up most of an object's map
    scores = torch.matmul(query[:, :, chunk].float() * _scale(query), key_t)
    if mask is not None:
        scores = scores + (mask if mask.shape[-2] == 1 else mask[..., chunk, :]).float()
    return scores


def to_heads(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    heads: int,
    norm_q: Callable[[torch.Tensor], torch.Tensor] | None = None,
    norm_k: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Projected [batch, sequence, heads * head_dim] query, key and value as [batch, heads,
    sequence, head_dim], with the layer's per-head query and key norms where it has them."""
    query, key, value = (
        x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)
        for x in (query, key, value)
    )
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    return query, key, value


def kept_probabilities(
    query: torch.Tensor, key: torch.Tensor, columns: torch.Tensor, mask=None
) -> torch.Tensor:
    """softmax(q k^T) over all keys, kept only at `columns` [P, kept]: [P, heads, Q, kept]
    float32, computed over chunks of queries so no (Q x keys) matrix is ever whole."""
    mask = _additive(mask)
    key_t = key.float().mT
    index = columns.to(query.device)[:, None, None, :]
    parts = []
    for chunk in _query_chunks(query, key.shape[2]):
        scores = _chunk_scores(query, key_t, mask, chunk)
        picked = scores.gather(-1, index.expand(*scores.shape[:3], index.shape[-1]))
        parts.append(torch.exp(picked - scores.logsumexp(dim=-1, keepdim=True)))
    return torch.cat(parts, dim=2)


def mean_attention(query: torch.Tensor, key: torch.Tensor, mask=None, lse=None) -> torch.Tensor:
    """softmax(q k^T) over the given keys, averaged over heads: [P, Q, keys] float32,
    computed over chunks of queries (rows sum to 1), so no (heads x Q x keys) float32
    matrix is ever whole.

    lse: each query's log-sum-exp over these keys [P, heads, Q], as the attention kernel
    returned it: the probabilities are then one exp away from the scores, with no max and
    sum passes. The scores' product then runs in the inputs' precision (float16 on a GPU
    accumulates in float32 and rounds each score to 11 bits: probabilities within ~0.5%,
    which averaging over heads, layers and steps only smooths).
    """
    mask = _additive(mask)
    parts = []
    if lse is None:
        key_t = key.float().mT
        for chunk in _query_chunks(query, key.shape[2]):
            parts.append(_chunk_scores(query, key_t, mask, chunk).softmax(dim=-1).mean(dim=1))
        return torch.cat(parts, dim=1)
    key_t = key.mT * _scale(query)
    for chunk in _query_chunks(query, key.shape[2]):
        scores = torch.matmul(query[:, :, chunk], key_t).float()
        if mask is not None:
            scores = scores + (mask if mask.shape[-2] == 1 else mask[..., chunk, :]).float()
        parts.append(torch.exp(scores - lse[:, :, chunk, None]).mean(dim=1))
    return torch.cat(parts, dim=1)


def lse_kernel(device_type: str, backend: int) -> Callable | None:
    """The kernel that gives SDPA's output and the log-sum-exp when SDPA picks `backend`
    on `device_type`, or None where there is none (then the caller computes it)."""
    if device_type == "cpu" and _CPU_FLASH is None:
        return None
    return _LSE_KERNELS.get((device_type, int(backend)))


def attention_with_lse(query, key, value) -> tuple[torch.Tensor, torch.Tensor | None]:
    """scaled_dot_product_attention(query, key, value) exactly as SDPA computes it, and each
    query's log-sum-exp over the keys [B, heads, Q] (float32) when the kernel SDPA picks
    returns one; None otherwise. No mask: with one, SDPA may pick other kernels."""
    backend = torch._fused_sdp_choice(query, key, value)
    kernel = lse_kernel(query.device.type, backend)
    # Flash kernels on CUDA take head dims that are multiples of 8 (SDPA pads the others).
    if kernel is None or (query.is_cuda and query.shape[-1] % 8):
        return F.scaled_dot_product_attention(query, key, value), None
    out, lse = kernel(query, key, value)
    return out, lse.reshape(query.shape[:3]).float()


def attend_keeping_columns(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rows: int,
    columns: torch.Tensor,
    queries: slice = slice(None),
    mask: torch.Tensor | None = None,
    plain: Callable[[], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention output of the whole batch, exactly as the stock processor gives it,
    and the probabilities [P, heads, queries, kept] (float32, normalised over every key)
    of batch rows `rows:`, query positions `queries`, key positions `columns` [P, kept].

    plain: how the stock processor attends, when that is not plain SDPA with `mask`
    (another attention backend); the output then comes from it and the log-sum-exp from
    a chunked float32 pass.
    """
    lse = None
    if plain is None and mask is None:
        out, lse = attention_with_lse(query, key, value)
    elif plain is not None:
        out = plain()
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    if lse is not None:
        # The kernel's log-sum-exp normalises the kept columns' logits: one
        # (queries x kept columns) product, not a second pass over all the keys.
        kept = _gather_keys(key[rows:], columns)  # [P, heads, kept, dim]
        logits = torch.matmul(query[rows:, :, queries].float(), kept.float().mT * _scale(query))
        return out, torch.exp(logits - lse[rows:, :, queries, None])
    if mask is not None:
        mask = mask[rows:] if mask.shape[0] > 1 else mask
        if mask.shape[-2] > 1:
            mask = mask[..., queries, :]
    return out, kept_probabilities(query[rows:, :, queries], key[rows:], columns, mask)


class RunningSums:
    """Running sums shared by all processors of one capture: the kept columns' maps per
    map size and one affinity, float32, added into; nothing kept per step."""

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
        self.cross: dict[tuple[int, int], torch.Tensor] = {}
        self.cross_adds: dict[tuple[int, int], int] = {}
        self.affinity: torch.Tensor | None = None
        self.affinity_size: tuple[int, int] | None = None
        self.affinity_adds = 0
        self.steps_seen: set[int] = set()

    @property
    def active(self) -> bool:
        steps = self.options.steps
        return steps is None or steps[0] <= self.step < steps[1]

    @property
    def affinity_active(self) -> bool:
        """Whether this step's self-attention goes into the affinity."""
        steps = self.options.affinity_steps
        return self.active and (steps is None or steps[0] <= self.step < steps[1])

    def split(self, batch: int, denoiser: str = "UNet") -> int:
        """Where the conditional rows of the denoiser's batch start."""
        prompts = len(self.tokens)
        if self.options.conditional_half:
            if batch != 2 * prompts:
                raise DiffuMaskError(
                    f"the {denoiser} batch has {batch} rows, not 2 x {prompts} prompts; with "
                    "guidance_scale <= 1 there is no unconditional half: capture with "
                    "conditional_half=False"
                )
            return prompts
        if batch != prompts:
            raise DiffuMaskError(
                f"the {denoiser} batch has {batch} rows but {prompts} prompts were given"
            )
        return 0

    def add_cross(self, picked: torch.Tensor, size: tuple[int, int]) -> None:
        """Add one layer's kept columns' maps [P, Q, kept] (heads averaged) at `size`."""
        if size in self.cross:
            self.cross[size] += picked
        else:
            self.cross[size] = picked
        self.cross_adds[size] = self.cross_adds.get(size, 0) + 1
        self.steps_seen.add(self.step)

    def add_affinity(self, probs: torch.Tensor, size: tuple[int, int]) -> None:
        """Add one layer's row-stochastic self-attention [P, Q, Q] (heads averaged)."""
        self.affinity = probs if self.affinity is None else self.affinity + probs
        self.affinity_size = size
        self.affinity_adds += 1

    def result(self) -> Captured:
        if not self.cross and self.options.steps is not None and self.step >= 0:
            raise DiffuMaskError(
                f"steps={list(self.options.steps)} selected none of the {self.step + 1} "
                "denoising steps run (indices from 0; labelling a given image runs only the "
                "last `strength` share of num_inference_steps); choose a range inside them, "
                "or None for every step"
            )
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
        elif self.options.affinity_factor is not None and self.options.affinity_steps:
            raise DiffuMaskError(
                f"affinity_steps={list(self.options.affinity_steps)} selected none of the "
                f"{len(self.steps_seen)} denoising steps read (indices from 0); choose a "
                "range inside them, or None for every step"
            )
        return Captured(
            cross=cross,
            tokens=self.tokens,
            affinity=affinity,
            affinity_size=self.affinity_size,
            steps=len(self.steps_seen),
            layers=layers,
        )


class Capture:
    """A live capture; `result()` gives the averaged maps once the pipeline has run."""

    def __init__(self, sums: RunningSums, wrapped: dict[str, int]):
        self._sums = sums
        self.wrapped = wrapped  # processor name -> factor, the layers being captured

    def result(self) -> Captured:
        return self._sums.result()
