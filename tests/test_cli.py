"""The `diffumask` command line: through click's CliRunner and as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from diffumask_datasets.cli import main

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
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env()
    )
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
