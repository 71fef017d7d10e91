"""Train the built-in shapes-world latent diffusion model (``builtin:shapes``).

Stages, each cached in the work folder so a rerun with ``--resume`` picks up where it
stopped: (1) a word-level tokenizer from the world's vocabulary; (2) a small
AutoencoderKL (64x64 RGB <-> 16x16x4 latent), then its decoder trained on alone
(--decoder-steps: the encoder frozen, so the latents keep their meaning); (3) a fixed set
of rendered scenes encoded to latents; (4) the text encoder and UNet2DConditionModel
trained with the denoising loss (epsilon, or v with --prediction), plus an unsupervised
attention-sharpness term (the entropy of each pixel's
cross-attention distribution over tokens) between --entropy-start and --entropy-stop.
Masks never enter training: they are read only by the localisation probe, which logs how
well the cross-attention of the shape and colour words overlaps the objects in held-out
scenes. The schedule: 315 steps without the term, the term at weight 0.05 until step
4357 (attention collapses onto a sink token), then without it (the remainder on the object
words localises). The defaults are the recipe of the shipped weights: that schedule with
min-SNR loss weighting (gamma 5), 27,000 steps at a constant learning rate that falls
linearly to zero over the last 3,000 (--cooldown-steps), the autoencoder seeded and
trained 2,000 steps, then its decoder alone 2,700 more (--decoder-steps). On 2 CPU cores
(--threads 2) about 30 + 23 + 4 + 125-280 minutes (autoencoder, decoder, encoding, UNet
at 0.28-0.62 s/step); on an NVIDIA H200 the UNet runs at 11 ms/step. Every recipe tried,
and how the shipped weights were made, is in the lab log (docs/lab/shapes-training.md):

    python scripts/train_shapes.py --work runs/shapes --export runs/shapes/export
    python scripts/train_shapes.py --work runs/shapes --resume --export ...   # after a stop
    python scripts/train_shapes.py --work runs/more --init-from diffumask_datasets/weights/shapes \
        --max-steps 30000 --export ...   # on from an export: its work folder is gone
    python scripts/train_shapes.py --device cuda ...   # the same recipe on a GPU
    python scripts/train_shapes.py --work runs/shapes-S --min-snr-gamma 0 --max-steps 11817 \
        --cooldown-steps 0 --vae-steps 800 --decoder-steps 0 --export ...   # a shorter recipe
    python scripts/train_shapes.py --work runs/dec --init-from diffumask_datasets/weights/shapes \
        --export ...   # an export whose decoder was not tuned: that stage alone

On a GPU each step's forward and backward are recorded once as a CUDA graph and replayed
(--no-cuda-graph: launched one by one, 5x slower on the H200).

Every random draw (batches, noise, timesteps, dropped captions) comes from one CPU
generator, so ``--device cuda`` trains on the same data in the same order as the CPU, and a
run may resume on another device. ``training.json`` records each training session's device,
steps and seconds, and the wall time of the autoencoder and UNet stages.

The run writes ``log.jsonl`` (loss, entropy, probe figures), ``ckpt.pt`` every few
minutes, ``best.pt`` at the best probe so far, and exports a StableDiffusionPipeline
folder (safetensors) from the best or the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffumask_datasets import shapes_world as sw  # noqa: E402
from diffumask_datasets.errors import DiffuMaskError  # noqa: E402

SPECIALS = ("<pad>", "<unk>", "<start>", "<end>")
MAX_LENGTH = 24


# ---------------------------------------------------------------- tokenizer
def build_tokenizer():
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(sw.CAPTION_WORDS))}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    # Punctuation splits off as its own (unknown) token rather than gluing to a word.
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    core.post_processor = processors.TemplateProcessing(
        single="<start> $A <end>",
        special_tokens=[("<start>", vocab["<start>"]), ("<end>", vocab["<end>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<start>",
        eos_token="<end>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MAX_LENGTH,
    )


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions,
        padding="max_length",
        max_length=MAX_LENGTH,
        truncation=True,
        return_tensors="pt",
    ).input_ids


# ---------------------------------------------------------------- models
def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        mid_block_add_attention=False,
    )


def make_text_encoder(tokenizer, layers: int, hidden: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return CLIPTextModel(config)


def make_unet(args):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type=args.mid_block,
        block_out_channels=tuple(args.channels),
        layers_per_block=1,
        cross_attention_dim=args.text_hidden,
        # Legacy diffusers naming: this is the number of heads.
        attention_head_dim=args.heads,
        norm_num_groups=8,
        only_cross_attention=args.only_cross,
    )


def make_scheduler(kind: str = "ddpm", prediction: str = "epsilon"):
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type=prediction,
    )
    if kind == "ddim":
        return DDIMScheduler(**common, set_alpha_to_one=False, steps_offset=1)
    return DDPMScheduler(**common)


# ---------------------------------------------------------------- attention read-out
class RecordingProcessor:
    """Plain attention math (same result as diffusers' default processor) that also keeps
    each cross-attention's probabilities, so training can penalise their entropy and the
    probe can read them."""

    def __init__(self, sink: list, name: str):
        self.sink = sink
        self.name = name

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        **kwargs,
    ):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, None)
        if encoder_hidden_states is not None:
            self.sink.append((self.name, attn.heads, probs))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


def install_recorders(unet) -> list:
    sink: list = []
    processors = {}
    for name in unet.attn_processors:
        processors[name] = RecordingProcessor(sink, name)
    unet.set_attn_processor(processors)
    return sink


def token_maps(records, batch: int, size: int = 64) -> torch.Tensor:
    """Average recorded cross-attention over layers and heads: (batch, tokens, size, size),
    each resolution upsampled bilinearly before averaging."""
    total = None
    for _, heads, probs in records:
        n, q, t = probs.shape
        side = int(math.isqrt(q))
        maps = probs.reshape(batch, heads, side, side, t).mean(1).permute(0, 3, 1, 2)
        maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
        total = maps if total is None else total + maps
    return total / len(records)


def coverage_loss(records, content: torch.Tensor, frac: float) -> torch.Tensor:
    """1 - (mean of the top `frac` of pixels' attention to a content word), averaged over
    the caption's content words (shapes and colours): every object the caption names must
    be attended strongly somewhere. Where is left to the denoising loss; no mask is used."""
    weights = content.float()
    if weights.sum() == 0:
        return torch.zeros(())
    values = []
    for _, heads, probs in records:
        b = content.shape[0]
        p = probs.reshape(b, heads, probs.shape[1], probs.shape[2]).mean(1)  # [B, Q, T]
        k = max(1, int(round(frac * p.shape[1])))
        top = p.topk(k, dim=1).values.mean(1)  # [B, T]
        values.append(((1 - top) * weights).sum() / weights.sum())
    return torch.stack(values).mean()


def smoothness_loss(records, content: torch.Tensor) -> torch.Tensor:
    """Total variation of each content word's attention map (mean absolute difference
    between neighbouring pixels), averaged over the caption's content words: attention
    should fall on coherent regions, not on scattered pixels. No mask is used."""
    weights = content.float()
    if weights.sum() == 0:
        return torch.zeros(())
    values = []
    for _, heads, probs in records:
        b, side = content.shape[0], int(math.isqrt(probs.shape[1]))
        p = probs.reshape(b, heads, side, side, probs.shape[2]).mean(1)  # [B, s, s, T]
        tv = (p[:, 1:] - p[:, :-1]).abs().mean((1, 2)) + (p[:, :, 1:] - p[:, :, :-1]).abs().mean(
            (1, 2)
        )  # [B, T]
        values.append((tv * weights).sum() / weights.sum())
    return torch.stack(values).mean()


def snr_weight(alpha_bar: torch.Tensor, gamma: float, prediction: str = "epsilon") -> torch.Tensor:
    """Min-SNR loss weighting (Hang et al. 2023): each sample's epsilon loss times
    min(SNR, gamma) / SNR, which lowers the weight of the nearly clean timesteps
    (SNR > gamma) so training spends itself on the noisy ones, where an object's shape is
    decided. The v objective's loss is (SNR + 1) times the epsilon loss's scale at x0, so
    its weight is min(SNR, gamma) / (SNR + 1)."""
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(max=gamma) / (snr if prediction == "epsilon" else snr + 1)


def learning_rate(step: int, lr: float, max_steps: int, cooldown: int) -> float:
    """The rate of the step about to run: constant, then linear down to zero over the
    last `cooldown` steps of `max_steps` (0: constant throughout)."""
    if cooldown <= 0:
        return lr
    return lr * min(1.0, (max_steps - step) / cooldown)


def denoising_losses(
    unet, text_encoder, sink: list, batch: dict, alphas: torch.Tensor, args
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss of one batch and its figures (epsilon MSE, entropy, coverage,
    smoothness) as one tensor. Free of host syncs, so a CUDA graph can capture it."""
    x0, noise = batch["x0"], batch["noise"]
    a = alphas[batch["t"]].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    sink.clear()
    pred = unet(noisy, batch["t"], encoder_hidden_states=text_encoder(batch["ids"])[0]).sample
    if args.prediction == "epsilon":
        target, eps = noise, pred
    else:  # v = sqrt(a) noise - sqrt(1 - a) x0
        target = a.sqrt() * noise - (1 - a).sqrt() * x0
        eps = a.sqrt() * pred + (1 - a).sqrt() * noisy
    mse = F.mse_loss(eps, noise)  # logged as the epsilon error, comparable across objectives
    # gamma 0, epsilon: runs A-S's loss, to the bit
    denoise = mse if args.prediction == "epsilon" else F.mse_loss(pred, target)
    if args.min_snr_gamma > 0:
        per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))
        weight = snr_weight(a.view(-1), args.min_snr_gamma, args.prediction)
        denoise = (per_sample * weight).mean()
    entropy = query_entropy(sink)
    loss = denoise + args.entropy_weight * batch["ramp"] * entropy
    coverage = smooth = torch.zeros((), device=loss.device)
    if args.coverage_weight > 0:
        coverage = coverage_loss(sink, batch["content"], args.coverage_frac)
        loss = loss + args.coverage_weight * batch["ramp"] * coverage
    if args.smooth_weight > 0:
        smooth = smoothness_loss(sink, batch["content"])
        loss = loss + args.smooth_weight * batch["ramp"] * smooth
    return loss, torch.stack([mse, entropy, coverage, smooth]).detach()


