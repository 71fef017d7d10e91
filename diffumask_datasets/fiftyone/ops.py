"""What the plugin's operators do, as plain functions over FiftyOne collections.

The operators in `plugin/__init__.py` only read their form, call these and report back,
so everything here can be used from Python (and is tested) without the App.

Areas are shares of the image (0..1). A mask field other than `ground_truth` (one the
re-refine operator wrote) has its companions `<field>_quality`, `<field>_mask_area` and
`<field>_class_areas`; `ground_truth`'s are `quality`, `mask_area`, `class_areas`.
"""

from __future__ import annotations

import keyword
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fiftyone as fo
import numpy as np
from fiftyone import ViewField as F
from PIL import Image

from ..errors import DiffuMaskError
from ..statistics import IGNORE, MaskFigures, class_rows, dataset_statistics
from ..store import Record
from .importer import GROUND_TRUTH, INFO_KEY
from .media import REFINED_DIR, _write_atomic, class_slug, pixel_fractions, sample_stem

EXPORT_FORMATS = ("voc", "coco")
DEFAULT_BAD_TAG = "bad"
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# -- what the dataset knows about itself -------------------------------------------------


@dataclass(frozen=True)
class ClassInfo:
    """A class of a loaded dataset as the operators see it: id, name, the slug used in field
    names, and its attention field."""

    id: int
    name: str
    slug: str
    attention_field: str


def diffumask_info(dataset: fo.Dataset | None) -> dict[str, Any]:
    """The diffumask part of a dataset's `info` (classes, media folder, store), or a
    DiffuMaskError when the dataset was not loaded by diffumask-datasets."""
    if dataset is None:
        raise DiffuMaskError("no dataset is open; open one loaded by diffumask-datasets")
    info = (dataset.info or {}).get(INFO_KEY)
    if not info:
        raise DiffuMaskError(
            f"FiftyOne dataset {dataset.name!r} was not loaded by diffumask-datasets; load "
            "it with to_fiftyone(DIR) or fo.Dataset.from_dir(DIR, dataset_type=DiffuMaskDataset)"
        )
    return info


def dataset_classes(dataset: fo.Dataset) -> list[ClassInfo]:
    """The classes of a dataset loaded by diffumask-datasets, in id order."""
    return [
        ClassInfo(c["id"], c["name"], c["slug"], c["attention_field"])
        for c in diffumask_info(dataset)["classes"]
    ]


def present_classes(dataset: fo.Dataset) -> list[str]:
    """Class names with an attention map in at least one sample, in id order."""
    schema = dataset.get_field_schema()
    return [c.name for c in dataset_classes(dataset) if c.attention_field in schema]


def companion_fields(mask_field: str) -> tuple[str, str, str]:
    """(quality, mask area, class areas) fields that go with a mask field."""
    if mask_field == GROUND_TRUTH:
        return "quality", "mask_area", "class_areas"
    return f"{mask_field}_quality", f"{mask_field}_mask_area", f"{mask_field}_class_areas"


def mask_fields(dataset: fo.Dataset) -> list[str]:
    """Segmentation fields: ground_truth first, then re-refined ones."""
    schema = dataset.get_field_schema(embedded_doc_type=fo.Segmentation)
    return sorted(schema, key=lambda name: (name != GROUND_TRUTH, name))


# -- checks the forms run ----------------------------------------------------------------
# Each returns None when the value is fine, else the message to show under the input.


def check_fraction(name: str, value: Any, allow_none: bool = True) -> str | None:
    """None when `value` is a number in [0, 1] (or None where allowed), else the message
    that says what to fix; the forms show it as the user types."""
    if value is None:
        return None if allow_none else f"{name} is required: a number in [0, 1]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name} must be a number in [0, 1], got {value!r}"
    if not 0.0 <= float(value) <= 1.0:
        return f"{name} = {value} is outside [0, 1]; areas and thresholds are fractions"
    return None


