"""The `diffumask` command line: through click's CliRunner and as a real subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from diffumask_datasets.cli import main, open_dataset

# pycocotools 2.0.11 calls np.array(copy=False) on numpy 2: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--model",
    "builtin:tiny-random",
    "--classes",
    "bird,dog",
    "--per-class",
    "2",
    "--steps",
    "3",
    "--size",
    "64",
    "--seed",
    "0",
]


def diffumask_command() -> list[str]:
    """The installed console script when there is one, else the module."""
    script = Path(sys.executable).with_name("diffumask")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "diffumask_datasets.cli"]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    # The tree under test, also when the console script comes from an installed copy.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(HF_HUB_OFFLINE="1", HF_UPDATE_DOWNLOAD_COUNTS="0", OMP_NUM_THREADS="1")
    env.pop("DIFFUMASK_DEBUG", None)
    return env


def run_python(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter (first imports, process-wide state), on the tree under test."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env()
    )


def run_cli(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*diffumask_command(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=subprocess_env(),
        **kwargs,
    )


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def assert_one_line_error(result, *needles: str, code: int | None = None) -> str:
    """Exit non-zero with exactly one line on stderr, no traceback, naming the needles."""
    stderr = result.stderr if hasattr(result, "stderr") else result.output
    assert result.returncode if hasattr(result, "returncode") else result.exit_code
    if code is not None:
        assert (result.returncode if hasattr(result, "returncode") else result.exit_code) == code
    lines = [line for line in stderr.splitlines() if line.strip()]
    # tqdm may leave a progress line before the error; the error is the last line
    error = lines[-1]
    assert error.startswith("diffumask: error: "), stderr
    assert "Traceback" not in stderr, stderr
    assert sum(line.startswith("diffumask: error") for line in lines) == 1, stderr
    for needle in needles:
        assert needle in error, (needle, error)
    return error


# -- help, version, start-up cost --------------------------------------------------------


def test_help_lists_every_verb_with_examples():
    result = invoke("--help")
    assert result.exit_code == 0
    for verb in ("generate", "info", "export", "filter", "app", "plugin"):
        assert f"  {verb}" in result.output
    assert "Examples:" in result.output
    for verb in ("generate", "info", "export", "filter"):
        sub = invoke(verb, "--help")
        assert sub.exit_code == 0 and "Examples:" in sub.output, verb


def test_model_help_names_every_builtin():
    from diffumask_datasets.models import BUILTINS

    for verb in ("generate", "label"):
        option = next(p for p in main.commands[verb].params if p.name == "model")
        for name in BUILTINS:
            assert f"{name} " in option.help or f"{name}." in option.help, (verb, name)


def test_generate_has_exactly_the_documented_flags():
    flags = {opt for p in main.commands["generate"].params for opt in p.opts if opt[0] == "-"}
    assert flags == {
        "--model",
        "--classes",
        "--per-class",
        "--steps",
        "--size",
        "--seed",
        "--batch-size",
        "--device",
        "--dtype",
        "--out",
        "--resume",
        "--workers",
        "--ray",
        "--gpus-per-worker",
    }


def test_version_and_help_do_not_import_torch():
    code = (
        "import sys\n"
        "from diffumask_datasets.cli import main\n"
        "for args in (['--help'], ['--version'], ['generate', '--help']):\n"
        "    try:\n"
        "        main(args, prog_name='diffumask')\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, exc.code\n"
        "heavy = {'torch', 'diffusers', 'transformers', 'datasets', 'fiftyone'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "0.1" in out.stdout  # the version line


def test_version_from_a_real_subprocess():
    from diffumask_datasets import __version__

    result = run_cli("--version", timeout=60)
    assert result.returncode == 0
    assert result.stdout.strip() == f"diffumask {__version__}"


# -- bad command-line values: one line, the value, the fix ---------------------------------


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--steps", "0"], ["--steps", "0", "at least 1"]),
        (["--size", "65"], ["--size", "65", "multiple of 8", "64 or 72"]),
        (["--size", "0"], ["--size", "multiple of 8"]),
        (["--per-class", "0"], ["--per-class", "at least 1"]),
        (["--batch-size", "-2"], ["--batch-size", "-2"]),
        (["--classes", "bird,../dog"], ["'../dog'", "path character", "'/'"]),
        (["--classes", "bird,a\\b"], ["path character"]),
        (["--classes", "bird,,dog"], ["empty class name"]),
        (["--dtype", "float8"], ["--dtype", "float8"]),
        (["--stesp", "3"], ["--stesp", "--steps"]),
    ],
)
def test_bad_generate_options_are_one_line(tmp_path, args, needles):
    result = CliRunner().invoke(main, ["generate", "voc", *args, "--out", str(tmp_path / "o")])
    assert_one_line_error(result, *needles, code=2)
    assert not (tmp_path / "o").exists()


def test_export_val_fraction_out_of_range_is_one_line(tmp_path):
    result = CliRunner().invoke(
        main, ["export", str(tmp_path), "--format", "voc", "--to", "x", "--val-fraction", "1.5"]
    )
    assert_one_line_error(result, "--val-fraction", "1.5", code=2)


def test_unknown_format_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["export", str(tmp_path), "--format", "yolo", "--to", "x"])
    assert_one_line_error(result, "yolo", "voc", "coco", "hf", code=2)


# -- info, export, filter on a small store made without the engine -------------------------


def synthetic_records(n: int = 6, size: int = 32) -> list:
    from diffumask_datasets.store import Record

    rng = np.random.default_rng(1)
    records = []
    for index in range(n):
        name, class_id = ("bird", 3) if index % 2 == 0 else ("dog", 12)
        mask = np.zeros((size, size), np.uint8)
        y, x = rng.integers(0, size // 2, 2)
        mask[y : y + 10, x : x + 8] = class_id
        mask[y + 10, x : x + 8] = 255
        records.append(
            Record(
                index=index,
                image=Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
                mask=mask,
                prompt=f"a photo of a {name}",
                seed=index,
                classes=[name],
                quality=round(0.1 + 0.15 * index, 3),
                attention={name: rng.random((8, 8)).astype(np.float32)},
            )
        )
    return records


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    from diffumask_datasets.definitions import load_definition
    from diffumask_datasets.store import make_manifest, write_store

    path = tmp_path_factory.mktemp("store") / "ds"
    records = synthetic_records()
    manifest = make_manifest(
        load_definition("voc"),
        {"model": "synthetic", "num_inference_steps": 3},
        "synthetic",
        len(records),
        4,
        8,
    )
    write_store(path, records, manifest)
    return path


def test_info_reports_counts_pixels_quality_and_config(small_store):
    result = invoke("info", str(small_store), "--json")
    stats = json.loads(result.stdout)
    records = synthetic_records()
    assert stats["samples"] == len(records)
    bird, dog = stats["classes"]["bird"], stats["classes"]["dog"]
    assert bird["prompted_images"] == dog["prompted_images"] == 3
    assert bird["images_with_pixels"] == 3 and stats["classes"]["cat"]["images_with_pixels"] == 0
    total = sum(r.mask.size for r in records)
    assert bird["pixel_share"] == pytest.approx(sum((r.mask == 3).sum() for r in records) / total)
    assert stats["ignore_share"] == pytest.approx(
        sum((r.mask == 255).sum() for r in records) / total
    )
    qualities = [r.quality for r in records]
    assert stats["quality"]["min"] == pytest.approx(min(qualities), abs=1e-6)
    assert stats["quality"]["max"] == pytest.approx(max(qualities), abs=1e-6)
    assert sum(stats["quality"]["histogram"]) == len(records)
    text = invoke("info", str(small_store)).stdout
    for needle in ("6 samples", "bird", "quality: mean", "num_inference_steps", "2 of 2 match"):
        assert needle in text


def test_export_voc_and_coco_through_the_cli_keep_the_masks(small_store, tmp_path):
    from pycocotools.coco import COCO

    records = {r.index: r for r in synthetic_records()}
    result = invoke("export", str(small_store), "--format", "voc", "--to", str(tmp_path / "V"))
    assert "voc export" in result.stdout and "val 1" in result.stdout
    sets = tmp_path / "V/VOCdevkit/VOC2012/ImageSets/Segmentation"
    names = (sets / "trainval.txt").read_text().split()
    assert names == [f"{i:06d}" for i in sorted(records)]
    for name in names:
        png = Image.open(tmp_path / f"V/VOCdevkit/VOC2012/SegmentationClass/{name}.png")
        np.testing.assert_array_equal(np.array(png), records[int(name)].mask)

    invoke("export", str(small_store), "--format", "coco", "--to", str(tmp_path / "C"))
    for split in ("train", "val"):
        coco = COCO(str(tmp_path / "C" / "annotations" / f"instances_{split}.json"))
        assert {c["name"] for c in coco.loadCats(coco.getCatIds())} >= {"bird", "dog", "cat"}
        for image in coco.loadImgs(coco.getImgIds()):
            mask = records[image["diffumask_index"]].mask
            rebuilt = np.zeros_like(mask)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
                rebuilt[coco.annToMask(ann) > 0] = ann["category_id"]
            np.testing.assert_array_equal(rebuilt, np.where(mask == 255, 0, mask))


def test_export_into_a_non_empty_directory_is_refused(small_store, tmp_path):
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "thesis.tex").write_text("precious")
    result = CliRunner().invoke(
        main, ["export", str(small_store), "--format", "coco", "--to", str(dest)]
    )
    assert_one_line_error(result, str(dest), "not empty", "--overwrite", code=1)
    assert (dest / "thesis.tex").read_text() == "precious"
    invoke("export", str(small_store), "--format", "coco", "--to", str(dest), "--overwrite")
    assert (dest / "annotations" / "instances_train.json").is_file()
    assert not (dest / "thesis.tex").exists()


def test_filter_keeps_good_samples_as_a_new_store(small_store, tmp_path):
    result = invoke(
        "filter",
        str(small_store),
        "--min-quality",
        "0.4",
        "--classes",
        "dog",
        "--to",
        str(tmp_path / "F"),
    )
    kept = [r for r in synthetic_records() if r.quality >= 0.4 and "dog" in r.classes]
    assert f"kept {len(kept)} of 6" in result.stdout
    store = open_dataset(tmp_path / "F")
    got = list(store.records())
    assert [r.index for r in got] == [r.index for r in kept]
    for a, b in zip(got, kept, strict=True):
        np.testing.assert_array_equal(a.mask, b.mask)
    assert store.manifest["filter"]["min_quality"] == 0.4
    assert "filtered" in invoke("info", str(tmp_path / "F")).stdout
    bad = CliRunner().invoke(
        main,
        [
            "filter",
            str(small_store),
            "--min-quality",
            "0.4",
            "--classes",
            "dgo",
            "--to",
            str(tmp_path / "G"),
        ],
    )
    assert_one_line_error(bad, "'dgo'", "'dog'", code=1)
    assert not (tmp_path / "G").exists()


@pytest.mark.parametrize("verb", ["info", "export", "filter"])
def test_missing_dataset_directory_names_the_path(tmp_path, verb):
    missing = tmp_path / "nowhere"
    extra = {
        "info": [],
        "export": ["--format", "voc", "--to", str(tmp_path / "V")],
        "filter": ["--min-quality", "0.5", "--to", str(tmp_path / "F")],
    }[verb]
    result = CliRunner().invoke(main, [verb, str(missing), *extra])
    assert_one_line_error(result, str(missing), "does not exist", code=1)


def test_corrupt_dataset_names_the_file(small_store, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(small_store, broken)
    (broken / "manifest.json").write_text("{ not json")
    result = CliRunner().invoke(main, ["info", str(broken)])
    assert_one_line_error(result, str(broken / "manifest.json"), "corrupt", code=1)

    shutil.rmtree(broken)
    shutil.copytree(small_store, broken)
    shard = sorted((broken / "data").iterdir())[0]
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    result = CliRunner().invoke(main, ["export", str(broken), "--format", "voc", "--to", "V"])
    assert_one_line_error(result, shard.name, "corrupt", code=1)

    not_a_store = tmp_path / "photos"
    not_a_store.mkdir()
    (not_a_store / "cat.jpg").write_bytes(b"")
    result = CliRunner().invoke(main, ["info", str(not_a_store)])
    assert_one_line_error(result, str(not_a_store), "manifest.json", code=1)


def damaged_copy(store: Path, to: Path) -> Path:
    """A copy of `store` with one byte of shard 1 changed: same size, footer intact."""
    import shutil

    shutil.copytree(store, to)
    shard = to / "data" / "train-00001-of-00002.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    return to


def test_verify_checks_every_shard_against_its_digest(small_store, tmp_path):
    result = invoke("verify", str(small_store))
    assert result.exit_code == 0
    assert "all 2 shards intact (sha256 matches)" in result.stdout

    broken = damaged_copy(small_store, tmp_path / "broken")
    result = CliRunner().invoke(main, ["verify", str(broken)])
    assert "shard 1 (train-00001-of-00002.parquet): corrupt" in result.stdout
    assert_one_line_error(result, "1 of 2 shards are damaged", "sha256", "--resume", code=1)
    (broken / "data" / "train-00000-of-00002.parquet").unlink()
    result = CliRunner().invoke(main, ["verify", str(broken)])
    assert "shard 0 (train-00000-of-00002.parquet): missing" in result.stdout
    assert_one_line_error(result, "2 of 2 shards are damaged", code=1)


def test_info_reports_a_damaged_shard(small_store, tmp_path):
    broken = damaged_copy(small_store, tmp_path / "broken")
    result = CliRunner().invoke(main, ["info", str(broken)])
    assert_one_line_error(result, "train-00001-of-00002.parquet", "sha256", "--resume", code=1)
    as_json = invoke("info", str(small_store), "--json")
    assert json.loads(as_json.stdout)["shards"] == {
        "total": 2,
        "sha256_verified": 2,
        "no_digest": 0,
    }


def test_workers_without_ray_name_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    out = tmp_path / "OUT"
    for flags in (["--workers", "2"], ["--ray", "auto"]):
        result = CliRunner().invoke(main, ["generate", "voc", *TINY, *flags, "--out", str(out)])
        assert_one_line_error(result, 'pip install "diffumask-datasets[ray]"', code=1)
    assert not out.exists()
    result = CliRunner().invoke(
        main, ["generate", "voc", *TINY, "--gpus-per-worker", "0.5", "--out", str(out)]
    )
    assert_one_line_error(result, "--gpus-per-worker", "--workers N", code=2)


def test_info_and_export_as_real_subprocesses(small_store, tmp_path):
    # A fresh process: nothing imported beforehand (this once caught a store that only
    # read back when `datasets` happened to be imported already).
    info = run_cli("info", str(small_store), "--json", timeout=120)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["samples"] == 6
    export = run_cli("export", str(small_store), "--format", "voc", "--to", str(tmp_path / "V"))
    assert export.returncode == 0, export.stderr
    assert "img/s" in export.stderr  # the progress bar, with its rate
    assert (
        len(
            (tmp_path / "V/VOCdevkit/VOC2012/ImageSets/Segmentation/trainval.txt")
            .read_text()
            .split()
        )
        == 6
    )
    again = run_cli("export", str(small_store), "--format", "voc", "--to", str(tmp_path / "V"))
    assert_one_line_error(again, "not empty", "--overwrite", code=1)


# -- generate with the built-in tiny model -------------------------------------------------


def store_digest(path: Path) -> dict[str, str]:
    """sha256 of every file that makes up a store (shards and manifest)."""
    files = [path / "manifest.json", *sorted((path / "data").glob("*.parquet"))]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_generate_then_export_voc_and_coco_with_identical_masks(tmp_path):
    """The issue's Done-when, through the CLI: generate, export twice, read back."""
    from pycocotools.coco import COCO

    out = tmp_path / "OUT"
    result = invoke("generate", "voc", *TINY, "--out", str(out))
    assert "4 samples" in result.stdout
    masks = {r.index: r.mask for r in open_dataset(out).records()}
    assert sorted(masks) == [0, 1, 2, 3]
    # the contact sheet: one row of four 128-pixel cells with 2-pixel gaps
    assert f"contact sheet (images with their masks): {out / 'contact_sheet.png'}" in result.stdout
    assert Image.open(out / "contact_sheet.png").size == (4 * 128 + 5 * 2, 128 + 2 * 2)
    invoke("export", str(out), "--format", "voc", "--to", str(tmp_path / "V"))
    invoke("export", str(out), "--format", "coco", "--to", str(tmp_path / "C"))

    voc = tmp_path / "V/VOCdevkit/VOC2012"
    names = (voc / "ImageSets/Segmentation/trainval.txt").read_text().split()
    assert names == [f"{i:06d}" for i in range(4)]
    for name in names:
        target = Image.open(voc / "SegmentationClass" / f"{name}.png")
        assert target.mode == "P"
        np.testing.assert_array_equal(np.array(target), masks[int(name)])
        assert Image.open(voc / "JPEGImages" / f"{name}.jpg").convert("RGB").size == (64, 64)

    seen = []
    for split in ("train", "val"):
        coco = COCO(str(tmp_path / "C/annotations" / f"instances_{split}.json"))
        assert {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}[3] == "bird"
        for image in coco.loadImgs(coco.getImgIds()):
            mask = masks[image["diffumask_index"]]
            seen.append(image["diffumask_index"])
            for class_id in (3, 12):
                union = np.zeros(mask.shape, bool)
                for ann in coco.loadAnns(coco.getAnnIds(imgIds=image["id"], catIds=[class_id])):
                    union |= coco.annToMask(ann).astype(bool)
                np.testing.assert_array_equal(union, mask == class_id)
    assert sorted(seen) == [0, 1, 2, 3]


