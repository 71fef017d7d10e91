"""The MMDiT shapes model's training script: a stopped and resumed run ends where an
uninterrupted one does, its export is `builtin:shapes-mmdit` to the engine, and a run goes on
from an export."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import train_shapes_mmdit  # noqa: E402

RUN = [
    "--scenes", "64", "--probe-scenes", "4", "--probe-every", "2", "--batch", "4",
    "--cooldown-steps", "0", "--warmup-steps", "2",
]  # fmt: skip
ARCHITECTURE = ["--layers", "2", "--width", "32", "--heads", "2", "--text-hidden", "16"]
TINY = RUN + ARCHITECTURE


def weights(work: Path) -> dict:
    return torch.load(work / "ckpt.pt", weights_only=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run of 4 steps, exported."""
    work = tmp_path_factory.mktemp("mmdit")
    train_shapes_mmdit.main(["--work", str(work), "--max-steps", "4", *TINY])
    train_shapes_mmdit.main(
        ["--work", str(work), "--export-only", "--export", str(work / "export"), *TINY]
    )
    return work


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(finished, tmp_path):
    train_shapes_mmdit.main(["--work", str(tmp_path), "--max-steps", "4", "--minutes", "0", *TINY])
    assert weights(tmp_path)["step"] == 0  # the session's time cap stopped it at once
    train_shapes_mmdit.main(["--work", str(tmp_path), "--max-steps", "2", *TINY, "--resume"])
    train_shapes_mmdit.main(["--work", str(tmp_path), "--max-steps", "4", *TINY, "--resume"])
    resumed, whole = weights(tmp_path), weights(finished)
    assert resumed["step"] == whole["step"] == 4
    for part in ("model", "ema"):
        for name, state in whole[part].items():
            for key, value in state.items():
                torch.testing.assert_close(resumed[part][name][key], value, rtol=0, atol=0)
    assert len(resumed["sessions"]) == 3
    with pytest.raises(SystemExit, match="pass --resume"):
        train_shapes_mmdit.main(["--work", str(tmp_path), "--max-steps", "4", *TINY])


def test_resuming_past_max_steps_names_the_step_and_the_fix(finished, tmp_path):
    # --max-steps is not read back from the run: left out, the default would end it at once
    shutil.copy(finished / "ckpt.pt", tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit, match="at step 4, past --max-steps 2; pass the run's"):
        train_shapes_mmdit.main(["--work", str(tmp_path), "--max-steps", "2", *TINY, "--resume"])
    assert weights(tmp_path)["step"] == 4 and len(weights(tmp_path)["sessions"]) == 1


def test_the_probe_reads_the_engines_capture(finished):
    log = [json.loads(line) for line in (finished / "log.jsonl").read_text().splitlines()]
    probes = [r for r in log if r["stage"] == "probe"]
    assert [r["step"] for r in probes] == [2, 4]
    assert all(0.0 <= r["probe_shape_area_iou"] <= 1.0 for r in probes)


@pytest.fixture
def exported_builtin(finished, monkeypatch):
    """builtin:shapes-mmdit pointing at the run's export; the process's cached built-in
    (the shipped weights, if another test loaded them) is set aside and back."""
    from diffumask_datasets import models

    models._builtin.cache_clear()
    monkeypatch.setattr(models, "SHAPES_MMDIT_WEIGHTS", finished / "export")
    yield
    models._builtin.cache_clear()


def test_the_export_is_a_builtin_model_to_the_engine(finished, exported_builtin):
    from diffumask_datasets import DiffuMask

    dm = DiffuMask("builtin:shapes-mmdit")
    assert dm.family.name == "sd3" and dm.default_size() == 64
    assert dm.family.max_sequence_length == 24  # the T5 length it was trained with
    prompt = "a photo of a red circle and a blue star on a white background"
    positions = dm.family.token_positions(prompt, ["circle", "star"], None)
    assert positions == {"circle": [6, 30], "star": [10, 34]}  # CLIP's 24 tokens, then T5's
    samples = dm([prompt], classes=[["circle", "star"]], num_inference_steps=2, seed=3)
    assert samples[0].image.size == (64, 64) and samples[0].mask.shape == (64, 64)
    record = json.loads((finished / "export" / "training.json").read_text())
    assert record["step"] == 4 and record["args"]["layers"] == 2
    assert record["sessions"][0]["device"].startswith("cpu")
    # the trained weights, not fresh ones
    exported = dm.pipe.transformer.state_dict()
    for key, value in weights(finished)["ema"]["transformer"].items():
        torch.testing.assert_close(exported[key], value)


def test_a_run_goes_on_from_an_exported_folder(finished, tmp_path):
    work = tmp_path / "more"
    # the architecture comes from the folder, not from the command's defaults
    train_shapes_mmdit.main(
        ["--work", str(work), "--init-from", str(finished / "export"), "--max-steps", "6", *RUN]
    )
    state = weights(work)
    assert state["step"] == 6 and state["init_from"]["step"] == 4
    assert json.loads((work / "args.json").read_text())["layers"] == 2
    with pytest.raises(SystemExit, match="not a folder this script exported"):
        train_shapes_mmdit.main(["--work", str(tmp_path / "x"), "--init-from", str(tmp_path)])
