"""What every command of the CLI shares: option checks, the one-line error, output-folder
checks, opening a dataset and the progress bar.

Each check names the bad value and the fix. Nothing here imports a heavy library.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

from ..errors import DiffuMaskError, one_line
from ..models import BUILTINS

PROG = "diffumask"
MODEL_HELP = "Hub id, local diffusers folder or " + " | ".join(BUILTINS) + "."


def fail(message: object, code: int = 1) -> None:
    """Print `diffumask: error: <message>` on one line and exit with `code`."""
    click.echo(f"{PROG}: error: {one_line(message)}", err=True)
    sys.exit(code)


def show_warning(message: Warning | str, *args: Any, **kwargs: Any) -> None:
    """A warning as one line, `diffumask: warning: ...` (for warnings.showwarning)."""
    click.echo(f"{PROG}: warning: {one_line(message)}", err=True)


# -- option checks (each names the bad value and the fix) --------------------------------


def at_least_one(example: int):
    """An option callback refusing values below 1, with `example` as the fix."""

    def check(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise click.BadParameter(f"{value} is too small: it must be at least 1, e.g. {example}")
        return value

    return check


def check_size(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    """Click callback: `--size` must be a positive multiple of 8; the error offers the
    nearest ones."""
    if value is None:
        return value
    if value < 8 or value % 8:
        lower, upper = max(8, value // 8 * 8), max(8, value // 8 * 8 + 8)
        choices = f"{lower} or {upper}" if value > 8 else "8"
        raise click.BadParameter(
            f"{value} is not a positive multiple of 8 (the VAE works on 8x8 pixel blocks); "
            f"use {choices}"
        )
    return value


def parse_class_list(value: str | None) -> list[str] | None:
    """`--classes bird,dog` -> ["bird", "dog"]; refuses names that could act as paths."""
    if value is None:
        return None
    names = [name.strip() for name in value.split(",")]
    if not all(names):
        raise click.BadParameter(f"{value!r} has an empty class name; write e.g. bird,dog")
    from ..definitions import PATH_CHARACTERS

    for name in names:
        bad = [c for c in PATH_CHARACTERS if c in name]
        if bad or name in (".", ".."):
            shown = repr(bad[0]) if bad else repr(name)
            raise click.BadParameter(
                f"class name {name!r} contains the path character {shown}; give the "
                "definition's class names, plain names such as 'dog'"
            )
    return names


def check_classes(ctx: click.Context, param: click.Parameter, value: str | None):
    """Click callback: `--classes a,b` as a list of names (None: every class)."""
    return parse_class_list(value)


def check_fraction(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """Click callback: `--val-fraction` must lie in [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise click.BadParameter(f"{value} is outside [0, 1); e.g. 0.1 puts 10% in val")
    return value


def check_quality(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """Click callback: a quality bound must lie in [0, 1]."""
    if not 0.0 <= value <= 1.0:
        raise click.BadParameter(f"{value} is outside [0, 1]; quality scores lie in [0, 1]")
    return value


def destination_option(command):
    """`--to DEST`, the destination folder of the commands that write a new dataset."""
    return click.option(
        "--to", "dest", required=True, type=click.Path(path_type=Path), help="Destination folder."
    )(command)


# -- folders and datasets ------------------------------------------------------------------


def is_empty_dir(path: Path) -> bool:
    """Whether `path` is a folder with nothing in it."""
    return path.is_dir() and not any(path.iterdir())


def check_output_dir(out: Path, resume: bool) -> None:
    """Refuse an `--out` that is a file, or a non-empty folder without `--resume`, so two
    datasets never mix."""
    if out.exists() and not out.is_dir():
        raise DiffuMaskError(f"--out {out} is a file; give a folder for the dataset")
    if out.is_dir() and not is_empty_dir(out) and not resume:
        raise DiffuMaskError(
            f"--out {out} is not empty; pass --resume to continue the dataset in it, "
            "or choose an empty or new folder"
        )


def open_dataset(path: Path) -> Any:
    """`store.open_store`, imported on use so that --help stays fast."""
    from ..store import open_store

    return open_store(path)


def progress(iterable: Iterable[Any], total: int, desc: str) -> Iterable[Any]:
    """A progress bar on stderr over `iterable`."""
    from ..export import progress_bar

    return progress_bar(iterable, total=total, desc=desc, enabled=True)
