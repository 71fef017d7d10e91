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


class _Operator(foo.Operator):
    """An operator of this plugin: its config from the class attributes below; its form
    (`form`) only where a DiffuMask dataset is open, a notice elsewhere."""

    NAME = ""
    LABEL = ""  # shown after "DiffuMask: " in the operator browser
    DESCRIPTION = ""
    RISK = "low"  # FiftyOne's risk level: low, medium

    @property
    def config(self):
        return foo.OperatorConfig(
            name=self.NAME,
            label=f"DiffuMask: {self.LABEL}",
            description=self.DESCRIPTION,
            dynamic=True,
            risk_level=self.RISK,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        if (notice := _no_dataset(ctx, inputs)) is not None:
            return notice
        return self.form(ctx, inputs)

    def form(self, ctx, inputs):
        """The operator's form on an open DiffuMask dataset."""
        raise NotImplementedError


class FilterSamples(_Operator):
    """Operator `filter_samples`: a view by quality range, classes named, mask area and
    per-class area, on `ground_truth` or a re-refined field."""

    NAME = "filter_samples"
    LABEL = "filter samples"
    DESCRIPTION = "Show samples by quality, class and mask area"
    RISK = "low"

    def form(self, ctx, inputs):
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


class RerefineSamples(_Operator):
    """Operator `rerefine_samples`: masks of the chosen samples recomputed from their stored
    attention with another threshold, band and minimum area, into a new field."""

    NAME = "rerefine_samples"
    LABEL = "re-refine masks"
    DESCRIPTION = "Recompute masks from the stored attention into a new field"
    RISK = "medium"

    def form(self, ctx, inputs):
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


class TagBadSamples(_Operator):
    """Operator `tag_bad_samples`: tag (or untag) the selected samples, or those below a
    quality, and hide them."""

    NAME = "tag_bad_samples"
    LABEL = "tag and exclude bad samples"
    DESCRIPTION = "Tag the selected samples (or those below a quality) and hide them"
    RISK = "medium"

    def form(self, ctx, inputs):
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


class ClassStatistics(_Operator):
    """Operator `class_statistics`: per class, samples naming it, samples with pixels, areas
    and mean quality."""

    NAME = "class_statistics"
    LABEL = "per-class mask statistics"
    DESCRIPTION = "Samples, pixel shares and quality per class"
    RISK = "low"

    def form(self, ctx, inputs):
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


class ExportView(_Operator):
    """Operator `export_view`: the current view exported to VOC or COCO with the package's
    exporters."""

    NAME = "export_view"
    LABEL = "export to VOC or COCO"
    DESCRIPTION = "Write the current view as a VOC or COCO dataset"
    RISK = "medium"

    def form(self, ctx, inputs):
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


class LabelSamples(_Operator):
    """Label the images of any dataset or view with a diffusion model's masks into a
    new Segmentation field (fiftyone.model.label_samples), its mask targets set."""

    NAME = "label_samples"
    LABEL = "label samples"
    DESCRIPTION = "Masks for the images of the dataset or view from a diffusion model"
    RISK = "medium"

    def resolve_input(self, ctx):
        # any image dataset, not only DiffuMask ones: no notice
        return self.form(ctx, types.Object())

    def form(self, ctx, inputs):
        from diffumask_datasets.fiftyone import model as fmodel

        params = ctx.params
        inputs.view_target(ctx, action_description="Label")
        inputs.str(
            "model",
            label="model",
            description="A built-in alias, a hub id or a local diffusers folder",
            default=fmodel.default_model(ctx.dataset),
        )
        classes = inputs.list(
            "classes", types.String(), label="classes", description="The classes to label"
        )
        if not params.get("classes"):
            _invalidate(classes, "name at least one class, e.g. dog")
        inputs.str(
            "prompt",
            label="prompt",
            description="Naming every class; empty: 'a photo of a dog and a cat'",
            default="",
        )
        from diffumask_datasets.label import DEFAULT_STRENGTH

        about = "Noise level (share of steps)"
        _fraction_input(inputs, ctx, "strength", "strength", about, DEFAULT_STRENGTH)
        inputs.int("steps", label="denoising steps", default=50, min=1)
        inputs.float("guidance", label="guidance scale", default=7.5)
        field = inputs.str("field", label="new mask field", default="diffumask")
        _invalidate(field, fmodel.check_label_field(ctx.dataset, params.get("field", "diffumask")))
        return types.Property(inputs, view=types.View(label="Label samples with DiffuMask"))

    def execute(self, ctx):
        from diffumask_datasets.fiftyone import model as fmodel

        params = ctx.params
        model = fmodel.DiffuMaskModel(
            params.get("model") or fmodel.default_model(ctx.dataset),
            classes=params["classes"],
            prompt=params.get("prompt") or None,
            strength=params.get("strength"),  # None: the default
            num_inference_steps=int(params.get("steps", 50)),
            guidance_scale=float(params.get("guidance", 7.5)),
        )
        field = params.get("field") or "diffumask"
        count = fmodel.label_samples(ctx.target_view(), model, field)
        ctx.ops.reload_dataset()
        return {"field": field, "count": count}

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("field", label="new mask field")
        outputs.int("count", label="samples labelled")
        return types.Property(outputs)


OPERATORS = (
    FilterSamples,
    RerefineSamples,
    TagBadSamples,
    ClassStatistics,
    ExportView,
    LabelSamples,
)


def register(p):
    """Register the DiffuMask operators with FiftyOne (called when the plugin loads)."""
    for operator in OPERATORS:
        p.register(operator)
