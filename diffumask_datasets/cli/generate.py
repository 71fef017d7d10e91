"""`diffumask generate`: a dataset definition and the options -> a dataset folder."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import click

from .common import (
    MODEL_HELP,
    PROG,
    at_least_one,
    check_classes,
    check_output_dir,
    check_size,
    fail,
    show_warning,
)

# Options that set a generation setting of another name: GenerationConfig, load_dataset
# and the manifest's config use the setting's name. The other options keep theirs.
SETTING_NAMES = {
    "per_class": "images_per_class",
    "steps": "num_inference_steps",
    "size": "resolution",
}


def _setting(option: str) -> str:
    return f"[setting: {SETTING_NAMES[option]}]"


GENERATE_EPILOG = (
    f"""\b
Examples:
  {PROG} generate voc --model builtin:tiny-random --classes bird,dog \\
      --per-class 2 --steps 3 --size 64 --seed 0 --out out/tiny
  {PROG} generate shapes --per-class 20 --out out/shapes
  {PROG} generate my_classes.yaml --model CompVis/stable-diffusion-v1-4 \\
      --device cuda --dtype float16 --per-class 500 --out out/mine
  {PROG} generate voc ... --out out/tiny --resume   # continue after a crash or Ctrl-C
  {PROG} generate voc ... --workers 2 --out out/tiny   # 2 model workers (Ray)
  {PROG} generate voc ... --ray auto --out /shared/voc # every GPU of a Ray cluster

Options left out take the definition's defaults. With the same options and seed,
the same samples come out, whatever the batch size, the number of workers (each
runs on OMP_NUM_THREADS CPU threads, 1 when unset) and however often it is resumed.

\b
Options and the settings they set (GenerationConfig, load_dataset, the manifest):
"""
    + "".join(
        f"  --{option.replace('_', '-'):<10} -> {name}\n" for option, name in SETTING_NAMES.items()
    )
    + """  (DiffuMask(...)(...) itself takes height= and width= for --size; the other
  options keep their names: --seed -> seed, --batch-size -> batch_size, ...)
"""
)


def _check_gpus(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and value < 0:
        raise click.BadParameter(f"{value} is negative; e.g. 0.5 puts two workers on each GPU")
    return value


@click.command(epilog=GENERATE_EPILOG, short_help="Generate a dataset into a folder.")
@click.argument("dataset")
@click.option(
    "--model",
    help=f"{MODEL_HELP} Default: the definition's.",
)
@click.option(
    "--classes",
    callback=check_classes,
    metavar="A,B,...",
    help="Comma-separated class names of the definition. Default: all.",
)
@click.option(
    "--per-class",
    type=int,
    callback=at_least_one(100),
    help=f"Images per class. {_setting('per_class')}",
)
@click.option(
    "--steps", type=int, callback=at_least_one(50), help=f"Denoising steps. {_setting('steps')}"
)
@click.option(
    "--size",
    type=int,
    callback=check_size,
    help=f"Image width and height in pixels (x8). {_setting('size')}",
)
@click.option("--seed", type=int, help="Base seed; sample i gets a seed derived from it and i.")
@click.option("--batch-size", type=int, callback=at_least_one(4), help="Images per forward pass.")
@click.option("--device", help="torch device, e.g. cuda, cuda:1, cpu, mps. Default: the best.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    help="Weights' dtype. Default: float16 on GPU, float32 on CPU.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the dataset (the store). Must be empty or new unless --resume.",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option(
    "--workers",
    type=int,
    callback=at_least_one(2),
    help="Model workers on Ray (a local Ray instance unless --ray). Default with --ray: one "
    "per GPU, else one per CPU.",
)
@click.option(
    "--ray",
    "ray_address",
    metavar="auto|ADDRESS",
    help="Run on the Ray cluster at ADDRESS (auto: the one this machine joined with `ray "
    "start`). --out must be a folder every machine sees at the same path.",
)
@click.option(
    "--gpus-per-worker",
    type=float,
    callback=_check_gpus,
    help="GPUs each worker reserves (0.5: two per GPU). Default: 1 where there are GPUs.",
)
def generate(
    dataset: str,
    out: Path,
    resume: bool,
    workers: int | None,
    ray_address: str | None,
    gpus_per_worker: float | None,
    **options: Any,
) -> None:
    """Generate DATASET (a built-in definition name or a definition .yaml file) into --out."""
    from ..definitions import load_definition

    distributed = workers is not None or ray_address is not None
    if gpus_per_worker is not None and not distributed:
        raise click.BadParameter(
            "--gpus-per-worker sizes Ray workers: add --workers N or --ray auto",
            param_hint="'--gpus-per-worker'",
        )
    if distributed:
        from ..distributed import require_ray

        require_ray()
    check_output_dir(out, resume)
    definition = load_definition(dataset)
    if options["classes"] is not None:
        definition.select(options["classes"])  # unknown names fail here, with close matches
    config = generation_config(definition, **options)
    from ..build import build_dataset, complete_store

    complete = complete_store(out, config.fingerprint(definition)) if resume else None
    if complete is not None:
        click.echo(f"{complete.path} is already complete ({len(complete)} samples)")
        sheet = Path(complete.path) / "contact_sheet.png"
        if sheet.is_file():
            click.echo(f"contact sheet (images with their masks): {sheet}")
        return
    # transformers' notices (e.g. about torchvision-backed image processors the pipeline
    # never uses) would bury the progress bar; a user's own setting wins.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    started = time.perf_counter()
    try:
        # The model loads before the store is created: a model that cannot be loaded
        # (a typo, offline without a cached copy) fails with --out left untouched. Ray
        # workers load their own copies: here it is only looked for.
        engine = None
        if distributed:
            from ..build import check_model_available

            check_model_available(config.model)
        else:
            click.echo(f"loading {config.model} ...", err=True)
            from ..generate import DiffuMask

            engine = DiffuMask(config.model, device=config.device, dtype=config.dtype)
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            store = build_dataset(
                out,
                definition,
                config,
                resume=resume,
                progress=True,
                engine=engine,
                workers=workers,
                ray_address=ray_address,
                gpus_per_worker=gpus_per_worker,
            )
    except KeyboardInterrupt:
        fail(
            f"interrupted; {out} keeps every finished shard: run the same command "
            "with --resume to continue",
            130,
        )
    seconds = time.perf_counter() - started
    click.echo(f"{len(store)} samples in {store.path} ({seconds:.1f} s)")
    from ..contact_sheet import write_contact_sheet

    click.echo(f"contact sheet (images with their masks): {write_contact_sheet(store)}")
    click.echo(f"next: {PROG} info {out}   |   {PROG} export {out} --format voc --to DEST")


def generation_config(definition: Any, **options: Any) -> Any:
    """A config.GenerationConfig from the command's options (renamed by SETTING_NAMES)
    over the definition's defaults; None means the default."""
    from ..config import GenerationConfig

    given = {SETTING_NAMES.get(k, k): v for k, v in options.items() if v is not None}
    return GenerationConfig.from_definition(definition, **given)
