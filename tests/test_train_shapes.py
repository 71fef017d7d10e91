"""The shapes model's training script: the loss weighting, and a run that stops and
resumes ends where an uninterrupted one does (runs span sessions on these 2 cores)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import train_shapes  # noqa: E402

TINY = [
    "--vae-steps", "2", "--decoder-steps", "0", "--scenes", "64", "--probe-scenes", "4",
    "--probe-every", "1000", "--batch", "4", "--entropy-start", "1", "--entropy-stop", "3",
    "--snapshots", "2", "--cooldown-steps", "0",
]  # fmt: skip


def test_min_snr_weight_lowers_only_the_nearly_clean_timesteps():
    alpha_bar = torch.tensor([0.999, 0.9, 5 / 6, 0.5, 0.01])  # SNR 999, 9, 5, 1, ~0.01
    weight = train_shapes.snr_weight(alpha_bar, 5.0)
    torch.testing.assert_close(weight[:2], torch.tensor([5 / 999, 5 / 9]))
    torch.testing.assert_close(weight[2:], torch.ones(3))


def test_the_cooldown_falls_to_zero_over_the_last_steps_only():
    rates = [train_shapes.learning_rate(step, 1e-3, 10, 4) for step in range(10)]
    assert rates[:7] == [1e-3] * 7
    assert rates[6:] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])  # the last step still moves
    assert train_shapes.learning_rate(9, 1e-3, 10, 0) == 1e-3


def test_background_weights_choose_the_training_scenes(tmp_path):
    dark = ["--background-weights", "white=0,cream=0,sky=0"]
    train_shapes.main(["--work", str(tmp_path), "--max-steps", "0", *TINY, *dark])
    captions = torch.load(tmp_path / "latents.pt", weights_only=False)["captions"]
    named = {c.split(" on a ")[1].split()[0] for c in captions if " on a " in c}
    assert named == {"black", "gray"} and len(captions) == 64


def test_shape_weights_choose_the_training_scenes(tmp_path):
    no_circles = ["--shape-weights", "circle=0"]
    train_shapes.main(["--work", str(tmp_path), "--max-steps", "0", *TINY, *no_circles])
    captions = torch.load(tmp_path / "latents.pt", weights_only=False)["captions"]
    words = {word for c in captions for word in c.split()}
    assert {"square", "triangle", "star"} <= words and "circle" not in words


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("star", "is not NAME=WEIGHT (e.g. circle=2)"),
        ("star=-1", "must be finite"),
        ("oval=2", "oval"),
        ("circle=0,star=0", "leave 2 shapes to draw; training scenes hold up to 3"),
    ],
)
def test_bad_shape_weights_stop_the_script_naming_them(value, message, capsys):
    with pytest.raises(SystemExit):
        train_shapes.parse_args(["--shape-weights", value])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "message"),
    [("black", "is not NAME=WEIGHT"), ("black=x", "is not NAME=WEIGHT"), ("plaid=2", "plaid")],
)
def test_bad_background_weights_stop_the_script_naming_them(value, message, capsys):
    with pytest.raises(SystemExit):
        train_shapes.parse_args(["--background-weights", value])
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> Path:
    """A work folder whose autoencoder and latents (cached stages) the runs start from,
    so each test pays for the UNet steps only."""
    work = tmp_path_factory.mktemp("stages")
    train_shapes.main(["--work", str(work), "--max-steps", "0", *TINY])
    return work


def train(stages: Path, work: Path, steps: int, *extra: str) -> dict:
    if not work.exists():
        work.mkdir()
        for stage in ("vae.pt", "latents.pt"):
            shutil.copy(stages / stage, work / stage)
    train_shapes.main(["--work", str(work), "--max-steps", str(steps), *TINY, *extra])
    return torch.load(work / "ckpt.pt", map_location="cpu", weights_only=False)


def export_run(work: Path, dest: Path) -> None:
    train_shapes.main(["--work", str(work), "--export-only", "--export", str(dest)])


@pytest.mark.parametrize("gamma", ["5", "0"])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(stages, tmp_path, gamma):
    whole = train(stages, tmp_path / "whole", 4, "--min-snr-gamma", gamma)
    train(stages, tmp_path / "parts", 2, "--min-snr-gamma", gamma)
    parts = train(stages, tmp_path / "parts", 4, "--min-snr-gamma", gamma, "--resume")
    assert parts["step"] == whole["step"] == 4
    for name in ("unet", "text", "ema_unet"):
        for key, value in whole[name].items():
            assert torch.equal(parts[name][key], value), (name, key)
    snapshot = torch.load(tmp_path / "whole" / "snapshot-2.pt", weights_only=False)
    assert snapshot["step"] == 2
    moved = [k for k, v in whole["unet"].items() if not torch.equal(v, snapshot["unet"][k])]
    assert moved  # the snapshot is the run at step 2, not a copy of the end


def test_a_finished_run_is_not_overwritten_without_resume(stages, tmp_path):
    train(stages, tmp_path / "run", 1)
    with pytest.raises(SystemExit, match="--resume"):
        train(stages, tmp_path / "run", 1)


def test_the_autoencoder_is_seeded(tmp_path):
    """Two runs of one seed build the same autoencoder in one process (its weights were
    once drawn before the seed was set)."""
    scales = []
    for name in ("a", "b"):
        train_shapes.main(["--work", str(tmp_path / name), "--max-steps", "0", *TINY])
        scales.append(torch.load(tmp_path / name / "vae.pt", weights_only=False)["scale"])
    assert scales[0] == scales[1]


def test_exporting_a_snapshot_that_was_not_kept_names_it(stages, tmp_path):
    args = ["--work", str(stages), "--export-only", "--export", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"--export-from snapshot-9: .*snapshot-9\.pt does not"):
        train_shapes.main([*args, "--export-from", "snapshot-9"])
    assert not (tmp_path / "out").exists()


def test_v_prediction_weights_each_timestep_by_its_snr_plus_one():
    alpha_bar = torch.tensor([0.999, 5 / 6, 0.5])  # SNR 999, 5, 1
    weight = train_shapes.snr_weight(alpha_bar, 5.0, "v_prediction")
    torch.testing.assert_close(weight, torch.tensor([5 / 1000, 5 / 6, 1 / 2]))


def test_an_export_builds_the_model_the_run_trained(stages, tmp_path):
    """--export-only reads the run's own arguments (args.json): a v-prediction run with
    wider channels exports as such without repeating the flags."""
    work = tmp_path / "v"
    train(stages, work, 2, "--prediction", "v_prediction", "--channels", "16,32,32")
    out = tmp_path / "out"
    export_run(work, out)
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    unet = json.loads((out / "unet" / "config.json").read_text())
    assert unet["block_out_channels"] == [16, 32, 32]
    assert json.loads((out / "training.json").read_text())["args"]["channels"] == [16, 32, 32]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_graph_step_trains_as_the_eager_step(stages, tmp_path):
    """Six steps replayed from the graph end where six eager ones do. Not to the bit: the
    kernels round in another order, and Adam turns a near-zero gradient's rounding into
    a step of up to the learning rate (seen on an H200: 2 of 16,384 elements of one
    tensor). A graph that replayed a stale batch or summed gradients would move most."""
    graphed = train(stages, tmp_path / "graph", 6, "--device", "cuda")
    eager = train(stages, tmp_path / "eager", 6, "--device", "cuda", "--no-cuda-graph")
    for name in ("unet", "text", "ema_unet"):
        far = total = 0
        for key, value in eager[name].items():
            diff = (graphed[name][key] - value).abs()
            assert diff.max() <= 6 * 2 * 5e-4, (name, key)
            far += int((diff > 1e-5 + 1e-3 * value.abs()).sum())
            total += value.numel()
        assert far <= total // 1000, (name, far, total)
    assert '"captured": true' in (tmp_path / "graph" / "log.jsonl").read_text()
    assert '"captured": true' not in (tmp_path / "eager" / "log.jsonl").read_text()


def test_a_run_goes_on_from_an_exported_folder(stages, tmp_path):
    """--init-from: a later session whose work folder is gone starts from the weights it
    shipped, at their step, with their autoencoder and model shape, and records where."""
    first = train(stages, tmp_path / "first", 2, "--channels", "16,32,32")
    shipped = tmp_path / "shipped"
    export_run(tmp_path / "first", shipped)
    later = tmp_path / "later"
    start = ["--work", str(later), "--init-from", str(shipped), *TINY]
    train_shapes.main([*start, "--max-steps", "2"])  # no step left: the start as it is read
    began = torch.load(later / "ckpt.pt", weights_only=False)
    assert began["step"] == 2 and began["init_from"]["step"] == 2
    for name in ("unet", "ema_unet"):
        for key, value in first["ema_unet"].items():
            assert torch.equal(began[name][key], value), (name, key)
    vae = torch.load(later / "vae.pt", weights_only=False)["model"]
    original = torch.load(stages / "vae.pt", weights_only=False)["model"]
    assert all(torch.equal(vae[k], v) for k, v in original.items())

    train_shapes.main([*start, "--max-steps", "4", "--resume"])
    out = tmp_path / "out"
    export_run(later, out)
    record = json.loads((out / "training.json").read_text())
    assert record["step"] == 4 and record["args"]["channels"] == [16, 32, 32]
    assert record["init_from"]["folder"] == str(shipped)
    assert [(s["from_step"], s["to_step"]) for s in record["sessions"]] == [(0, 2), (2, 2), (2, 4)]


def test_init_from_refuses_what_it_cannot_continue(stages, tmp_path):
    with pytest.raises(SystemExit, match=r"--init-from .*nowhere: not a pipeline folder"):
        train_shapes.main(["--work", str(tmp_path / "a"), "--init-from", str(tmp_path / "nowhere")])
    train(stages, tmp_path / "first", 1)
    shipped = tmp_path / "shipped"
    export_run(tmp_path / "first", shipped)
    wide = ["--work", str(tmp_path / "b"), "--init-from", str(shipped), "--channels", "64,64,64"]
    with pytest.raises(SystemExit, match=r"--channels \[32, 64, 64\], the command asks for "):
        train_shapes.main([*wide, "--max-steps", "1", *TINY])
    other = tmp_path / "c"
    other.mkdir()
    theirs = torch.load(stages / "vae.pt", weights_only=False)["model"]
    torch.save({"model": {k: v + 1 for k, v in theirs.items()}}, other / "vae.pt")
    with pytest.raises(SystemExit, match="holds another autoencoder"):
        train_shapes.main(["--work", str(other), "--init-from", str(shipped), *TINY])


def test_the_time_cap_is_the_sessions_not_the_runs(stages, tmp_path):
    """A run resumed after more UNet time than --minutes allows still trains: the cap stops
    one session (the defaults take longer than any one session on a CPU)."""
    train(stages, tmp_path / "run", 1)
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    torch.save({**ckpt, "seconds": 10 * 3600.0}, tmp_path / "run" / "ckpt.pt")
    resumed = train(stages, tmp_path / "run", 2, "--resume", "--minutes", "60")
    assert resumed["step"] == 2


def test_a_run_with_a_cooldown_steps_at_the_falling_rate(stages, tmp_path):
    ckpt = train(stages, tmp_path / "run", 4, "--cooldown-steps", "2", "--lr", "1e-3")
    assert ckpt["opt"]["param_groups"][0]["lr"] == pytest.approx(5e-4)  # step 3 of 4
    with pytest.raises(SystemExit, match="--cooldown-steps -1"):
        train(stages, tmp_path / "bad", 4, "--cooldown-steps", "-1")


def test_the_decoder_stage_tunes_the_decoder_alone_and_ships_once(stages, tmp_path):
    """--decoder-steps: the decoder trains on with the encoder frozen (the UNet's latents
    keep their meaning); the export carries the tuned decoder and its record, and a run
    that goes on from that export adopts it instead of tuning it again."""
    from diffusers import AutoencoderKL

    train(stages, tmp_path / "run", 1, "--decoder-steps", "2")
    original = torch.load(stages / "vae.pt", weights_only=False)["model"]
    tuned = torch.load(tmp_path / "run" / "decoder.pt", weights_only=False)
    assert tuned["model"] and all(k.startswith(("decoder.", "post_quant")) for k in tuned["model"])
    assert any(not torch.equal(v, original[k]) for k, v in tuned["model"].items())
    shipped = tmp_path / "shipped"
    export_run(tmp_path / "run", shipped)
    exported = AutoencoderKL.from_pretrained(shipped / "vae").state_dict()
    for key, value in exported.items():
        assert torch.equal(value, tuned["model"].get(key, original[key])), key
    record = json.loads((shipped / "training.json").read_text())["decoder"]
    assert record["steps"] == 2 and record["held_out_mse"] > 0

    later = tmp_path / "later"
    start = ["--work", str(later), "--init-from", str(shipped), *TINY]
    train_shapes.main([*start, "--max-steps", "1", "--decoder-steps", "2"])
    adopted = torch.load(later / "decoder.pt", weights_only=False)
    assert adopted["seconds"] == tuned["seconds"]  # the record carried over: not run again
    assert all(torch.equal(v, tuned["model"][k]) for k, v in adopted["model"].items())


def test_negative_decoder_steps_stop_the_script_before_it_writes(tmp_path):
    with pytest.raises(SystemExit, match=r"--decoder-steps -1: must be 0 \(no decoder stage\)"):
        train_shapes.main(["--work", str(tmp_path / "run"), "--decoder-steps", "-1"])
    assert not (tmp_path / "run").exists()
