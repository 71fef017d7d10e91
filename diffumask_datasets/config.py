"""The settings of a generation run: one dataclass, its defaults, checks and fingerprint.

    from diffumask_datasets.config import GenerationConfig
    config = GenerationConfig.from_definition("voc", images_per_class=2, resolution=64)

Settings left as None take the definition's `defaults`, then the package's fallbacks.
Everything that changes a sample (model, classes, sizes, steps, guidance, seed,
refinement, dtype, the definition itself) is in the fingerprint; batch_size and device
are not (a sample never depends on its batch), so a run may resume with another batch
size or on another machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from diffumask_datasets.definitions import DEFAULT_KEYS, Definition, load_definition
from diffumask_datasets.errors import DiffuMaskError
from diffumask_datasets.families import refinement_by_family

# Used when neither the caller nor the definition sets a value.
FALLBACKS: dict[str, Any] = {
    "model": "CompVis/stable-diffusion-v1-4",
    "images_per_class": 10,
    "num_inference_steps": 50,
    "guidance_scale": 7.5,
    "resolution": 512,
    "refinement": None,  # the engine's default method
    "batch_size": 4,
    "shard_size": 64,
    "two_classes": 0.0,
    "seed": 0,
    "attention_size": None,  # resolution // 8: the size of the largest attention map
}
# Settings that never change a sample: left out of the fingerprint.
NOT_FINGERPRINTED = ("batch_size", "device")
DTYPES = (None, "float32", "float16", "bfloat16")


@dataclass
class GenerationConfig:
    """The settings of one dataset's generation, by their Python names (the CLI's
    `--per-class`, `--steps`, `--size` set `images_per_class`, `num_inference_steps`,
    `resolution`). None means "the definition's default"; `from_definition` and `resolve`
    fill them in and check them."""

    model: str | None = None  # hub id, local folder or builtin:<alias>
    classes: list[str] | None = None  # class names of the definition; None: all
    images_per_class: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    resolution: int | None = None  # square images, pixels (a multiple of 8)
    seed: int | None = None  # base seed; sample i gets generate.sample_seed(seed, i)
    refinement: str | dict | None = None  # threshold | adaptive | affinity | separate, or a dict
    batch_size: int | None = None
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # None: the engine's choice for the device
    shard_size: int | None = None  # samples per stored shard
    two_classes: float | bool | None = None  # fraction of images naming a second class
    negative_prompt: str | None = None  # None: the definition's
    attention_size: int | None = None  # side of the stored attention maps

    @classmethod
    def from_definition(cls, definition: Definition | str, **given: Any) -> GenerationConfig:
        """A config with the caller's values (None ignored) over the definition's defaults."""
        definition = load_definition(definition)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in given if k not in fields]
        if unknown:
            raise DiffuMaskError(
                f"unknown generation setting {unknown[0]!r}; settings: {', '.join(sorted(fields))}"
            )
        return cls(**{k: v for k, v in given.items() if v is not None}).resolve(definition)

    def resolve(self, definition: Definition) -> GenerationConfig:
        """Every None filled in (caller, then definition defaults, then FALLBACKS), the
        classes put in definition order, and each value checked."""
        values = dataclasses.asdict(self)
        for key, value in values.items():
            if value is None:
                if key in definition.defaults:
                    values[key] = definition.defaults[key]
                elif key in FALLBACKS:
                    values[key] = FALLBACKS[key]
        if values["negative_prompt"] is None:
            values["negative_prompt"] = definition.negative_prompt
        values["classes"] = [c.name for c in definition.select(values["classes"])]
        if self.two_classes is None and len(values["classes"]) < 2:
            # The definition's pairing default cannot apply to a single chosen class; only
            # a caller asking for pairs explicitly gets the error.
            values["two_classes"] = 0.0
        resolved = GenerationConfig(**values)
        resolved._check()
        if resolved.attention_size is None:
            resolved.attention_size = max(8, resolved.resolution // 8)
        resolved.two_classes = float(resolved.two_classes)
        return resolved

    def _check(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DiffuMaskError(f"{name}={value!r} must be a positive integer")

        for name in ("images_per_class", "num_inference_steps", "resolution", "batch_size"):
            positive(name)
        positive("shard_size")
        if self.attention_size is not None:
            positive("attention_size")
        if self.resolution % 8:
            raise DiffuMaskError(
                f"resolution={self.resolution} must be a multiple of 8 (e.g. "
                f"{max(8, round(self.resolution / 8) * 8)})"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise DiffuMaskError(f"seed={self.seed!r} must be a non-negative integer")
        if not isinstance(self.guidance_scale, (int, float)) or isinstance(
            self.guidance_scale, bool
        ):
            raise DiffuMaskError(f"guidance_scale={self.guidance_scale!r} must be a number")
        if self.dtype not in DTYPES:
            raise DiffuMaskError(f"dtype={self.dtype!r} must be one of {DTYPES[1:]} or None")
        if not isinstance(self.model, str) or not self.model:
            raise DiffuMaskError(
                f"model={self.model!r} must be a hub id, a local folder or builtin:<alias>; "
                "pass a ready pipeline to build_dataset(engine=...) instead"
            )
        if self.refinement is not None and not isinstance(self.refinement, (str, dict)):
            raise DiffuMaskError(
                f"refinement={self.refinement!r} must be a method name or a dict of parameters"
            )
        two = self.two_classes
        if not isinstance(two, (bool, int, float)) or not 0 <= float(two) <= 1:
            raise DiffuMaskError(f"two_classes={two!r} must be a bool or a fraction in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, definition: Definition) -> str:
        """A hash of the definition and of every setting that changes a sample, the
        refinement by its resolved parameters: a changed default changes the hash, so a
        dataset is never resumed with masks cut two ways."""
        settings = {k: v for k, v in self.to_dict().items() if k not in NOT_FINGERPRINTED}
        settings["refinement"] = refinement_by_family(self.refinement)
        blob = json.dumps(
            {"definition": definition.fingerprint(), "settings": settings},
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(blob.encode()).hexdigest()


assert set(DEFAULT_KEYS) <= {f.name for f in dataclasses.fields(GenerationConfig)}
