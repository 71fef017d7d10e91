"""One generated sample: what every consumer of the engine reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

IGNORE = 255  # mask value for pixels whose label is uncertain


@dataclass
class Sample:
    """One generated image with its mask: what `DiffuMask(...)(...)` returns per prompt.

    `mask` holds 0 for background, the class ids, and 255 where the refinement was unsure;
    `attention` the per-class scores the mask was cut from; `quality` how decisive they
    were (the guide's "How a mask is made"); `meta` the prompt, seed, model, settings
    and the refinement chain."""

    image: Image.Image  # RGB
    mask: np.ndarray  # uint8 HxW: 0 background, 1..N class ids, 255 ignore
    attention: dict[str, np.ndarray]  # class name -> float32 HxW in [0, 1]
    quality: float  # in [0, 1], higher is better (docs/guide/masks.md)
    meta: dict[str, Any] = field(default_factory=dict)