def shard_per_sample_definition(tmp_path: Path) -> Path:
    """The voc definition with one sample per shard, so a killed run keeps some shards."""
    text = (REPO / "builders/voc/definition.yaml").read_text()
    assert "shard_size: 64" in text
    path = tmp_path / "voc-shard1.yaml"
    path.write_text(text.replace("shard_size: 64", "shard_size: 1"))
    return path


def run_and_stop(args: list[str], stop_when, sig: int, timeout: float = 300):
    """Run the CLI in a subprocess and send `sig` as soon as `stop_when()` holds."""
    proc = subprocess.Popen(
        [*diffumask_command(), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
        # A shell's background job (CI may run us as one) ignores SIGINT, and a child
        # inherits that: give it back the default, as an interactive terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + timeout
    stopped = False
    while proc.poll() is None and time.monotonic() < deadline:
        if stop_when():
            proc.send_signal(sig)
            stopped = True
            break
        time.sleep(0.02)
    _, stderr = proc.communicate(timeout=120)
    assert stopped, f"the run ended before the stop condition held:\n{stderr}"
    return proc.returncode, stderr


def test_kill_and_resume_equals_a_clean_run(tmp_path):
    definition = shard_per_sample_definition(tmp_path)
    # 16 one-sample shards, one per batch: enough left after each stop that the signal
    # lands before the run ends, even on an idle machine where a shard takes ~50 ms.
    args = ["generate", str(definition), *TINY, "--per-class", "8", "--batch-size", "1"]
    clean = tmp_path / "clean"
    # A subprocess like the others: torch's float sums depend on its thread count, so
    # byte equality is a promise for runs on the same machine with the same settings.
    done = run_cli(*args, "--out", str(clean))
    assert done.returncode == 0, done.stderr
    expected = store_digest(clean)
    assert len(expected) == 17  # manifest + 16 one-sample shards

    out = tmp_path / "killed"
    shards = lambda: len(list((out / "data").glob("*.parquet")))  # noqa: E731
    # 1. kill -9 as soon as the store exists, before any shard is written
    code, _ = run_and_stop(
        [*args, "--out", str(out)], lambda: (out / "manifest.json").exists(), signal.SIGKILL
    )
    assert code == -signal.SIGKILL
    # without --resume the half-made store is refused, and left as it is
    refused = run_cli(*args, "--out", str(out), timeout=120)
    assert_one_line_error(refused, str(out), "--resume", code=1)
    # 2. kill -9 in the middle, with some shards written
    code, _ = run_and_stop(
        [*args, "--out", str(out), "--resume"], lambda: shards() >= 2, signal.SIGKILL
    )
    assert code == -signal.SIGKILL
    assert 2 <= shards() < 16
    # a half-made dataset is refused by the readers, with the way out
    incomplete = CliRunner().invoke(main, ["info", str(out)])
    assert_one_line_error(incomplete, str(out), "incomplete", "--resume", code=1)
    # 3. Ctrl-C in the middle: one line that says how to continue
    before = shards()
    code, stderr = run_and_stop(
        [*args, "--out", str(out), "--resume"], lambda: shards() > before, signal.SIGINT
    )
    assert code == 130
    assert_one_line_error(
        subprocess.CompletedProcess([], code, "", stderr), "interrupted", "--resume"
    )
    # 4. finish
    final = run_cli(*args, "--out", str(out), "--resume")
    assert final.returncode == 0, final.stderr
    assert store_digest(out) == expected  # the same files, byte for byte
    assert [r.index for r in open_dataset(out).records()] == list(range(16))
    assert not list((out / ".work").glob("*.tmp"))


def test_resume_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "OUT"
    invoke("generate", "voc", *TINY, "--per-class", "1", "--out", str(out))
    before = store_digest(out)
    again = invoke("generate", "voc", *TINY, "--per-class", "1", "--out", str(out), "--resume")
    assert "already complete" in again.stdout and "loading" not in again.output
    result = CliRunner().invoke(
        main,
        [
            "generate",
            "voc",
            *TINY,
            "--per-class",
            "1",
            "--steps",
            "4",
            "--out",
            str(out),
            "--resume",
        ],
    )
    assert_one_line_error(result, str(out), "num_inference_steps", code=1)
    assert store_digest(out) == before


# -- bad input to generate: one line naming the value and the fix -------------------------


def generate_error(tmp_path: Path, *args: str, code: int = 1) -> str:
    out = tmp_path / "never"
    result = CliRunner().invoke(main, ["generate", *args, "--out", str(out)])
    error = assert_one_line_error(result, code=code)
    assert not out.exists() or not any(out.iterdir())
    return error


def test_unknown_dataset_lists_close_matches(tmp_path):
    error = generate_error(tmp_path, "vco")
    assert "'vco'" in error and "'voc'" in error and "shapes" in error


def test_unknown_class_lists_close_matches(tmp_path):
    error = generate_error(tmp_path, "voc", "--classes", "bird,dgo")
    assert "'dgo'" in error and "Did you mean 'dog'" in error


def test_missing_definition_file_names_it(tmp_path):
    missing = tmp_path / "mine.yaml"
    error = generate_error(tmp_path, str(missing))
    assert str(missing) in error and "does not exist" in error


def test_corrupt_definition_file_names_it(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: mine\nclasses: [ {id: 1, name: cat\n")
    error = generate_error(tmp_path, str(broken))
    assert str(broken) in error and "YAML" in error


def test_definition_class_name_with_path_characters_is_refused(tmp_path):
    path = tmp_path / "paths.yaml"
    path.write_text("name: paths\nclasses:\n  - {id: 1, name: ../cat, prompt: cat}\n")
    error = generate_error(tmp_path, str(path))
    assert "'../cat'" in error and str(path) in error


def test_generate_into_a_non_empty_directory_is_refused(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, ["generate", "voc", *TINY, "--out", str(out)])
    assert_one_line_error(result, str(out), "not empty", "--resume", code=1)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_unavailable_model_offline_is_one_line(tmp_path):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    error = generate_error(tmp_path, "voc", *TINY, "--model", "nobody/no-such-diffusion-model")
    assert "'nobody/no-such-diffusion-model'" in error and "builtin:tiny-random" in error


def test_export_hf_with_the_rendered_card(small_store, tmp_path):
    import datasets

    from diffumask_datasets.cards import validate_card

    dest = tmp_path / "H"
    result = invoke(
        "export", str(small_store), "--format", "hf", "--to", str(dest), "--val-fraction", "0.3"
    )
    assert "hf export" in result.stdout and "train 4, val 2" in result.stdout
    card = (dest / "README.md").read_text()
    validate_card(card)  # the Hub's metadata rules, offline
    assert "path: data/validation-*-" in card and "bird" in card
    loaded = datasets.load_dataset(str(dest), cache_dir=str(tmp_path / "cache"))
    assert {k: len(v) for k, v in loaded.items()} == {"train": 4, "validation": 2}
    masks = {r.index: r.mask for r in synthetic_records()}
    for row in loaded["validation"]:
        np.testing.assert_array_equal(np.asarray(row["mask"]), masks[row["index"]])

    disk = tmp_path / "D"
    invoke("export", str(small_store), "--format", "hf", "--to", str(disk), "--hf-layout", "disk")
    assert sum(len(v) for v in datasets.load_from_disk(str(disk)).values()) == 6
    assert (disk / "README.md").is_file()
    bad = CliRunner().invoke(
        main,
        ["export", str(small_store), "--format", "voc", "--to", "x", "--push-to-hub", "me/x"],
    )
    assert_one_line_error(bad, "--push-to-hub", "--format hf", code=2)
