"""The `diffumask` command line: generate, info, export, filter (and app, plugin).

Heavy libraries (torch, diffusers, datasets, fiftyone) are imported inside the commands
that use them, so `diffumask --help` and `--version` answer at once.

Errors a user can cause print one line, `diffumask: error: <what and how to fix it>`,
and exit non-zero: 1 for a bad value (DiffuMaskError), 2 for a command-line usage
mistake, 130 for Ctrl-C. DIFFUMASK_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import DiffuMaskError, one_line

PROG = "diffumask"
IGNORE = 255  # the mask value for uncertain pixels (sample.IGNORE; not imported: numpy)

# Commands that live in other modules, loaded when named (FiftyOne is optional).
LAZY_COMMANDS = {
    "app": ("diffumask_datasets.fiftyone.commands", "app"),
    "plugin": ("diffumask_datasets.fiftyone.commands", "plugin"),
}


def fail(message: object, code: int = 1) -> None:
    click.echo(f"{PROG}: error: {one_line(message)}", err=True)
    sys.exit(code)


def _unavailable_command(name: str, reason: str) -> click.Command:
    def refuse() -> None:
        raise DiffuMaskError(
            f"'{PROG} {name}' is unavailable ({reason}); install the FiftyOne extra: "
            "pip install 'diffumask-datasets[fiftyone]'"
        )

    return click.Command(name, callback=refuse, help=f"(unavailable: {reason})")


class DiffuMaskGroup(click.Group):
    """A click group that keeps its commands in the order they were added, loads the
    FiftyOne commands lazily, and turns every user error into one line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*self.commands, *(name for name in LAZY_COMMANDS if name not in self.commands)]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands or name not in LAZY_COMMANDS:
            return super().get_command(ctx, name)
        module_name, attribute = LAZY_COMMANDS[name]
        try:
            command = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            return _unavailable_command(name, one_line(exc))
        return command

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode or os.environ.get("DIFFUMASK_DEBUG"):
            return super().main(*args, standalone_mode=standalone_mode, **kwargs)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else PROG
            fail(f"{exc.format_message()} (see '{where} --help')", 2)
        except DiffuMaskError as exc:
            fail(exc)
        except (KeyboardInterrupt, click.Abort):
            fail("interrupted", 130)
        except click.ClickException as exc:
            fail(exc.format_message(), exc.exit_code)
        except OSError as exc:
            # Disk full, permission denied and the like: the system's message names the file.
            fail(exc)
        sys.exit(result if isinstance(result, int) else 0)


# -- option checks (each names the bad value and the fix) --------------------------------


