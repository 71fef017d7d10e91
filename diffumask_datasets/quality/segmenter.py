"""The one segmenter trainer behind evaluate, clean and the shapes ablation.

A SegFormer from transformers: by default a small configuration built from scratch
(random init, ~0.2 M parameters), or a pretrained checkpoint by name or path
(`segmenter="nvidia/mit-b0"`), whose head is re-made for our classes. `builtin:fcn` is
a small dilated FCN (~36 k parameters, the network of benchmarks/shapes_quality.py):
from scratch on a CPU it learns the shapes world several times faster per step than the
small SegFormer (docs/lab/shapes-quality.md), which is why the shapes ablation uses it.

Images are resized to a square `size` (masks by nearest neighbour); pixels labelled 255
are ignored by the loss. Seeded: the same data and
settings give the same model on the same device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from diffumask_datasets.errors import DiffuMaskError

from .metrics import IGNORE

# ImageNet statistics: what pretrained SegFormer backbones expect (harmless from scratch).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TrainSettings:
    """How a segmenter is trained. `size` None: the first training image's longer side
    (at most 512)."""

    steps: int = 600
    batch_size: int = 16
    learning_rate: float = 4e-3
    size: int | None = None
    seed: int = 0
    splice: bool = False  # replace half of each batch by 2x2 mosaics (splicing)
    segmenter: str | None = None  # a SegFormer checkpoint (hub id or folder); None: small
    device: str | None = None  # None: cuda when present, else cpu

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def small_config(num_labels: int):
    """A small SegFormer for from-scratch training: four stages of one block each, the
    first at half resolution (not a quarter), so 64x64 inputs keep 32x32 logits."""
    from transformers import SegformerConfig

    return SegformerConfig(
        num_channels=3,
        num_encoder_blocks=4,
        depths=[1, 1, 1, 1],
        sr_ratios=[4, 2, 1, 1],
        hidden_sizes=[16, 32, 64, 96],
        patch_sizes=[3, 3, 3, 3],
        strides=[2, 2, 2, 2],
        num_attention_heads=[1, 1, 2, 2],
        mlp_ratios=[2, 2, 2, 2],
        decoder_hidden_size=48,
        # no stochastic depth or head dropout: a net this small underfits before it overfits
        drop_path_rate=0.0,
        classifier_dropout_prob=0.0,
        num_labels=num_labels,
        semantic_loss_ignore_index=IGNORE,
    )


FCN = "builtin:fcn"


def small_fcn(num_labels: int):
    """A dilated FCN at half resolution: a stride-2 stem, dilated 3x3 context, per-pixel
    logits. Called like a SegFormer: model(pixel_values=x).logits."""
    from types import SimpleNamespace

    from torch import nn

    def block(i: int, o: int, d: int = 1):
        return nn.Sequential(
            nn.Conv2d(i, o, 3, padding=d, dilation=d), nn.BatchNorm2d(o), nn.ReLU(inplace=True)
        )

    class SmallFCN(nn.Sequential):
        def forward(self, pixel_values):
            return SimpleNamespace(logits=super().forward(pixel_values))

    return SmallFCN(
        nn.Conv2d(3, 24, 3, stride=2, padding=1),
        nn.BatchNorm2d(24),
        nn.ReLU(inplace=True),
        block(24, 32),
        block(32, 32, 2),
        block(32, 32, 4),
        block(32, 32, 2),
        nn.Conv2d(32, num_labels, 1),
    )


def build_segmenter(num_labels: int, name_or_path: str | None = None):
    """A SegformerForSemanticSegmentation for `num_labels` classes (random init, or the
    checkpoint `name_or_path` with a fresh head), or the small FCN for `builtin:fcn`."""
    from transformers import SegformerForSemanticSegmentation

    if name_or_path == FCN:
        return small_fcn(num_labels)
    if name_or_path is None:
        return SegformerForSemanticSegmentation(small_config(num_labels))
    try:
        return SegformerForSemanticSegmentation.from_pretrained(
            name_or_path,
            num_labels=num_labels,
            ignore_mismatched_sizes=True,
            semantic_loss_ignore_index=IGNORE,
        )
    except (OSError, ValueError) as exc:
        raise DiffuMaskError(
            f"--segmenter {name_or_path!r} could not be loaded as a SegFormer checkpoint "
            f"({' '.join(str(exc).split())[:200]}); give a local folder or a hub id such as "
            "nvidia/mit-b0 (with network), builtin:fcn, or leave --segmenter out for the small "
            "built-in SegFormer"
        ) from None


def pick_device(device: str | None) -> str:
    """`device`, or cuda when there is a GPU, else cpu."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def to_tensors(images: Sequence[Any], masks: Sequence[np.ndarray] | None, size: int):
    """PIL images (any size) -> normalised float (N, 3, size, size); masks -> long
    (N, size, size) by nearest neighbour, or None."""
    import torch
    from PIL import Image

    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    if masks is None:
        return x.contiguous(), None
    resized = [
        np.asarray(m, dtype=np.uint8)
        if np.asarray(m).shape == (size, size)
        else np.asarray(Image.fromarray(np.asarray(m, np.uint8)).resize((size, size), 0))
        for m in masks
    ]
    return x.contiguous(), torch.from_numpy(np.stack(resized).astype(np.int64))


