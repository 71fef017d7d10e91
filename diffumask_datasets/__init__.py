"""diffumask-datasets: semantic-segmentation datasets from diffusion models' own attention.

    from diffumask_datasets import DiffuMask
    samples = DiffuMask("builtin:tiny-random")(["a photo of a bird"], classes=[["bird"]])

Importing the package is cheap: torch and diffusers load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import DiffuMaskError

__version__ = "0.1.0"
__all__ = [
    "DiffuMask",
    "DiffuMaskError",
    "Refinement",
    "Sample",
    "CaptureOptions",
    "trace",
    "load_pipeline",
    "__version__",
]

_LAZY = {
    "DiffuMask": "generate",
    "Refinement": "refine",
    "Sample": "sample",
    "CaptureOptions": "capture",
    "trace": "capture",
    "load_pipeline": "models",
}

if TYPE_CHECKING:
    from .capture import CaptureOptions, trace
    from .generate import DiffuMask
    from .models import load_pipeline
    from .refine import Refinement
    from .sample import Sample


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