class GraphedBackward:
    """Forward and backward of `losses` recorded once as a CUDA graph and replayed for
    every step: the small UNet's step is thousands of tiny kernels, so launching them one
    by one, not the GPU, sets the pace. The gradients live in the graph's memory, each
    replay overwrites them (no zero_grad), and the optimizer steps outside the graph."""

    def __init__(self, losses, batch: dict, params: list):
        self.static = {k: v.clone() for k, v in batch.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture: lazy inits, autotuning
            for _ in range(3):
                losses(self.static)[0].backward()
        torch.cuda.current_stream().wait_stream(side)
        for p in params:
            p.grad = None
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            loss, self.figures = losses(self.static)
            loss.backward()

    def __call__(self, batch: dict) -> torch.Tensor:
        for key, value in batch.items():
            self.static[key].copy_(value)
        self.graph.replay()
        return self.figures


def query_entropy(records) -> torch.Tensor:
    """Mean entropy (nats) of each query's distribution over tokens."""
    values = [-(p * torch.log(p.clamp_min(1e-8))).sum(-1).mean() for _, _, p in records]
    return torch.stack(values).mean()


# ---------------------------------------------------------------- probe (evaluation only)
def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def word_positions(tokenizer, caption: str) -> dict[str, int]:
    ids = tokenize(tokenizer, [caption])[0].tolist()
    vocab = tokenizer.get_vocab()
    out = {}
    for word in sw.CAPTION_WORDS:
        if vocab[word] in ids:
            out[word] = ids.index(vocab[word])
    return out


@torch.no_grad()
def probe(unet, text_encoder, tokenizer, scheduler, probe_set, timesteps=(300, 600)) -> dict:
    """IoU between the max-normalised, 0.5-thresholded cross-attention of an object's
    shape word (and colour word) and the object's exact mask, on noised held-out scenes."""
    latents, scenes = probe_set
    device = latents.device
    sink = install_recorders(unet)
    ids = tokenize(tokenizer, [s.caption for s in scenes])
    states = text_encoder(ids.to(device))[0]
    # Noise drawn on the CPU, so the probe sees the same noise on every device.
    gen = torch.Generator().manual_seed(1234)
    maps = 0
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=gen).to(device)
        tt = torch.full((len(scenes),), t, dtype=torch.long)
        noisy = scheduler.add_noise(latents, noise, tt.to(device))
        sink.clear()
        unet(noisy, tt.to(device), encoder_hidden_states=states)
        maps = maps + token_maps(sink, len(scenes))
    sink.clear()
    maps = maps.cpu().numpy()
    word = np.isin(ids.numpy(), [tokenizer.get_vocab()[w] for w in sw.CAPTION_WORDS])
    # Share of each pixel's attention that goes to caption words (not start/end/pad).
    word_mass = float((maps.sum(axis=(2, 3)) * word).sum() / maps.sum())
    return {**localisation_figures(maps, scenes, tokenizer), "probe_word_mass": word_mass}


