"""The DiffuMask FiftyOne plugin: operators for looking at synthetic masks.

Install with `diffumask plugin install` (links this folder into FIFTYONE_PLUGINS_DIR).
Every operator works on a dataset loaded by `diffumask_datasets.fiftyone.to_fiftyone`
or `DiffuMaskDataset`; the work is done by `diffumask_datasets.fiftyone.ops`, so it can
be scripted too. Forms check their inputs as they are typed (thresholds and areas in
[0, 1], known classes, new field names, export destinations) and say what to fix.
"""

from __future__ import annotations

from typing import Any

import fiftyone.operators as foo
import fiftyone.operators.types as types

from diffumask_datasets.errors import DiffuMaskError
from diffumask_datasets.fiftyone import ops


def _invalidate(prop: types.Property, message: str | None) -> None:
    """Mark a form input invalid with `message` (shown under it; execution refused)."""
    if message:
        prop.invalid = True
        prop.error_message = message


def _no_dataset(ctx, inputs: types.Object) -> types.Property | None:
    """A notice instead of a form when the App's dataset is not a DiffuMask one."""
    try:
        ops.diffumask_info(ctx.dataset)
    except DiffuMaskError as error:
        notice = types.Error(label="Not a DiffuMask dataset", description=str(error))
        inputs.view("not_diffumask", notice)
        prop = types.Property(inputs)
        _invalidate(inputs.get_property("not_diffumask"), str(error))
        return prop
    return None


def _fraction_input(inputs: types.Object, ctx, name: str, label: str, about: str, default=None):
    prop = inputs.float(name, label=label, description=about, default=default, min=0.0, max=1.0)
    _invalidate(prop, ops.check_fraction(label, ctx.params.get(name, default)))
    return prop


def _mask_field_input(inputs: types.Object, dataset, label: str) -> types.Property:
    fields = ops.mask_fields(dataset)
    return inputs.enum("mask_field", fields, default=fields[0], label=label, view=types.Dropdown())


