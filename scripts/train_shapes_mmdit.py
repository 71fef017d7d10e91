"""Train the built-in shapes-world MMDiT model (``builtin:shapes-mmdit``).

The MMDiT sibling of ``train_shapes.py``: the same world, training scenes, caption
tokenizer, probe scenes, checkpoints and resume, and the same autoencoder (``builtin:shapes``'
own, taken from its folder: 64x64 RGB <-> 16x16x4 latents), so only the text encoders and
the denoiser train. The denoiser is SD3's: an ``SD3Transformer2DModel`` (joint attention of
image and text tokens, adaLN modulation from pooled text, QK RMS norm as SD3.5) with
patches of one latent pixel, so the image is a 16x16 grid of tokens, the grid of the
UNet's finest cross-attention. FLUX.1's pipeline packs latents 2x2 into tokens, which at
this world's 64 px would leave an 8x8 grid (see the lab log for the choice).

Objective: rectified flow as SD3 trains it: x_t = (1 - s) x0 + s noise, the model predicts
the velocity noise - x0, s drawn logit-normal (mean 0, std 1), the timestep fed as
1000 s. Text: two CLIP encoders of one layer (the pipeline reads their penultimate state,
i.e. the token and position embeddings, and their pooled projections) and a T5 encoder of
no layers (token embeddings), all over the world's word-level tokenizer; the text is
encoded by the pipeline's own ``encode_prompt``, so training conditions the model exactly
as generation will. 10% of captions are dropped (classifier-free guidance). Masks never
enter training: the probe reads the engine's own capture (``capture.mmdit.trace``) of the
shape and colour words on noised held-out scenes.

    python scripts/train_shapes_mmdit.py --work runs/mmdit --export runs/mmdit/export
    python scripts/train_shapes_mmdit.py --work runs/mmdit --resume --export ...  # after a stop
    python scripts/train_shapes_mmdit.py --work runs/more \\
        --init-from diffumask_datasets/weights/shapes-mmdit --max-steps 20000 --export ...
    python scripts/train_shapes_mmdit.py --device cuda ...   # the same recipe on a GPU

Every random draw comes from one CPU generator, so a run draws the same batches on any
device and may resume on another. ``training.json`` beside the export records the command's
arguments, each session's device, steps and seconds, and where the run began.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_shapes import (  # noqa: E402
    MAX_LENGTH,
    Run,
    build_tokenizer,
    encode_dataset,
    learning_rate,
    localisation_figures,
    make_log,
    portable_tokenizers,
    probe_set,
)

SHAPES_FOLDER = Path(__file__).resolve().parents[1] / "diffumask_datasets" / "weights" / "shapes"
# What fixes the model's shape: an --init-from folder's own values are adopted for these.
ARCHITECTURE = ("layers", "width", "heads", "text_hidden")


# ---------------------------------------------------------------- models
def make_clip(tokenizer, hidden: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        # One layer: the pipeline reads the penultimate state (here the embeddings) as the
        # sequence, and the last layer's end token through the projection as the pooled text.
        num_hidden_layers=1,
        num_attention_heads=2,
        projection_dim=hidden,
        max_position_embeddings=MAX_LENGTH,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return CLIPTextModelWithProjection(config)


def make_t5(tokenizer, width: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_ff=width,
        d_kv=width // 4,
        num_heads=4,
        num_layers=0,  # token embeddings, RMS-normed: each token's value is its word
        dropout_rate=0.0,  # every random draw comes from the run's generator
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config)


def make_transformer(args):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=args.layers,
        attention_head_dim=args.width // args.heads,
        num_attention_heads=args.heads,
        joint_attention_dim=2 * args.text_hidden,  # the two CLIPs side by side; T5's width
        caption_projection_dim=args.width,
        pooled_projection_dim=2 * args.text_hidden,
        pos_embed_max_size=16,
        qk_norm="rms_norm",
    )


def make_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # No shift: SD3 shifts towards noise for its 128x128 latents; these are 16x16.
    return FlowMatchEulerDiscreteScheduler(shift=1.0)


def load_autoencoder(folder: Path):
    from diffusers import AutoencoderKL

    if not (folder / "vae" / "config.json").is_file():
        sys.exit(
            f"--vae-from {folder}: no vae/ in it; pass a pipeline folder such as {SHAPES_FOLDER}"
        )
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval().requires_grad_(False)
    # SD3's pipeline un-shifts latents before decoding; this autoencoder has no shift.
    vae.register_to_config(shift_factor=0.0)
    return vae, float(vae.config.scaling_factor)


def make_pipeline(transformer, encoders, tokenizer, vae):
    from diffusers import StableDiffusion3Pipeline

    clip_l, clip_g, t5 = encoders
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=make_scheduler(),
        vae=vae,
        text_encoder=clip_l,
        tokenizer=tokenizer,
        text_encoder_2=clip_g,
        tokenizer_2=tokenizer,
        text_encoder_3=t5,
        tokenizer_3=tokenizer,
    )


def encode(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, pooled) text of captions, as the pipeline encodes them for generation."""
    sequence, _, pooled, _ = pipe.encode_prompt(
        prompt=list(captions),
        prompt_2=None,
        prompt_3=None,
        device=pipe.transformer.device,
        do_classifier_free_guidance=False,
        max_sequence_length=MAX_LENGTH,
    )
    return sequence, pooled


