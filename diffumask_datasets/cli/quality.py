"""`diffumask evaluate`, `clean` and `splice` (diffumask_datasets.quality) and `diffumask
shapes render` (real scenes of the shapes world to evaluate against)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .common import PROG, at_least_one, check_fraction, destination_option

# What evaluate and clean train when an option is left out: evaluate a small SegFormer at
# the images' size (quality.TrainSettings), clean the small FCN at 64 px
# (quality.CLEAN_SETTINGS, chosen on the noise benchmark). Kept as text so that --help
# does not import the trainer.
EVALUATE_DEFAULTS = "a small SegFormer from scratch, 600 steps, at the first image's side"
CLEAN_DEFAULTS = "builtin:fcn (a small conv net), 600 steps, at 64 px (minutes on a CPU)"


def trainer_options(defaults: str):
    """The segmenter options shared by evaluate and clean; left out, an option takes the
    command's own default (`defaults` says which in --help)."""

    def decorate(command):
        options = [
            click.option(
                "--segmenter",
                metavar="NAME_OR_PATH",
                help="A SegFormer checkpoint (hub id or folder, e.g. nvidia/mit-b0), or "
                f"builtin:fcn (a small conv net, fast on a CPU). Default: {defaults}.",
            ),
            click.option(
                "--train-steps",
                type=int,
                callback=at_least_one(600),
                help="Optimiser steps of each segmenter training.",
            ),
            click.option(
                "--batch-size", type=int, default=16, show_default=True, callback=at_least_one(16)
            ),
            click.option(
                "--size", type=int, callback=at_least_one(64), help="Train and test at size x size."
            ),
            click.option("--seed", type=int, default=0, show_default=True),
            click.option(
                "--device", help="torch device, e.g. cuda or cpu. Default: cuda if present."
            ),
            click.option(
                "--splice",
                is_flag=True,
                help="Splice half of each batch into 2x2 mosaics on the fly.",
            ),
        ]
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


# The options trainer_options adds, and the TrainSettings field each sets where the
# names differ.
TRAINER_OPTIONS = ("segmenter", "train_steps", "batch_size", "size", "seed", "device", "splice")
TRAIN_SETTING_NAMES = {"train_steps": "steps"}


def train_settings(base: Any, **options: Any) -> Any:
    """`base` (a quality.TrainSettings: the command's defaults) with the trainer options
    given on the command line (an option left out, None, keeps base's value; other
    options are left out)."""
    from dataclasses import replace

    given = {TRAIN_SETTING_NAMES.get(k, k): options[k] for k in TRAINER_OPTIONS}
    return replace(base, **{k: v for k, v in given.items() if v is not None})


EVALUATE_EPILOG = f"""\b
Examples (the shapes world, offline):
  {PROG} generate shapes --per-class 64 --out out/shapes
  {PROG} shapes render --count 512 --to out/shapes-real
  {PROG} evaluate out/shapes --real out/shapes-real --split val --real-train train

TRAIN is a dataset folder or a VOC export; REAL is a VOC-layout folder (our VOC export
or a VOC2012 download). mIoU is over background and TRAIN's classes; REAL's pixels of
other classes are ignored.
"""


@click.command(epilog=EVALUATE_EPILOG, short_help="Train on a dataset, test on real data.")
@click.argument("train", type=click.Path(path_type=Path))
@click.option(
    "--real",
    required=True,
    type=click.Path(path_type=Path),
    help="VOC-layout folder to test on (JPEGImages, SegmentationClass, ImageSets).",
)
@click.option("--split", default="val", show_default=True, help="REAL's split to test on.")
@click.option(
    "--real-train",
    metavar="SPLIT",
    help="Also train on this split of REAL and print synthetic_over_real.",
)
@trainer_options(EVALUATE_DEFAULTS)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def evaluate(
    train: Path, real: Path, split: str, real_train: str | None, as_json: bool, **options: Any
) -> None:
    """Train a segmenter on TRAIN and report its IoU per class on REAL."""
    from ..quality import TrainSettings
    from ..quality import evaluate as run_evaluation

    settings = train_settings(TrainSettings(), **options)
    result = run_evaluation(train, real, split=split, real_train=real_train, settings=settings)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        click.echo(result.describe())


def _check_keep(ctx: click.Context, param: click.Parameter, value: float) -> float:
    from ..quality.clean import check_keep

    return check_keep(value)