def check_range(low_name: str, low: Any, high_name: str, high: Any) -> str | None:
    """None when `low` <= `high` (or either is None), else the message."""
    if low is not None and high is not None and float(low) > float(high):
        return f"{low_name} ({low}) is larger than {high_name} ({high}); nothing could match"
    return None


def check_classes(dataset: fo.Dataset, names: Iterable[str] | None) -> str | None:
    """None when every name is a class of the dataset, else the message naming the first
    unknown one and the dataset's classes."""
    known = [c.name for c in dataset_classes(dataset)]
    unknown = [n for n in (names or []) if n not in known]
    if unknown:
        return f"unknown class {unknown[0]!r}; this dataset's classes: {', '.join(known)}"
    return None


def check_new_field(dataset: fo.Dataset, name: Any) -> str | None:
    """None when `name` can hold new masks (a valid field name that no field of the dataset
    uses yet), else the message."""
    if not isinstance(name, str) or not name:
        return "give a field name for the new masks, e.g. refined_t060"
    if not _FIELD_NAME.match(name) or keyword.iskeyword(name):
        return (
            f"field name {name!r} must be letters, digits and underscores, "
            "not starting with a digit"
        )
    if name == GROUND_TRUTH:
        return (
            "ground_truth holds the generated masks; choose a new field name to compare against it"
        )
    schema = dataset.get_field_schema()
    reserved = set(schema) - set(mask_fields(dataset))
    taken = [f for f in (name, *companion_fields(name)) if f in reserved]
    if taken:
        return (
            f"field {taken[0]!r} already exists and is not a re-refined mask; choose another name"
        )
    return None


def check_tag(tag: Any) -> str | None:
    """None when `tag` is a non-empty string, else the message."""
    if not isinstance(tag, str) or not tag.strip():
        return "give a tag name, e.g. bad"
    return None


def check_export_destination(dataset: fo.Dataset, dest: Any, overwrite: bool) -> str | None:
    """None when `dest` is an absolute folder an export may write to (empty, or replaced
    with `overwrite`, outside the media folder), else the message."""
    from ..export import check_destination

    if not isinstance(dest, str) or not dest.strip():
        return "give a destination folder for the export"
    if not os.path.isabs(os.path.expanduser(dest)):
        return f"destination {dest!r} must be an absolute path (the App's server resolves it)"
    try:
        check_destination(Path(dest), bool(overwrite), Path(diffumask_info(dataset)["media_dir"]))
    except DiffuMaskError as error:
        # the form's checkbox, not the CLI's flag
        return str(error).replace("pass --overwrite", "tick 'replace a non-empty destination'")
    return None


def raise_unknown_mask_field(dataset: fo.Dataset, name: str) -> None:
    """Raise a DiffuMaskError naming `name` and the dataset's mask fields."""
    raise DiffuMaskError(
        f"{name!r} is not a mask field of this dataset; choose one of {mask_fields(dataset)}"
    )


def _save_mask(mask: np.ndarray, path: str) -> None:
    Image.fromarray(mask, mode="L").save(path, format="PNG")


def raise_if(message: str | None) -> None:
    """Raise a DiffuMaskError with `message` when there is one (the checks' result)."""
    if message:
        raise DiffuMaskError(message)


# -- filter ---------------------------------------------------------------------------