def flow_loss(pipe, batch: dict) -> torch.Tensor:
    """Rectified flow: the velocity (noise - x0) at x_t = (1 - s) x0 + s noise."""
    x0, noise, s = batch["x0"], batch["noise"], batch["sigma"]
    noisy = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
    sequence, pooled = encode(pipe, batch["captions"])
    pred = pipe.transformer(
        hidden_states=noisy,
        timestep=s * 1000,
        encoder_hidden_states=sequence,
        pooled_projections=pooled,
    ).sample
    return F.mse_loss(pred, noise - x0)


# ---------------------------------------------------------------- probe (evaluation only)
@torch.no_grad()
def probe(pipe, probe_set, sigmas=(0.3, 0.6)) -> dict:
    """The engine's capture of every caption token on noised held-out scenes, each word's
    CLIP and T5 columns added, scored by train_shapes.localisation_figures."""
    from diffumask_datasets.capture import CaptureOptions
    from diffumask_datasets.capture.mmdit import trace

    latents, scenes = probe_set
    device = latents.device
    captions = [s.caption for s in scenes]
    sequence, pooled = encode(pipe, captions)
    clip = sequence.shape[1] // 2  # CLIP tokens, then as many T5 tokens
    columns = [list(range(sequence.shape[1]))] * len(scenes)
    gen = torch.Generator().manual_seed(1234)  # the same noise on every device
    with trace(pipe.transformer, columns, CaptureOptions(conditional_half=False)) as cap:
        for s in sigmas:
            noise = torch.randn(latents.shape, generator=gen).to(device)
            t = torch.full((len(scenes),), s, device=device)
            pipe.transformer(
                hidden_states=(1 - s) * latents + s * noise,
                timestep=t * 1000,
                encoder_hidden_states=sequence,
                pooled_projections=pooled,
            )
    maps = torch.from_numpy(next(iter(cap.result().cross.values())))
    maps = maps[:, :clip] + maps[:, clip:]
    maps = F.interpolate(maps, size=(64, 64), mode="bilinear", align_corners=False)
    return localisation_figures(maps.numpy(), scenes, pipe.tokenizer)