def localisation_figures(maps: np.ndarray, scenes, tokenizer) -> dict:
    """How well each object's shape word (and colour word) map [scene, token, 64, 64]
    overlaps the object: IoU of the max-normalised map cut at 0.5, the best IoU over five
    cuts, the IoU of the object's area worth of highest-scoring pixels (threshold-free) and
    the median ratio of the map's mean inside to outside the object."""
    shape_ious, colour_ious, ratios, best, ranked = [], [], [], [], []
    for i, scene in enumerate(scenes):
        positions = word_positions(tokenizer, scene.caption)
        for k, obj in enumerate(scene.objects):
            inside = scene.instances == k + 1
            if inside.sum() < 20:
                continue
            for word, bucket in ((obj.shape, shape_ious), (obj.colour, colour_ious)):
                if word not in positions:
                    continue
                m = maps[i, positions[word]]
                m = m / max(m.max(), 1e-8)
                bucket.append(iou(m >= 0.5, inside))
                if word == obj.shape:
                    ratios.append(float(m[inside].mean() / max(m[~inside].mean(), 1e-8)))
                    best.append(max(iou(m >= th, inside) for th in (0.3, 0.4, 0.5, 0.6, 0.7)))
                    # Threshold-free: the object's area worth of highest-scoring pixels.
                    top = m >= np.sort(m, axis=None)[-int(inside.sum())]
                    ranked.append(iou(top, inside))
    return {
        "probe_shape_iou": float(np.mean(shape_ious)),
        "probe_colour_iou": float(np.mean(colour_ious)),
        "probe_shape_best_iou": float(np.mean(best)),
        "probe_in_out_ratio": float(np.median(ratios)),
        "probe_shape_area_iou": float(np.mean(ranked)),
    }


