"""`diffumask label` (given images -> a dataset folder) and `diffumask score` (a dataset's
masks against ground truth)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .common import MODEL_HELP, PROG, at_least_one, check_classes, check_output_dir

LABEL_EPILOG = f"""\b
Examples (the shapes world, offline):
  {PROG} shapes render --count 64 --to out/real
  {PROG} label out/real --classes circle,square,triangle,star --definition shapes \\
      --model builtin:shapes --steps 20 --guidance 4 --out out/labelled
  {PROG} score out/labelled --labels out/real
  {PROG} label photos/ --classes dog,cat --model stabilityai/stable-diffusion-2-1 \\
      --device cuda --out out/photos          # a folder of images; --resume continues
  {PROG} label annotations.json --classes dog,cat --model ... --out out/coco  # COCO

IMAGES is a folder of images, a VOC folder (its JPEGImages/) or a COCO json (its
"images"). Each image is inverted to --strength (the model run backwards from the
image; --start noise: random noise instead, cheaper), denoised with its prompt (--prompt,
or "a photo of a dog and a cat" from --classes) and its masks cut from the model's
attention at the image's own size; the stored image is the given one, pixel for pixel.
The folder is a dataset like `generate` writes: info, export, filter, app take it.
"""


def _check_refinement(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None or not value.lstrip().startswith("{"):
        return value
    try:
        return json.loads(value)
    except ValueError as err:
        raise click.BadParameter(
            f'{value!r} is not JSON ({err}); e.g. \'{{"method": "adaptive"}}\''
        ) from None


def _check_strength(ctx: click.Context, param: click.Parameter, value: float | None):
    if value is not None and not 0.0 < value <= 1.0:
        raise click.BadParameter(f"{value} is outside (0, 1]; e.g. 0.3 noises to 30% of steps")
    return value


@click.command(epilog=LABEL_EPILOG, short_help="Masks for your own images, into a folder.")
@click.argument("images", type=click.Path(path_type=Path))
@click.option(
    "--classes", required=True, callback=check_classes, metavar="A,B,...", help="Classes to label."
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Dataset folder.")
@click.option(
    "--model",
    required=True,
    help=MODEL_HELP,
)
@click.option(
    "--definition", help="Take the class ids and refinement of this definition (voc, shapes)."
)
@click.option("--prompt", help="One prompt for every image, naming every class.")
@click.option(
    "--strength", type=float, callback=_check_strength, help="Noise level in (0, 1]; default 0.3."
)
@click.option(
    "--start",
    type=click.Choice(["inversion", "noise"]),
    default="inversion",
    show_default=True,
    help="Where denoising starts: the image's inversion, or random noise.",
)
@click.option("--steps", type=int, default=50, show_default=True, callback=at_least_one(50))
@click.option("--guidance", type=float, default=7.5, show_default=True)
@click.option("--resolution", type=int, callback=at_least_one(512), help="Denoise at this side.")
@click.option(
    "--refinement",
    callback=_check_refinement,
    help="threshold | adaptive | affinity | separate, or JSON parameters. Default: the "
    "definition's, else the model family's (UNet adaptive, SD3 and FLUX.1 separate).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True, callback=at_least_one(4))
@click.option("--device", help="torch device, e.g. cuda, cpu. Default: the best.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]))
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
def label(images: Path, out: Path, resume: bool, refinement: Any, **options: Any) -> None:
    """Label the images of IMAGES with masks for --classes into the dataset --out."""
    from ..label_store import LabelConfig, label_dataset

    check_output_dir(out, resume)
    config = LabelConfig(
        model=options["model"],
        classes=options["classes"],
        definition=options["definition"],
        prompt=options["prompt"],
        strength=options["strength"],
        start=options["start"],
        num_inference_steps=options["steps"],
        guidance_scale=options["guidance"],
        resolution=options["resolution"],
        seed=options["seed"],
        refinement=refinement,
        batch_size=options["batch_size"],
        device=options["device"],
        dtype=options["dtype"],
    )
    store = label_dataset(images, out, config, resume=resume)
    click.echo(f"labelled {len(store)} images into {out}")


SCORE_EPILOG = f"""\b
Examples:
  {PROG} score out/labelled --labels out/real
  {PROG} score out/labelled --labels VOCdevkit/VOC2012 --json > scores.json

LABELS is a VOC folder with masks (SegmentationClass/) or a dataset folder of exact masks.
Samples meet their ground truth by the image they were labelled from (VOC) or by index
(a dataset). IoU per class over summed intersections and unions, mIoU over background and
the dataset's classes, the confusion, and the same by the number of classes an image shows.
"""


@click.command(epilog=SCORE_EPILOG, short_help="Score a dataset's masks against labels.")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option(
    "--labels", required=True, type=click.Path(path_type=Path), help="VOC folder or dataset."
)
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
def score(directory: Path, labels: Path, as_json: bool) -> None:
    """Score the masks of DIRECTORY against the ground truth in --labels."""
    from ..quality.labels import score_masks

    report = score_masks(directory, labels)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.describe())
