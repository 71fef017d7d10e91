"""One generated sample: what every consumer of the engine reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

IGNORE = 255  # mask value for pixels whose label is uncertain


@dataclass
class Sample:
    image: Image.Image  # RGB
    mask: np.ndarray  # uint8 HxW: 0 background, 1..N class ids, 255 ignore
    attention: dict[str, np.ndarray]  # class name -> float32 HxW in [0, 1]
    quality: float  # in [0, 1], higher is better (README: "How a mask is made")
    meta: dict[str, Any] = field(default_factory=dict)
