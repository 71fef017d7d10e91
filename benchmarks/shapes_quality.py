"""Quality of DiffuMask masks on the shapes world, against exact ground truth.

(a) Mask fidelity. The built-in model (`DiffuMask("builtin:shapes")`) draws single-object
    scenes ("a photo of a red circle on a white background"); a reference mask is read off
    each generated image's pixels: objects are saturated colours on a plain background, so
    a pixel belongs to the drawn object when its colour is far from the background's (the
    median of the image's border; `shapes_world.foreground_mask`). The attention-derived
    mask of every refinement method (fixed threshold 0.4, 0.5, 0.6; adaptive; affinity
    propagation; all with the colour step, and affinity again without it) is scored
    against it: IoU per class (intersection and union summed over
    images), mIoU over background and the four shapes. Also: how well the samples' quality
    score ranks their masks (Spearman correlation with each image's object IoU).

    Shape fidelity, on the same images: does the model draw the shape it was asked for?
    A small CNN is trained (seeded, ~1,000 steps, under a minute) on the silhouettes of
    2,048 rendered single objects, and its accuracy per shape on 1,024 held-out rendered
    objects is printed first: the measure is shown to work before it judges the model.
    Each generated image's largest drawn object is cut out the same way
    (`shapes_world.object_silhouette`: the pixels far from the background, cropped to a
    square, 24x24) and named; accuracy per shape = images named as the prompted shape /
    images prompted (an image that drew nothing is a miss), beside how many drew the
    named colour, and named/prompted by the background the prompt asks for (a shape may
    fail on one background only).
(b) The paper's protocol in small. One small segmentation network is trained on N
    synthetic samples (generated images, masks from the best method of (a)) and the same
    network on N rendered scenes with exact masks; both are evaluated on held-out rendered
    scenes. synthetic_over_real = mIoU(synthetic) / mIoU(real). With --filter-study, the
    network is also trained on the top and the bottom half by quality of 2N samples: what
    filtering on the quality score is worth.

    Beside them, every run, the network trained on the same generated images with exact
    masks read off their pixels: exact_masks_over_real = mIoU(exact) / mIoU(real), so
    synthetic_over_real / exact_masks_over_real is what our masks cost (mask efficiency)
    apart from how the generator draws.

(c) Several objects. Prompts naming 2 and 3 distinct shapes in distinct colours (128 per
    count by default, seeded). Each drawn object is a connected region of foreground
    pixels sharing their nearest world colour (so touching objects of two colours are
    two objects), named by (a)'s shape classifier, not by colour (the model at times
    swaps colours between objects); objects it names with probability below 0.9, or
    names as a shape the prompt did not ask for, are left unscored. Per refinement: mask
    mIoU over background and the four shapes, class confusion (object pixels labelled as
    another prompted class), missing classes (drawn prompted objects whose class is
    absent from the mask), and how many images drew every prompted shape. Each capture
    setting generates once; every refinement is cut from the same captured maps
    (`DiffuMask.captures`, `refine_captured`).

The last line printed is exactly
`shapes: mask_miou=<best> synthetic_over_real=<ratio> exact_masks_over_real=<ratio>`.

    python benchmarks/shapes_quality.py            # ~8 minutes on 2 idle CPU cores
    python benchmarks/shapes_quality.py --json out.json
    python benchmarks/shapes_quality.py --only shape-fidelity   # ~2 minutes; last line
        # `shape fidelity: circle=<a> square=<a> triangle=<a> star=<a>`
    python benchmarks/shapes_quality.py --only multi-object    # (c) beside (a)'s mask
        # mIoU for the same refinements; --multi-methods picks them; last line
        # `multi-object: <method>=<mIoU 2 objects>/<mIoU 3 objects> ...`
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffumask_datasets import shapes_world as sw  # noqa: E402

NAMES = ("background", *sw.SHAPES)
METHODS: dict[str, dict] = {
    # band 0: every pixel is labelled, so methods are compared on the same pixels.
    "threshold-0.4": {"method": "threshold", "threshold": 0.4, "band": 0.0},
    "threshold-0.5": {"method": "threshold", "threshold": 0.5, "band": 0.0},
    "threshold-0.6": {"method": "threshold", "threshold": 0.6, "band": 0.0},
    "adaptive": {"method": "adaptive", "band": 0.0, "affinity_factor": 1},
    "affinity": {"method": "affinity", "band": 0.0, "affinity_factor": 1},
    # the same without the colour step (the masks before the step existed): its worth
    "affinity-no-colour": {
        "method": "affinity",
        "band": 0.0,
        "affinity_factor": 1,
        "colour_steps": 0,
    },
}
# An image whose reference holds fewer object pixels than this did not draw the object.
MIN_OBJECT_PIXELS = 20


# ---------------------------------------------------------------- prompts and references
def single_object_prompts(n: int, seed: int) -> list[tuple[str, str, str]]:
    """n (prompt, shape, colour) triples cycling through the shapes; colour and
    background drawn from a seeded generator."""
    rng = np.random.default_rng(seed)
    colours, backgrounds = list(sw.COLOURS), list(sw.BACKGROUNDS)
    out = []
    for i in range(n):
        shape = sw.SHAPES[i % len(sw.SHAPES)]
        colour = colours[int(rng.integers(len(colours)))]
        background = backgrounds[int(rng.integers(len(backgrounds)))]
        out.append((f"a photo of a {colour} {shape} on a {background} background", shape, colour))
    return out


def prompt_background(prompt: str) -> str:
    """The background a single-object prompt names ("... on a black background": black)."""
    return prompt.rsplit(" on a ", 1)[1].removesuffix(" background")


def reference_mask(image, shape: str) -> np.ndarray:
    """Class-id mask read off a generated image: every drawn object (pixels far from the
    plain background), labelled with the prompt's class."""
    return np.where(sw.foreground_mask(np.asarray(image)), sw.CLASS_IDS[shape], 0).astype(np.uint8)


def drew_named_colour(image, colour: str) -> bool:
    """Whether the image shows at least MIN_OBJECT_PIXELS pixels of the named colour."""
    found = sw.colour_masks(np.asarray(image), [colour], tolerance=90.0)
    return int((found == 1).sum()) >= MIN_OBJECT_PIXELS


class ConfusionIoU:
    """Per-class IoU with intersections and unions summed over images; 255 ignored."""

    def __init__(self, classes: int = len(NAMES)):
        self.inter = np.zeros(classes)
        self.union = np.zeros(classes)

    def add(self, pred: np.ndarray, ref: np.ndarray, classes: list[int] | None = None) -> None:
        valid = (ref != 255) & (pred != 255)
        for c in classes if classes is not None else range(len(self.inter)):
            p, r = (pred == c) & valid, (ref == c) & valid
            self.inter[c] += np.logical_and(p, r).sum()
            self.union[c] += np.logical_or(p, r).sum()

    def per_class(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.union > 0, self.inter / np.maximum(self.union, 1), np.nan)

    def miou(self) -> float:
        return float(np.nanmean(self.per_class()))


