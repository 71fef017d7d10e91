"""Dataset cards: a template per definition in cards/, rendered with a store's real numbers.

    from diffumask_datasets.cards import render_card, validate_card
    text = render_card(open_store("out/birds"))   # README.md for the Hub
    validate_card(text)                           # offline checks of the Hub metadata

A template is Markdown with `$placeholders` (string.Template, so the braces of YAML and
code blocks need no escaping): cards/<definition name>.md, or cards/diffumask.md for a
user's own definition. The YAML header is made here, from the store, never by hand.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping
from typing import Any

from diffumask_datasets.errors import DiffuMaskError
from diffumask_datasets.families import FAMILIES
from diffumask_datasets.resources import cards_dir
from diffumask_datasets.statistics import class_rows, store_statistics

CITATION = """@inproceedings{wu2023diffumask,
  title     = {DiffuMask: Synthesizing Images with Pixel-level Annotations for Semantic
               Segmentation Using Diffusion Models},
  author    = {Wu, Weijia and Zhao, Yuzhong and Shou, Mike Zheng and Zhou, Hong and
               Shen, Chunhua},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year      = {2023}
}"""
PAPER = "https://arxiv.org/abs/2303.11681"

# Licenses of the models a dataset is commonly made with (the images inherit the model's
# terms). Anything else is "other" and the card asks the user to check the model's card.
MODEL_LICENSES = {
    "builtin:tiny-random": "apache-2.0",
    "builtin:tiny-random-xl": "apache-2.0",
    "builtin:tiny-random-sd3": "apache-2.0",
    "builtin:tiny-random-flux": "apache-2.0",
    "builtin:shapes": "apache-2.0",
    "builtin:shapes-mmdit": "apache-2.0",
    "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
    "CompVis/stable-diffusion-v1-5": "creativeml-openrail-m",
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-2-base": "openrail++",
    "stabilityai/stable-diffusion-2-1": "openrail++",
    "stabilityai/stable-diffusion-2-1-base": "openrail++",
    "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
}
# Values the Hub accepts in the header fields this module writes.
SIZE_CATEGORIES = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
)
KNOWN_LICENSES = {"apache-2.0", "mit", "cc-by-4.0", "creativeml-openrail-m", "openrail++", "other"}
_SPLIT_NAME = re.compile(r"^\w+(\.\w+)*$")


def model_license(model: str | None) -> str:
    """The Hub license id of `model`, "other" when unknown."""
    return MODEL_LICENSES.get(str(model), "other")


def size_category(count: int) -> str:
    """The Hub's size category for a dataset of `count` samples (e.g. `1K<n<10K`)."""
    for bound, name in SIZE_CATEGORIES:
        if count < bound:
            return name
    return "10M<n<100M"


# -- the card ----------------------------------------------------------------------------


def card_metadata(store: Any, splits: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The Hub header: license from the model, task, size, and the config that points
    `load_dataset` at the store's shards (an exporter may replace `configs`)."""
    config = store.manifest.get("config", {})
    model = str(config.get("model", "unknown"))
    license_id = model_license(model)
    count = sum(splits.values()) if splits else len(store)
    meta: dict[str, Any] = {
        "pretty_name": store.definition.title or store.definition.name,
        "license": license_id,
        "task_categories": ["image-segmentation"],
        "task_ids": ["semantic-segmentation"],
        "annotations_creators": ["machine-generated"],
        "language_creators": ["machine-generated"],
        "language": ["en"],
        "multilinguality": ["monolingual"],
        "source_datasets": ["original"],
        "size_categories": [size_category(count)],
        "tags": ["synthetic", "diffumask", "diffusion", "semantic-segmentation"],
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": "train", "path": "data/train-*.parquet"}],
            }
        ],
    }
    if license_id == "other":
        meta["license_name"] = "model-license"
        if "/" in model and not model.startswith(("/", ".", "builtin:")):
            meta["license_link"] = f"https://huggingface.co/{model}"
    return meta


def _yaml_header(meta: Mapping[str, Any]) -> str:
    import yaml

    return "---\n" + yaml.safe_dump(dict(meta), sort_keys=False, allow_unicode=True) + "---\n"


