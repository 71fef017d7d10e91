"""Given images -> a store: a folder of images, a VOC folder or a COCO json, labelled by
`DiffuMask.label` into the same shard store `generate` writes (resumable, fingerprinted,
with a card), so exports, FiftyOne and the quality tools take it as they are.

    from diffumask_datasets.label_store import LabelConfig, label_dataset
    store = label_dataset("photos/", "out/labelled", LabelConfig(
        model="builtin:tiny-random", classes=["dog", "cat"], num_inference_steps=4))

Sample i is the i-th image in name order (a folder, the VOC folder's JPEGImages/) or in
the COCO file's order; its `meta["source"]` is the image's path, which is how `diffumask
evaluate --labels` finds its ground truth. Every image is labelled with every class.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffumask_datasets.definitions import Definition, load_definition
from diffumask_datasets.errors import DiffuMaskError
from diffumask_datasets.families import refinement_by_family
from diffumask_datasets.inversion import DEFAULT_START
from diffumask_datasets.store import Record, Store, make_manifest, open_store, start_run

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class LabelConfig:
    """The settings of a labelled store; all but batch_size and device are in its
    fingerprint (with the images' paths and sizes), so a resume with others is refused."""

    model: str = "builtin:tiny-random"
    classes: list[str] | None = None  # class names every image is labelled with
    definition: str | None = None  # whose ids the classes take (None: 1..N) and refinement
    prompt: str | None = None  # one prompt for every image; None: made from the classes
    strength: float | None = None  # None: label.DEFAULT_STRENGTH
    start: str = DEFAULT_START  # where denoising starts: "inversion" or "noise"
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    resolution: int | None = None  # longer side the model denoises at; None: own size
    seed: int = 0
    refinement: str | dict | None = None  # None: the definition's, else the engine's
    batch_size: int = 4  # never changes a sample: not fingerprinted
    shard_size: int = 64
    attention_size: int | None = None  # side of the stored maps; None: from the images
    device: str | None = None
    dtype: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def image_inputs(source: str | Path) -> list[Path]:
    """The images of SOURCE: a folder's image files (a VOC folder's JPEGImages/) in name
    order, or a COCO json's `images` in its order (file names relative to the json's
    folder, or to the split's image folder of the COCO layout)."""
    from diffumask_datasets.quality.data import find_voc_root

    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".json":
        return _coco_images(path)
    if path.is_dir():
        root = find_voc_root(path)
        folder = root / "JPEGImages" if root is not None else path
        if root is None and (path / "JPEGImages").is_dir():
            folder = path / "JPEGImages"
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DiffuMaskError(
                f"IMAGES {str(path)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)}); "
                "give a folder of images, a VOC folder or a COCO json"
            )
        return images
    raise DiffuMaskError(
        f"IMAGES {str(path)!r} is neither a folder nor a COCO .json file; give a folder of "
        "images, a VOC folder or a COCO json"
    )


def _coco_images(path: Path) -> list[Path]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = [str(image["file_name"]) for image in data["images"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DiffuMaskError(
            f"COCO file {str(path)!r} cannot be read ({type(err).__name__}: {err}); it needs "
            'an "images" list whose entries have a "file_name"'
        ) from None
    if not entries:
        raise DiffuMaskError(f"COCO file {str(path)!r} lists no images")
    # file names are relative to an image folder: next to the json, or (COCO's and our
    # export's layout, annotations/instances_val.json) beside the annotations folder,
    # in a folder named after the split ("val2017", "images/val")
    split = path.stem.rsplit("_", 1)[-1]
    roots = [path.parent, path.parent / "images", path.parent.parent, path.parent.parent / "images"]
    folders = [folder for root in roots for folder in (root, root / split)]
    found = []
    for name in entries:
        hit = next((f / name for f in folders if (f / name).is_file()), None)
        if hit is None:
            raise DiffuMaskError(
                f"COCO file {str(path)!r} lists {name!r}, found in none of its image folders "
                f"({', '.join(str(f) for f in folders[:4])}, ...); put the images there"
            )
        found.append(hit)
    return found


def label_definition(classes: list[str], definition: str | None) -> Definition:
    """The definition a labelled store records: `definition`'s classes chosen by name (its
    ids kept), or one made from the classes (ids 1..N in their order)."""
    if definition is not None:
        base = load_definition(definition)
        chosen = {c.name for c in base.select(classes)}
        data = base.to_dict()
        data["classes"] = [c for c in data["classes"] if c["name"] in chosen]
        return Definition.from_dict(data, source=base.source)
    return Definition.from_dict(
        {
            "name": "labelled",
            "title": "Labelled images",
            "description": "Given images labelled from a diffusion model's attention.",
            "prompts": {"templates": ["a photo of a {class}"]},
            "classes": [{"id": i + 1, "name": n, "prompt": n} for i, n in enumerate(classes)],
        },
        source="diffumask label",
    )


def _fingerprint(config: LabelConfig, definition: Definition, images: list[Path]) -> str:
    settings = {k: v for k, v in config.to_dict().items() if k not in ("batch_size", "device")}
    settings["refinement"] = refinement_by_family(config.refinement)
    listing = [[str(p), p.stat().st_size] for p in images]
    payload = json.dumps(
        {"settings": settings, "definition": definition.fingerprint(), "images": listing},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _longest_side(images: list[Path]) -> int:
    """The longest image side; every image's header read, so an unreadable one is named
    before anything is labelled."""
    from PIL import Image

    from diffumask_datasets.label import read_image

    longest = 0
    for i, path in enumerate(images):
        try:
            with Image.open(path) as image:  # reads the header only
                longest = max(longest, *image.size)
        except OSError:
            read_image(path, f"image {i}")  # raises, naming it
    return longest


def _check_before_writing(engine, config: LabelConfig, definition: Definition) -> None:
    """What would fail the first shard fails before the store is made: the prompt must
    name every class, the strength must run a step, the refinement must parse."""
    from diffumask_datasets.inversion import check_start
    from diffumask_datasets.label import DEFAULT_STRENGTH, _check_strength, label_prompt

    classes = list(config.classes)
    prompt = config.prompt if config.prompt is not None else label_prompt(classes)
    synonyms = {c.name: list(c.words) for c in definition.classes}
    engine.family.token_positions(prompt, classes, synonyms)
    strength = DEFAULT_STRENGTH if config.strength is None else config.strength
    _check_strength(strength, config.num_inference_steps)
    check_start(config.start)
    engine.refinement(config.refinement)


def label_dataset(
    source: str | Path,
    out_dir: str | Path,
    config: LabelConfig,
    resume: bool = False,
    progress: bool = True,
    engine: Any = None,
) -> Store:
    """Label the images of SOURCE into a store at `out_dir` (see module doc). resume=True
    continues a store made from the same images and settings (complete shards are kept)
    and refuses one made otherwise. `engine`: a ready DiffuMask, to reuse a loaded model."""
    from diffumask_datasets.generate import DiffuMask, sample_seed

    if not config.classes:
        raise DiffuMaskError("no classes given; name the classes to label, e.g. --classes dog,cat")
    images = image_inputs(source)
    definition = label_definition(list(config.classes), config.definition)
    if config.refinement is None and config.definition is not None:
        # as `generate`: a setting left out takes the definition's default
        config = dataclasses.replace(config, refinement=definition.defaults.get("refinement"))
    longest = _longest_side(images)
    if config.attention_size is None:  # the largest map capture keeps, at most 64
        config = dataclasses.replace(config, attention_size=max(8, min(64, longest // 8)))
    if engine is None:
        engine = DiffuMask(config.model, device=config.device, dtype=config.dtype)
    _check_before_writing(engine, config, definition)
    record = {**config.to_dict(), "source": str(source), "route": "image-to-image"}
    manifest = make_manifest(
        definition,
        record,
        _fingerprint(config, definition, images),
        num_samples=len(images),
        shard_size=config.shard_size,
        attention_size=config.attention_size,
    )
    store = start_run(out_dir, manifest, resume=resume)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        done = sum(len(store.shard_range(k)) for k in store.complete_shards())
        bar = tqdm(total=len(store), initial=done, desc="labelling", unit="image")
    try:
        for shard in range(store.num_shards):
            if store.has_shard(shard):
                continue
            with store.claim(shard, blocking=True) as held:
                if not held or store.has_shard(shard):
                    continue
                indices = list(store.shard_range(shard))
                samples = engine.label(
                    [images[i] for i in indices],
                    classes=list(config.classes),
                    prompts=config.prompt,
                    seed=[sample_seed(config.seed, i) for i in indices],
                    strength=config.strength,
                    start=config.start,
                    num_inference_steps=config.num_inference_steps,
                    guidance_scale=config.guidance_scale,
                    resolution=config.resolution,
                    batch_size=config.batch_size,
                    class_ids=definition.class_ids,
                    synonyms={c.name: list(c.words) for c in definition.classes},
                    refinement=config.refinement,
                )
                records = []
                for index, sample in zip(indices, samples, strict=True):
                    sample.meta["index"] = index
                    records.append(Record.from_sample(index, sample, config.attention_size))
                store.write_shard(shard, records)
                if bar is not None:
                    bar.update(len(records))
    finally:
        if bar is not None:
            bar.close()
    store.record_missing_digests()
    store = open_store(store.path)
    if not (store.path / "README.md").is_file():
        from diffumask_datasets.cards import write_card

        write_card(store)
    return store