# ---------------------------------------------------------------- (a) mask fidelity
def mask_fidelity(dm, prompts, steps: int, guidance: float, seed: int, batch: int, methods=None):
    """Generate once per method (same seeds, so the same images) and score each method."""
    results, kept, images, coloured = {}, None, None, None
    for name, refinement in (methods or METHODS).items():
        start = time.time()
        samples = dm(
            [p for p, _, _ in prompts],
            classes=[[s] for _, s, _ in prompts],
            seed=seed,
            num_inference_steps=steps,
            guidance_scale=guidance,
            class_ids=sw.CLASS_IDS,
            refinement=refinement,
            batch_size=batch,
        )
        if kept is None:
            images = [s.image for s in samples]
            refs = [
                reference_mask(s.image, shape)
                for s, (_, shape, _) in zip(samples, prompts, strict=True)
            ]
            kept = [int((r > 0).sum()) >= MIN_OBJECT_PIXELS for r in refs]
            coloured = [
                drew_named_colour(s.image, c) for s, (_, _, c) in zip(samples, prompts, strict=True)
            ]
        score = ConfusionIoU()
        for sample, ref, keep in zip(samples, refs, kept, strict=True):
            if keep:
                score.add(sample.mask, ref)
        results[name] = {
            "miou": score.miou(),
            "per_class": dict(zip(NAMES, score.per_class().round(4).tolist(), strict=True)),
            "seconds": round(time.time() - start, 1),
            "samples": samples,
        }
    return results, refs, kept, images, coloured


def object_iou(mask: np.ndarray, ref: np.ndarray, class_id: int) -> float:
    """IoU of one class's pixels in a mask against the reference; 255 pixels left out."""
    valid = mask != 255
    pred, true = (mask == class_id) & valid, (ref == class_id) & valid
    union = np.logical_or(pred, true).sum()
    return float(np.logical_and(pred, true).sum() / union) if union else 1.0


def quality_ranking(samples, prompts, refs, kept) -> dict:
    """How well the quality score (what users filter on) ranks masks: the Spearman
    correlation of each scored sample's quality with its object IoU, and the mean IoU
    of the best-quality quarter against all."""
    from scipy.stats import spearmanr

    pairs = [
        (s.quality, object_iou(s.mask, ref, sw.CLASS_IDS[shape]))
        for s, ref, keep, (_, shape, _) in zip(samples, refs, kept, prompts, strict=True)
        if keep
    ]
    quality, iou = np.array(pairs).T
    top = quality >= np.quantile(quality, 0.75)
    return {
        "spearman": float(spearmanr(quality, iou).statistic),
        "mean_iou_all": float(iou.mean()),
        "mean_iou_top_quarter": float(iou[top].mean()),
        "top_quarter_min_quality": float(quality[top].min()),
    }


# ---------------------------------------------------------------- shape fidelity
# The classifier reads silhouettes of this side (shapes_world.object_silhouette).
SILHOUETTE = 24


def rendered_objects(n: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """n rendered single objects (random shape, colour, size, angle, background and
    shade, as the model's training scenes): their images and shape indices [n]."""
    rng = np.random.default_rng(seed)
    scenes = [sw.random_scene(rng, count=1) for _ in range(n)]
    labels = np.array([sw.SHAPES.index(s.objects[0].shape) for s in scenes])
    return [s.image for s in scenes], labels


def rendered_silhouettes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n rendered single objects cut out the way generated ones are: their silhouettes
    [n, SILHOUETTE, SILHOUETTE] and shape indices [n]."""
    images, labels = rendered_objects(n, seed)
    return np.stack([sw.object_silhouette(image, SILHOUETTE) for image in images]), labels


def autoencoder_round_trip(vae, images: list[np.ndarray], batch: int = 128) -> list[np.ndarray]:
    """Images through the model's own autoencoder (encode, decode): the best any drawing
    of the model can look, since every generated image leaves through that decoder."""
    import torch

    out = []
    with torch.no_grad():
        for begin in range(0, len(images), batch):
            x = to_tensor(images[begin : begin + batch]).to(vae.device, vae.dtype)
            y = vae.decode(vae.encode(x).latent_dist.mean).sample
            y = ((y.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            out += list(y.permute(0, 2, 3, 1).cpu().numpy())
    return out


def make_shape_classifier(seed: int):
    """A small CNN (~15 k parameters) from a silhouette to the four shapes; seeded."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(3),
        nn.Flatten(),
        nn.Linear(32 * 9, len(sw.SHAPES)),
    )