# ---------------------------------------------------------------- stages
def atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def device_name(device: torch.device, threads: int) -> str:
    """'cuda: NVIDIA H100 80GB HBM3' or 'cpu: 2 cores, 1 torch thread'."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {os.cpu_count()} cores, {threads} torch thread{'s' if threads > 1 else ''}"


def make_log(work: Path):
    """log(record): the record printed as a JSON line and appended to work/log.jsonl."""

    def log(record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        with (work / "log.jsonl").open("a") as fh:
            fh.write(line + "\n")

    return log


class Run:
    """A training loop's bookkeeping apart from its weights: the step, the seconds trained
    over every session, the best probe score, each session's device and steps, where the
    run began (--init-from), and when a checkpoint, a snapshot or the best is written.
    `weights()` gives the loop's own part of a checkpoint (models, optimizer, generator)."""

    def __init__(self, work: Path, args, device: torch.device, weights, log):
        self.work, self.args, self.weights, self.log = work, args, weights, log
        self.step, self.seconds, self.best = 0, 0.0, -1.0
        self.sessions: list[dict] = []
        self.lineage = None
        self.device = device_name(device, args.threads)

    def resume(self, ckpt: dict) -> None:
        """Go on from a checkpoint of this run (its own part is the loop's to load)."""
        if ckpt["step"] > self.args.max_steps:
            # --max-steps is not read back from the run: left out, it is the script's default
            sys.exit(
                f"--resume: {self.work / 'ckpt.pt'} is at step {ckpt['step']}, past "
                f"--max-steps {self.args.max_steps}; pass the run's --max-steps (and "
                "--cooldown-steps) or larger ones to train on, or --export-only to export it"
            )
        self.step, self.seconds, self.best = ckpt["step"], ckpt["seconds"], ckpt["best"]
        self.sessions, self.lineage = ckpt.get("sessions", []), ckpt.get("init_from")
        self.log({"stage": "resume", "step": self.step, "seconds": self.seconds})

    def start_from(self, start: dict) -> None:
        """Go on from an exported folder's step, seconds and sessions (init_from_export)."""
        self.step, self.seconds = start["step"], start["seconds"]
        self.sessions, self.lineage = start["sessions"], start["lineage"]

    def begin(self) -> None:
        """This session starts now: its clock, and the cap on its time (--minutes)."""
        self.began = self.last_ckpt = time.time()
        self.session_start = self.began - self.seconds
        self.from_step = self.step

    def elapsed(self) -> float:
        """Seconds trained over every session so far."""
        return time.time() - self.session_start

    def running(self) -> bool:
        # The cap is this session's: a run's whole time grows past any one cap by design.
        return self.step < self.args.max_steps and time.time() - self.began < self.args.minutes * 60

    def state(self, probe_figures=None) -> dict:
        session = {
            "device": self.device,
            "from_step": self.from_step,
            "to_step": self.step,
            "seconds": self.elapsed() - self.seconds,
        }
        return {
            **self.weights(),
            "step": self.step,
            "seconds": self.elapsed(),
            "best": self.best,
            "probe": probe_figures,
            "sessions": [*self.sessions, session],
            "init_from": self.lineage,
        }

    def after_step(self, probe, score_key: str) -> None:
        """The writes due after a step: the probe (`probe()`: its figures) every
        --probe-every steps and best.pt when its `score_key` figure is the best so far, a
        snapshot at --snapshots, the checkpoint every --ckpt-minutes."""
        if self.step % self.args.probe_every == 0:
            figures = probe()
            self.log(
                {
                    "stage": "probe",
                    "step": self.step,
                    **{k: round(v, 4) for k, v in figures.items()},
                }
            )
            if figures[score_key] > self.best:
                self.best = figures[score_key]
                atomic_save(self.state(figures), self.work / "best.pt")
        if self.step in self.args.snapshots:
            atomic_save(self.state(), self.work / f"snapshot-{self.step}.pt")
        if time.time() - self.last_ckpt > self.args.ckpt_minutes * 60:
            atomic_save(self.state(), self.work / "ckpt.pt")
            self.last_ckpt = time.time()

    def finish(self) -> None:
        atomic_save(self.state(), self.work / "ckpt.pt")
        if not (self.work / "best.pt").exists():
            atomic_save(self.state(), self.work / "best.pt")
        self.log({"stage": "done", "step": self.step, "elapsed": self.elapsed()})


def images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    arr = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def train_vae(work: Path, args, log, device: torch.device = torch.device("cpu")) -> tuple:
    path = work / "vae.pt"
    # Seeded before the autoencoder is built: runs A-T built it first, so their initial
    # weights came from an unseeded generator (torch seeds a fresh process at random).
    torch.manual_seed(args.seed)
    vae = make_vae()
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=False)
        vae.load_state_dict(state["model"])
        return vae.to(device), state["scale"]
    vae.to(device)
    rng = np.random.default_rng(args.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    start = time.time()
    for step in range(args.vae_steps):
        scenes = [sw.random_scene(rng) for _ in range(16)]
        x = images_to_tensor([s.image for s in scenes]).to(device)
        z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 1e-4 * z.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.vae_steps - 1:
            log({"stage": "vae", "step": step, "loss": loss.item(), "elapsed": time.time() - start})
    vae.eval()
    held_out_mse, z = round_trip_error(vae, args.seed)
    scale = float(1.0 / z.std())
    atomic_save(
        {
            "model": vae.state_dict(),
            "scale": scale,
            "held_out_mse": held_out_mse,
            "seconds": time.time() - start,
            "device": device_name(device, args.threads),
        },
        path,
    )
    log(
        {
            "stage": "vae",
            "done": True,
            "scale": scale,
            "held_out_mse": held_out_mse,
            "elapsed": time.time() - start,
        }
    )
    return vae, scale


@torch.no_grad()
def round_trip_error(vae, seed: int) -> tuple[float, torch.Tensor]:
    """The held-out round trip's MSE (the image's pixels in [-1, 1]; 0.0012 for the shipped
    model): what the autoencoder costs every image the model draws; and the held-out
    latents."""
    device = next(vae.parameters()).device
    scenes = sw.sample_scenes(256, seed=seed + 2)
    x = images_to_tensor([s.image for s in scenes]).to(device)
    z = vae.encode(x).latent_dist.mean
    return F.mse_loss(vae.decode(z).sample, x).item(), z


# The weights that turn latents into pixels: what --decoder-steps tunes.
DECODER = ("decoder.", "post_quant_conv.")


def decoder_parameters(vae) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vae.state_dict().items() if k.startswith(DECODER)}


def load_tuned_decoder(work: Path, vae) -> dict | None:
    """The work folder's tuned decoder (decoder.pt) loaded into `vae`; its record, or None
    when the run tuned none."""
    path = work / "decoder.pt"
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    vae.load_state_dict({**vae.state_dict(), **state["model"]})
    return {k: v for k, v in state.items() if k != "model"}


