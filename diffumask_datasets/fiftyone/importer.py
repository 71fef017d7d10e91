"""`DiffuMaskDataset`: a FiftyOne dataset type for generated DiffuMask datasets.

```python
import fiftyone as fo
from diffumask_datasets.fiftyone import DiffuMaskDataset

ds = fo.Dataset.from_dir("OUT", dataset_type=DiffuMaskDataset)   # a generated store
ds = fo.Dataset.from_dir("MEDIA", dataset_type=DiffuMaskDataset) # or its media folder
```

A store folder is first written out as a media folder (see `media.py`, once; later
imports reuse it); the importer then reads the media folder's index.

Fields of each sample: `ground_truth` (Segmentation, mask on disk), one Heatmap per
class present (`attention_<class>`, float map in [0, 1] at the stored resolution),
`classes` (Classifications), `prompt`, `seed`, `model`, `quality`, `mask_area`,
`ignore_area`, `class_areas` (class -> share of pixels), `refinement` (method,
parameters and chain), `index`, plus `negative_prompt`, `num_inference_steps`,
`guidance_scale` when recorded, and `consistency`, `combined_score` and (with `--relabel`)
`agreement` in a dataset made by `diffumask clean`.

The importer is both a `LabeledImageDatasetImporter` (iterate it to get
`(image_path, metadata, labels)` tuples) and a `BatchDatasetImporter`: `from_dir` inserts
the sample documents in bulk, which is what makes importing as fast as FiftyOne's own
`ImageSegmentationDirectory` importer despite six labels per sample instead of one. The
test suite checks that both paths give identical documents.
"""

from __future__ import annotations

import os
import random
from datetime import datetime, timezone
from typing import Any

import fiftyone as fo
import fiftyone.core.odm as foo
import fiftyone.types as fot
import fiftyone.utils.data as foud
from bson import ObjectId

from ..errors import DiffuMaskError
from .media import MediaIndex, MediaSample, is_media_dir, load_attention, read_media
from .sources import materialize

GROUND_TRUTH = "ground_truth"
ATTENTION_PREFIX = "attention_"
CLASSES_FIELD = "classes"
INFO_KEY = "diffumask"
HEATMAP_RANGE = [0.0, 1.0]
SCALAR_FIELDS = {
    "index": fo.IntField,
    "prompt": fo.StringField,
    "seed": fo.IntField,
    "model": fo.StringField,
    "quality": fo.FloatField,
    # noise learning's score (`diffumask clean`): set on the samples of a cleaned dataset
    "consistency": fo.FloatField,
    # the rank average of consistency and quality (`diffumask clean`, see quality/clean.py)
    "combined_score": fo.FloatField,
    # agreement with a re-labelling of the image (`diffumask clean --relabel`)
    "agreement": fo.FloatField,
    "mask_area": fo.FloatField,
    "ignore_area": fo.FloatField,
    "negative_prompt": fo.StringField,
    "num_inference_steps": fo.IntField,
    "guidance_scale": fo.FloatField,
}
DICT_FIELDS = ("class_areas", "refinement")


def attention_field(slug: str) -> str:
    """The FiftyOne field name of a class's attention heatmap (`attention_<slug>`)."""
    return ATTENTION_PREFIX + slug


def dataset_info(index: MediaIndex) -> dict[str, Any]:
    """What the plugin needs later: where the media are and how classes map to fields.
    Lists of records rather than dicts keyed by class name: names may hold dots."""
    return {
        "media_dir": str(index.root),
        "source": index.source,
        "fingerprint": index.fingerprint,
        "name": index.name,
        "classes": [
            {"id": i, "name": name, "slug": slug, "attention_field": attention_field(slug)}
            for (i, name), slug in zip(
                index.class_names.items(), index.class_slugs.values(), strict=True
            )
        ],
    }


def check_files(index: MediaIndex) -> None:
    """Raise a DiffuMaskError naming the first file of the media folder that is missing."""
    missing = index.missing_files()
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DiffuMaskError(
            f"missing file {missing[0]}{more} in media folder {index.root}; regenerate it "
            "with to_fiftyone(<the generated dataset folder>, media_dir=...)"
        )