def train_shape_classifier(seed: int, objects: int = 2048, steps: int = 1000, batch: int = 64):
    """The classifier trained on `objects` rendered objects (seconds on one CPU thread);
    random flips and quarter turns keep every shape's class and widen its poses."""
    import torch
    import torch.nn.functional as F

    silhouettes, labels = rendered_silhouettes(objects, seed)
    x, y = torch.from_numpy(silhouettes)[:, None], torch.from_numpy(labels)
    net = make_shape_classifier(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        xb = x[idx]
        if torch.rand(1, generator=gen) < 0.5:
            xb = xb.flip(-1)
        xb = torch.rot90(xb, int(torch.randint(0, 4, (1,), generator=gen)), dims=(-2, -1))
        loss = F.cross_entropy(net(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def classify_shapes(net, silhouettes: np.ndarray) -> np.ndarray:
    """Shape index per silhouette."""
    import torch

    with torch.no_grad():
        return net(torch.from_numpy(np.asarray(silhouettes, np.float32))[:, None]).argmax(1).numpy()


def classifier_accuracy(net, n: int, seed: int, vae=None) -> dict[str, float]:
    """Accuracy per shape on n held-out rendered objects (another seed): the measure's
    own check, before it judges a model. With `vae`, the objects first make the round
    trip through it (an object it loses counts as a miss): the model's ceiling."""
    images, labels = rendered_objects(n, seed)
    if vae is not None:
        images = autoencoder_round_trip(vae, images)
    silhouettes = [sw.object_silhouette(image, SILHOUETTE) for image in images]
    found = [i for i, s in enumerate(silhouettes) if s is not None]
    named = np.full(n, -1)
    if found:
        named[found] = classify_shapes(net, np.stack([silhouettes[i] for i in found]))
    return {s: float((named[labels == i] == i).mean()) for i, s in enumerate(sw.SHAPES)}


def rendered_areas(n: int, seed: int) -> dict[str, float]:
    """Median pixel area per shape of n rendered single objects (the world's sizes)."""
    rng = np.random.default_rng(seed)
    areas: dict[str, list[int]] = {s: [] for s in sw.SHAPES}
    for _ in range(n):
        scene = sw.random_scene(rng, count=1)
        areas[scene.objects[0].shape].append(int((scene.instances == 1).sum()))
    return {s: float(np.median(a)) for s, a in areas.items()}


def shape_fidelity(net, images, prompts, kept, coloured, refs) -> tuple[dict[str, dict], list[str]]:
    """Per prompted shape: how many images were prompted, drew an object, drew the named
    colour, and drew an object the classifier names as the prompted shape (an image that
    drew nothing counts as a miss); `named_as` counts what each object was named; the
    median area of the drawn objects (read off their pixels) beside that of rendered ones,
    do the model's objects come out at the world's sizes? Also each image's name ("none"
    where nothing was drawn)."""
    out = {
        s: {
            "prompted": 0,
            "drew": 0,
            "named_colour": 0,
            "named_shape": 0,
            "named_as": {},
            "by_background": {},  # [named, prompted]: a shape may fail on one background only
        }
        for s in sw.SHAPES
    }
    drawn_areas: dict[str, list[int]] = {s: [] for s in sw.SHAPES}
    drawn = [i for i, keep in enumerate(kept) if keep]
    silhouettes = [sw.object_silhouette(np.asarray(images[i]), SILHOUETTE) for i in drawn]
    named = (
        dict(zip(drawn, classify_shapes(net, np.stack(silhouettes)), strict=True)) if drawn else {}
    )
    labels = [sw.SHAPES[named[i]] if i in named else "none" for i in range(len(prompts))]
    for i, ((prompt, shape, _), label) in enumerate(zip(prompts, labels, strict=True)):
        row = out[shape]
        cell = row["by_background"].setdefault(prompt_background(prompt), [0, 0])
        cell[0] += int(label == shape)
        cell[1] += 1
        row["prompted"] += 1
        row["named_colour"] += int(coloured[i])
        row["drew"] += int(label != "none")
        row["named_shape"] += int(label == shape)
        row["named_as"][label] = row["named_as"].get(label, 0) + 1
        if label != "none":
            drawn_areas[shape].append(int((refs[i] > 0).sum()))
    rendered = rendered_areas(1024, 20_000)
    for shape, row in out.items():
        row["accuracy"] = row["named_shape"] / max(row["prompted"], 1)
        row["median_area_drawn"] = float(np.median(drawn_areas[shape] or [0]))
        row["median_area_rendered"] = rendered[shape]
    return out, labels


def print_shape_fidelity(
    check: dict[str, float], ceiling: dict[str, float], held_out: int, fidelity: dict
) -> None:
    print(
        f"shape fidelity: a CNN trained on rendered objects' silhouettes names each drawn "
        f"object's shape; on {held_out} held-out rendered objects it names "
        + ", ".join(f"{s} {a:.1%}" for s, a in check.items())
    )
    print(
        "  the same objects through the model's autoencoder (encode, decode; the ceiling of "
        "any drawing): " + ", ".join(f"{s} {a:.1%}" for s, a in ceiling.items())
    )
    print(
        f"{'shape':<10}{'prompted':>9}{'drew':>6}{'in colour':>10}{'named':>7}{'accuracy':>10}"
        f"{'area drawn/rendered':>21}  named as"
    )
    for shape, r in fidelity.items():
        named_as = ", ".join(f"{k} {v}" for k, v in sorted(r["named_as"].items()))
        areas = f"{r['median_area_drawn']:.0f}/{r['median_area_rendered']:.0f} px"
        print(
            f"{shape:<10}{r['prompted']:>9}{r['drew']:>6}{r['named_colour']:>10}"
            f"{r['named_shape']:>7}{r['accuracy']:>10.1%}{areas:>21}  {named_as}"
        )
    backgrounds = sorted({b for r in fidelity.values() for b in r["by_background"]})
    print("named/prompted by background: " + "".join(f"{b:>9}" for b in backgrounds))
    for shape, r in fidelity.items():
        cells = (r["by_background"].get(b, [0, 0]) for b in backgrounds)
        print(f"  {shape:<28}" + "".join(f"{f'{k}/{n}':>9}" for k, n in cells))


# ---------------------------------------------------------------- (c) several objects
# Refinements scored on images whose prompt names several shapes, band 0 as in (a).
MULTI_METHODS: dict[str, dict] = {
    "affinity": METHODS["affinity"],
    "adaptive": METHODS["adaptive"],
    "separate": {"method": "separate", "band": 0.0, "affinity_factor": 1},
    # the same from the last half of the 20 steps only (cross-attention and affinity)
    "separate-steps-10-20": {
        "method": "separate",
        "band": 0.0,
        "affinity_factor": 1,
        "steps": (10, 20),
    },
    # as users get them: band 0.1 (its pixels are left out of the scores); the API's
    # (and the VOC definition's) with the model's default affinity resolution (8x8 here)
    "separate-band": {"method": "separate", "affinity_factor": 1},
    "api-adaptive": {"method": "adaptive"},
    "api-separate": {"method": "separate"},
    # adaptive as the paper names the classes: from every resolution's maps
    "adaptive-all": {**METHODS["adaptive"], "classes_from": "all"},
    "api-adaptive-all": {"method": "adaptive", "classes_from": "all"},
}
MULTI_DEFAULT = ("affinity", "adaptive", "separate")


def multi_object_prompts(n: int, objects: int, seed: int) -> list[tuple[str, list[str]]]:
    """n (prompt, shapes) pairs naming `objects` distinct shapes in distinct colours on one
    background ("a photo of a red circle and a blue star on a white background"); seeded."""
    rng = np.random.default_rng(seed)
    colours, backgrounds = list(sw.COLOURS), list(sw.BACKGROUNDS)
    out = []
    for _ in range(n):
        shapes = [sw.SHAPES[i] for i in rng.choice(len(sw.SHAPES), objects, replace=False)]
        tints = [colours[i] for i in rng.choice(len(colours), objects, replace=False)]
        background = backgrounds[int(rng.integers(len(backgrounds)))]
        named = " and ".join(f"a {c} {s}" for c, s in zip(tints, shapes, strict=True))
        out.append((f"a photo of {named} on a {background} background", shapes))
    return out


def drawn_objects(image) -> list[np.ndarray]:
    """The drawn objects of a generated image as boolean masks: connected regions of
    foreground pixels (`shapes_world.foreground_mask`) that share their nearest world
    colour, so two touching objects of different colours are two objects (as one
    foreground component, the classifier would name their joint silhouette)."""
    from scipy import ndimage

    pixels = np.asarray(image, dtype=np.float32)[..., :3]
    palette = np.asarray(list(sw.COLOURS.values()), dtype=np.float32)
    nearest = np.linalg.norm(pixels[:, :, None] - palette, axis=-1).argmin(-1)
    foreground = sw.foreground_mask(pixels)
    objects = []
    for k in range(len(palette)):
        components, count = ndimage.label(foreground & (nearest == k))
        objects += [components == j for j in range(1, count + 1)]
    return objects


# An object is named when the classifier gives its shape at least this probability: the
# model's malformed shapes (a four-pointed star, a rounded square) are left unscored
# rather than named by a guess.
MIN_CONFIDENCE = 0.9


def shape_probabilities(net, silhouettes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shape index, its probability) per silhouette."""
    import torch

    with torch.no_grad():
        logits = net(torch.from_numpy(np.asarray(silhouettes, np.float32))[:, None])
        best = logits.softmax(1).max(1)
    return best.indices.numpy(), best.values.numpy()


def named_objects(net, image, shapes: list[str]) -> tuple[np.ndarray, set[str]]:
    """A class-id reference read off a generated image: each drawn object (`drawn_objects`)
    of at least MIN_OBJECT_PIXELS named by the shape classifier (probability >=
    MIN_CONFIDENCE), not by colour (the model at times swaps colours between objects).
    Objects named as a shape the prompt did not ask for, or unsure, and specks, are 255
    (not scored). Also the prompted shapes found."""
    objects = drawn_objects(image)
    ref = np.zeros(np.asarray(image).shape[:2], np.uint8)
    found: set[str] = set()
    big = [r for r in objects if r.sum() >= MIN_OBJECT_PIXELS]
    for region in objects:
        ref[region] = 255
    if big:
        silhouettes = np.stack([sw.silhouette(r, SILHOUETTE) for r in big])
        names, sure = shape_probabilities(net, silhouettes)
        for region, index, p in zip(big, names, sure, strict=True):
            shape = sw.SHAPES[int(index)]
            if shape in shapes and p >= MIN_CONFIDENCE:
                ref[region] = sw.CLASS_IDS[shape]
                found.add(shape)
    return ref, found


class MultiObjectScore:
    """A refinement's masks against named objects: mIoU over the background and the four
    shapes (intersections and unions summed over images; 255 in either left out), class
    confusion (the share of the prompted objects' pixels labelled as another prompted
    class) and missing classes (drawn prompted objects whose class is absent from the
    mask)."""

    def __init__(self):
        self.iou = ConfusionIoU()
        self.object_pixels = 0
        self.confused = 0
        self.objects = 0
        self.missing = 0

    def add(self, mask: np.ndarray, ref: np.ndarray, shapes: list[str], found: set[str]):
        mask = np.asarray(mask)
        self.iou.add(mask, ref)
        for shape in found:
            class_id = sw.CLASS_IDS[shape]
            region = (ref == class_id) & (mask != 255)
            others = [sw.CLASS_IDS[s] for s in shapes if s != shape]
            self.object_pixels += int(region.sum())
            self.confused += int(np.isin(mask[region], others).sum())
            self.objects += 1
            self.missing += int(not (mask == class_id).any())

    def summary(self) -> dict:
        return {
            "miou": self.iou.miou(),
            "per_class": dict(zip(NAMES, self.iou.per_class().round(4).tolist(), strict=True)),
            "confusion": self.confused / max(self.object_pixels, 1),
            "missing": self.missing,
            "objects": self.objects,
        }


def capture_groups(methods: dict[str, dict]) -> list[tuple[dict, list[str]]]:
    """Methods grouped by what they capture, so each group is generated once and refined
    once per method: [(the refinement to capture with, its methods' names)]."""
    from diffumask_datasets.refine import Refinement

    class_map_keys = ("cross_factors", "steps", "cross_blocks", "concept_blocks")
    affinity_keys = ("affinity_factor", "affinity_steps", "affinity_blocks")
    groups: dict[tuple, tuple[dict, list[str]]] = {}
    for name, refinement in methods.items():
        params, map_kind = without_map_kind(refinement)
        params = Refinement.from_any(params)
        key = (map_kind, *(getattr(params, k) for k in class_map_keys)) + (
            tuple(getattr(params, k) for k in affinity_keys) if params.needs_affinity else (None,)
        )
        groups.setdefault(key, (refinement, []))[1].append(name)
    # a group without the affinity captures none: cheaper, and refined the same way
    return list(groups.values())


def refined_rows(dm, prompts, classes, methods, steps, guidance, seed, batch):
    """Generate the prompts once per capture group (same seeds: the same images) and refine
    each batch with every method. Returns (images, {method: masks}, {method: seconds of
    refinement}, seconds of generation and capture)."""
    images, masks = [], {name: [] for name in methods}
    refine_seconds = dict.fromkeys(methods, 0.0)
    capture_seconds = 0.0
    for capture, names in capture_groups(methods):
        start = time.time()
        group_images = []
        capture, map_kind = without_map_kind(capture)
        batches = dm.captures(
            prompts,
            classes=classes,
            seed=seed,
            num_inference_steps=steps,
            guidance_scale=guidance,
            class_ids=sw.CLASS_IDS,
            refinement=capture,
            batch_size=batch,
            map_kind=map_kind,
        )
        for maps in batches:
            capture_seconds += time.time() - start
            group_images += maps.images
            for name in names:
                start = time.time()
                refinement = without_map_kind(methods[name])[0]
                masks[name] += [s.mask for s in dm.refine_captured(maps, refinement)]
                refine_seconds[name] += time.time() - start
            start = time.time()
        images = images or group_images
    return images, masks, refine_seconds, capture_seconds


def multi_object_rows(dm, net, counts, n, steps, guidance, seed, batch, methods=None) -> dict:
    """Per object count: n prompts naming that many shapes, generated once, every method's
    masks scored against the named objects (see MultiObjectScore)."""
    methods = methods or MULTI_METHODS
    rows = {}
    for objects in counts:
        prompts = multi_object_prompts(n, objects, seed + 100 * objects)
        images, masks, refine_seconds, capture_seconds = refined_rows(
            dm,
            [p for p, _ in prompts],
            [s for _, s in prompts],
            methods,
            steps,
            guidance,
            seed + 100 * objects,
            batch,
        )
        references = [
            named_objects(net, image, shapes)
            for image, (_, shapes) in zip(images, prompts, strict=True)
        ]
        every_drawn = sum(len(found) == objects for _, found in references)
        row = {"prompts": n, "every_prompted_shape_drawn": every_drawn}
        row["capture_seconds_per_image"] = capture_seconds / n / len(capture_groups(methods))
        for name in methods:
            score = MultiObjectScore()
            for mask, (ref, found), (_, shapes) in zip(
                masks[name], references, prompts, strict=True
            ):
                score.add(mask, ref, shapes, found)
            row[name] = {**score.summary(), "refine_ms_per_image": 1000 * refine_seconds[name] / n}
        rows[objects] = row
    return rows


def single_object_rows(dm, n, steps, guidance, seed, batch, methods=None) -> dict:
    """(a)'s mask mIoU (same prompts and seeds: the same images) for `methods`, generated
    once and refined once per method: the single-object rows beside the multi-object ones."""
    methods = methods or MULTI_METHODS
    prompts = single_object_prompts(n, seed)
    images, masks, refine_seconds, _ = refined_rows(
        dm,
        [p for p, _, _ in prompts],
        [[s] for _, s, _ in prompts],
        methods,
        steps,
        guidance,
        seed,
        batch,
    )
    refs = [
        reference_mask(image, shape) for image, (_, shape, _) in zip(images, prompts, strict=True)
    ]
    row = {"prompts": n}
    for name in methods:
        score = ConfusionIoU()
        scored = empty = 0  # images with a drawn object; those whose mask has none
        for mask, ref in zip(masks[name], refs, strict=True):
            if int((ref > 0).sum()) >= MIN_OBJECT_PIXELS:
                score.add(mask, ref)
                scored += 1
                empty += int(not (mask > 0).any())
        row[name] = {
            "miou": score.miou(),
            "scored_images": scored,
            "empty_masks": empty,
            "per_class": dict(zip(NAMES, score.per_class().round(4).tolist(), strict=True)),
            "refine_ms_per_image": 1000 * refine_seconds[name] / n,
        }
    return row


def print_multi_object_rows(single: dict | None, rows: dict, header: bool = True) -> None:
    if header:
        print(
            f"{'objects':>7}  {'refinement':<22}{'prompts':>8}{'all drawn':>10}{'mIoU':>7}"
            f"{'confusion':>10}{'missing':>12}{'refine ms':>10}",
            flush=True,
        )
    if single is not None:
        for name, r in single.items():
            if name != "prompts":
                missing = f"{r['empty_masks']}/{r['scored_images']}"  # one object each
                print(
                    f"{1:>7}  {name:<22}{single['prompts']:>8}{'':>10}{r['miou']:>7.3f}"
                    f"{'':>10}{missing:>12}{r['refine_ms_per_image']:>10.1f}",
                    flush=True,
                )
    for objects, row in rows.items():
        for name, r in row.items():
            if not isinstance(r, dict):
                continue
            missing = f"{r['missing']}/{r['objects']}"
            print(
                f"{objects:>7}  {name:<22}{row['prompts']:>8}"
                f"{row['every_prompted_shape_drawn']:>10}{r['miou']:>7.3f}"
                f"{r['confusion']:>10.1%}{missing:>12}{r['refine_ms_per_image']:>10.1f}",
                flush=True,
            )


# ---------------------------------------------------------------- (b) synthetic vs real
def make_segmenter(seed: int):
    """The library's small dilated FCN (`builtin:fcn` of diffumask_datasets.quality, ~36k
    parameters at half resolution), upsampled back to 64x64; seeded."""
    import torch
    from torch import nn

    from diffumask_datasets.quality.segmenter import small_fcn

    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fcn = small_fcn(len(NAMES))
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)

        def forward(self, x):
            return self.up(self.fcn(pixel_values=x).logits)

    return Net()


def to_tensor(images):
    import torch

    arr = np.stack([np.asarray(i, dtype=np.float32)[..., :3] for i in images]) / 127.5 - 1
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def train_segmenter(images, masks, seed: int, steps: int, batch: int = 32):
    import torch
    import torch.nn.functional as F

    net = make_segmenter(seed)
    x, y = to_tensor(images), torch.from_numpy(np.stack(masks).astype(np.int64))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        xb, yb = x[idx], y[idx]
        flip = torch.rand(batch, generator=gen) < 0.5  # flips keep shapes' classes
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        yb = torch.where(flip[:, None, None], yb.flip(-1), yb)
        loss = F.cross_entropy(net(xb), yb, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def evaluate_segmenter(net, scenes) -> tuple[float, list[float]]:
    import torch

    score = ConfusionIoU()
    with torch.no_grad():
        for start in range(0, len(scenes), 64):
            chunk = scenes[start : start + 64]
            pred = net(to_tensor([s.image for s in chunk])).argmax(1).numpy().astype(np.uint8)
            for p, s in zip(pred, chunk, strict=True):
                score.add(p, s.mask)
    return score.miou(), score.per_class().round(4).tolist()


# What a method name may change after a "+": the capture's blocks and step windows, and
# the kind of class maps (map_kind=concept: ConceptAttention, MMDiT models).
VARIANT_KEYS = ("cross_blocks", "affinity_blocks", "concept_blocks", "steps", "affinity_steps")
SCALAR_KEYS = ("affinity_power",)  # one number: the walk's steps
MAP_KINDS = ("cross", "concept")


def without_map_kind(refinement: dict) -> tuple[dict, str]:
    """(the refinement proper, the map kind a method variant names; default "cross")."""
    rest = dict(refinement)
    return rest, rest.pop("map_kind", "cross")


def method_variant(spec: str, table: dict[str, dict], flag: str) -> dict:
    """A refinement by name: a method of `table`, optionally with capture settings after
    "+" signs, values joined by dots: "separate+cross_blocks=1.2+steps=10.20" is
    `separate` reading blocks 1 and 2 over steps 10 to 20 (an MMDiT model's blocks);
    "separate+map_kind=concept+concept_blocks=0" names its classes from the
    ConceptAttention maps of block 0; "separate+affinity_power=1" walks one step."""
    base, *changes = spec.split("+")
    if base not in table:
        raise SystemExit(
            f"{flag} {spec!r}: unknown method {base!r}; choose from {', '.join(table)}"
        )
    refinement = dict(table[base])
    for change in changes:
        key, _, values = change.partition("=")
        if key == "map_kind" and values in MAP_KINDS:
            refinement[key] = values
            continue
        try:
            numbers = tuple(int(v) for v in values.split("."))
        except ValueError:
            numbers = ()
        if key in SCALAR_KEYS and len(numbers) == 1:
            refinement[key] = numbers[0]
            continue
        if key not in VARIANT_KEYS or not values or not numbers:
            raise SystemExit(
                f"{flag} {spec!r}: {change!r} is not KEY=N.N with KEY one of "
                f"{', '.join(VARIANT_KEYS)} (e.g. separate+cross_blocks=1.2), "
                f"{'|'.join(SCALAR_KEYS)}=N, nor map_kind={'|'.join(MAP_KINDS)}"
            )
        refinement[key] = numbers
    return refinement


def chosen_methods(names: str) -> dict[str, dict]:
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    if not chosen:
        raise SystemExit(f"--multi-methods {names!r}: choose from {', '.join(MULTI_METHODS)}")
    return {n: method_variant(n, MULTI_METHODS, "--multi-methods") for n in chosen}


def print_multi_object_header(args) -> None:
    print(
        f"(c) several objects: {args.multi_prompts} prompts per object count naming distinct "
        f"shapes in distinct colours, {args.steps} steps, guidance {args.guidance}; each drawn "
        "object a connected foreground component named by the shape classifier; confusion: "
        "object pixels labelled as another prompted class; missing: drawn prompted objects "
        "whose class is absent from the mask"
    )


def multi_object_main(dm, args, methods: dict[str, dict], began: float) -> dict:
    """--only multi-object: (c), with (a)'s single-object mask mIoU for the same
    refinements from the same run. Last line `multi-object: <method>=<2 objects>/<3
    objects> ...` (mask mIoU)."""
    print_multi_object_header(args)
    single = single_object_rows(
        dm, args.fidelity_images, args.steps, args.guidance, args.seed, args.batch, methods
    )
    print_multi_object_rows(single, {})  # printed as each part is done
    rows = {}
    counts = (2, 3) if args.multi_prompts > 0 else ()  # 0: the single-object rows alone
    classifier = train_shape_classifier(args.seed) if counts else None
    for objects in counts:
        rows |= multi_object_rows(
            dm,
            classifier,
            (objects,),
            args.multi_prompts,
            args.steps,
            args.guidance,
            args.seed,
            args.batch,
            methods,
        )
        print_multi_object_rows(None, {objects: rows[objects]}, header=False)
    report = {
        "model": args.model,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "methods": methods,
        "single_object": single,
        "multi_object": rows,
        "seconds": time.time() - began,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    if rows:
        print(
            "multi-object: "
            + " ".join(f"{m}={rows[2][m]['miou']:.3f}/{rows[3][m]['miou']:.3f}" for m in methods)
        )
    return report


# ---------------------------------------------------------------- (d) real images: label
# Refinements for given images: the propagated map as the class ("affinity"), as the
# threshold only ("adaptive", the engine's default), and as the foreground with the class
# from the cross-attention ("separate").
REAL_METHODS: dict[str, dict] = {
    "affinity": {"method": "affinity", "band": 0.0, "affinity_factor": 1},
    "adaptive": {"method": "adaptive", "band": 0.0, "affinity_factor": 1},
    "separate": {"method": "separate", "band": 0.0, "affinity_factor": 1},
    "adaptive-all": {
        "method": "adaptive",
        "band": 0.0,
        "affinity_factor": 1,
        "classes_from": "all",
    },
}


def real_scenes(n: int, objects: int, seed: int) -> list:
    """n rendered scenes of `objects` objects with exact masks; every caption names the
    background and each object's colour (what a user labelling their images would say)."""
    rng = np.random.default_rng([seed, objects])
    return [
        sw.random_scene(rng, count=objects, name_background=1.0, name_colour=1.0, photo=1.0)
        for _ in range(n)
    ]


def real_scene_prompts(scenes, prompts: str) -> tuple[list[list[str]], list[str] | None]:
    """Classes and prompts the scenes are labelled with. "captions": each scene's caption
    and its own classes (a user who describes each image); "scene-classes": its own
    classes, the prompt made from them ("a photo of a circle and a star"); "all-classes":
    every image with all four shapes (a user who only knows what may appear)."""
    own = [list(dict.fromkeys(o.shape for o in s.objects)) for s in scenes]
    if prompts == "captions":
        return own, [s.caption for s in scenes]
    if prompts == "scene-classes":
        return own, None
    return [list(sw.SHAPES)] * len(scenes), None


def label_real_scenes(
    dm, scenes, strength: float, refinement: dict, steps, guidance, seed, batch, prompts, begin
):
    """The scenes labelled through DiffuMask.label from `begin` (its start); scored against
    their exact masks: mIoU over background and the four shapes."""
    start = time.time()
    classes, texts = real_scene_prompts(scenes, prompts)
    refinement, map_kind = without_map_kind(refinement)
    samples = dm.label(
        [s.image for s in scenes],
        classes=classes,
        prompts=texts,
        seed=seed,
        strength=strength,
        start=begin,
        num_inference_steps=steps,
        guidance_scale=guidance,
        class_ids=sw.CLASS_IDS,
        refinement=refinement,
        batch_size=batch,
        map_kind=map_kind,
    )
    score = ConfusionIoU()
    for sample, scene in zip(samples, scenes, strict=True):
        score.add(sample.mask, scene.mask)
    return {
        "miou": score.miou(),
        "ignored": float(np.mean([(s.mask == 255).mean() for s in samples])),
        "per_class": dict(zip(NAMES, score.per_class().round(4).tolist(), strict=True)),
        "seconds": round(time.time() - start, 1),
    }


def real_scene_rows(dm, args) -> list[dict]:
    """(d) rows: objects per scene x refinement x strength x colour step on/off, printed
    as they come (incrementally written to --json when given)."""
    rows = []
    print(
        f"(d) rendered scenes with exact masks labelled through DiffuMask.label: "
        f"{args.real_scenes} scenes a row, {args.steps} steps, guidance {args.guidance}, "
        f"prompts: {args.real_prompts}"
    )
    width = max(20, *(len(m) + 12 for m in args.real_methods))  # room for "-no-colour"
    print(
        f"{'objects':>7} {'method':<{width}}{'strength':>9} {'start':<10}{'mIoU':>7}"
        + "".join(f"{n:>11}" for n in NAMES)
        + f"{'sec':>7}",
        flush=True,
    )
    settings = [
        (method, strength, start, colour)
        for method in args.real_methods
        for strength in args.real_strengths
        for start in args.real_starts
        for colour in ((True, False) if args.real_colour == "both" else (True,))
    ]
    for objects in args.real_objects:
        scenes = real_scenes(args.real_scenes, objects, args.seed + 20)
        for method, strength, start, colour in settings:
            refinement = dict(
                method_variant(method, REAL_METHODS, "--real-methods"),
                **({} if colour else {"colour_steps": 0}),
            )
            name = method if colour else f"{method}-no-colour"
            r = label_real_scenes(
                dm,
                scenes,
                strength,
                refinement,
                args.steps,
                args.guidance,
                args.seed,
                args.batch,
                args.real_prompts,
                start,
            )
            rows.append(
                {
                    "objects": objects,
                    "method": name,
                    "strength": strength,
                    "start": start,
                    "prompts": args.real_prompts,
                    **r,
                }
            )
            cells = "".join(f"{r['per_class'][n]:>11.3f}" for n in NAMES)
            print(
                f"{objects:>7} {name:<{width}}{strength:>9.2f} {start:<10}{r['miou']:>7.3f}"
                f"{cells}{r['seconds']:>7.1f}",
                flush=True,
            )
            if args.json is not None:
                args.json.write_text(json.dumps({"real_scenes": rows}, indent=2))
    return rows


def real_scenes_only(dm, args, began: float) -> dict:
    """--only real-scenes: (d) alone; its last line gives each object count's best row
    with the colour step on."""
    rows = real_scene_rows(dm, args)
    report = {
        "model": args.model,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "real_scenes": rows,
        "seconds": time.time() - began,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    best = {}
    for row in rows:
        if not row["method"].endswith("-no-colour"):
            old = best.get(row["objects"])
            best[row["objects"]] = row if old is None or row["miou"] > old["miou"] else old
    print(
        "real scenes: "
        + " ".join(
            f"{k}_objects={r['miou']:.3f} ({r['method']} {r['strength']} {r['start']})"
            for k, r in sorted(best.items())
        )
    )
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:shapes")
    parser.add_argument("--fidelity-images", type=int, default=256)
    parser.add_argument("--train-images", type=int, default=256, help="N of protocol (b)")
    parser.add_argument("--test-scenes", type=int, default=256)
    # 1600: the network trained on exact masks is then near its ceiling (0.94 mIoU; 0.38
    # after 400 steps, where an under-trained baseline made the ratio look good)
    parser.add_argument("--seg-steps", type=int, default=1600)
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--filter-study",
        action="store_true",
        help="(b) also on the top and the bottom half by quality of 2N samples (+5 minutes)",
    )
    # One thread: the model's tensors are tiny, and on a busy 2-core machine two threads
    # mostly wait on each other (measured 40x slower).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--only",
        choices=("shape-fidelity", "multi-object", "real-scenes"),
        default=None,
        help="shape-fidelity: generate (a)'s images once and name their shapes (~2 minutes); "
        "multi-object: (c) alone, beside (a)'s mask mIoU for the same refinements; "
        "real-scenes: (d) alone",
    )
    parser.add_argument("--real-scenes", type=int, default=128, help="(d) scenes a row")
    parser.add_argument("--real-objects", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--real-strengths", type=float, nargs="+", default=[0.3])
    parser.add_argument(
        "--real-starts",
        nargs="+",
        choices=("inversion", "noise"),
        default=["inversion"],
        help="(d): where labelling's denoising starts (DiffuMask.label's start)",
    )
    parser.add_argument(
        "--real-methods",
        nargs="+",
        default=["affinity", "adaptive"],
        help=f"(d): refinements of {', '.join(REAL_METHODS)}, each optionally with capture "
        "settings after '+' (e.g. separate+cross_blocks=1.2; see method_variant)",
    )
    parser.add_argument(
        "--real-colour",
        choices=("both", "on"),
        default="both",
        help="(d): each refinement with and without the colour step, or with it only",
    )
    parser.add_argument(
        "--real-prompts",
        choices=("captions", "scene-classes", "all-classes"),
        default="captions",
        help="(d) what each scene is labelled with (see real_scene_prompts)",
    )
    parser.add_argument(
        "--multi-prompts",
        type=int,
        default=128,
        help="(c): prompts per object count (2 and 3 shapes); 0 leaves (c) out",
    )
    parser.add_argument(
        "--multi-methods",
        default=",".join(MULTI_DEFAULT),
        help=f"(c): comma-separated refinements of {', '.join(MULTI_METHODS)}, each "
        "optionally with capture settings after '+' (e.g. separate+cross_blocks=1.2)",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--sheet", type=Path, default=None, help="contact sheet PNG of (a)")
    args = parser.parse_args(argv)

    import torch

    from diffumask_datasets import DiffuMask

    torch.set_num_threads(args.threads)
    began = time.time()
    multi_methods = chosen_methods(args.multi_methods)
    for method in args.real_methods:  # refused now, not after the first rows
        method_variant(method, REAL_METHODS, "--real-methods")
    dm = DiffuMask(args.model)
    if args.only == "multi-object":
        return multi_object_main(dm, args, multi_methods, began)
    if args.only == "real-scenes":
        return real_scenes_only(dm, args, began)

    # (a)
    prompts = single_object_prompts(args.fidelity_images, args.seed)
    only_shapes = args.only == "shape-fidelity"
    # The images do not depend on the method: one (a cheap one) is enough to name shapes.
    methods = {"threshold-0.5": METHODS["threshold-0.5"]} if only_shapes else METHODS
    fidelity, refs, kept, images, coloured = mask_fidelity(
        dm, prompts, args.steps, args.guidance, args.seed, args.batch, methods
    )
    drawn = sum(kept)
    start = time.time()
    classifier = train_shape_classifier(args.seed)
    held_out = 1024
    check = classifier_accuracy(classifier, held_out, args.seed + 10_000)
    ceiling = classifier_accuracy(classifier, held_out, args.seed + 10_000, vae=dm.pipe.vae)
    shapes, names = shape_fidelity(classifier, images, prompts, kept, coloured, refs)
    shapes_report = {
        "classifier_held_out_accuracy": check,
        "classifier_held_out_objects": held_out,
        "autoencoder_round_trip_accuracy": ceiling,
        "classifier_seconds": round(time.time() - start, 1),
        "per_shape": shapes,
        "per_image": names,
    }
    if only_shapes:
        print(
            f"(a) {args.fidelity_images} single-object images, {args.steps} steps, guidance "
            f"{args.guidance}; {drawn} drew an object (>= {MIN_OBJECT_PIXELS} px off the "
            f"background); {sum(coloured)} drew the named colour"
        )
        print_shape_fidelity(check, ceiling, held_out, shapes)
        report = {
            "model": args.model,
            "settings": {k: str(v) for k, v in vars(args).items()},
            "scored_images": drawn,
            "named_colour_images": sum(coloured),
            "shape_fidelity": shapes_report,
            "seconds": time.time() - began,
        }
        if args.json is not None:
            args.json.write_text(json.dumps(report, indent=2))
        print("shape fidelity: " + " ".join(f"{s}={r['accuracy']:.3f}" for s, r in shapes.items()))
        return report
    print(
        f"(a) mask fidelity: {args.fidelity_images} single-object images, {args.steps} steps, "
        f"guidance {args.guidance}; {drawn} drew an object (>= {MIN_OBJECT_PIXELS} px off the "
        f"background) and are scored; {sum(coloured)} drew the named colour"
    )
    header = f"{'method':<20}{'mIoU':>7}" + "".join(f"{n:>11}" for n in NAMES) + f"{'sec':>7}"
    print(header)
    for name, r in fidelity.items():
        cells = "".join(f"{r['per_class'][n]:>11.3f}" for n in NAMES)
        print(f"{name:<20}{r['miou']:>7.3f}{cells}{r['seconds']:>7.1f}")
    best = max(fidelity, key=lambda k: fidelity[k]["miou"])
    print_shape_fidelity(check, ceiling, held_out, shapes)
    if args.sheet is not None:
        from diffumask_datasets.contact_sheet import contact_sheet

        # Rows in pairs: 8 images with the reference read off their pixels, then the
        # same 8 with the best method's mask.
        sheet_images, sheet_masks = [], []
        for row in range(0, 16, 8):
            sheet_images += images[row : row + 8] * 2
            sheet_masks += refs[row : row + 8]
            sheet_masks += [s.mask for s in fidelity[best]["samples"][row : row + 8]]
        contact_sheet(sheet_images, sheet_masks, args.sheet, columns=8, tile=128)
    ranking = quality_ranking(fidelity[best]["samples"], prompts, refs, kept)
    print(
        f"quality score vs object IoU ({best}): Spearman {ranking['spearman']:.3f}; mean IoU "
        f"{ranking['mean_iou_all']:.3f} over all, {ranking['mean_iou_top_quarter']:.3f} over "
        f"the top quarter by quality (>= {ranking['top_quarter_min_quality']:.3f})"
    )
    multi = None
    if args.multi_prompts > 0:
        multi = multi_object_rows(
            dm,
            classifier,
            (2, 3),
            args.multi_prompts,
            args.steps,
            args.guidance,
            args.seed,
            args.batch,
            multi_methods,
        )
        print_multi_object_header(args)
        print_multi_object_rows(None, multi)

    # (b)
    n = args.train_images
    # With --filter-study, 2N samples: the first N are the same as without it (seeds and
    # prompts follow the index), the halves by quality are trained on besides.
    synth_prompts = single_object_prompts(2 * n if args.filter_study else n, args.seed + 1)
    start = time.time()
    pool = dm(
        [p for p, _, _ in synth_prompts],
        classes=[[s] for _, s, _ in synth_prompts],
        seed=args.seed + 1,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        class_ids=sw.CLASS_IDS,
        refinement={k: v for k, v in METHODS[best].items() if k != "band"},
        batch_size=args.batch,
    )
    synthetic = pool[:n]
    generate_seconds = time.time() - start
    # Real: rendered single-object scenes with exact masks, the same distribution of
    # prompts; test: held-out rendered scenes with one or two objects.
    real = sw.sample_scenes(n, seed=args.seed + 2, count=1)
    rng = np.random.default_rng(args.seed + 3)
    test = [sw.random_scene(rng, count=1 + i % 2) for i in range(args.test_scenes)]
    start = time.time()
    # The same generated images with exact masks read off their pixels: what the masks
    # cost, apart from how the generator draws.
    exact = [
        reference_mask(s.image, shape)
        for s, (_, shape, _) in zip(synthetic, synth_prompts[:n], strict=True)
    ]
    synth_net = train_segmenter(
        [s.image for s in synthetic], [s.mask for s in synthetic], args.seed, args.seg_steps
    )
    exact_net = train_segmenter([s.image for s in synthetic], exact, args.seed, args.seg_steps)
    real_net = train_segmenter(
        [s.image for s in real], [s.mask for s in real], args.seed, args.seg_steps
    )
    train_seconds = time.time() - start
    synth_miou, synth_per = evaluate_segmenter(synth_net, test)
    exact_miou, exact_per = evaluate_segmenter(exact_net, test)
    real_miou, real_per = evaluate_segmenter(real_net, test)
    ratio = synth_miou / real_miou if real_miou > 0 else float("nan")
    exact_ratio = exact_miou / real_miou if real_miou > 0 else float("nan")
    rows = [
        ("synthetic", synth_miou, synth_per),
        ("synth exact masks", exact_miou, exact_per),
        ("real", real_miou, real_per),
    ]
    if args.filter_study:
        by_quality = sorted(range(len(pool)), key=lambda i: -pool[i].quality)
        for label, chosen in (("top half", by_quality[:n]), ("bottom half", by_quality[n:])):
            half = [pool[i] for i in sorted(chosen)]
            net = train_segmenter(
                [s.image for s in half], [s.mask for s in half], args.seed, args.seg_steps
            )
            rows.append((f"synth {label}", *evaluate_segmenter(net, test)))
    print(
        f"(b) segmentation net trained {args.seg_steps} steps on N={n} images, tested on "
        f"{len(test)} held-out rendered scenes (1-2 objects); generation {generate_seconds:.0f}"
        f" s ({best} masks), training {train_seconds:.0f} s"
    )
    print(f"{'train set':<18}{'mIoU':>7}" + "".join(f"{n_:>11}" for n_ in NAMES))
    for label, miou, per in rows:
        print(f"{label:<18}{miou:>7.3f}" + "".join(f"{v:>11.3f}" for v in per))
    total = time.time() - began
    print(f"total {total:.0f} s")
    report = {
        "model": args.model,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "fidelity": {
            k: {kk: vv for kk, vv in v.items() if kk != "samples"} for k, v in fidelity.items()
        },
        "scored_images": drawn,
        "named_colour_images": sum(coloured),
        "shape_fidelity": shapes_report,
        "best_method": best,
        "synthetic_miou": synth_miou,
        "real_miou": real_miou,
        "synthetic_over_real": ratio,
        "exact_masks_miou": exact_miou,
        "exact_masks_over_real": exact_ratio,
        "mask_efficiency": ratio / exact_ratio if exact_ratio > 0 else float("nan"),
        "quality_ranking": ranking,
        "multi_object": multi,
        "train_sets": {label: miou for label, miou, _ in rows},
        "seconds": total,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    print(
        f"shapes: mask_miou={fidelity[best]['miou']:.3f} synthetic_over_real={ratio:.3f} "
        f"exact_masks_over_real={exact_ratio:.3f}"
    )
    return report


if __name__ == "__main__":
    main()