def tune_decoder(work: Path, vae, args, log) -> dict | None:
    """Stage 2b: the decoder trained on with the encoder frozen. The latents, and so a
    UNet trained on them, keep their meaning, so this stage may follow the UNet (from an
    export, with --init-from) as well as precede it; it raises the ceiling every drawing
    meets on its way out. The learning rate falls linearly to zero over the steps.
    Cached as decoder.pt (the tuned weights and its record); returns the record."""
    cached = load_tuned_decoder(work, vae)
    if cached is not None or args.decoder_steps == 0:
        return cached
    device = next(vae.parameters()).device
    before, _ = round_trip_error(vae, args.seed)
    tuned = [p for k, p in vae.named_parameters() if k.startswith(DECODER)]
    vae.requires_grad_(False)
    for p in tuned:
        p.requires_grad_(True)
    rng = np.random.default_rng(args.seed + 4)
    opt = torch.optim.AdamW(tuned, lr=args.decoder_lr, weight_decay=0.0)
    start = time.time()
    vae.train()
    for step in range(args.decoder_steps):
        x = images_to_tensor([sw.random_scene(rng).image for _ in range(16)]).to(device)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        loss = F.mse_loss(vae.decode(z).sample, x)
        for group in opt.param_groups:
            group["lr"] = learning_rate(
                step, args.decoder_lr, args.decoder_steps, args.decoder_steps
            )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.decoder_steps - 1:
            log(
                {
                    "stage": "decoder",
                    "step": step,
                    "loss": loss.item(),
                    "elapsed": time.time() - start,
                }
            )
    vae.eval().requires_grad_(False)
    record = {
        "steps": args.decoder_steps,
        "lr": args.decoder_lr,
        "held_out_mse_before": before,
        "held_out_mse": round_trip_error(vae, args.seed)[0],
        "seconds": time.time() - start,
        "device": device_name(device, args.threads),
    }
    atomic_save({"model": decoder_parameters(vae), **record}, work / "decoder.pt")
    log({"stage": "decoder", "done": True, **record})
    return record


@torch.no_grad()
def encode_dataset(work: Path, vae, scale: float, tokenizer, args, log) -> tuple:
    path = work / "latents.pt"
    device = next(vae.parameters()).device
    if path.exists():
        data = torch.load(path, map_location="cpu", weights_only=False)
        return data["latents"].to(device), data["captions"]
    start = time.time()
    rng = np.random.default_rng(args.seed + 3)
    latents, captions = [], []
    for begin in range(0, args.scenes, 256):
        count = min(256, args.scenes - begin)
        scenes = [
            sw.random_scene(rng, backgrounds=args.background_weights, shapes=args.shape_weights)
            for _ in range(count)
        ]
        x = images_to_tensor([s.image for s in scenes]).to(device)
        latents.append(vae.encode(x).latent_dist.mean * scale)
        captions += [s.caption for s in scenes]
    latents = torch.cat(latents)
    atomic_save({"latents": latents.cpu(), "captions": captions}, path)
    log({"stage": "encode", "scenes": len(captions), "elapsed": time.time() - start})
    return latents, captions


def probe_set(vae, scale, args):
    # Held-out: a seed the training scenes never use; one and two objects, named backgrounds.
    rng = np.random.default_rng(args.seed + 10_000)
    scenes = [
        sw.random_scene(rng, count=1 + (i % 2), name_background=0.5, name_colour=1.0)
        for i in range(args.probe_scenes)
    ]
    device = next(vae.parameters()).device
    with torch.no_grad():
        x = images_to_tensor([s.image for s in scenes]).to(device)
        z = vae.encode(x).latent_dist.mean * scale
    return z, scenes


# What fixes the model's shape: an --init-from folder's own values are adopted for these.
ARCHITECTURE = ("channels", "heads", "text_hidden", "text_layers", "mid_block", "only_cross")


def init_from_export(folder: Path, work: Path, args, defaults: dict) -> dict:
    """Read a pipeline folder this script exported (the shipped weights, say) as a run's
    starting point: its architecture and objective become the command's, its autoencoder
    becomes the work folder's stage 2 (vae.pt), and its UNet and text encoder (the EMA
    weights it shipped) start both the trained and the EMA copies. The optimizer's moments
    and the generator's state are not in an export: they start afresh. Returns the start:
    step, UNet seconds and sessions so far, and the lineage to record (the weights are read
    by exported_weights, only when no checkpoint goes on instead)."""
    from diffusers import AutoencoderKL

    record_path = folder / "training.json"
    if not record_path.is_file() or not (folder / "unet").is_dir():
        sys.exit(
            f"--init-from {folder}: not a pipeline folder this script exported (no "
            "training.json or unet/ in it); pass a folder written by --export, such as "
            "diffumask_datasets/weights/shapes"
        )
    record = json.loads(record_path.read_text())
    trained = record.get("args", {})
    for key in (*ARCHITECTURE, "prediction"):
        if key not in trained:
            continue
        ours = getattr(args, key)
        if ours != defaults[key] and ours != trained[key]:
            flag = "--" + key.replace("_", "-")
            sys.exit(
                f"--init-from {folder}: its model was trained with {flag} {trained[key]}, "
                f"the command asks for {ours}; drop {flag} (the folder fixes the model)"
            )
        setattr(args, key, trained[key])
    vae = make_vae()
    vae.load_state_dict(AutoencoderKL.from_pretrained(folder / "vae").state_dict())
    vae_path = work / "vae.pt"
    if vae_path.exists():
        cached = torch.load(vae_path, map_location="cpu", weights_only=False)["model"]
        if any(not torch.equal(v, cached[k]) for k, v in vae.state_dict().items()):
            sys.exit(
                f"--init-from {folder}: {vae_path} holds another autoencoder, whose latents "
                "the folder's UNet cannot read; start in an empty --work"
            )
    else:
        atomic_save(
            {
                "model": vae.state_dict(),
                "scale": float(AutoencoderKL.load_config(folder / "vae")["scaling_factor"]),
                "held_out_mse": record.get("vae_held_out_mse"),
                "seconds": record.get("wall_seconds", {}).get("vae"),
                "device": record.get("vae_device"),
                "init_from": str(folder),
            },
            vae_path,
        )
    decoder_path = work / "decoder.pt"
    if record.get("decoder") and not decoder_path.exists():
        # The folder's decoder was tuned: that stage is done, not to be run on it again.
        atomic_save({"model": decoder_parameters(vae), **record["decoder"]}, decoder_path)
    return {
        "step": int(record["step"]),
        "seconds": float(record.get("wall_seconds", {}).get("unet") or 0.0),
        "sessions": record.get("sessions", []),
        "lineage": {
            "folder": str(folder),
            "step": int(record["step"]),
            "checkpoint": record.get("checkpoint"),
            "fresh": ["optimizer moments", "generator"],
            "init_from": record.get("init_from"),
        },
    }


