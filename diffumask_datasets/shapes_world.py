"""A procedural world of flat-coloured shapes with exact masks.

It is the training world of the built-in ``builtin:shapes`` model and the ground truth
of its quality benchmark: every scene comes with the mask it was drawn from, so a mask
derived from a model's attention can be scored exactly. Pure numpy, seeded.

A pixel belongs to an object when its centre lies inside the object's outline; the image
is painted from the same masks, so image and mask never disagree (no anti-aliasing).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from diffumask_datasets.errors import DiffuMaskError

SIZE = 64

# Class ids follow the order of this tuple (0 is background), as in builders/shapes.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
CLASS_IDS: dict[str, int] = {name: i + 1 for i, name in enumerate(SHAPES)}

# Saturated object colours, far apart from each other and from every background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (40, 75, 215),
    "yellow": (240, 200, 25),
    "purple": (135, 45, 175),
}
# Backgrounds: light, dark and mid tones without much saturation.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 236),
    "gray": (150, 150, 150),
    "black": (28, 28, 32),
    "cream": (238, 226, 190),
    "sky": (190, 218, 245),
}

# Every word a caption of this world can contain: the built-in model's vocabulary.
CAPTION_WORDS: tuple[str, ...] = (
    ("a", "photo", "of", "and", "on", "background") + SHAPES + tuple(COLOURS) + tuple(BACKGROUNDS)
)

# The most objects a random scene holds (each of a distinct shape and colour).
MAX_OBJECTS = 3

# Half-size (circumradius) range of an object in pixels at 64x64.
MIN_RADIUS, MAX_RADIUS = 8.0, 15.0


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene: its shape, colour, centre and circumradius in pixels, and
    rotation."""

    shape: str
    colour: str
    center: tuple[float, float]  # (x, y) in pixels
    radius: float  # circumradius in pixels
    angle: float = 0.0  # radians, ignored for circles


@dataclass
class Scene:
    """A rendered scene: the RGB image, its exact class mask and instance mask, the objects,
    the background's name and the caption."""

    image: np.ndarray  # uint8 HxWx3
    mask: np.ndarray  # uint8 HxW: 0 background, CLASS_IDS[shape] where an object shows
    instances: np.ndarray  # uint8 HxW: 0 background, k+1 where objects[k] shows
    objects: list[ShapeObject]
    background: str
    caption: str = ""
    meta: dict = field(default_factory=dict)