# ---------------------------------------------------------------- export
def export(work: Path, which: str, dest: Path, args, log) -> None:
    args_path = work / "args.json"
    args = argparse.Namespace(**{**vars(args), **json.loads(args_path.read_text())})
    ckpt = torch.load(work / f"{which}.pt", map_location="cpu", weights_only=False)
    tokenizer = build_tokenizer()
    transformer, encoders = make_transformer(args), make_encoders(tokenizer, args)
    transformer.load_state_dict(ckpt["ema"]["transformer"])
    for name, model in zip(ENCODERS, encoders, strict=True):
        model.load_state_dict(ckpt["ema"][name])
    vae, _ = load_autoencoder(Path(args.vae_from))
    pipe = make_pipeline(transformer, encoders, tokenizer, vae)
    dest.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(dest, safe_serialization=True)
    portable_tokenizers(dest, ("tokenizer", "tokenizer_2", "tokenizer_3"))
    record = {
        "checkpoint": which,
        "step": ckpt["step"],
        "probe": ckpt.get("probe"),
        "devices": sorted({s["device"] for s in ckpt.get("sessions", [])}),
        "wall_seconds": {"transformer": ckpt.get("seconds")},
        "autoencoder": str(args.vae_from),
        "sessions": ckpt.get("sessions", []),
        "init_from": ckpt.get("init_from"),
        "args": vars(args),
    }
    (dest / "training.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    log({"stage": "export", "dest": str(dest), "checkpoint": which, "step": ckpt["step"]})


ENCODERS = ("clip_l", "clip_g", "t5")


def make_encoders(tokenizer, args) -> tuple:
    return (
        make_clip(tokenizer, args.text_hidden),
        make_clip(tokenizer, args.text_hidden),
        make_t5(tokenizer, 2 * args.text_hidden),
    )


def init_from_export(folder: Path, args) -> dict:
    """A folder this script exported as a run's start: its architecture becomes the
    command's, its (EMA) weights start both copies; the optimizer's moments and the
    generator start afresh. Returns the weights and the start."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    record_path = folder / "training.json"
    if not record_path.is_file() or not (folder / "transformer").is_dir():
        sys.exit(
            f"--init-from {folder}: not a folder this script exported (no training.json or "
            "transformer/ in it); pass one written by --export, such as "
            "diffumask_datasets/weights/shapes-mmdit"
        )
    record = json.loads(record_path.read_text())
    for key in ARCHITECTURE:
        setattr(args, key, record["args"][key])
    weights = {
        "transformer": SD3Transformer2DModel.from_pretrained(folder / "transformer").state_dict(),
        "clip_l": CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder").state_dict(),
        "clip_g": CLIPTextModelWithProjection.from_pretrained(
            folder / "text_encoder_2"
        ).state_dict(),
        "t5": T5EncoderModel.from_pretrained(folder / "text_encoder_3").state_dict(),
    }
    return {
        "weights": weights,
        "step": int(record["step"]),
        "seconds": float(record["wall_seconds"].get("transformer") or 0.0),
        "sessions": record.get("sessions", []),
        "lineage": {
            "folder": str(folder),
            "step": int(record["step"]),
            "fresh": ["optimizer moments", "generator"],
            "init_from": record.get("init_from"),
        },
    }


# ---------------------------------------------------------------- command
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("runs/shapes-mmdit"))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=600.0, help="this session's training time cap")
    p.add_argument(
        "--max-steps",
        type=int,
        default=6000,
        help="transformer steps (6000: one session of this CPU; the shipped model went on to "
        "14000 from that export with --init-from, stopping at 13522 on its time cap)",
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument(
        "--cooldown-steps",
        type=int,
        default=1500,
        help="the rate falls linearly to zero over the last N steps (0: constant)",
    )
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=200,
        help="the rate rises linearly from zero over the first N steps",
    )
    p.add_argument("--scenes", type=int, default=30_000)
    p.add_argument(
        "--vae-from",
        type=Path,
        default=SHAPES_FOLDER,
        help="the pipeline folder whose autoencoder the model draws through",
    )
    p.add_argument("--layers", type=int, default=4, help="joint transformer blocks")
    p.add_argument("--width", type=int, default=64, help="the transformer's width")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--text-hidden", type=int, default=32, help="each CLIP's width (T5's: twice)")
    p.add_argument("--uncond-prob", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--probe-every", type=int, default=500)
    p.add_argument("--probe-scenes", type=int, default=24)
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    p.add_argument(
        "--snapshots",
        type=lambda text: [int(c) for c in text.split(",") if c],
        default=[],
        help="steps at which a copy of the checkpoint is kept (snapshot-STEP.pt)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from a folder this script exported (fresh optimizer)",
    )
    p.add_argument("--export", type=Path, default=None, help="pipeline folder to write")
    p.add_argument(
        "--export-from",
        default="ckpt",
        help="ckpt, best (by the probe's area IoU) or snapshot-STEP",
    )
    p.add_argument("--export-only", action="store_true")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    # train_shapes' scene stages read these; this recipe draws the world as it is.
    args.background_weights = args.shape_weights = None
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    for flag in ("cooldown_steps", "warmup_steps"):
        if getattr(args, flag) < 0:
            sys.exit(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be 0 or more")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device here; use --device cpu")
    device = torch.device(args.device)
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    log = make_log(work)

    if args.export_only:
        if not (work / f"{args.export_from}.pt").exists():
            sys.exit(
                f"--export-from {args.export_from}: {work / args.export_from}.pt does not exist"
            )
        if args.export is None:
            sys.exit("--export-only: pass --export FOLDER, the pipeline folder to write")
        export(work, args.export_from, args.export, args, log)
        return
    ckpt_path = work / "ckpt.pt"
    if ckpt_path.exists() and not args.resume:
        sys.exit(f"{ckpt_path} exists: pass --resume to continue it or choose another --work")
    start = init_from_export(args.init_from, args) if args.init_from is not None else None
    (work / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))

    tokenizer = build_tokenizer()
    vae, scale = load_autoencoder(args.vae_from)
    vae.to(device)
    latents, captions = encode_dataset(work, vae, scale, tokenizer, args, log)
    held_out = probe_set(vae, scale, args)

    torch.manual_seed(args.seed)
    transformer, encoders = make_transformer(args), make_encoders(tokenizer, args)
    models = dict(zip(("transformer", *ENCODERS), (transformer, *encoders), strict=True))
    ema = {name: make_transformer(args) if name == "transformer" else None for name in models}
    ema.update(zip(ENCODERS, make_encoders(tokenizer, args), strict=True))
    for name, model in models.items():
        ema[name].load_state_dict(model.state_dict())
        model.to(device).train()
        ema[name].to(device).eval().requires_grad_(False)
    params = [p for model in models.values() for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    run = Run(
        work,
        args,
        device,
        lambda: {
            "model": {name: model.state_dict() for name, model in models.items()},
            "ema": {name: model.state_dict() for name, model in ema.items()},
            "opt": opt.state_dict(),
            "gen": gen.get_state(),
        },
        log,
    )
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        for name, model in models.items():
            model.load_state_dict(ckpt["model"][name])
            ema[name].load_state_dict(ckpt["ema"][name])
        opt.load_state_dict(ckpt["opt"])
        gen.set_state(ckpt["gen"])
        run.resume(ckpt)
    elif start is not None:
        for name, model in models.items():
            model.load_state_dict(start["weights"][name])
            ema[name].load_state_dict(start["weights"][name])
        run.start_from(start)
        gen.manual_seed(args.seed + run.step)  # an export keeps no generator state
        log({"stage": "init-from", **run.lineage})
    pipe = make_pipeline(transformer, encoders, tokenizer, vae)
    ema_pipe = make_pipeline(ema["transformer"], [ema[n] for n in ENCODERS], tokenizer, vae)
    log(
        {
            "stage": "transformer",
            "params": sum(p.numel() for p in transformer.parameters()),
            "text_params": sum(p.numel() for m in encoders for p in m.parameters()),
        }
    )

    run.begin()
    recent: list[torch.Tensor] = []

    while run.running():
        step = run.step
        idx = torch.randint(0, len(latents), (args.batch,), generator=gen)
        drop = torch.rand(args.batch, generator=gen) < args.uncond_prob
        noise = torch.randn((args.batch, *latents.shape[1:]), generator=gen)
        sigma = torch.sigmoid(torch.randn(args.batch, generator=gen))  # logit-normal
        pairs = zip(idx.tolist(), drop.tolist(), strict=True)
        batch = {
            "x0": latents[idx.to(device)],
            "captions": ["" if dropped else captions[i] for i, dropped in pairs],
            "noise": noise.to(device),
            "sigma": sigma.to(device),
        }
        rate = learning_rate(step, args.lr, args.max_steps, args.cooldown_steps)
        rate *= min(1.0, (step + 1) / max(args.warmup_steps, 1))
        for group in opt.param_groups:
            group["lr"] = rate
        opt.zero_grad()
        loss = flow_loss(pipe, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for name, model in models.items():
                torch._foreach_lerp_(
                    list(ema[name].parameters()), list(model.parameters()), 1 - decay
                )
        run.step = step = step + 1
        recent.append(loss.detach())
        if step % 50 == 0:
            mean = float(torch.stack(recent).double().mean())
            log(
                {
                    "stage": "train",
                    "step": step,
                    "loss": round(mean, 5),
                    "lr": rate,
                    "elapsed": round(run.elapsed(), 1),
                }
            )
            recent.clear()
        run.after_step(lambda: probe(ema_pipe, held_out), "probe_shape_area_iou")
    run.finish()
    if args.export is not None:
        export(work, args.export_from, args.export, args, log)


if __name__ == "__main__":
    main()
