"""`diffumask export` (VOC, COCO, Hugging Face) and `diffumask filter` (keep the good
samples in a new dataset)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import (
    PROG,
    check_classes,
    check_fraction,
    check_quality,
    destination_option,
    open_dataset,
)

EXPORT_EPILOG = f"""\b
Examples:
  {PROG} export out/tiny --format voc --to out/tiny-voc
      torchvision: VOCSegmentation(root="out/tiny-voc", year="2012", image_set="train")
  {PROG} export out/tiny --format coco --to out/tiny-coco --val-fraction 0.2
      detectron2: register_coco_instances("tiny_train", {{}},
          "out/tiny-coco/annotations/instances_train.json", "out/tiny-coco/images/train")
  {PROG} export out/tiny --format hf --to out/tiny-hf
      datasets: load_dataset("out/tiny-hf")
  {PROG} export out/tiny --format hf --to out/tiny-hf --push-to-hub me/tiny

The val split is deterministic: the same samples go to val in every export.
"""


@click.command(epilog=EXPORT_EPILOG, short_help="Export as VOC, COCO or HF Datasets.")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    required=True,
    type=click.Choice(["voc", "coco", "hf"]),
    help="voc: VOC2012 segmentation layout; coco: COCO instances JSON + semantic PNGs; "
    "hf: Hugging Face Datasets with a dataset card.",
)
@destination_option
@click.option("--overwrite", is_flag=True, help="Replace a non-empty destination.")
@click.option(
    "--val-fraction",
    type=float,
    default=0.1,
    show_default=True,
    callback=check_fraction,
    help="Share of samples in the val split (deterministic).",
)
@click.option(
    "--hf-layout",
    type=click.Choice(["parquet", "disk"]),
    default="parquet",
    show_default=True,
    help="hf only: Parquet files + README card (load_dataset) or save_to_disk (load_from_disk).",
)
@click.option(
    "--push-to-hub",
    metavar="REPO_ID",
    help="hf only: also push to this Hub dataset repo (needs network and a token).",
)
def export(
    directory: Path,
    fmt: str,
    dest: Path,
    overwrite: bool,
    val_fraction: float,
    hf_layout: str,
    push_to_hub: str | None,
) -> None:
    """Export the dataset in DIRECTORY as VOC, COCO or Hugging Face Datasets."""
    from ..export import check_destination, export_store

    if fmt != "hf" and push_to_hub:
        raise click.BadParameter("--push-to-hub needs --format hf", param_hint="'--push-to-hub'")
    store = open_dataset(directory)
    check_destination(dest, overwrite, Path(store.path))
    options = {"layout": hf_layout, "push_to_hub": push_to_hub} if fmt == "hf" else {}
    summary = export_store(
        store, fmt, dest, val_fraction=val_fraction, overwrite=overwrite, progress=True, **options
    )
    click.echo(summary.describe())


FILTER_EPILOG = f"""\b
Examples:
  {PROG} filter out/tiny --min-quality 0.5 --to out/tiny-good
  {PROG} filter out/tiny --min-quality 0 --classes dog --to out/tiny-dogs

The result is a dataset like any other: info, export and app work on it.
"""


@click.command("filter", epilog=FILTER_EPILOG, short_help="Keep the good samples in a new dataset.")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option(
    "--min-quality",
    type=float,
    required=True,
    callback=check_quality,
    help="Keep samples whose quality score is at least this (0..1).",
)
@click.option(
    "--classes",
    callback=check_classes,
    metavar="A,B,...",
    help="Keep only samples prompted for one of these classes.",
)
@destination_option
@click.option("--overwrite", is_flag=True, help="Replace a non-empty destination.")
def filter_command(
    directory: Path, min_quality: float, classes: list[str] | None, dest: Path, overwrite: bool
) -> None:
    """Copy the samples of DIRECTORY that pass the filter into a new dataset at --to."""
    from ..filtering import filter_store

    store = open_dataset(directory)
    kept = filter_store(store, dest, min_quality, classes, overwrite=overwrite, progress=True)
    click.echo(f"kept {len(kept)} of {len(store)} samples in {dest}")
