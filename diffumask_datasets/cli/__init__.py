"""The `diffumask` command line: a short dispatcher over one module per command family.

    generate.py  generate            info.py     info, verify
    export.py    export, filter      quality.py  evaluate, clean, splice, shapes render
    label.py     label, score
    fiftyone.py  app, plugin (loaded when named: FiftyOne is optional)

Heavy libraries (torch, diffusers, datasets, fiftyone) are imported inside the commands
that use them, so `diffumask --help` and `--version` answer at once.

Errors a user can cause print one line, `diffumask: error: <what and how to fix it>`,
and exit non-zero: 1 for a bad value (DiffuMaskError), 2 for a command-line usage
mistake, 130 for Ctrl-C. DIFFUMASK_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from .. import __version__
from ..errors import DiffuMaskError, one_line
from .common import PROG, fail, open_dataset

# Commands that live in modules importing optional libraries, loaded when named.
LAZY_COMMANDS = {
    "app": ("diffumask_datasets.cli.fiftyone", "app"),
    "plugin": ("diffumask_datasets.cli.fiftyone", "plugin"),
}


def _unavailable_command(name: str, reason: str) -> click.Command:
    def refuse() -> None:
        raise DiffuMaskError(
            f"'{PROG} {name}' is unavailable ({reason}); install the FiftyOne extra: "
            "pip install 'diffumask-datasets[fiftyone]'"
        )

    return click.Command(name, callback=refuse, help=f"(unavailable: {reason})")


class DiffuMaskGroup(click.Group):
    """A click group that keeps its commands in the order they were added, loads the
    FiftyOne commands lazily, and turns every user error into one line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*self.commands, *(name for name in LAZY_COMMANDS if name not in self.commands)]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands or name not in LAZY_COMMANDS:
            return super().get_command(ctx, name)
        module_name, attribute = LAZY_COMMANDS[name]
        try:
            command = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            return _unavailable_command(name, one_line(exc))
        return command

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode or os.environ.get("DIFFUMASK_DEBUG"):
            return super().main(*args, standalone_mode=standalone_mode, **kwargs)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else PROG
            fail(f"{exc.format_message()} (see '{where} --help')", 2)
        except DiffuMaskError as exc:
            fail(exc)
        except (KeyboardInterrupt, click.Abort):
            fail("interrupted", 130)
        except click.ClickException as exc:
            fail(exc.format_message(), exc.exit_code)
        except OSError as exc:
            # Disk full, permission denied and the like: the system's message names the file.
            fail(exc)
        sys.exit(result if isinstance(result, int) else 0)


MAIN_HELP = f"""Make semantic-segmentation datasets with a diffusion model and its attention.

\b
Examples:
  {PROG} generate voc --model builtin:tiny-random --classes bird,dog \\
      --per-class 2 --steps 3 --size 64 --seed 0 --out out/voc-tiny
  {PROG} info out/voc-tiny
  {PROG} verify out/voc-tiny
  {PROG} export out/voc-tiny --format voc --to out/voc-tiny-VOC
  {PROG} export out/voc-tiny --format coco --to out/voc-tiny-COCO
  {PROG} filter out/voc-tiny --min-quality 0.5 --to out/voc-tiny-good
  {PROG} app out/voc-tiny

Errors print one line and exit non-zero; DIFFUMASK_DEBUG=1 shows tracebacks.
"""


@click.group(
    name=PROG, cls=DiffuMaskGroup, help=MAIN_HELP, context_settings={"max_content_width": 100}
)
@click.version_option(
    __version__, "--version", "-V", prog_name=PROG, message="%(prog)s %(version)s"
)
def main() -> None:
    """The `diffumask` command: one verb per job (its help text is MAIN_HELP)."""
    pass


def _register() -> None:
    from .export import export, filter_command
    from .generate import generate
    from .info import info, verify
    from .label import label, score
    from .quality import clean, evaluate, shapes, splice

    commands = (generate, label, info, verify, export, filter_command, evaluate, score)
    for command in (*commands, clean, splice):
        main.add_command(command)
    main.add_command(shapes)


_register()

__all__ = ["PROG", "main", "open_dataset"]
