"""Synthetic stores for the FiftyOne tests: real store files, made-up attention fields.

Each sample's attention is a Gaussian blob per class (low resolution, as the store
keeps it); its mask is the blob upsampled and cut at 0.5, the way refinement does it,
so re-thresholding the stored maps behaves like it does on generated samples. Several
layouts are made without the diffusion model, which keeps the suite fast; one test
builds a store with the real engine too. benchmarks/fiftyone_import.py imports the
same stores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from diffumask_datasets.definitions import load_definition
from diffumask_datasets.store import Record, Store, make_manifest, write_store

CLASS_IDS = {"bird": 3, "dog": 12}  # VOC ids
PROMPT_CLASSES = [["bird"], ["dog"], ["bird", "dog"]]


def blob(size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius * radius)).astype(np.float32)


def synthetic_records(count: int, size: int = 64, attention_size: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    for index in range(count):
        classes = PROMPT_CLASSES[index % len(PROMPT_CLASSES)]
        attention = {
            name: blob(attention_size, *rng.uniform(0.3, 0.7, 2), rng.uniform(0.12, 0.22))
            for name in classes
        }
        upsampled = np.stack(
            [
                np.asarray(
                    Image.fromarray(attention[name], "F").resize(
                        (size, size), Image.Resampling.BILINEAR
                    )
                )
                for name in classes
            ]
        )
        ids = np.array([CLASS_IDS[name] for name in classes], np.uint8)
        mask = np.where(upsampled.max(0) > 0.5, ids[upsampled.argmax(0)], 0).astype(np.uint8)
        mask[0, :4] = 255  # a few ignore pixels, as the uncertainty band leaves them
        image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        yield Record(
            index=index,
            image=image,
            mask=mask,
            prompt="a photo of a " + " and a ".join(classes),
            seed=1000 + index,
            classes=list(classes),
            quality=round(float(rng.uniform(0.05, 0.95)), 4),
            attention=attention,
            meta={
                "model": "builtin:tiny-random",
                "negative_prompt": "blurry",
                "num_inference_steps": 2,
                "guidance_scale": 7.5,
                "refinement": {
                    "method": "threshold",
                    "params": {"threshold": 0.5, "band": 0.0},
                    "chain": [
                        {"step": "aggregate"},
                        {"step": "threshold", "value": 0.5},
                        {"step": "band", "width": 0.0},
                    ],
                },
            },
        )


def make_store(
    dest: Path, count: int, size: int = 64, shard_size: int = 64, attention_size: int = 16
) -> Store:
    manifest = make_manifest(
        load_definition("voc"),
        config={"synthetic": True, "count": count, "size": size},
        fingerprint=f"synthetic-{count}-{size}",
        num_samples=count,
        shard_size=shard_size,
        attention_size=attention_size,
    )
    return write_store(dest, synthetic_records(count, size, attention_size), manifest)