CLEAN_EPILOG = f"""\b
Examples:
  {PROG} clean out/shapes --to out/shapes-clean
  {PROG} clean out/shapes --folds 3 --keep 0.5 --to out/shapes-clean
  {PROG} clean out/shapes --to out/shapes-clean --size 128 --train-steps 2000   # on a GPU
  {PROG} clean out/shapes --to out/shapes-clean --no-relabel   # noise learning alone
  {PROG} app out/shapes-clean

A mask that shows no object is never kept, however it ranks (a re-labelling that finds
no object either agrees with it perfectly), nor does it teach the segmenters. Each kept
sample's meta holds its consistency, its agreement with a re-labelling of its image by
the model that made it (when re-labelled) and its combined score (the rank average of
consistency and agreement; without a re-labelling, of consistency and the attention's
quality); the new manifest's "clean" entry holds the settings and every sample's scores.
Each kept sample's held-out prediction is saved in held_out/; `{PROG} app` shows it
beside the mask, evaluated by FiftyOne (sort by held_out_accuracy). The source dataset
is not changed.
"""


def _check_rank_by(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from ..quality.clean import check_rank_by

    return check_rank_by(value, relabel=True)  # whether --relabel is given: clean_store


@click.command(epilog=CLEAN_EPILOG, short_help="Noise learning: drop inconsistent masks.")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--folds", type=int, default=3, show_default=True, help="K of K-fold.")
@click.option(
    "--keep",
    type=float,
    default=0.7,
    show_default=True,
    callback=_check_keep,
    help="Share of samples to keep, the most consistent first, in (0, 1].",
)
@destination_option
@click.option("--no-priors", is_flag=True, help="Ignore the definition's per-class priors.")
@click.option(
    "--rank-by",
    default=None,
    callback=_check_rank_by,
    help="The score that decides what is kept: combined (the default with a re-labelling: "
    "the rank average of consistency and agreement), consistency (the default without "
    "one), or agreement.",
)
@click.option(
    "--relabel/--no-relabel",
    default=None,
    help="Label each sample's image again with the model that made it (image-to-image) "
    "and score its mask's agreement with that. Default: when the samples name their model.",
)
@click.option(
    "--relabel-model",
    metavar="MODEL",
    help="The model to re-label with (implies --relabel); default: the samples' own model.",
)
@trainer_options(CLEAN_DEFAULTS)
def clean(
    directory: Path,
    folds: int,
    keep: float,
    dest: Path,
    no_priors: bool,
    rank_by: str | None,
    relabel: bool | None,
    relabel_model: str | None,
    **options: Any,
) -> None:
    """Rank the samples of DIRECTORY by K-fold consistency; keep the best in --to."""
    from ..quality import CLEAN_SETTINGS, clean_store

    store, summary = clean_store(
        directory,
        dest,
        folds,
        keep,
        train_settings(CLEAN_SETTINGS, **options),
        use_priors=not no_priors,
        rank_by=rank_by,
        relabel=True if relabel_model is not None else relabel,
        relabel_model=relabel_model,
    )
    click.echo(
        f"kept {summary['kept']} of {summary['samples']} samples in {dest} "
        f"({summary['empty_rejected']} with no object, {summary['prior_rejected']} outside "
        "their class prior)"
    )


SPLICE_EPILOG = f"""\b
Examples:
  {PROG} splice out/shapes --grid 2x2 --count 200 --to out/shapes-spliced
  {PROG} splice out/shapes --grid 1x2 --count 100 --to out/shapes-pairs
"""


@click.command(epilog=SPLICE_EPILOG, short_help="Write mosaics of a dataset's samples.")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--grid", default="2x2", show_default=True, help="Rows x columns, e.g. 2x2, 1x2.")
@click.option("--count", type=int, required=True, help="Number of mosaics.")
@destination_option
@click.option("--seed", type=int, default=0, show_default=True)
def splice(directory: Path, grid: str, count: int, dest: Path, seed: int) -> None:
    """Splice the samples of DIRECTORY into mosaics (images and masks alike) in --to."""
    from ..quality import splice_store
    from ..quality.splice import parse_grid

    rows, cols = parse_grid(grid)
    store = splice_store(directory, dest, (rows, cols), count, seed)
    click.echo(f"wrote {len(store)} {rows}x{cols} mosaics in {dest}")


@click.group(short_help="The procedural shapes world (exact masks).")
def shapes() -> None:
    """The shapes world of the built-in `builtin:shapes` model."""


@shapes.command("render", short_help="Rendered scenes with exact masks, VOC layout.")
@click.option("--count", type=int, required=True, callback=at_least_one(512))
@destination_option
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--objects",
    type=click.IntRange(1, 4),
    default=2,
    show_default=True,
    help="Scenes show 1 up to this many objects, in turn.",
)
@click.option(
    "--val-fraction",
    type=float,
    default=0.5,
    show_default=True,
    callback=check_fraction,
    help="Share of scenes in the val split.",
)
def shapes_render(count: int, dest: Path, seed: int, objects: int, val_fraction: float) -> None:
    """Write COUNT rendered scenes with exact masks in the VOC layout at --to."""
    from ..shapes_world import render_voc

    summary = render_voc(dest, count, seed=seed, max_objects=objects, val_fraction=val_fraction)
    click.echo(summary.describe())