def _at_least_one(example: int):
    def check(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise click.BadParameter(f"{value} is too small: it must be at least 1, e.g. {example}")
        return value

    return check


def _check_size(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is None:
        return value
    if value < 8 or value % 8:
        lower, upper = max(8, value // 8 * 8), max(8, value // 8 * 8 + 8)
        choices = f"{lower} or {upper}" if value > 8 else "8"
        raise click.BadParameter(
            f"{value} is not a positive multiple of 8 (the VAE works on 8x8 pixel blocks); "
            f"use {choices}"
        )
    return value


def parse_class_list(value: str | None) -> list[str] | None:
    """`--classes bird,dog` -> ["bird", "dog"]; refuses names that could act as paths."""
    if value is None:
        return None
    names = [name.strip() for name in value.split(",")]
    if not all(names):
        raise click.BadParameter(f"{value!r} has an empty class name; write e.g. bird,dog")
    from .definitions import PATH_CHARACTERS

    for name in names:
        bad = [c for c in PATH_CHARACTERS if c in name]
        if bad or name in (".", ".."):
            shown = repr(bad[0]) if bad else repr(name)
            raise click.BadParameter(
                f"class name {name!r} contains the path character {shown}; give the "
                "definition's class names, plain names such as 'dog'"
            )
    return names


def _check_classes(ctx: click.Context, param: click.Parameter, value: str | None):
    return parse_class_list(value)


def _check_fraction(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise click.BadParameter(f"{value} is outside [0, 1); e.g. 0.1 puts 10% in val")
    return value


def _check_quality(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise click.BadParameter(f"{value} is outside [0, 1]; quality scores lie in [0, 1]")
    return value


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_output_dir(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DiffuMaskError(f"--out {out} is a file; give a folder for the dataset")
    if out.is_dir() and not is_empty_dir(out) and not resume:
        raise DiffuMaskError(
            f"--out {out} is not empty; pass --resume to continue the dataset in it, "
            "or choose an empty or new folder"
        )


# -- the group -----------------------------------------------------------------------------

MAIN_HELP = f"""Make semantic-segmentation datasets with a diffusion model and its attention.

\b
Examples:
  {PROG} generate voc --model builtin:tiny-random --classes bird,dog \\
      --per-class 2 --steps 3 --size 64 --seed 0 --out out/voc-tiny
  {PROG} info out/voc-tiny
  {PROG} verify out/voc-tiny
  {PROG} export out/voc-tiny --format voc --to out/voc-tiny-VOC
  {PROG} export out/voc-tiny --format coco --to out/voc-tiny-COCO
  {PROG} filter out/voc-tiny --min-quality 0.5 --to out/voc-tiny-good
  {PROG} app out/voc-tiny

Errors print one line and exit non-zero; DIFFUMASK_DEBUG=1 shows tracebacks.
"""


@click.group(
    name=PROG, cls=DiffuMaskGroup, help=MAIN_HELP, context_settings={"max_content_width": 100}
)
@click.version_option(
    __version__, "--version", "-V", prog_name=PROG, message="%(prog)s %(version)s"
)
def main() -> None:
    pass


# -- generate ------------------------------------------------------------------------------

GENERATE_EPILOG = f"""\b
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
"""


def _check_gpus(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and value < 0:
        raise click.BadParameter(f"{value} is negative; e.g. 0.5 puts two workers on each GPU")
    return value


@main.command(epilog=GENERATE_EPILOG, short_help="Generate a dataset into a folder.")
@click.argument("dataset")
@click.option(
    "--model",
    help="Hub id, local diffusers folder or builtin:tiny-random | builtin:tiny-random-xl | "
    "builtin:tiny-random-sd3 | builtin:tiny-random-flux | builtin:shapes. Default: the "
    "definition's.",
)
@click.option(
    "--classes",
    callback=_check_classes,
    metavar="A,B,...",
    help="Comma-separated class names of the definition. Default: all.",
)
@click.option("--per-class", type=int, callback=_at_least_one(100), help="Images per class.")
@click.option("--steps", type=int, callback=_at_least_one(50), help="Denoising steps.")
@click.option(
    "--size", type=int, callback=_check_size, help="Image width and height in pixels (x8)."
)
@click.option("--seed", type=int, help="Base seed; sample i gets a seed derived from it and i.")
@click.option("--batch-size", type=int, callback=_at_least_one(4), help="Images per forward pass.")
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
    callback=_at_least_one(2),
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
    model: str | None,
    classes: list[str] | None,
    per_class: int | None,
    steps: int | None,
    size: int | None,
    seed: int | None,
    batch_size: int | None,
    device: str | None,
    dtype: str | None,
    out: Path,
    resume: bool,
    workers: int | None,
    ray_address: str | None,
    gpus_per_worker: float | None,
) -> None:
    """Generate DATASET (a built-in definition name or a definition .yaml file) into --out."""
    from .definitions import load_definition

    distributed = workers is not None or ray_address is not None
    if gpus_per_worker is not None and not distributed:
        raise click.BadParameter(
            "--gpus-per-worker sizes Ray workers: add --workers N or --ray auto",
            param_hint="'--gpus-per-worker'",
        )
    if distributed:
        from .distributed import require_ray

        require_ray()
    check_output_dir(out, resume)
    definition = load_definition(dataset)
    if classes is not None:
        definition.select(classes)  # unknown names fail here, with close matches
    config = generation_config(
        definition,
        model=model,
        classes=classes,
        per_class=per_class,
        steps=steps,
        size=size,
        seed=seed,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
    )
    from .build import build_dataset

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
            from .build import check_model_available

            check_model_available(config.model)
        else:
            click.echo(f"loading {config.model} ...", err=True)
            from .generate import DiffuMask

            engine = DiffuMask(config.model, device=config.device, dtype=config.dtype)
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
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
    click.echo(f"contact sheet (images with their masks): {write_contact_sheet(store)}")
    click.echo(f"next: {PROG} info {out}   |   {PROG} export {out} --format voc --to DEST")


def _show_warning(message: Warning | str, *args: Any, **kwargs: Any) -> None:
    click.echo(f"{PROG}: warning: {one_line(message)}", err=True)


def write_contact_sheet(store: Any, limit: int = 32) -> Path:
    """A PNG grid of the first samples with their masks overlaid, beside the shards."""
    from itertools import islice

    from .contact_sheet import contact_sheet

    records = list(islice(store.records(), limit))
    path = Path(store.path) / "contact_sheet.png"
    return contact_sheet([r.image for r in records], [r.mask for r in records], path)


def complete_store(out: Path, fingerprint: str) -> Any:
    """The store at `out` when it is complete and made with these settings, else None
    (then build_dataset decides: continue it, or refuse other settings)."""
    if not (out / "manifest.json").is_file():
        return None
    try:
        store = open_dataset(out)
    except DiffuMaskError:
        return None
    return store if store.fingerprint == fingerprint else None


def generation_config(definition: Any, **options: Any) -> Any:
    """A build.GenerationConfig from the command's options; None means the default."""
    from .build import GenerationConfig

    names = {
        "model": "model",
        "classes": "classes",
        "per_class": "images_per_class",
        "steps": "num_inference_steps",
        "size": "resolution",
        "seed": "seed",
        "batch_size": "batch_size",
        "device": "device",
        "dtype": "dtype",
    }
    given = {names[key]: value for key, value in options.items() if value is not None}
    if hasattr(GenerationConfig, "from_definition"):
        return GenerationConfig.from_definition(definition, **given)
    return GenerationConfig(**given)


# -- info ----------------------------------------------------------------------------------


def store_statistics(records: Iterable[Any], class_names: Mapping[int, str]) -> dict[str, Any]:
    """Counts per class (images whose mask shows it, images prompted for it), pixel
    shares per class, ignore and background, and the quality distribution."""
    import numpy as np

    names = {int(i): n for i, n in class_names.items() if int(i) != 0}
    images_with = dict.fromkeys(names, 0)
    prompted = dict.fromkeys(names.values(), 0)
    pixels = np.zeros(256, dtype=np.int64)
    qualities = []
    sizes: dict[str, int] = {}
    for record in records:
        counts = np.bincount(np.asarray(record.mask).reshape(-1), minlength=256)
        pixels += counts
        for class_id in names:
            images_with[class_id] += int(counts[class_id] > 0)
        for name in record.classes:
            prompted[name] = prompted.get(name, 0) + 1
        qualities.append(float(record.quality))
        size = "x".join(str(v) for v in record.image.size)
        sizes[size] = sizes.get(size, 0) + 1
    total = int(pixels.sum()) or 1
    q = np.array(qualities, dtype=np.float64)
    quality: dict[str, Any] = {"count": len(qualities)}
    if len(q):
        quality.update(
            mean=float(q.mean()),
            min=float(q.min()),
            p25=float(np.quantile(q, 0.25)),
            median=float(np.median(q)),
            p75=float(np.quantile(q, 0.75)),
            max=float(q.max()),
            histogram=np.histogram(q, bins=10, range=(0.0, 1.0))[0].tolist(),
        )
    return {
        "samples": len(qualities),
        "image_sizes": sizes,
        "classes": {
            names[i]: {
                "id": i,
                "prompted_images": prompted.get(names[i], 0),
                "images_with_pixels": images_with[i],
                "pixel_share": float(pixels[i] / total),
            }
            for i in names
        },
        "background_share": float(pixels[0] / total),
        "ignore_share": float(pixels[IGNORE] / total),
        "quality": quality,
    }


def _histogram_line(counts: list[int]) -> str:
    blocks = " ▁▂▃▄▅▆▇█"
    top = max(counts) or 1
    return "".join(blocks[round(c / top * 8)] for c in counts)


def format_statistics(path: Path, stats: Mapping[str, Any], manifest: Mapping[str, Any]) -> str:
    lines = [f"{path}: {stats['samples']} samples"]
    if stats["image_sizes"]:
        sizes = ", ".join(f"{size} ({n})" for size, n in stats["image_sizes"].items())
        lines.append(f"  image sizes: {sizes}")
    lines.append("")
    lines.append(f"  {'class':<20} {'id':>4} {'prompted':>9} {'in mask':>8} {'pixels':>8}")
    # A dataset of a few classes from a large definition: list the classes it has.
    rows = {
        n: r for n, r in stats["classes"].items() if r["prompted_images"] or r["images_with_pixels"]
    }
    rows = rows or stats["classes"]
    for name, row in rows.items():
        lines.append(
            f"  {name:<20} {row['id']:>4} {row['prompted_images']:>9} "
            f"{row['images_with_pixels']:>8} {row['pixel_share']:>8.1%}"
        )
    lines.append(f"  {'background':<20} {0:>4} {'':>9} {'':>8} {stats['background_share']:>8.1%}")
    lines.append(f"  {'ignore':<20} {IGNORE:>4} {'':>9} {'':>8} {stats['ignore_share']:>8.1%}")
    absent = len(stats["classes"]) - len(rows)
    if absent:
        lines.append(f"  ({absent} more classes of the definition have no samples here)")
    quality = stats["quality"]
    lines.append("")
    if quality["count"]:
        lines.append(
            "  quality: mean {mean:.3f}  min {min:.3f}  p25 {p25:.3f}  median {median:.3f}  "
            "p75 {p75:.3f}  max {max:.3f}".format(**quality)
        )
        lines.append(f"  quality histogram 0..1: |{_histogram_line(quality['histogram'])}|")
    lines.append("")
    store_keys = ("name", "num_shards", "shard_size", "attention_size", "fingerprint")
    summary = "  ".join(f"{k} {manifest[k]}" for k in store_keys if k in manifest)
    if summary:
        lines.append(f"  store: {summary}")
    shards = stats.get("shards")
    if shards:
        line = f"  shards: {shards['sha256_verified']} of {shards['total']} match their sha256"
        if shards["no_digest"]:
            line += f"; {shards['no_digest']} have no digest recorded (readable)"
        lines.append(line)
    if "filter" in manifest:
        lines.append(f"  filtered: {json.dumps(manifest['filter'], default=str)}")
    config = manifest.get("config") or {}
    if config:
        lines.append("  config:")
        for key, value in sorted(config.items()):
            shown = json.dumps(value, sort_keys=True, default=str)
            if len(shown) > 200:
                shown = shown[:197] + "..."
            lines.append(f"    {key}: {shown}")
    return "\n".join(lines)


INFO_EPILOG = f"""\b
Examples:
  {PROG} info out/tiny
  {PROG} info out/tiny --json | jq .quality
"""


@main.command(epilog=INFO_EPILOG, short_help="Figures and config of a dataset.")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def info(directory: Path, as_json: bool) -> None:
    """Counts and pixels per class, quality distribution and config of a dataset DIRECTORY."""
    store = open_dataset(directory)
    stats = {"shards": shard_summary(store, store.verify())}
    records = _progress(store.records(), len(store), "reading")
    stats.update(store_statistics(records, store.class_names))
    if as_json:
        click.echo(
            json.dumps(
                {"path": str(store.path), **stats, "manifest": store.manifest},
                indent=2,
                default=str,
            )
        )
    else:
        click.echo(format_statistics(Path(store.path), stats, store.manifest))


def shard_summary(store: Any, checks: list[Any]) -> dict[str, Any]:
    """Counts of intact shards; a DiffuMaskError listing the corrupt or missing ones."""
    bad = [check for check in checks if not check.ok]
    if bad:
        listed = "; ".join(check.describe() for check in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DiffuMaskError(
            f"{store.path}: {len(bad)} of {len(checks)} shards are damaged ({listed}{more}); "
            f"`{PROG} generate ... --out {store.path} --resume` with the same settings remakes them"
        )
    verified = sum(check.verified for check in checks)
    return {"total": len(checks), "sha256_verified": verified, "no_digest": len(checks) - verified}


def open_dataset(path: Path) -> Any:
    """`store.open_store`, imported on use so that --help stays fast."""
    from .store import open_store

    return open_store(path)


def _progress(iterable: Iterable[Any], total: int, desc: str) -> Iterable[Any]:
    from .export import progress_bar

    return progress_bar(iterable, total=total, desc=desc, enabled=True)


# -- verify --------------------------------------------------------------------------------

VERIFY_EPILOG = f"""\b
Examples:
  {PROG} verify out/tiny
  {PROG} verify /shared/voc || {PROG} generate voc ... --out /shared/voc --resume
"""


@main.command(epilog=VERIFY_EPILOG, short_help="Check every shard against its digest.")
@click.argument("directory", type=click.Path(path_type=Path))
def verify(directory: Path) -> None:
    """Read every shard of the dataset in DIRECTORY and compare it with the sha256 recorded
    when it was written. Exits 1 when a shard is missing or damaged."""
    from .store import open_store

    store = open_store(directory, allow_incomplete=True)
    checks = store.verify(progress=True)
    for check in checks:
        if not check.ok:
            click.echo(check.describe())
    summary = shard_summary(store, checks)
    line = f"{store.path}: all {summary['total']} shards intact"
    if summary["no_digest"]:
        line += (
            f" ({summary['sha256_verified']} match their sha256; {summary['no_digest']} have no "
            "digest recorded, so only their Parquet footers were checked)"
        )
    else:
        line += " (sha256 matches)"
    click.echo(line)


# -- export --------------------------------------------------------------------------------

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


@main.command(epilog=EXPORT_EPILOG, short_help="Export as VOC, COCO or HF Datasets.")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    required=True,
    type=click.Choice(["voc", "coco", "hf"]),
    help="voc: VOC2012 segmentation layout; coco: COCO instances JSON + semantic PNGs; "
    "hf: Hugging Face Datasets with a dataset card.",
)
@click.option(
    "--to", "dest", required=True, type=click.Path(path_type=Path), help="Destination folder."
)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty destination.")
@click.option(
    "--val-fraction",
    type=float,
    default=0.1,
    show_default=True,
    callback=_check_fraction,
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
    from .export import check_destination, export_store

    if fmt != "hf" and push_to_hub:
        raise click.BadParameter("--push-to-hub needs --format hf", param_hint="'--push-to-hub'")
    store = open_dataset(directory)
    check_destination(dest, overwrite, Path(store.path))
    options = {"layout": hf_layout, "push_to_hub": push_to_hub} if fmt == "hf" else {}
    summary = export_store(
        store, fmt, dest, val_fraction=val_fraction, overwrite=overwrite, progress=True, **options
    )
    click.echo(summary.describe())


# -- filter --------------------------------------------------------------------------------


def filter_records(
    records: Iterable[Any], min_quality: float, classes: list[str] | None
) -> Iterator[Any]:
    """Records with quality >= min_quality and, when classes are given, prompted for at
    least one of them."""
    wanted = set(classes or ())
    for record in records:
        if float(record.quality) < min_quality:
            continue
        if wanted and not wanted.intersection(record.classes):
            continue
        yield record


FILTER_EPILOG = f"""\b
Examples:
  {PROG} filter out/tiny --min-quality 0.5 --to out/tiny-good
  {PROG} filter out/tiny --min-quality 0 --classes dog --to out/tiny-dogs

The result is a dataset like any other: info, export and app work on it.
"""


@main.command("filter", epilog=FILTER_EPILOG, short_help="Keep the good samples in a new dataset.")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option(
    "--min-quality",
    type=float,
    required=True,
    callback=_check_quality,
    help="Keep samples whose quality score is at least this (0..1).",
)
@click.option(
    "--classes",
    callback=_check_classes,
    metavar="A,B,...",
    help="Keep only samples prompted for one of these classes.",
)
@click.option(
    "--to", "dest", required=True, type=click.Path(path_type=Path), help="Destination folder."
)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty destination.")
def filter_command(
    directory: Path, min_quality: float, classes: list[str] | None, dest: Path, overwrite: bool
) -> None:
    """Copy the samples of DIRECTORY that pass the filter into a new dataset at --to."""
    from .export import check_destination, staged_destination
    from .store import write_store

    store = open_dataset(directory)
    if classes:
        known = set(store.class_names.values())
        unknown = [c for c in classes if c not in known]
        if unknown:
            store.definition.select(unknown)  # raises with close matches
    check_destination(dest, overwrite, Path(store.path))
    manifest = dict(store.manifest)
    manifest["filter"] = {
        "source": str(store.path),
        "min_quality": min_quality,
        "classes": classes,
    }
    records = filter_records(_progress(store.records(), len(store), "filter"), min_quality, classes)
    # Staged like an export: a half-written filter result never sits at --to.
    with staged_destination(dest, overwrite, Path(store.path)) as staging:
        kept = len(write_store(staging, records, manifest))
    click.echo(f"kept {kept} of {len(store)} samples in {dest}")


# -- evaluate, clean, splice (diffumask_datasets.quality) and shapes render ----------------


def trainer_options(command):
    """The segmenter options shared by evaluate and clean."""
    options = [
        click.option(
            "--segmenter",
            metavar="NAME_OR_PATH",
            help="A SegFormer checkpoint (hub id or folder, e.g. nvidia/mit-b0), or "
            "builtin:fcn (a small conv net, fast on a CPU). Default: a small SegFormer "
            "trained from scratch.",
        ),
        click.option(
            "--train-steps",
            type=int,
            default=600,
            show_default=True,
            callback=_at_least_one(600),
            help="Optimiser steps of each segmenter training.",
        ),
        click.option(
            "--batch-size", type=int, default=16, show_default=True, callback=_at_least_one(16)
        ),
        click.option(
            "--size",
            type=int,
            callback=_at_least_one(64),
            help="Train and test at size x size. Default: the first training image's side.",
        ),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", help="torch device, e.g. cuda or cpu. Default: cuda if present."),
        click.option(
            "--splice", is_flag=True, help="Splice half of each batch into 2x2 mosaics on the fly."
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def train_settings(segmenter, train_steps, batch_size, size, seed, device, splice, **_: Any) -> Any:
    from .quality import TrainSettings

    return TrainSettings(
        steps=train_steps,
        batch_size=batch_size,
        size=size,
        seed=seed,
        device=device,
        splice=splice,
        segmenter=segmenter,
    )


EVALUATE_EPILOG = f"""\b
Examples (the shapes world, offline):
  {PROG} generate shapes --per-class 64 --out out/shapes
  {PROG} shapes render --count 512 --to out/shapes-real
  {PROG} evaluate out/shapes --real out/shapes-real --split val --real-train train

TRAIN is a dataset folder or a VOC export; REAL is a VOC-layout folder (our VOC export
or a VOC2012 download). mIoU is over background and TRAIN's classes; REAL's pixels of
other classes are ignored.
"""


@main.command(epilog=EVALUATE_EPILOG, short_help="Train on a dataset, test on real data.")
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
@trainer_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def evaluate(
    train: Path, real: Path, split: str, real_train: str | None, as_json: bool, **options: Any
) -> None:
    """Train a segmenter on TRAIN and report its IoU per class on REAL."""
    from .quality import evaluate as run_evaluation

    result = run_evaluation(
        train, real, split=split, real_train=real_train, settings=train_settings(**options)
    )
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        click.echo(result.describe())


def _check_keep(ctx: click.Context, param: click.Parameter, value: float) -> float:
    from .quality.clean import check_keep

    return check_keep(value)


CLEAN_EPILOG = f"""\b
Examples:
  {PROG} clean out/shapes --folds 3 --keep 0.7 --to out/shapes-clean
  {PROG} info out/shapes-clean

Each kept sample's meta holds its consistency; the new manifest's "clean" entry holds
the settings and every sample's consistency. The source dataset is not changed.
"""


@main.command(epilog=CLEAN_EPILOG, short_help="Noise learning: drop inconsistent masks.")
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
@click.option(
    "--to", "dest", required=True, type=click.Path(path_type=Path), help="Destination folder."
)
@click.option("--no-priors", is_flag=True, help="Ignore the definition's per-class priors.")
@trainer_options
def clean(
    directory: Path, folds: int, keep: float, dest: Path, no_priors: bool, **options: Any
) -> None:
    """Rank the samples of DIRECTORY by K-fold consistency; keep the best in --to."""
    from .quality import clean_store

    store, summary = clean_store(
        directory, dest, folds, keep, train_settings(**options), use_priors=not no_priors
    )
    click.echo(
        f"kept {summary['kept']} of {summary['samples']} samples in {dest} "
        f"({summary['prior_rejected']} outside their class prior)"
    )


SPLICE_EPILOG = f"""\b
Examples:
  {PROG} splice out/shapes --grid 2x2 --count 200 --to out/shapes-spliced
  {PROG} splice out/shapes --grid 1x2 --count 100 --to out/shapes-pairs
"""


@main.command(epilog=SPLICE_EPILOG, short_help="Write mosaics of a dataset's samples.")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--grid", default="2x2", show_default=True, help="Rows x columns, e.g. 2x2, 1x2.")
@click.option("--count", type=int, required=True, help="Number of mosaics.")
@click.option(
    "--to", "dest", required=True, type=click.Path(path_type=Path), help="Destination folder."
)
@click.option("--seed", type=int, default=0, show_default=True)
def splice(directory: Path, grid: str, count: int, dest: Path, seed: int) -> None:
    """Splice the samples of DIRECTORY into mosaics (images and masks alike) in --to."""
    from .quality import splice_store
    from .quality.splice import parse_grid

    rows, cols = parse_grid(grid)
    store = splice_store(directory, dest, (rows, cols), count, seed)
    click.echo(f"wrote {len(store)} {rows}x{cols} mosaics in {dest}")


@main.group(short_help="The procedural shapes world (exact masks).")
def shapes() -> None:
    """The shapes world of the built-in `builtin:shapes` model."""


@shapes.command("render", short_help="Rendered scenes with exact masks, VOC layout.")
@click.option("--count", type=int, required=True, callback=_at_least_one(512))
@click.option(
    "--to", "dest", required=True, type=click.Path(path_type=Path), help="Destination folder."
)
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
    callback=_check_fraction,
    help="Share of scenes in the val split.",
)
def shapes_render(count: int, dest: Path, seed: int, objects: int, val_fraction: float) -> None:
    """Write COUNT rendered scenes with exact masks in the VOC layout at --to."""
    from .shapes_world import render_voc

    summary = render_voc(dest, count, seed=seed, max_objects=objects, val_fraction=val_fraction)
    click.echo(summary.describe())


if __name__ == "__main__":
    main(prog_name=PROG)