class DiffuMaskDatasetImporter(foud.LabeledImageDatasetImporter, foud.BatchDatasetImporter):
    """Imports a generated store folder or a DiffuMask media folder.

    Args:
        dataset_dir: a generated dataset folder (store) or a media folder
        media_dir (None): where a store's media are written (default: a folder under
            FiftyOne's dataset directory, one per store fingerprint); ignored for a
            media folder
        shuffle (False), seed (None), max_samples (None): as for every FiftyOne importer
        progress (None): progress bar while writing media
    """

    def __init__(
        self,
        dataset_dir: str | None = None,
        media_dir: str | None = None,
        shuffle: bool = False,
        seed: int | None = None,
        max_samples: int | None = None,
        progress: bool | None = None,
    ):
        if dataset_dir is None:
            raise DiffuMaskError("DiffuMaskDataset needs dataset_dir: a generated dataset folder")
        super().__init__(
            dataset_dir=dataset_dir, shuffle=shuffle, seed=seed, max_samples=max_samples
        )
        self.media_dir = media_dir
        self.progress = progress
        self.index: MediaIndex | None = None
        self._samples: list[MediaSample] = []
        self._iter = iter(())

    # -- setup ----------------------------------------------------------------------

    def setup(self) -> None:
        if self.index is None:
            self.index = open_media(self.dataset_dir, self.media_dir, progress=self.progress)
        check_files(self.index)
        self._samples = self._preprocess_list(list(self.index.samples))

    def __len__(self) -> int:
        return len(self._samples)

    def __iter__(self):
        self._iter = iter(self._samples)
        return self

    @property
    def has_dataset_info(self) -> bool:
        return True

    @property
    def has_image_metadata(self) -> bool:
        return True

    @property
    def label_cls(self):
        return None  # labels plus scalar fields; the schema is declared in import_samples

    def get_dataset_info(self) -> dict[str, Any]:
        targets = self.index.mask_targets
        return {
            "mask_targets": {GROUND_TRUTH: targets},
            "default_mask_targets": targets,  # re-refined mask fields get them too
            "classes": {CLASSES_FIELD: list(self.index.class_names.values())},
            INFO_KEY: dataset_info(self.index),
        }

    # -- per-sample path (LabeledImageDatasetImporter) --------------------------------

    def __next__(self):
        sample = next(self._iter)
        index = self.index
        labels: dict[str, Any] = {
            GROUND_TRUTH: fo.Segmentation(mask_path=index.path(sample.mask)),
            CLASSES_FIELD: fo.Classifications(
                classifications=[fo.Classification(label=name) for name in sample.classes]
            ),
        }
        slugs = index.class_slugs
        for name, array in load_attention(index, sample).items():
            labels[attention_field(slugs[name])] = fo.Heatmap(map=array, range=HEATMAP_RANGE)
        labels.update(_scalars(sample))
        return index.path(sample.image), _metadata(sample), labels

    # -- bulk path (BatchDatasetImporter) ---------------------------------------------

    def import_samples(self, dataset, tags=None, progress=None) -> list[str]:
        index = self.index
        if dataset.media_type is None:
            dataset.media_type = "image"
        declare_schema(dataset, index)
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        dataset_id = dataset._doc.id  # as FiftyOne's own bulk importers do
        slugs = index.class_slugs
        tags = list(tags or [])

        def documents():
            for sample in self._samples:
                yield sample_document(index, sample, slugs, dataset_id, now, tags)

        ids = foo.insert_documents(
            documents(),
            dataset._sample_collection,
            ordered=True,
            progress=progress,
            num_docs=len(self._samples),
        )
        foud.parse_dataset_info(dataset, self.get_dataset_info())
        if dataset.app_config.active_fields is None:
            # the grid opens with masks over the images and the class tags
            dataset.app_config.active_fields = fo.ActiveFields(paths=[GROUND_TRUTH, CLASSES_FIELD])
        if dataset.app_config.color_scheme is None:
            # one colour per class rather than one per field: bird and dog differ
            dataset.app_config.color_scheme = fo.ColorScheme(color_by="value")
        dataset.save()
        return [str(i) for i in ids]


