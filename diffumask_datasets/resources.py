"""Where the data shipped with the package lies: in the wheel, or in a source checkout."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _shipped(name: str) -> Path:
    # The wheel carries builders/ and cards/ inside the package; a source checkout
    # (editable install, tests from the repository) has them at the repository root.
    for candidate in (PACKAGE_DIR / name, PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"the package data folder {name!r} is missing from {PACKAGE_DIR}")


def builders_dir() -> Path:
    """The folder of the built-in dataset definitions (`builders/`)."""
    return _shipped("builders")


def cards_dir() -> Path:
    """The folder of the dataset-card templates (`cards/`)."""
    return _shipped("cards")


def data_file(name: str) -> Path:
    """The path of a data file shipped in the package (`diffumask_datasets/data/`)."""
    return PACKAGE_DIR / "data" / name