def filter_view(
    collection: fo.core.collections.SampleCollection,
    *,
    min_quality: float | None = None,
    max_quality: float | None = None,
    classes: Sequence[str] | None = None,
    match: str = "any",
    min_mask_area: float | None = None,
    max_mask_area: float | None = None,
    min_class_area: float | None = None,
    mask_field: str = GROUND_TRUTH,
    exclude_tag: str | None = None,
    min_consistency: float | None = None,
) -> fo.DatasetView:
    """Samples by quality, classes named in the prompt and mask area.

    `min_mask_area`/`max_mask_area` bound the share of pixels with any class;
    `min_class_area` asks each chosen class (with `classes`) to cover at least that share.
    `match` is "any" or "all" of `classes`. `min_consistency` keeps samples whose noise-
    learning consistency (a dataset made by `diffumask clean`) is at least that.
    """
    dataset = collection._dataset
    for name, value in (
        ("min_quality", min_quality),
        ("max_quality", max_quality),
        ("min_mask_area", min_mask_area),
        ("max_mask_area", max_mask_area),
        ("min_class_area", min_class_area),
        ("min_consistency", min_consistency),
    ):
        raise_if(check_fraction(name, value))
    raise_if(check_range("min_quality", min_quality, "max_quality", max_quality))
    raise_if(check_range("min_mask_area", min_mask_area, "max_mask_area", max_mask_area))
    raise_if(check_classes(dataset, classes))
    if match not in ("any", "all"):
        raise DiffuMaskError(f"match must be 'any' or 'all', got {match!r}")
    if mask_field not in mask_fields(dataset):
        raise_unknown_mask_field(dataset, mask_field)
    quality, mask_area, class_areas = companion_fields(mask_field)
    view = collection.view()
    if exclude_tag:
        view = view.match_tags(exclude_tag, bool=False)
    if min_quality is not None:
        view = view.match(F(quality) >= float(min_quality))
    if max_quality is not None:
        view = view.match(F(quality) <= float(max_quality))
    if min_consistency is not None:
        view = view.match(F("consistency") >= float(min_consistency))
    if min_mask_area is not None:
        view = view.match(F(mask_area) >= float(min_mask_area))
    if max_mask_area is not None:
        view = view.match(F(mask_area) <= float(max_mask_area))
    if classes:
        named = F("classes.classifications.label")
        wanted = list(classes)
        view = view.match(named.contains(wanted, all=(match == "all")))
        if min_class_area is not None:
            slugs = {c.name: c.slug for c in dataset_classes(dataset)}
            conditions = [F(f"{class_areas}.{slugs[n]}") >= float(min_class_area) for n in wanted]
            combined = conditions[0]
            for condition in conditions[1:]:
                combined = (combined & condition) if match == "all" else (combined | condition)
            view = view.match(combined)
    return view


# -- re-refine ---------------------------------------------------------------------------