def exported_weights(folder: Path) -> dict:
    """The UNet's and the text encoder's state dicts of an exported pipeline folder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    return {
        "unet": UNet2DConditionModel.from_pretrained(folder / "unet").state_dict(),
        "text": CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict(),
    }


def portable_tokenizers(dest: Path, folders: tuple[str, ...]) -> None:
    """Name an exported pipeline's tokenizers by the class every transformers version has
    (4.x and 5.x), not 5.x's TokenizersBackend, so the folder loads wherever diffusers
    does."""
    index_path = dest / "model_index.json"
    index = json.loads(index_path.read_text())
    for folder in folders:
        index[folder] = ["transformers", "PreTrainedTokenizerFast"]
        config_path = dest / folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def export(work: Path, which: str, dest: Path, args, log) -> None:
    from diffusers import StableDiffusionPipeline

    # The model is built as the training command built it (args.json, written when it
    # started), so --export-only needs no repeated --channels or --prediction.
    args_path = work / "args.json"
    train_args = json.loads(args_path.read_text()) if args_path.exists() else {}
    args = argparse.Namespace(**{**vars(args), **train_args})
    tokenizer = build_tokenizer()
    vae, scale = train_vae(work, args, log)
    decoder_record = load_tuned_decoder(work, vae)
    vae_record = torch.load(work / "vae.pt", map_location="cpu", weights_only=False)
    vae.register_to_config(scaling_factor=scale)
    ckpt = torch.load(work / f"{which}.pt", map_location="cpu", weights_only=False)
    unet = make_unet(args)
    text_encoder = make_text_encoder(tokenizer, args.text_layers, args.text_hidden)
    unet.load_state_dict(ckpt["ema_unet"])
    text_encoder.load_state_dict(ckpt["ema_text"])
    unet.set_default_attn_processor()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_scheduler("ddim", args.prediction),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    dest.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(dest, safe_serialization=True)
    portable_tokenizers(dest, ("tokenizer",))
    (dest / "training.json").write_text(
        json.dumps(
            {
                "checkpoint": which,
                "step": ckpt["step"],
                "probe": ckpt.get("probe"),
                # Where and how long it trained: the UNet's sessions (a resumed run may
                # have moved between machines) and the autoencoder's stage.
                "devices": sorted({s["device"] for s in ckpt.get("sessions", [])}),
                "wall_seconds": {
                    "vae": vae_record.get("seconds"),
                    "unet": ckpt.get("seconds"),
                },
                "vae_device": vae_record.get("device"),
                "vae_held_out_mse": vae_record.get("held_out_mse"),
                # The decoder's own stage (--decoder-steps), when the run had one.
                "decoder": decoder_record,
                "sessions": ckpt.get("sessions", []),
                # Where a run that began from an exported folder (--init-from) began.
                "init_from": ckpt.get("init_from"),
                "args": vars(args),
            },
            indent=2,
            default=str,
        )
    )
    log({"stage": "export", "dest": str(dest), "checkpoint": which, "step": ckpt["step"]})


def weights_by_name(names, what: str, at_least: int = 1):
    """An argparse type: 'black=2,gray=2' -> {'black': 2.0, 'gray': 2.0}, checked against
    `names` (the world's backgrounds or shapes), at least `at_least` of them drawable."""

    def parse(text: str) -> dict[str, float]:
        weights = {}
        for item in (part.strip() for part in text.split(",") if part.strip()):
            name, _, value = item.partition("=")  # no "=": value is "", which float refuses
            try:
                weights[name.strip()] = float(value)
            except ValueError:
                message = f"{item!r} is not NAME=WEIGHT (e.g. {names[0]}=2)"
                raise argparse.ArgumentTypeError(message) from None
        try:
            odds = sw.weighted_odds(weights, names, what)
        except DiffuMaskError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        if np.count_nonzero(odds) < at_least:  # refused now, not after the autoencoder's minutes
            message = (
                f"{what} weights {weights} leave {np.count_nonzero(odds)} {what}s to draw; "
                f"training scenes hold up to {at_least} distinct ones, so give at least "
                f"{at_least} a weight > 0"
            )
            raise argparse.ArgumentTypeError(message)
        return weights

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("runs/shapes"))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--minutes",
        type=float,
        default=600.0,
        help="this session's UNet training time cap (a safety stop; --resume goes on)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=27_000,
        help="UNet steps (the shipped model: 27000); a step count, not a time, keeps runs equal",
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument(
        "--cooldown-steps",
        type=int,
        default=3000,
        help="the learning rate falls linearly to zero over the last N of --max-steps "
        "(0: constant)",
    )
    p.add_argument(
        "--vae-steps",
        type=int,
        default=2000,
        help="autoencoder steps at batch 16 (its round trip caps every mask)",
    )
    p.add_argument(
        "--decoder-steps",
        type=int,
        default=2700,
        help="steps (batch 16) of the decoder trained on with the encoder frozen, after "
        "the autoencoder (0: none); latents keep their meaning, so it may follow an export",
    )
    p.add_argument("--decoder-lr", type=float, default=1e-3, help="falls linearly to zero")
    p.add_argument("--scenes", type=int, default=30_000)
    p.add_argument(
        "--background-weights",
        type=weights_by_name(tuple(sw.BACKGROUNDS), "background"),
        default=None,
        help="relative weights of the training scenes' backgrounds, e.g. black=2,gray=2 "
        "(a name left out weighs 1; default: uniform)",
    )
    p.add_argument(
        "--shape-weights",
        type=weights_by_name(sw.SHAPES, "shape", at_least=sw.MAX_OBJECTS),
        default=None,
        help="relative weights of the training scenes' shapes, e.g. star=2,square=2 "
        "(a name left out weighs 1; default: uniform)",
    )
    p.add_argument("--text-layers", type=int, default=0, help="0: token-local embeddings")
    p.add_argument("--text-hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument(
        "--channels",
        type=lambda text: [int(c) for c in text.split(",")],
        default=[32, 64, 64],
        help="UNet block widths, comma-separated (three levels: 16, 8 and 4 latent pixels)",
    )
    p.add_argument(
        "--min-snr-gamma",
        type=float,
        default=5.0,
        help="min-SNR loss weighting (0: the plain epsilon loss)",
    )
    p.add_argument(
        "--prediction",
        choices=("epsilon", "v_prediction"),
        default="epsilon",
        help="what the UNet predicts: the noise, or v (the objective lever)",
    )
    p.add_argument("--only-cross", action="store_true", help="no self-attention in the UNet")
    p.add_argument("--mid-block", default="UNetMidBlock2D")
    p.add_argument("--entropy-weight", type=float, default=0.05)
    p.add_argument("--entropy-warmup", type=int, default=1)
    p.add_argument(
        "--entropy-start",
        type=int,
        default=315,
        help="step the entropy term starts (the shipped run: after 315 steps without it)",
    )
    p.add_argument(
        "--entropy-stop",
        type=int,
        default=4357,
        help="step the attention terms stop (the shipped run: 4357); localisation grew after",
    )
    p.add_argument("--coverage-weight", type=float, default=0.0)
    p.add_argument("--smooth-weight", type=float, default=0.0)
    p.add_argument("--coverage-frac", type=float, default=0.05)
    p.add_argument("--uncond-prob", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--probe-every", type=int, default=200)
    p.add_argument("--probe-scenes", type=int, default=24)
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    p.add_argument(
        "--snapshots",
        type=lambda text: [int(c) for c in text.split(",") if c],
        default=[14_000, 18_000, 22_000, 24_000],
        help="steps at which a copy of the checkpoint is kept (snapshot-STEP.pt), so a "
        "longer run can be compared with shorter ones (the lengths of the lab log's table)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where to train (same recipe: random draws stay on the CPU); export runs on the CPU",
    )
    p.add_argument(
        "--no-cuda-graph",
        dest="cuda_graph",
        action="store_false",
        help="on a GPU, launch each step's kernels one by one instead of replaying a CUDA graph",
    )
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from a pipeline folder this script exported (its autoencoder, UNet and "
        "text encoder, at its step; fresh optimizer): how a run goes on in a later session "
        "when its work folder is gone",
    )
    p.add_argument("--export", type=Path, default=None, help="pipeline folder to write")
    p.add_argument(
        "--export-from",
        default="ckpt",
        help="ckpt: the last checkpoint; best: the best by the probe's thresholded IoU; "
        "snapshot-STEP: a kept snapshot (--snapshots)",
    )
    p.add_argument("--export-only", action="store_true")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return parser().parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cooldown_steps < 0:
        sys.exit(f"--cooldown-steps {args.cooldown_steps}: must be 0 (no cooldown) or more")
    if args.decoder_steps < 0:
        sys.exit(f"--decoder-steps {args.decoder_steps}: must be 0 (no decoder stage) or more")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device here; use --device cpu")
    device = torch.device(args.device)
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    log = make_log(work)

    if not (work / f"{args.export_from}.pt").exists() and args.export_only:
        sys.exit(f"--export-from {args.export_from}: {work / args.export_from}.pt does not exist")
    if args.export_only:
        export(work, args.export_from, args.export, args, log)
        return

    ckpt_path = work / "ckpt.pt"
    if ckpt_path.exists() and not args.resume:
        sys.exit(f"{ckpt_path} exists: pass --resume to continue it or choose another --work")
    start = None
    if args.init_from is not None:  # on --resume too: the folder fixes the model's shape
        start = init_from_export(args.init_from, work, args, vars(parser().parse_args([])))
        if not ckpt_path.exists():
            log({"stage": "init-from", **start["lineage"]})
    (work / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))

    tokenizer = build_tokenizer()
    vae, scale = train_vae(work, args, log, device)
    tune_decoder(work, vae, args, log)
    vae.eval().requires_grad_(False)
    latents, captions = encode_dataset(work, vae, scale, tokenizer, args, log)
    token_ids = tokenize(tokenizer, captions)
    empty_ids = tokenize(tokenizer, [""])[0]
    vocab = tokenizer.get_vocab()
    content_words = [vocab[w] for w in (*sw.SHAPES, *sw.COLOURS, *sw.BACKGROUNDS)]
    content_ids = torch.isin(token_ids, torch.tensor(content_words))
    held_out = probe_set(vae, scale, args)

    torch.manual_seed(args.seed)
    unet = make_unet(args)
    text_encoder = make_text_encoder(tokenizer, args.text_layers, args.text_hidden)
    ema_unet, ema_text = (
        make_unet(args),
        make_text_encoder(tokenizer, args.text_layers, args.text_hidden),
    )
    ema_unet.load_state_dict(unet.state_dict())
    ema_text.load_state_dict(text_encoder.state_dict())
    for model in (unet, text_encoder, ema_unet, ema_text):
        model.to(device)
    ema_unet.requires_grad_(False)
    ema_text.requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    scheduler = make_scheduler()
    alphas = scheduler.alphas_cumprod.to(device)
    run = Run(
        work,
        args,
        device,
        lambda: {
            "unet": unet.state_dict(),
            "text": text_encoder.state_dict(),
            "ema_unet": ema_unet.state_dict(),
            "ema_text": ema_text.state_dict(),
            "opt": opt.state_dict(),
            "gen": gen.get_state(),
        },
        log,
    )
    # Every random draw comes from this CPU generator, so a run draws the same batches,
    # noise and timesteps on any device.
    gen = torch.Generator().manual_seed(args.seed)
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        unet.load_state_dict(ckpt["unet"])
        text_encoder.load_state_dict(ckpt["text"])
        ema_unet.load_state_dict(ckpt["ema_unet"])
        ema_text.load_state_dict(ckpt["ema_text"])
        opt.load_state_dict(ckpt["opt"])
        gen.set_state(ckpt["gen"])
        run.resume(ckpt)
    elif start is not None:
        weights = exported_weights(args.init_from)
        for model, ema, key in ((unet, ema_unet, "unet"), (text_encoder, ema_text, "text")):
            model.load_state_dict(weights[key])
            ema.load_state_dict(weights[key])
        run.start_from(start)
        # An export keeps no generator state: a fresh one, seeded apart from step 0's.
        gen.manual_seed(args.seed + run.step)
    n_params = sum(p.numel() for p in unet.parameters())
    log(
        {
            "stage": "unet",
            "params": n_params,
            "text_params": sum(p.numel() for p in text_encoder.parameters()),
        }
    )

    sink = install_recorders(unet)
    run.begin()
    recent: list[torch.Tensor] = []

    ramp = torch.zeros((), device=device)
    step_losses = partial(denoising_losses, unet, text_encoder, sink, alphas=alphas, args=args)
    graphed = None
    while run.running():
        step = run.step
        idx = torch.randint(0, len(latents), (args.batch,), generator=gen)
        ids = token_ids[idx].clone()
        drop = torch.rand(args.batch, generator=gen) < args.uncond_prob
        ids[drop] = empty_ids
        noise = torch.randn((args.batch, *latents.shape[1:]), generator=gen)
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        weight = min(1.0, max(0.0, (step - args.entropy_start) / max(args.entropy_warmup, 1)))
        if args.entropy_stop is not None and step >= args.entropy_stop:
            weight = 0.0
        ramp.fill_(weight)
        batch = {
            "x0": latents[idx.to(device)],
            "ids": ids.to(device),
            "content": (content_ids[idx] & ~drop[:, None]).to(device),
            "noise": noise.to(device),
            "t": t.to(device),
            "ramp": ramp,
        }
        if device.type == "cuda" and args.cuda_graph:
            if graphed is None:
                graphed = GraphedBackward(step_losses, batch, params)
                log({"stage": "cuda-graph", "step": step, "captured": True})
            figures = graphed(batch)
        else:
            opt.zero_grad()
            loss, figures = step_losses(batch)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        rate = learning_rate(step, args.lr, args.max_steps, args.cooldown_steps)
        for group in opt.param_groups:
            group["lr"] = rate
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for src, dst in ((unet, ema_unet), (text_encoder, ema_text)):
                torch._foreach_lerp_(list(dst.parameters()), list(src.parameters()), 1 - decay)
        run.step = step = step + 1
        recent.append(figures.clone())  # read back every 50 steps: no sync per step
        if step % 50 == 0:
            m = torch.stack(recent).double().mean(0).tolist()
            log(
                {
                    "stage": "train",
                    "step": step,
                    "mse": round(float(m[0]), 5),
                    "entropy": round(float(m[1]), 4),
                    "coverage": round(float(m[2]), 4),
                    "smooth": round(float(m[3]), 4),
                    "lr": rate,
                    "elapsed": round(run.elapsed(), 1),
                }
            )
            recent.clear()
        run.after_step(
            lambda: probe(ema_unet, ema_text, tokenizer, scheduler, held_out),
            "probe_shape_best_iou",
        )
    run.finish()
    if args.export is not None:
        export(work, args.export_from, args.export, args, log)


if __name__ == "__main__":
    main()
