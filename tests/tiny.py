"""The generation settings the tests share: the built-in tiny SD 1.x model, two VOC classes,
64 px, a few steps; a test changes only what it is about."""

from __future__ import annotations

from typing import Any

TINY_SETTINGS: dict[str, Any] = {
    "model": "builtin:tiny-random",
    "classes": ["bird", "dog"],
    "images_per_class": 2,
    "num_inference_steps": 3,
    "resolution": 64,
    "seed": 0,
}


def tiny_settings(**changes: Any) -> dict[str, Any]:
    """TINY_SETTINGS with `changes` over them (a fresh dict, its lists copied)."""
    return {**TINY_SETTINGS, "classes": list(TINY_SETTINGS["classes"]), **changes}