def rerefine(
    collection: fo.core.collections.SampleCollection,
    field: str,
    *,
    threshold: float,
    band: float = 0.0,
    min_area: float = 0.0,
    progress: Callable[[float, str], None] | None = None,
) -> dict[str, Any]:
    """Recompute masks from each sample's stored attention with other parameters and
    write them to a NEW Segmentation field (plus `<field>_quality`, `_mask_area`,
    `_class_areas`), so both can be compared in the App. Masks go to
    `<media_dir>/refined/<field>/`. Returns counts and mean foreground shares."""
    from ..refine import rethreshold

    dataset = collection._dataset
    raise_if(check_new_field(dataset, field))
    for name, value in (("threshold", threshold), ("band", band), ("min_area", min_area)):
        raise_if(check_fraction(name, value, allow_none=False))
    classes = dataset_classes(dataset)
    class_ids = {c.name: c.id for c in classes}
    id_names = {c.id: c.name for c in classes}
    schema = dataset.get_field_schema()
    attention_fields = {c.name: c.attention_field for c in classes if c.attention_field in schema}
    out_dir = Path(diffumask_info(dataset)["media_dir"]) / REFINED_DIR / field
    out_dir.mkdir(parents=True, exist_ok=True)
    quality_field, area_field, class_areas_field = companion_fields(field)

    view = collection.select_fields([*attention_fields.values(), "metadata", "index", "mask_area"])
    total = len(view)
    updates: dict[str, dict[str, Any]] = {
        field: {},
        quality_field: {},
        area_field: {},
        class_areas_field: {},
    }
    before, after, skipped = [], [], 0
    for position, sample in enumerate(view.iter_samples(progress=False)):
        attention = {
            name: heatmap.get_map().astype(np.float32)
            for name, path in attention_fields.items()
            if (heatmap := sample[path]) is not None
        }
        if not attention:
            skipped += 1
            continue
        size = (sample.metadata.height, sample.metadata.width)
        mask, quality, chain = rethreshold(
            attention, class_ids, float(threshold), float(band), float(min_area), size=size
        )
        path = out_dir / f"{sample_stem(sample['index'])}.png"
        _write_atomic(path, lambda tmp, m=mask: _save_mask(m, tmp))
        segmentation = fo.Segmentation(mask_path=str(path))
        segmentation["chain"] = chain
        labelled = float(np.count_nonzero((mask > 0) & (mask < 255))) / mask.size
        fractions = pixel_fractions(mask, id_names)
        updates[field][sample.id] = segmentation
        updates[quality_field][sample.id] = float(quality)
        updates[area_field][sample.id] = round(labelled, 6)
        updates[class_areas_field][sample.id] = {class_slug(n): v for n, v in fractions.items()}
        before.append(sample["mask_area"])
        after.append(labelled)
        if progress is not None and (position % 8 == 0 or position + 1 == total):
            progress((position + 1) / max(total, 1), f"re-refined {position + 1} of {total}")
    for name, values in updates.items():
        if values:
            dataset.set_values(name, values, key_field="id")
    targets = dict(dataset.mask_targets.get(GROUND_TRUTH) or dataset.default_mask_targets)
    dataset.mask_targets[field] = targets
    info = dict(dataset.info)
    refinements = dict(info[INFO_KEY].get("refinements", {}))
    refinements[field] = {
        "method": "threshold",
        "params": {"threshold": float(threshold), "band": float(band), "min_area": float(min_area)},
        "source": "stored attention",
    }
    info[INFO_KEY] = {**info[INFO_KEY], "refinements": refinements}
    dataset.info = info
    dataset.save()
    return {
        "field": field,
        "count": len(after),
        "skipped": skipped,
        "mean_mask_area_before": float(np.mean(before)) if before else 0.0,
        "mean_mask_area_after": float(np.mean(after)) if after else 0.0,
    }


# -- tag and exclude ---------------------------------------------------------------------


def tag_samples(
    collection: fo.core.collections.SampleCollection,
    tag: str = DEFAULT_BAD_TAG,
    *,
    below_quality: float | None = None,
    untag: bool = False,
) -> int:
    """Tag (or untag) the samples of `collection`; with `below_quality`, only those whose
    quality is below it. Returns how many samples were changed."""
    raise_if(check_tag(tag))
    raise_if(check_fraction("below_quality", below_quality))
    view = collection.view()
    if below_quality is not None:
        view = view.match(F("quality") < float(below_quality))
    if untag:
        view = view.match_tags(tag)
        count = len(view)
        view.untag_samples(tag)
    else:
        view = view.match_tags(tag, bool=False)
        count = len(view)
        view.tag_samples(tag)
    return count


def exclude_tagged(collection, tag: str = DEFAULT_BAD_TAG) -> fo.DatasetView:
    """The view of `collection` without the samples tagged `tag`."""
    raise_if(check_tag(tag))
    return collection.match_tags(tag, bool=False)


# -- statistics ---------------------------------------------------------------------------


