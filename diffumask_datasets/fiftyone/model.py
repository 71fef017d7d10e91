"""DiffuMask as a FiftyOne model: `apply_model` labels any image dataset with masks from a
diffusion model's attention (`DiffuMask.label`).

```python
import fiftyone as fo
from diffumask_datasets.fiftyone.model import DiffuMaskModel, label_samples

model = DiffuMaskModel("builtin:shapes", classes=["circle", "square"], num_inference_steps=20)
dataset.apply_model(model, label_field="diffumask")        # fo.Segmentation per sample
dataset.mask_targets["diffumask"] = model.mask_targets     # names of the mask's ids
dataset.save()
label_samples(dataset.take(10), model, "diffumask")        # both steps in one call
```

Each image's noise seed comes from the base seed and the image's own pixels, so a
sample's mask depends neither on its batch nor on the order FiftyOne visits samples in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import fiftyone as fo
import fiftyone.core.models as fom
import numpy as np

from ..errors import DiffuMaskError


def image_seed(seed: int, image: np.ndarray) -> int:
    """The noise seed of one image: the base seed and a digest of its pixels and shape."""
    from ..generate import sample_seed

    digest = hashlib.sha256(np.ascontiguousarray(image).tobytes())
    digest.update(repr(image.shape).encode())
    return sample_seed(seed, int.from_bytes(digest.digest()[:8], "big"))


class DiffuMaskModel(fom.Model):
    """A FiftyOne image model whose predictions are `fo.Segmentation`s (mask ids 0
    background, 1..N the classes in order, 255 uncertain) with the sample's mask
    quality as the label's `quality` attribute. Arguments as for `DiffuMask.label`;
    `model` is a model spec or a ready DiffuMask."""

    def __init__(
        self,
        model: Any = "builtin:tiny-random",
        classes: Sequence[str] = (),
        prompt: str | None = None,
        seed: int = 0,
        strength: float | None = None,
        start: str | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        resolution: int | None = None,
        refinement: Mapping[str, Any] | str | None = None,
        class_ids: Mapping[str, int] | None = None,
    ):
        from ..generate import DiffuMask

        classes = [classes] if isinstance(classes, str) else list(classes)
        if not classes:
            raise DiffuMaskError("DiffuMaskModel needs classes=[...]: the classes to label")
        self.engine = model if isinstance(model, DiffuMask) else DiffuMask(model)
        self.classes = classes
        self.class_ids = dict(class_ids or {name: i + 1 for i, name in enumerate(classes)})
        self.settings = {
            "prompts": prompt,
            "strength": strength,
            "start": start,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "resolution": resolution,
            "refinement": refinement,
            "class_ids": self.class_ids,
        }
        self.seed = int(seed)
        self._preprocess = True

    @property
    def mask_targets(self) -> dict[int, str]:
        """{mask id: class name}: what FiftyOne shows for the ids (dataset.mask_targets)."""
        return {i: name for name, i in self.class_ids.items() if name in self.classes}

    @property
    def media_type(self) -> str:
        return "image"

    @property
    def ragged_batches(self) -> bool:
        # No transforms: a batch reaches predict_all as a list of arrays, never stacked,
        # so images of different sizes batch fine (each labelled at its own size).
        return False

    @property
    def transforms(self):
        return None

    @property
    def preprocess(self) -> bool:
        return self._preprocess

    @preprocess.setter
    def preprocess(self, value: bool) -> None:
        self._preprocess = value

    def predict(self, arg) -> fo.Segmentation:
        return self.predict_all([arg])[0]

    def predict_all(self, args) -> list[fo.Segmentation]:
        images = [np.asarray(arg) for arg in args]
        images = [np.repeat(i[..., None], 3, -1) if i.ndim == 2 else i[..., :3] for i in images]
        samples = self.engine.label(
            images,
            classes=self.classes,
            seed=[image_seed(self.seed, image) for image in images],
            batch_size=max(1, len(images)),
            **self.settings,
        )
        return [fo.Segmentation(mask=s.mask, quality=float(s.quality)) for s in samples]


def label_samples(
    samples, model: DiffuMaskModel, label_field: str = "diffumask", batch_size: int = 4
) -> int:
    """`model` applied to `samples` (a dataset or a view) into `label_field`, and the
    field's mask targets set on the dataset. Returns the number of samples labelled."""
    samples.apply_model(
        model, label_field=label_field, batch_size=batch_size, skip_failures=False, progress=False
    )
    dataset = samples._dataset
    dataset.mask_targets = {**dataset.mask_targets, label_field: model.mask_targets}
    dataset.save()
    return len(samples.exists(label_field))


def default_model(dataset) -> str:
    """The model a DiffuMask dataset was made with (its samples' `model`), else the tiny
    built-in."""
    if dataset is not None and "model" in dataset.get_field_schema():
        models = [m for m in dataset.distinct("model") if m]
        if models:
            return str(models[0])
    return "builtin:tiny-random"


def check_label_field(dataset, name: Any) -> str | None:
    """Why `name` cannot take new masks (None: it can): a valid new field, or one holding
    Segmentations already (labelled again)."""
    import keyword
    import re

    if not isinstance(name, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
        return f"field name {name!r} must be letters, digits and underscores"
    if keyword.iskeyword(name):
        return f"field name {name!r} is a Python keyword; choose another"
    field = dataset.get_field_schema().get(name) if dataset is not None else None
    if field is not None and getattr(field, "document_type", None) is not fo.Segmentation:
        return f"field {name!r} already exists and holds no masks; choose another name"
    return None
