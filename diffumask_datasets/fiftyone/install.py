"""Installing the FiftyOne plugin: where FiftyOne looks for plugins, and our plugin
folder linked (or copied) there.

    from diffumask_datasets.fiftyone.install import install_plugin, plugins_dir
    install_plugin(plugins_dir())     # what `diffumask plugin install` does

Importing this module does not import fiftyone; `plugins_dir()` does when it has to ask
FiftyOne's configuration.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import DiffuMaskError

PLUGIN_DIR = Path(__file__).resolve().parent / "plugin"
PLUGIN_FOLDER_NAME = "diffumask"
PLUGIN_NAME = "@diffumask/diffumask"


def plugin_operators() -> list[str]:
    """The URIs of the plugin's operators, as FiftyOne lists them."""
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


def uninstall_plugin(target_root: Path) -> Path:
    """Remove the plugin from `target_root` (a link, or a copy of ours); returns its path."""
    target = target_root / PLUGIN_FOLDER_NAME
    if not (target.exists() or target.is_symlink()):
        raise DiffuMaskError(f"the DiffuMask plugin is not installed at {target}")
    if target.is_symlink():
        target.unlink()
    else:
        if PLUGIN_NAME not in (target / "fiftyone.yml").read_text():
            raise DiffuMaskError(f"{target} is not the DiffuMask plugin; not removing it")
        shutil.rmtree(target)
    return target


def plugin_installed() -> bool:
    """True when FiftyOne's plugins directory holds the plugin."""
    try:
        root = plugins_dir()
    except DiffuMaskError:
        return False
    return (root / PLUGIN_FOLDER_NAME / "fiftyone.yml").is_file()