def class_statistics(
    collection: fo.core.collections.SampleCollection, mask_field: str = GROUND_TRUTH
) -> list[dict[str, Any]]:
    """The class rows of `statistics.dataset_statistics` over the collection (the figures
    and keys of `diffumask info` and the dataset card), for the classes it has: samples
    naming the class, samples where its mask has pixels, its share of all pixels, its
    area where it shows (mean, min, max) and the mean quality of the samples naming it.
    Read from the areas the importer (or the re-refine operator) stored, not the masks."""
    dataset = collection._dataset
    if mask_field not in mask_fields(dataset):
        raise_unknown_mask_field(dataset, mask_field)
    quality_field, _, class_areas_field = companion_fields(mask_field)
    ignore_field = "ignore_area" if mask_field == GROUND_TRUTH else None
    fields = ["classes.classifications.label", quality_field, class_areas_field]
    fields += ["metadata.width", "metadata.height"]
    values = collection.values(fields + ([ignore_field] if ignore_field else []))
    named, qualities, areas, widths, heights = values[:5]
    ignored = values[5] if ignore_field else [0.0] * len(named)
    classes = dataset_classes(dataset)
    figures = []
    for i in range(len(named)):
        size = (int(widths[i] or 1), int(heights[i] or 1))
        total = float(size[0] * size[1])
        shares = {c.id: (areas[i] or {}).get(c.slug, 0.0) for c in classes}
        pixels = {class_id: share * total for class_id, share in shares.items() if share}
        pixels[IGNORE] = float(ignored[i] or 0.0) * total
        pixels[0] = max(0.0, total - sum(pixels.values()))
        figures.append(MaskFigures(named[i] or [], qualities[i], pixels, size))
    stats = dataset_statistics(figures, {c.id: c.name for c in classes})
    return class_rows(stats)


# -- export ---------------------------------------------------------------------------


@dataclass
class _RecordSource:
    index: int
    image_path: str
    mask_path: str
    prompt: str
    seed: int
    classes: list[str]
    quality: float

    def load(self) -> Record:
        with Image.open(self.image_path) as image:
            rgb = image.convert("RGB")
        with Image.open(self.mask_path) as mask:
            ids = np.asarray(mask, dtype=np.uint8)
        return Record(self.index, rgb, ids, self.prompt, self.seed, self.classes, self.quality)


def view_records(collection, mask_field: str = GROUND_TRUTH) -> list[_RecordSource]:
    """One entry per sample with a mask in `mask_field`; `.load()` reads its files (so
    an export holds one image in memory at a time)."""
    quality_field, _, _ = companion_fields(mask_field)
    fields = [
        "index",
        "filepath",
        f"{mask_field}.mask_path",
        "prompt",
        "seed",
        "classes.classifications.label",
        quality_field,
    ]
    index, paths, masks, prompts, seeds, labels, qualities = collection.values(fields)
    return [
        _RecordSource(
            index=int(index[i]),
            image_path=paths[i],
            mask_path=masks[i],
            prompt=prompts[i] or "",
            seed=int(seeds[i] or 0),
            classes=list(labels[i] or []),
            quality=float(qualities[i] if qualities[i] is not None else 0.0),
        )
        for i in range(len(index))
        if masks[i] is not None  # a sample the re-refinement skipped has no mask there
    ]


def export_view(
    collection,
    format: str,
    dest: str | os.PathLike,
    *,
    mask_field: str = GROUND_TRUTH,
    val_fraction: float = 0.1,
    overwrite: bool = False,
    progress: bool = False,
):
    """Export the collection (e.g. the current view, bad samples excluded) with the
    project's VOC or COCO exporter, using `mask_field`'s masks."""
    dataset = collection._dataset
    if format not in EXPORT_FORMATS:
        raise DiffuMaskError(
            f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}"
        )
    if mask_field not in mask_fields(dataset):
        raise_unknown_mask_field(dataset, mask_field)
    raise_if(check_export_destination(dataset, str(dest), overwrite))
    sources = view_records(collection, mask_field)
    if not sources:
        raise DiffuMaskError("the view holds no samples with masks; nothing to export")
    class_names = {c.id: c.name for c in dataset_classes(dataset)}
    common = dict(
        val_fraction=val_fraction,
        overwrite=overwrite,
        total=len(sources),
        progress=progress,
        source=Path(diffumask_info(dataset)["media_dir"]),
    )
    records = (source.load() for source in sources)
    if format == "voc":
        from ..export.voc import export_voc

        return export_voc(records, class_names, dest, **common)
    from ..export.coco import export_coco

    return export_coco(records, class_names, dest, **common)
