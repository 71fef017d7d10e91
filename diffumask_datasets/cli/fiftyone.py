"""`diffumask app` (a dataset in the FiftyOne App) and `diffumask plugin` (the FiftyOne
plugin's folder).

Importing this module does not import fiftyone (the CLI lists these commands at once);
the command bodies do.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import click

from ..errors import DiffuMaskError
from ..fiftyone.install import (
    PLUGIN_DIR,
    install_plugin,
    plugin_installed,
    plugin_operators,
    plugins_dir,
    uninstall_plugin,
)


@click.group("plugin")
def plugin() -> None:
    """The DiffuMask FiftyOne plugin (operators for the App).

    \b
    Examples:
      diffumask plugin install            # link it into FIFTYONE_PLUGINS_DIR
      diffumask plugin install --copy     # copy instead (e.g. for a shared plugins dir)
      diffumask plugin path               # where the plugin folder ships
    """


@plugin.command("install")
@click.option(
    "--dir",
    "directory",
    default=None,
    help="Plugins directory (default: FIFTYONE_PLUGINS_DIR or FiftyOne's plugins_dir).",
)
@click.option("--copy", is_flag=True, help="Copy the plugin folder instead of linking it.")
@click.option("--force", is_flag=True, help="Replace whatever is at the destination.")
def install(directory: str | None, copy: bool, force: bool) -> None:
    """Make the plugin visible to FiftyOne (and to the App)."""
    target = install_plugin(plugins_dir(directory), copy=copy, force=force)
    how = "copied to" if copy else "linked at"
    click.echo(f"DiffuMask plugin {how} {target}")
    click.echo("operators:")
    for uri in plugin_operators():
        click.echo(f"  {uri}")
    if directory and os.environ.get("FIFTYONE_PLUGINS_DIR") != str(Path(directory).expanduser()):
        click.echo(f"FiftyOne finds it when FIFTYONE_PLUGINS_DIR={Path(directory).expanduser()}")


@plugin.command("uninstall")
@click.option("--dir", "directory", default=None, help="Plugins directory.")
def uninstall(directory: str | None) -> None:
    """Remove the plugin from the plugins directory."""
    target = uninstall_plugin(plugins_dir(directory))
    click.echo(f"removed {target}")


@plugin.command("path")
def path() -> None:
    """Print the folder the plugin ships in."""
    click.echo(str(PLUGIN_DIR))


def _check_port(address: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address if address not in ("", "0.0.0.0") else "", port))
        except OSError as error:
            raise DiffuMaskError(
                f"cannot serve on {address}:{port} ({error.strerror}); pass another --port"
            ) from None


@click.command("app")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--address",
    default="localhost",
    show_default=True,
    help="Address to serve on (0.0.0.0: every interface).",
)
@click.option(
    "--port", default=5151, show_default=True, type=click.IntRange(1, 65535), help="Port."
)
@click.option(
    "--name", default=None, help="FiftyOne dataset name (default: folder name + fingerprint)."
)
@click.option(
    "--media-dir",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where images and masks are written for FiftyOne (once; reused).",
)
@click.option(
    "--fresh",
    is_flag=True,
    help="Re-import even if the FiftyOne dataset exists (tags set in the App are lost).",
)
def app(
    directory: Path, address: str, port: int, name: str | None, media_dir: Path | None, fresh: bool
) -> None:
    """Open a generated dataset in the FiftyOne App and serve it until interrupted.

    The dataset is kept in FiftyOne's database, so tags set in the App survive a restart;
    --fresh re-imports it.

    \b
    Examples:
      diffumask app OUT
      diffumask app OUT --address 0.0.0.0 --port 5151   # reachable from other machines
    """
    _check_port(address, port)
    import fiftyone as fo

    from ..fiftyone import materialize, to_fiftyone
    from ..fiftyone.media import class_slug

    index = materialize(directory, media_dir=media_dir)
    name = name or f"diffumask-{class_slug(directory.resolve().name)}-{index.fingerprint[:8]}"
    dataset = None
    if fo.dataset_exists(name) and not fresh:
        existing = fo.load_dataset(name)
        info = (existing.info or {}).get("diffumask") or {}
        if info.get("fingerprint") == index.fingerprint and len(existing) == len(index.samples):
            dataset = existing
    if dataset is None:
        dataset = to_fiftyone(index.root, name=name, persistent=True, overwrite=True)
    session = fo.launch_app(dataset, remote=True, address=address, port=port, auto=False)
    host = "localhost" if address in ("", "0.0.0.0") else address
    click.echo(
        f"FiftyOne App: {len(dataset)} samples of {directory} (dataset {dataset.name!r}) "
        f"at http://{host}:{port}/"
    )
    if not plugin_installed():
        click.echo("tip: `diffumask plugin install` adds the DiffuMask operators to the App")
    click.echo("serving until interrupted (Ctrl-C)", err=True)
    _stop_on_signals()
    try:
        session.wait(-1)
    except KeyboardInterrupt:
        click.echo("stopped", err=True)
    finally:
        session.close()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _stop_on_signals() -> None:
    """Ctrl-C and `kill` both stop the App cleanly (the server subprocess included):
    SIGINT may arrive ignored (a shell's background job), and SIGTERM would otherwise
    skip the clean-up."""
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