def _class_table(
    stats: dict[str, Any],
    rows: list[dict[str, Any]],
    palette: Mapping[int, tuple[int, int, int]],
) -> str:
    lines = [
        "| id | class | images prompted | images with pixels | pixels | pixel share | colour |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for c in rows:
        colour = "#{:02x}{:02x}{:02x}".format(*palette.get(c["id"], (0, 0, 0)))
        lines.append(
            f"| {c['id']} | {c['name']} | {c['prompted_images']} | {c['images_with_pixels']} "
            f"| {c['pixels']:,} | {100 * c['pixel_share']:.2f}% | `{colour}` |"
        )
    lines.append(f"| 0 | background | | | | {100 * stats['background_share']:.2f}% | `#000000` |")
    lines.append(f"| 255 | ignore | | | | {100 * stats['ignore_share']:.2f}% | |")
    return "\n".join(lines)


def _config_table(config: Mapping[str, Any]) -> str:
    lines = ["| setting | value |", "|---|---|"]
    for key in sorted(config):
        value = config[key]
        shown = json.dumps(value) if not isinstance(value, str) else value
        lines.append(f"| `{key}` | `{shown}` |")
    return "\n".join(lines)


def _split_table(splits: Mapping[str, int] | None, total: int) -> str:
    splits = dict(splits) if splits else {"train": total}
    lines = ["| split | samples |", "|---|---:|"]
    lines += [f"| {name} | {count} |" for name, count in splits.items()]
    return "\n".join(lines)


def _template(name: str, labelled: bool = False) -> str:
    """The card template: labelled.md for given images (`diffumask label`), else the
    definition's own, else the generic one."""
    folder = cards_dir()
    path = folder / ("labelled.md" if labelled else f"{name}.md")
    if not path.is_file():
        path = folder / "diffumask.md"
    return path.read_text(encoding="utf-8")


def _refinement_text(refinement: Any) -> str:
    if refinement is not None:
        return json.dumps(refinement)
    defaults = ", ".join(f"{f.default_method} for {f.name}" for f in FAMILIES)
    return f"the model family's default method: {defaults}"


def _python_literal(value: Any) -> str:
    return repr(value)


def render_card(store: Any, splits: Mapping[str, int] | None = None) -> str:
    """The dataset card (README.md) of `store`: its definition's template filled with the
    real settings and statistics, under a Hub metadata header."""
    definition = store.definition
    config = store.manifest.get("config", {})
    model = str(config.get("model", "unknown"))
    stats = store_statistics(store)
    # the classes this dataset was made for, and any other that shows up
    rows = class_rows(stats, also=config.get("classes") or store.class_names.values())
    meta = card_metadata(store, splits)
    load_args = {
        key: config[key]
        for key in (
            "model",
            "classes",
            "images_per_class",
            "num_inference_steps",
            "guidance_scale",
            "resolution",
            "seed",
            "refinement",
        )
        if config.get(key) is not None
    }
    builder = "diffumask-" + definition.name
    builtin = (cards_dir() / f"{definition.name}.md").is_file()
    call_args = ", ".join(f"{k}={_python_literal(v)}" for k, v in load_args.items())
    if config.get("route") == "image-to-image":
        # Labelled images cannot be made again from settings: the folder loads its own files.
        load_call = (
            'load_dataset("path/to/this/folder", split="train")  # masks by `diffumask label` '
            f"of the images in {str(config.get('source', 'unknown'))!r}"
        )
    elif builtin:
        load_call = f'load_dataset("{builder}", {call_args}, split="train")'
    else:
        load_call = (
            f'load_dataset("diffumask", data_files="{definition.name}.yaml", {call_args}, '
            'split="train")'
        )
    license_id = meta["license"]
    license_text = (
        f"`{license_id}`, the license of the model that drew the images (`{model}`)"
        if license_id != "other"
        else f"the license of the model that drew the images (`{model}`): check its model card"
    )
    sizes = ", ".join(sorted(stats["image_sizes"])) or "none"
    quality = stats["quality"]
    values = {
        "pretty_name": meta["pretty_name"],
        "name": definition.name,
        "description": definition.description or definition.title or definition.name,
        "num_samples": str(stats["samples"]),
        "num_classes": str(len(definition.classes)),
        "image_sizes": sizes,
        "model": model,
        "model_license": license_text,
        "class_table": _class_table(stats, rows, definition.palette()),
        "config_table": _config_table(config),
        "split_table": _split_table(splits, stats["samples"]),
        "fingerprint": store.manifest.get("fingerprint", ""),
        "quality_mean": f"{quality['mean']:.3f}",
        "quality_median": f"{quality['median']:.3f}",
        "quality_min": f"{quality['min']:.3f}",
        "quality_max": f"{quality['max']:.3f}",
        "ignore_share": f"{100 * stats['ignore_share']:.2f}%",
        "background_share": f"{100 * stats['background_share']:.2f}%",
        "load_call": load_call,
        "citation": CITATION,
        "paper": PAPER,
        "package_version": str(store.manifest.get("package_version", "unknown")),
        "refinement": _refinement_text(config.get("refinement")),
    }
    labelled = config.get("route") == "image-to-image"
    body = string.Template(_template(definition.name, labelled)).safe_substitute(values)
    return _yaml_header(meta) + "\n" + body.lstrip()


# -- offline validation -------------------------------------------------------------------


def validate_card(text: str):
    """Check a card the way the Hub would, without the network.

    huggingface_hub parses the header into DatasetCardData (strictly: bad YAML raises);
    datasets checks the `configs` data files; the values of the fields the Hub restricts
    (task, size category, license) are checked against the Hub's lists. Returns the
    DatasetCard; raises DiffuMaskError listing every problem.
    """
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard

    if not text.startswith("---\n"):
        raise DiffuMaskError("the dataset card has no YAML metadata header")
    try:
        card = DatasetCard(text, ignore_metadata_errors=False)
    except Exception as exc:
        raise DiffuMaskError(f"the dataset card's metadata does not parse: {exc}") from None
    data = card.data.to_dict()
    problems = []
    if "image-segmentation" not in (data.get("task_categories") or []):
        problems.append("task_categories lacks 'image-segmentation'")
    size = data.get("size_categories") or []
    allowed_sizes = {name for _, name in SIZE_CATEGORIES} | {"10M<n<100M"}
    if not size or any(s not in allowed_sizes for s in size):
        problems.append(f"size_categories {size!r} is not one of the Hub's categories")
    license_id = data.get("license")
    if license_id not in KNOWN_LICENSES:
        problems.append(f"license {license_id!r} is not a Hub license id")
    if license_id == "other" and not data.get("license_name"):
        problems.append("license 'other' needs license_name")
    configs = data.get("configs") or []
    if not configs:
        problems.append("no configs: load_dataset would not know the data files")
    for config in configs:
        if "config_name" not in config:
            problems.append(f"config {config!r} lacks config_name")
        try:
            MetadataConfigs._raise_if_data_files_field_not_valid(config)
        except ValueError as exc:
            problems.append(f"config {config.get('config_name')!r}: {exc}".strip())
        for item in config.get("data_files") or []:
            if isinstance(item, dict) and not _SPLIT_NAME.match(str(item.get("split", ""))):
                problems.append(f"split name {item.get('split')!r} is not allowed")
    try:
        MetadataConfigs.from_dataset_card_data(card.data)
    except Exception as exc:
        problems.append(f"configs do not parse: {exc}")
    if problems:
        raise DiffuMaskError("the dataset card is not valid for the Hub: " + "; ".join(problems))
    return card


def write_card(store: Any) -> None:
    """Write the store's card to README.md in it (the store then loads as a Hub-style
    dataset folder: `load_dataset("path/to/store")`). A card that cannot be made is
    reported and skipped: it must never cost a finished generation."""
    import os
    import warnings

    try:
        text = render_card(store)
        validate_card(text)
    except Exception as exc:  # reported, never fatal
        warnings.warn(f"no dataset card written for {store.path}: {exc}", stacklevel=2)
        return
    target = store.path / "README.md"
    tmp = target.with_name(f".README.md.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)