def open_media(
    path: str | os.PathLike,
    media_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> MediaIndex:
    """A media folder as is, or a store folder written out as media (reused if there)."""
    if is_media_dir(path):
        return read_media(path)
    return materialize(path, media_dir=media_dir, progress=progress)


def declare_schema(dataset, index: MediaIndex) -> None:
    """Declare every field up front, so bulk-inserted documents match the schema
    (a heatmap field only for classes that have a map somewhere)."""
    slugs = index.class_slugs
    # a recorded-only field (negative prompt, consistency, ...) only where a sample has
    # it, as FiftyOne's own sample path would add it
    present = {name for name in SCALAR_FIELDS if name not in SCALAR_TYPES} | {
        key for sample in index.samples for key, v in sample.extra.items() if v is not None
    }
    embedded = {
        GROUND_TRUTH: fo.Segmentation,
        CLASSES_FIELD: fo.Classifications,
        **{attention_field(slugs[name]): fo.Heatmap for name in index.attention_classes},
    }
    wanted: dict[str, tuple[type, type | None]] = {
        **{name: (fo.EmbeddedDocumentField, doc_type) for name, doc_type in embedded.items()},
        **{name: (ftype, None) for name, ftype in SCALAR_FIELDS.items() if name in present},
        **{name: (fo.DictField, None) for name in DICT_FIELDS},
    }
    existing = dataset.get_field_schema()
    missing = {name: spec for name, spec in wanted.items() if name not in existing}
    if not missing:
        return
    merge = getattr(dataset, "_merge_sample_field_schema", None)
    if merge is None:  # pragma: no cover - one field at a time, as the public API does
        for name, (ftype, doc_type) in missing.items():
            dataset.add_sample_field(name, ftype, embedded_doc_type=doc_type)
        return
    # every field in one schema update: add_sample_field reloads the dataset each time
    merge(
        {
            name: foo.create_field(name, ftype, embedded_doc_type=doc_type)
            for name, (ftype, doc_type) in missing.items()
        }
    )


def _scalars(sample: MediaSample) -> dict[str, Any]:
    values = {
        "index": sample.index,
        "prompt": sample.prompt,
        "seed": sample.seed,
        "model": sample.model,
        "quality": float(sample.quality),
        "mask_area": float(sample.mask_area),
        "ignore_area": float(sample.ignore_area),
        "class_areas": dict(sample.class_areas),
        "refinement": sample.refinement,
    }
    for key, value in sample.extra.items():
        if key in SCALAR_FIELDS and value is not None:
            values[key] = SCALAR_TYPES[key](value)
    return values


SCALAR_TYPES = {
    "negative_prompt": str,
    "num_inference_steps": int,
    "guidance_scale": float,
    "consistency": float,
    "combined_score": float,
    "agreement": float,
}


def _metadata(sample: MediaSample):
    return fo.ImageMetadata(
        width=sample.width, height=sample.height, num_channels=3, mime_type="image/png"
    )


def _label(cls: str, **fields) -> dict[str, Any]:
    return {"_id": ObjectId(), "_cls": cls, "tags": [], **fields}


try:  # FiftyOne's own draw for the `_rand` field (used by `take`, `shuffle`)
    from fiftyone.core.odm.sample import _generate_rand as _rand
except ImportError:  # pragma: no cover - the same distribution, should the name move

    def _rand() -> float:
        return random.random() * 0.001 + 0.999


def sample_document(
    index: MediaIndex,
    sample: MediaSample,
    slugs: dict[str, str],
    dataset_id,
    now: datetime,
    tags: list[str],
) -> dict[str, Any]:
    """The BSON document FiftyOne would store for this sample (checked by the tests)."""
    doc: dict[str, Any] = {
        "filepath": index.path(sample.image),
        "tags": list(tags),
        "metadata": {
            "_cls": "ImageMetadata",
            "mime_type": "image/png",
            "width": sample.width,
            "height": sample.height,
            "num_channels": 3,
        },
        "created_at": now,
        "last_modified_at": now,
        "_media_type": "image",
        "_rand": _rand(),
        "_dataset_id": dataset_id,
        GROUND_TRUTH: _label("Segmentation", mask_path=index.path(sample.mask)),
        CLASSES_FIELD: {
            "_cls": "Classifications",
            "classifications": [_label("Classification", label=name) for name in sample.classes],
        },
    }
    for name, (offset, length) in sample.attention.items():
        # the media folder keeps maps in FiftyOne's array encoding: no work per map here
        doc[attention_field(slugs[name])] = _label(
            "Heatmap", map=index.attention_blob(offset, length), range=list(HEATMAP_RANGE)
        )
    doc.update(_scalars(sample))
    return doc


class DiffuMaskDataset(fot.LabeledImageDataset):
    """A generated DiffuMask dataset (store folder) or its media folder.

    `fo.Dataset.from_dir(DIR, dataset_type=DiffuMaskDataset, media_dir=None)`.
    """

    def get_dataset_importer_cls(self):
        return DiffuMaskDatasetImporter

    def get_dataset_exporter_cls(self):
        raise DiffuMaskError(
            "DiffuMaskDataset is import-only; export with the plugin's export operator or "
            "`diffumask export DIR --format voc|coco|hf`"
        )