class FilterSamples(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="filter_samples",
            label="DiffuMask: filter samples",
            description="Show samples by quality, class and mask area",
            dynamic=True,
            risk_level="low",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        if (notice := _no_dataset(ctx, inputs)) is not None:
            return notice
        dataset = ctx.dataset
        params = ctx.params
        _fraction_input(inputs, ctx, "min_quality", "min quality", "Keep quality >= this")
        _fraction_input(inputs, ctx, "max_quality", "max quality", "Keep quality <= this")
        held_out = "Keep noise-learning consistency >= this (datasets made by diffumask clean)"
        _fraction_input(inputs, ctx, "min_consistency", "min consistency", held_out)
        classes = inputs.list(
            "classes",
            types.String(),
            label="classes",
            description=f"Named in the prompt; known: {', '.join(ops.present_classes(dataset))}",
        )
        _invalidate(classes, ops.check_classes(dataset, params.get("classes")))
        inputs.enum(
            "match",
            ["any", "all"],
            default="any",
            label="match",
            description="Samples naming any or all of these classes",
            view=types.RadioGroup(),
        )
        area = "Share of pixels with a class"
        _fraction_input(inputs, ctx, "min_mask_area", "min mask area", area)
        _fraction_input(inputs, ctx, "max_mask_area", "max mask area", area)
        each = "Each chosen class covers at least this share"
        _fraction_input(inputs, ctx, "min_class_area", "min class area", each)
        _mask_field_input(inputs, dataset, "mask field")
        hide = "Hide samples with this tag"
        inputs.str("exclude_tag", label="exclude tag", description=hide, default="")
        for low, high in (("min_quality", "max_quality"), ("min_mask_area", "max_mask_area")):
            message = ops.check_range(
                low.replace("_", " "), params.get(low), high.replace("_", " "), params.get(high)
            )
            _invalidate(inputs.get_property(high), message)
        return types.Property(inputs, view=types.View(label="Filter DiffuMask samples"))

    def execute(self, ctx):
        params = ctx.params
        view = ops.filter_view(
            ctx.dataset,
            min_quality=params.get("min_quality"),
            max_quality=params.get("max_quality"),
            min_consistency=params.get("min_consistency"),
            classes=params.get("classes") or None,
            match=params.get("match") or "any",
            min_mask_area=params.get("min_mask_area"),
            max_mask_area=params.get("max_mask_area"),
            min_class_area=params.get("min_class_area"),
            mask_field=params.get("mask_field") or ops.GROUND_TRUTH,
            exclude_tag=params.get("exclude_tag") or None,
        )
        ctx.ops.set_view(view)
        return {"count": len(view), "total": len(ctx.dataset)}

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.int("count", label="samples shown")
        outputs.int("total", label="samples in the dataset")
        return types.Property(outputs)


class RerefineSamples(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="rerefine_samples",
            label="DiffuMask: re-refine masks",
            description="Recompute masks from the stored attention into a new field",
            dynamic=True,
            risk_level="medium",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        if (notice := _no_dataset(ctx, inputs)) is not None:
            return notice
        params = ctx.params
        inputs.view_target(ctx, action_description="Re-refine")
        higher = "Background level: higher keeps fewer pixels"
        _fraction_input(inputs, ctx, "threshold", "threshold", higher, 0.5)
        _fraction_input(inputs, ctx, "band", "band", "Uncertain band labelled 255", 0.0)
        _fraction_input(inputs, ctx, "min_area", "min area", "Drop smaller regions", 0.0)
        threshold = params.get("threshold", 0.5)
        default_field = _default_field(threshold)
        field = inputs.str(
            "field",
            label="new mask field",
            description="The generated masks stay in ground_truth; compare them in the App",
            default=default_field,
        )
        _invalidate(field, ops.check_new_field(ctx.dataset, params.get("field", default_field)))
        label = "Re-refine masks from stored attention"
        return types.Property(inputs, view=types.View(label=label))

    def execute(self, ctx):
        params = ctx.params
        threshold = params.get("threshold", 0.5)
        result = ops.rerefine(
            ctx.target_view(),
            params.get("field") or _default_field(threshold),
            threshold=threshold,
            band=params.get("band", 0.0),
            min_area=params.get("min_area", 0.0),
            progress=lambda share, label: ctx.set_progress(progress=share, label=label),
        )
        ctx.ops.reload_dataset()
        return result

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("field", label="new mask field")
        outputs.int("count", label="samples re-refined")
        outputs.int("skipped", label="samples without attention maps")
        outputs.float("mean_mask_area_before", label="mean mask area (ground_truth)")
        outputs.float("mean_mask_area_after", label="mean mask area (new field)")
        return types.Property(outputs)


def _default_field(threshold: Any) -> str:
    try:
        return f"refined_t{int(round(float(threshold) * 100)):03d}"
    except (TypeError, ValueError):
        return "refined"


class TagBadSamples(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="tag_bad_samples",
            label="DiffuMask: tag and exclude bad samples",
            description="Tag the selected samples (or those below a quality) and hide them",
            dynamic=True,
            risk_level="medium",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        if (notice := _no_dataset(ctx, inputs)) is not None:
            return notice
        params = ctx.params
        inputs.view_target(ctx, action_description="Tag", default_target="SELECTED_SAMPLES")
        tag = inputs.str("tag", label="tag", default=ops.DEFAULT_BAD_TAG)
        _invalidate(tag, ops.check_tag(params.get("tag", ops.DEFAULT_BAD_TAG)))
        below = "Only samples whose quality is below this"
        _fraction_input(inputs, ctx, "below_quality", "below quality", below)
        inputs.bool("untag", label="untag instead", default=False)
        inputs.bool("exclude", label="hide tagged samples", default=True)
        return types.Property(inputs, view=types.View(label="Tag and exclude bad samples"))

    def execute(self, ctx):
        params = ctx.params
        tag = params.get("tag") or ops.DEFAULT_BAD_TAG
        changed = ops.tag_samples(
            ctx.target_view(),
            tag,
            below_quality=params.get("below_quality"),
            untag=bool(params.get("untag", False)),
        )
        remaining = None
        if params.get("exclude", True):
            view = ops.exclude_tagged(ctx.dataset, tag)
            remaining = len(view)
            ctx.ops.set_view(view)
        else:
            ctx.ops.reload_samples()
        return {"changed": changed, "tag": tag, "remaining": remaining}

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.int("changed", label="samples changed")
        outputs.int("remaining", label="samples shown")
        return types.Property(outputs)


class ClassStatistics(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="class_statistics",
            label="DiffuMask: per-class mask statistics",
            description="Samples, pixel shares and quality per class",
            dynamic=True,
            risk_level="low",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        if (notice := _no_dataset(ctx, inputs)) is not None:
            return notice
        inputs.view_target(ctx, action_description="Summarise", allow_selected_samples=True)
        _mask_field_input(inputs, ctx.dataset, "mask field")
        return types.Property(inputs, view=types.View(label="Per-class mask statistics"))

    def execute(self, ctx):
        mask_field = ctx.params.get("mask_field") or ops.GROUND_TRUTH
        rows = ops.class_statistics(ctx.target_view(), mask_field)
        return {"mask_field": mask_field, "rows": rows}

    def resolve_output(self, ctx):
        outputs = types.Object()
        table = types.TableView()
        for key, label in (
            ("name", "class"),
            ("prompted_images", "samples naming it"),
            ("images_with_pixels", "samples with pixels"),
            ("mean_area", "mean area"),
            ("min_area", "min area"),
            ("max_area", "max area"),
            ("pixel_share", "share of all pixels"),
            ("mean_quality", "mean quality"),
        ):
            table.add_column(key, label=label)
        outputs.list("rows", types.Object(), label="per-class statistics", view=table)
        return types.Property(outputs)


class ExportView(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="export_view",
            label="DiffuMask: export to VOC or COCO",
            description="Write the current view as a VOC or COCO dataset",
            dynamic=True,
            risk_level="medium",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        if (notice := _no_dataset(ctx, inputs)) is not None:
            return notice
        params = ctx.params
        inputs.view_target(ctx, action_description="Export")
        formats = list(ops.EXPORT_FORMATS)
        inputs.enum("format", formats, default="voc", label="format", view=types.RadioGroup())
        where = "An absolute path on the server"
        dest = inputs.str("dest", label="destination folder", description=where, required=True)
        overwrite = params.get("overwrite", False)
        _invalidate(dest, ops.check_export_destination(ctx.dataset, params.get("dest"), overwrite))
        _mask_field_input(inputs, ctx.dataset, "masks from")
        val = inputs.float("val_fraction", label="val fraction", default=0.1, min=0.0, max=0.99)
        value = params.get("val_fraction", 0.1)
        if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
            _invalidate(val, f"val fraction {value!r} must lie in [0, 1)")
        inputs.bool("overwrite", label="replace a non-empty destination", default=False)
        return types.Property(inputs, view=types.View(label="Export to VOC or COCO"))

    def execute(self, ctx):
        params = ctx.params
        summary = ops.export_view(
            ctx.target_view(),
            params.get("format") or "voc",
            params["dest"],
            mask_field=params.get("mask_field") or ops.GROUND_TRUTH,
            val_fraction=params.get("val_fraction", 0.1),
            overwrite=bool(params.get("overwrite", False)),
        )
        ctx.ops.notify(summary.describe(), variant="success")
        return {
            "dest": str(summary.dest),
            "splits": {split: len(names) for split, names in summary.splits.items()},
            "summary": summary.describe(),
        }

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("summary", label="export")
        return types.Property(outputs)


OPERATORS = (FilterSamples, RerefineSamples, TagBadSamples, ClassStatistics, ExportView)


def register(p):
    for operator in OPERATORS:
        p.register(operator)