def _polygon_inside(xs: np.ndarray, ys: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd rule: which points (xs, ys) lie inside the closed polygon."""
    inside = np.zeros(xs.shape, dtype=bool)
    x0, y0 = vertices[-1]
    for x1, y1 in vertices:
        crosses = (y1 > ys) != (y0 > ys)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = (x0 - x1) * (ys - y1) / (y0 - y1) + x1
        inside ^= crosses & (xs < x_at)
        x0, y0 = x1, y1
    return inside


def _outline(obj: ShapeObject) -> np.ndarray:
    """Polygon vertices (x, y) of a non-circular shape."""
    cx, cy = obj.center
    if obj.shape == "square":
        angles = obj.angle + np.pi / 4 + np.arange(4) * np.pi / 2
        radii = np.full(4, obj.radius)
    elif obj.shape == "triangle":
        angles = obj.angle - np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        radii = np.full(3, obj.radius)
    elif obj.shape == "star":
        angles = obj.angle - np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, obj.radius, obj.radius * 0.45)
    else:
        raise DiffuMaskError(f"unknown shape {obj.shape!r}; use one of {', '.join(SHAPES)}")
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def shape_mask(obj: ShapeObject, size: int = SIZE) -> np.ndarray:
    """Boolean HxW: pixels whose centre lies inside the object."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    if obj.shape == "circle":
        cx, cy = obj.center
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= obj.radius**2
    return _polygon_inside(xs, ys, _outline(obj))


def _background(name: str, size: int, rng: np.random.Generator | None) -> np.ndarray:
    base = np.asarray(BACKGROUNDS[name], dtype=np.float64)
    image = np.broadcast_to(base, (size, size, 3)).copy()
    if rng is not None:
        # A gentle linear shade so backgrounds vary without changing their name.
        direction = rng.uniform(0, 2 * np.pi)
        strength = rng.uniform(0, 14)
        ys, xs = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
        shade = (np.cos(direction) * xs + np.sin(direction) * ys) * 2 * strength
        image += shade[..., None]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def caption(
    objects: list[ShapeObject],
    background: str | None,
    photo: bool = True,
    name_colours: list[bool] | None = None,
) -> str:
    """'a photo of a red circle and a blue star on a white background'.

    name_colours: per object, whether its colour is named ("a circle" when False)."""
    if not objects:
        raise DiffuMaskError("a caption needs at least one object")
    named = name_colours if name_colours is not None else [True] * len(objects)
    words = ["a photo of"] if photo else []
    words.append(
        " and ".join(
            f"a {o.colour} {o.shape}" if say else f"a {o.shape}"
            for o, say in zip(objects, named, strict=True)
        )
    )
    if background is not None:
        words.append(f"on a {background} background")
    return " ".join(words)


def render_scene(
    objects: list[ShapeObject],
    background: str = "white",
    size: int = SIZE,
    rng: np.random.Generator | None = None,
    caption_text: str | None = None,
) -> Scene:
    """Paint objects in order (later ones on top) and return image plus exact masks."""
    if background not in BACKGROUNDS:
        raise DiffuMaskError(
            f"unknown background {background!r}; use one of {', '.join(BACKGROUNDS)}"
        )
    image = _background(background, size, rng)
    mask = np.zeros((size, size), dtype=np.uint8)
    instances = np.zeros((size, size), dtype=np.uint8)
    for k, obj in enumerate(objects):
        if obj.colour not in COLOURS:
            raise DiffuMaskError(f"unknown colour {obj.colour!r}; use one of {', '.join(COLOURS)}")
        inside = shape_mask(obj, size)
        image[inside] = COLOURS[obj.colour]
        mask[inside] = CLASS_IDS[obj.shape]
        instances[inside] = k + 1
    text = caption_text if caption_text is not None else caption(objects, background)
    return Scene(image, mask, instances, list(objects), background, text)


def random_objects(
    rng: np.random.Generator,
    count: int,
    size: int = SIZE,
    max_overlap: float = 0.15,
    shapes: Mapping[str, float] | None = None,
) -> list[ShapeObject]:
    """`count` objects of distinct shapes and distinct colours, mostly not overlapping.

    `shapes`: relative weights by name (a name left out weighs 1); None draws uniformly."""
    if not 1 <= count <= len(SHAPES):
        raise DiffuMaskError(f"object count {count} is out of range 1..{len(SHAPES)}")
    if shapes is None:  # no p: the draws of every run before the weights existed
        shape_indices = rng.choice(len(SHAPES), size=count, replace=False)
    else:
        odds = weighted_odds(shapes, SHAPES, "shape")
        if np.count_nonzero(odds) < count:
            raise DiffuMaskError(
                f"shape weights {dict(shapes)} leave fewer than {count} shapes to draw a "
                f"scene of {count} distinct objects; give at least {count} shapes a weight > 0"
            )
        shape_indices = rng.choice(len(SHAPES), size=count, replace=False, p=odds)
    colours = rng.choice(len(COLOURS), size=count, replace=False)
    colour_names = list(COLOURS)
    scale = size / SIZE
    placed: list[ShapeObject] = []
    for shape_index, colour_index in zip(shape_indices, colours, strict=True):
        best = None
        for _ in range(30):
            # Several objects share the canvas, so they are drawn a bit smaller.
            top = MAX_RADIUS if count == 1 else MAX_RADIUS - 2 * (count - 1)
            radius = rng.uniform(MIN_RADIUS, top) * scale
            margin = radius * 0.8
            center = (rng.uniform(margin, size - margin), rng.uniform(margin, size - margin))
            candidate = ShapeObject(
                SHAPES[shape_index],
                colour_names[colour_index],
                (float(center[0]), float(center[1])),
                float(radius),
                float(rng.uniform(0, 2 * np.pi)),
            )
            # Overlap as a fraction of the smaller radius sum; accept the first that fits.
            worst = max(
                (
                    1
                    - np.hypot(center[0] - o.center[0], center[1] - o.center[1])
                    / (radius + o.radius)
                    for o in placed
                ),
                default=-1.0,
            )
            if best is None or worst < best[0]:
                best = (worst, candidate)
            if worst <= max_overlap:
                break
        placed.append(best[1])
    return placed


def weighted_odds(weights: Mapping[str, float], names, what: str) -> np.ndarray:
    """Probabilities over `names` (in order) from relative weights by name; `what` says
    what the names are in the errors ("background", "shape")."""
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise DiffuMaskError(f"unknown {what}(s) {unknown} in the weights; use {', '.join(names)}")
    odds = np.array([float(weights.get(name, 1.0)) for name in names])
    if (odds < 0).any() or not np.isfinite(odds).all() or odds.sum() <= 0:
        raise DiffuMaskError(f"{what} weights {dict(weights)} must be finite, >= 0 and not all 0")
    return odds / odds.sum()


def random_scene(
    rng: np.random.Generator,
    count: int | None = None,
    size: int = SIZE,
    name_background: float = 0.8,
    photo: float = 0.5,
    name_colour: float = 0.9,
    backgrounds: Mapping[str, float] | None = None,
    shapes: Mapping[str, float] | None = None,
) -> Scene:
    """One random scene; `count` None draws 1 (40%), 2 (40%) or 3 (20%) objects.

    The caption names the background with probability `name_background`, starts with
    "a photo of" with probability `photo` and names each object's colour with
    probability `name_colour`. `backgrounds` and `shapes`: relative weights by name (a
    name left out weighs 1); None draws uniformly, as runs before the weights existed."""
    if count is None:
        count = int(rng.choice([1, 2, MAX_OBJECTS], p=[0.4, 0.4, 0.2]))
    objects = random_objects(rng, count, size, shapes=shapes)
    names = list(BACKGROUNDS)
    if backgrounds is None:  # no p: the draws of every run before the weights existed
        background = str(rng.choice(names))
    else:
        background = str(rng.choice(names, p=weighted_odds(backgrounds, names, "background")))
    text = caption(
        objects,
        background if rng.random() < name_background else None,
        photo=bool(rng.random() < photo),
        name_colours=[bool(rng.random() < name_colour) for _ in objects],
    )
    return render_scene(objects, background, size, rng=rng, caption_text=text)


def sample_scenes(n: int, seed: int = 0, count: int | None = None, size: int = SIZE):
    """`n` scenes from one seed; the same seed always gives the same scenes."""
    rng = np.random.default_rng(seed)
    return [random_scene(rng, count=count, size=size) for _ in range(n)]


def colour_masks(image: np.ndarray, colours: list[str], tolerance: float = 60.0) -> np.ndarray:
    """Read object masks off an image of this world by colour (a reference for generated
    images, where no drawing-time mask exists).

    Each pixel goes to the nearest of the named object colours and the scene's possible
    backgrounds; pixels of colour k (within `tolerance` in RGB distance) get k+1.
    Returns uint8 HxW with 0 for background.
    """
    pixels = np.asarray(image, dtype=np.float64)[..., :3]
    palette = [COLOURS[c] for c in colours] + list(BACKGROUNDS.values())
    palette_arr = np.asarray(palette, dtype=np.float64)
    distances = np.linalg.norm(pixels[:, :, None, :] - palette_arr[None, None], axis=-1)
    nearest = distances.argmin(axis=-1)
    close = distances.min(axis=-1) <= tolerance
    out = np.zeros(pixels.shape[:2], dtype=np.uint8)
    for k in range(len(colours)):
        out[(nearest == k) & close] = k + 1
    return out


def foreground_mask(image: np.ndarray, tolerance: float = 60.0, min_pixels: int = 8) -> np.ndarray:
    """Read the drawn objects off an image of this world, whatever their colour.

    The background is plain (a flat colour with a gentle shade), so its colour is the
    median of the image's outer ring of pixels; a pixel farther than `tolerance` (RGB
    distance) from it is foreground. Connected foreground regions smaller than
    `min_pixels` (specks of texture) are dropped. Returns a boolean HxW mask.
    """
    from scipy import ndimage

    pixels = np.asarray(image, dtype=np.float64)[..., :3]
    ring = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background = np.median(ring, axis=0)
    far = np.linalg.norm(pixels - background, axis=-1) > tolerance
    labels, count = ndimage.label(far)
    if count:
        sizes = ndimage.sum(far, labels, index=np.arange(1, count + 1))
        far &= np.isin(labels, 1 + np.flatnonzero(sizes >= min_pixels))
    return far


def object_silhouette(image: np.ndarray, size: int = 24) -> np.ndarray | None:
    """The largest drawn object of an image of this world as a size x size silhouette
    (what a shape classifier reads), or None when nothing is drawn.

    The object is read off the pixels (`foreground_mask`), so rendered and generated
    images are cut out the same way; it is cropped to its bounding box, centred in a
    square (aspect kept) and resampled by area: each output pixel is the fraction of its
    cell the object covers, in [0, 1].
    """
    from scipy import ndimage

    drawn = foreground_mask(image)
    labels, count = ndimage.label(drawn)
    if not count:
        return None
    sizes = ndimage.sum(drawn, labels, index=np.arange(1, count + 1))
    return silhouette(labels == 1 + int(np.argmax(sizes)), size)


def silhouette(region: np.ndarray, size: int = 24) -> np.ndarray:
    """A non-empty boolean HxW region as a size x size silhouette: cropped to its bounding
    box, centred in a square (aspect kept), resampled by area (each output pixel is the
    fraction of its cell the region covers, in [0, 1])."""
    from PIL import Image

    ys, xs = np.nonzero(region)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    side = max(height, width)
    square = np.zeros((side, side), dtype=np.float32)
    square[ys - ys.min() + (side - height) // 2, xs - xs.min() + (side - width) // 2] = 1.0
    resized = Image.fromarray(square).resize((size, size), Image.Resampling.BOX)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def scene_records(count: int, seed: int = 0, max_objects: int = 2, size: int = SIZE):
    """`count` rendered scenes as store Records (1 up to max_objects objects, in turn),
    exact masks; the same seed always gives the same records."""
    from PIL import Image

    from diffumask_datasets.store import Record

    rng = np.random.default_rng(seed)
    for index in range(count):
        scene = random_scene(rng, count=1 + index % max_objects, size=size)
        yield Record(
            index=index,
            image=Image.fromarray(scene.image),
            mask=scene.mask,
            prompt=scene.caption,
            seed=seed,
            classes=[o.shape for o in scene.objects],
            quality=1.0,
        )


def render_voc(dest, count: int, seed: int = 0, max_objects: int = 2, val_fraction: float = 0.5):
    """Write `count` rendered scenes with exact masks in the VOC layout of our VOC export
    (`diffumask shapes render`): real data for the synthetic-to-real protocol, offline."""
    from diffumask_datasets.export import check_val_fraction
    from diffumask_datasets.export.voc import export_voc

    if count < 1:
        raise DiffuMaskError(f"--count {count} is too small; render at least 1 scene, e.g. 512")
    check_val_fraction(val_fraction)
    return export_voc(
        scene_records(count, seed, max_objects),
        {i: name for name, i in CLASS_IDS.items()},
        dest,
        val_fraction=val_fraction,
        total=count,
        progress=True,
    )
