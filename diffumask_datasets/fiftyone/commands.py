"""`diffumask app` and `diffumask plugin`: the FiftyOne commands of the CLI.

Importing this module does not import fiftyone (the CLI lists these commands at once);
the command bodies do.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import click

from ..errors import DiffuMaskError

PLUGIN_DIR = Path(__file__).resolve().parent / "plugin"
PLUGIN_FOLDER_NAME = "diffumask"
PLUGIN_NAME = "@diffumask/diffumask"


def _plugin_operators() -> list[str]:
    import yaml

    data = yaml.safe_load((PLUGIN_DIR / "fiftyone.yml").read_text())
    return [f"{data['name']}/{name}" for name in data.get("operators", [])]


def plugins_dir(explicit: str | None = None) -> Path:
    """FIFTYONE_PLUGINS_DIR (or FiftyOne's configured plugins_dir): where FiftyOne looks."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("FIFTYONE_PLUGINS_DIR")
    if env:
        return Path(env).expanduser()
    import fiftyone as fo  # reads ~/.fiftyone/config.json too

    if not fo.config.plugins_dir:
        raise DiffuMaskError(
            "FiftyOne has no plugins directory configured; set FIFTYONE_PLUGINS_DIR or pass --dir"
        )
    return Path(fo.config.plugins_dir).expanduser()


def install_plugin(target_root: Path, copy: bool = False, force: bool = False) -> Path:
    """Link (or copy) the plugin folder to `target_root/diffumask`; returns that path."""
    target_root.mkdir(parents=True, exist_ok=True)
    target = target_root / PLUGIN_FOLDER_NAME
    if target.is_symlink() and target.resolve() == PLUGIN_DIR and not copy:
        return target  # already installed from this package
    if target.exists() or target.is_symlink():
        ours = (target / "fiftyone.yml").is_file() and PLUGIN_NAME in (
            target / "fiftyone.yml"
        ).read_text()
        if not (force or ours):
            raise DiffuMaskError(
                f"{target} exists and is not the DiffuMask plugin; pass --force to replace it "
                "or --dir to install elsewhere"
            )
        if target.is_symlink() or target.is_file():
            target.unlink()
        else:
            shutil.rmtree(target)
    if copy:
        shutil.copytree(PLUGIN_DIR, target, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        target.symlink_to(PLUGIN_DIR, target_is_directory=True)
    return target


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
    for uri in _plugin_operators():
        click.echo(f"  {uri}")
    if directory and os.environ.get("FIFTYONE_PLUGINS_DIR") != str(Path(directory).expanduser()):
        click.echo(f"FiftyOne finds it when FIFTYONE_PLUGINS_DIR={Path(directory).expanduser()}")


@plugin.command("uninstall")
@click.option("--dir", "directory", default=None, help="Plugins directory.")
def uninstall(directory: str | None) -> None:
    """Remove the plugin from the plugins directory."""
    target = plugins_dir(directory) / PLUGIN_FOLDER_NAME
    if not (target.exists() or target.is_symlink()):
        raise DiffuMaskError(f"the DiffuMask plugin is not installed at {target}")
    if target.is_symlink():
        target.unlink()
    else:
        if PLUGIN_NAME not in (target / "fiftyone.yml").read_text():
            raise DiffuMaskError(f"{target} is not the DiffuMask plugin; not removing it")
        shutil.rmtree(target)
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

    from . import materialize, to_fiftyone
    from .media import class_slug

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
    if not _plugin_installed():
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


def _plugin_installed() -> bool:
    try:
        root = plugins_dir()
    except DiffuMaskError:
        return False
    return (root / PLUGIN_FOLDER_NAME / "fiftyone.yml").is_file()


__all__ = ["app", "plugin", "install_plugin", "plugins_dir", "PLUGIN_DIR"]
