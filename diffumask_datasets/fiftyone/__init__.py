"""FiftyOne integration: look at generated samples, filter, re-threshold, export.

```python
from diffumask_datasets.fiftyone import to_fiftyone

ds = to_fiftyone("OUT")                 # a generated dataset folder (the store)
ds = to_fiftyone(hf_dataset)            # or a Hugging Face datasets.Dataset
session = fo.launch_app(ds)
```

Importing this package does not import fiftyone (the CLI imports it for `app` and
`plugin` only); `to_fiftyone`, `materialize` and `DiffuMaskDataset` import it on use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DiffuMaskError
from .media import is_media_dir
from .sources import materialize

if TYPE_CHECKING:  # pragma: no cover
    import fiftyone as fo

__all__ = ["to_fiftyone", "materialize", "DiffuMaskDataset", "DiffuMaskDatasetImporter"]


def __getattr__(name: str) -> Any:
    # the importer module imports fiftyone: load it only when asked for
    if name in ("DiffuMaskDataset", "DiffuMaskDatasetImporter"):
        from . import importer

        return getattr(importer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def to_fiftyone(
    source: Any,
    name: str | None = None,
    persistent: bool = False,
    media_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> fo.Dataset:
    """Load generated samples into a new FiftyOne dataset.

    Fields: `ground_truth` (Segmentation, mask targets from the definition, 255 =
    "ignore"), `attention_<class>` (Heatmap of the soft attention map in [0, 1], one per
    class present), `classes` (Classifications), `prompt`, `seed`, `model`, `quality`,
    `mask_area`, `ignore_area`, `class_areas`, `refinement` (method, parameters, chain),
    `index` (the sample's index in the store); in a dataset made by `diffumask clean`,
    `consistency`, and `held_out` (the held-out prediction, a Segmentation) evaluated
    against `ground_truth` by FiftyOne's `evaluate_segmentations` under the key
    `held_out` (see `diffumask_datasets.fiftyone.evaluation`).

    Args:
        source: a generated dataset folder, an opened Store, a `datasets.Dataset`, or a
            media folder written before
        name: the FiftyOne dataset name (default: generated)
        persistent: keep the dataset in the database after the process exits
        media_dir: where images, masks and maps are written (once; reused later)
        overwrite: replace an existing FiftyOne dataset of the same name
        progress: show progress bars (default: on)
    """
    import fiftyone as fo

    from .evaluation import add_held_out, has_held_out
    from .importer import DiffuMaskDatasetImporter

    if name is not None and fo.dataset_exists(name) and not overwrite:
        raise DiffuMaskError(
            f"FiftyOne dataset {name!r} already exists; pass overwrite=True to replace it, "
            f"or fo.load_dataset({name!r}) to open it"
        )
    index = materialize(source, media_dir=media_dir, progress=progress)
    importer = DiffuMaskDatasetImporter(dataset_dir=str(index.root))
    importer.index = index
    dataset = fo.Dataset.from_importer(
        importer, name=name, persistent=persistent, overwrite=overwrite, progress=progress
    )
    store_dir = _store_dir(source)
    if store_dir is not None and has_held_out(store_dir):
        add_held_out(dataset, store_dir)
    return dataset


def _store_dir(source: Any) -> Path | None:
    """The folder of a store given as a path or an opened Store, else None."""
    if isinstance(source, (str, os.PathLike)) and not is_media_dir(source):
        return Path(source)
    if hasattr(source, "records") and hasattr(source, "manifest"):
        return Path(source.path)
    return None