class Segmenter:
    """A trained model and what it takes to run it."""

    def __init__(self, model, size: int, device: str, num_labels: int):
        self.model, self.size, self.device, self.num_labels = model, size, device, num_labels

    def predict(
        self,
        images: Sequence[Any],
        batch_size: int = 64,
        only: Sequence[Sequence[int]] | None = None,
    ) -> list[np.ndarray]:
        """uint8 id masks, each at its image's own size. `only[i]`: the class ids image i
        may show (each pixel takes the likeliest of them), e.g. background and the
        classes its prompt names."""
        import torch
        import torch.nn.functional as F

        self.model.eval()
        out: list[np.ndarray] = []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                x, _ = to_tensors(chunk, None, self.size)
                logits = self.model(pixel_values=x.to(self.device)).logits
                for k, (image, one) in enumerate(zip(chunk, logits, strict=True)):
                    width, height = image.size
                    one = F.interpolate(one[None], size=(height, width), mode="bilinear")[0]
                    if only is not None:
                        ids = torch.tensor(sorted(set(only[start + k])), device=one.device)
                        pred = ids[one[ids].argmax(0)]
                    else:
                        pred = one.argmax(0)
                    out.append(pred.to(torch.uint8).cpu().numpy())
        return out


def train_segmenter(
    images: Sequence[Any],
    masks: Sequence[np.ndarray],
    num_labels: int,
    settings: TrainSettings = TrainSettings(),
    progress: bool = True,
    desc: str = "train segmenter",
    on_step: Callable[[], None] | None = None,
) -> Segmenter:
    """Train a segmenter on (image, id mask) pairs: AdamW with a one-cycle schedule,
    random horizontal flips, optional splicing; cross entropy with 255 ignored.
    `on_step` is called after each step (a caller's own progress over many trainings)."""
    import torch
    import torch.nn.functional as F

    from .splice import splice_batch

    if len(images) == 0:
        raise DiffuMaskError("no training samples: the training set is empty")
    size = settings.size or min(512, max(images[0].size))
    device = pick_device(settings.device)
    torch.manual_seed(settings.seed)
    model = build_segmenter(num_labels, settings.segmenter).to(device)
    x, y = to_tensors(images, masks, size)
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=1e-2)
    # a tenth of the steps warming up; torch's OneCycleLR divides by zero when that is
    # exactly one step (steps=10), so that run warms up for two
    warmup = 0.1 if settings.steps != 10 else 0.2
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, settings.learning_rate, total_steps=settings.steps, pct_start=warmup
    )
    generator = torch.Generator().manual_seed(settings.seed)
    steps = range(settings.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=desc, unit="step", dynamic_ncols=True, leave=False)
    model.train()
    for _ in steps:
        pick = torch.randint(0, len(x), (settings.batch_size,), generator=generator)
        xb, yb = x[pick], y[pick]
        if settings.splice:
            xb, yb = splice_batch(xb, yb, x, y, 0.5, generator)
        flip = torch.rand(len(xb), generator=generator) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        yb = torch.where(flip[:, None, None], yb.flip(-1), yb)
        logits = model(pixel_values=xb.to(device)).logits
        logits = F.interpolate(logits, size=yb.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, yb.to(device), ignore_index=IGNORE)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if on_step is not None:
            on_step()
    return Segmenter(model.eval(), size, device, num_labels)
