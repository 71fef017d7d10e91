"""Import speed into FiftyOne: DiffuMaskDataset vs FiftyOne's own ImageSegmentationDirectory.

Both import the same 1,000 images and masks from the same media folder (its data/ and
labels/ are the ImageSegmentationDirectory layout). Ours also brings one float heatmap
per class present, the class list, prompt, seed, model, quality, areas and the
refinement chain; FiftyOne's brings the mask only. The two imports alternate, each
into a fresh dataset, and the medians are compared. Writing the media folder from the
store happens once, before the timing, and is reported separately (later imports reuse
it). Also timed: `to_fiftyone(STORE)` with the media reused, and our importer driven
through FiftyOne's per-sample Sample API instead of the bulk insert, for reference.

    python benchmarks/fiftyone_import.py [--samples 1000] [--size 256] [--rounds 5]

Prints `ratio ours/fiftyone = R (goal <= 1.2)`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

# the working tree's package, not an installed copy
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def synthetic_records(count: int, size: int, attention_size: int, seed: int = 0):
    """Records shaped like generated ones: a soft blob per class, the mask cut at 0.5."""
    from diffumask_datasets.store import Record

    rng = np.random.default_rng(seed)
    ids = {"bird": 3, "dog": 12, "cat": 8}
    combos = [["bird"], ["dog"], ["cat"], ["bird", "dog"], ["dog", "cat"]]
    grid = np.mgrid[0:attention_size, 0:attention_size] / attention_size
    for index in range(count):
        classes = combos[index % len(combos)]
        attention = {}
        for name in classes:
            cy, cx = rng.uniform(0.3, 0.7, 2)
            radius = rng.uniform(0.1, 0.25)
            attention[name] = np.exp(
                -((grid[1] - cx) ** 2 + (grid[0] - cy) ** 2) / (2 * radius**2)
            ).astype(np.float32)
        up = np.stack(
            [
                np.asarray(
                    Image.fromarray(attention[n], "F").resize(
                        (size, size), Image.Resampling.BILINEAR
                    )
                )
                for n in classes
            ]
        )
        class_ids = np.array([ids[n] for n in classes], np.uint8)
        mask = np.where(up.max(0) > 0.5, class_ids[up.argmax(0)], 0).astype(np.uint8)
        image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        yield Record(
            index=index,
            image=image,
            mask=mask,
            prompt="a photo of a " + " and a ".join(classes),
            seed=index,
            classes=classes,
            quality=float(rng.uniform(0, 1)),
            attention=attention,
            meta={
                "model": "builtin:tiny-random",
                "num_inference_steps": 4,
                "guidance_scale": 7.5,
                "refinement": {
                    "method": "threshold",
                    "params": {"threshold": 0.5},
                    "chain": [{"step": "aggregate"}, {"step": "threshold", "value": 0.5}],
                },
            },
        )


def make_store(path: Path, count: int, size: int):
    from diffumask_datasets.definitions import load_definition
    from diffumask_datasets.store import make_manifest, open_store, write_store

    if (path / "manifest.json").is_file():
        return open_store(path)
    attention_size = max(8, size // 8)  # what generation stores by default
    manifest = make_manifest(
        load_definition("voc"),
        config={"benchmark": True, "count": count, "size": size},
        fingerprint=f"bench-{count}-{size}",
        num_samples=count,
        shard_size=256,
        attention_size=attention_size,
    )
    return write_store(path, synthetic_records(count, size, attention_size), manifest)


def timed(fn) -> float:
    start = time.perf_counter()
    dataset = fn()
    elapsed = time.perf_counter() - start
    dataset.delete()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=None, help="folder for the store and media")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="fo-import-bench-"))
    os.environ.setdefault("FIFTYONE_DATABASE_DIR", str(work / "db"))

    import fiftyone as fo

    from diffumask_datasets.fiftyone import (
        DiffuMaskDataset,
        DiffuMaskDatasetImporter,
        materialize,
        to_fiftyone,
    )

    start = time.perf_counter()
    store = make_store(work / f"store-{args.samples}-{args.size}", args.samples, args.size)
    print(
        f"store: {len(store)} samples of {args.size}x{args.size} in {store.path} "
        f"({time.perf_counter() - start:.1f} s to make)"
    )
    media = work / f"media-{args.samples}-{args.size}"
    start = time.perf_counter()
    materialize(store.path, media_dir=media, progress=False)
    print(f"media folder written once: {time.perf_counter() - start:.2f} s ({media})")

    def ours():
        return fo.Dataset.from_dir(str(media), dataset_type=DiffuMaskDataset, progress=False)

    def theirs():
        return fo.Dataset.from_dir(
            dataset_type=fo.types.ImageSegmentationDirectory,
            data_path=str(media / "data"),
            labels_path=str(media / "labels"),
            progress=False,
        )

    def ours_from_store():
        return to_fiftyone(store.path, media_dir=media, progress=False)

    def ours_per_sample():
        importer = DiffuMaskDatasetImporter(str(media))
        dataset = fo.Dataset()
        with importer:
            dataset.add_samples(
                (fo.Sample(filepath=p, metadata=m, **labels) for p, m, labels in importer),
                progress=False,
            )
        return dataset

    timed(theirs), timed(ours)  # warm-up: database connection, imports, file cache
    times: dict[str, list[float]] = {"ours": [], "fiftyone": [], "store": [], "per-sample": []}
    for round_ in range(args.rounds):
        order = [("ours", ours), ("fiftyone", theirs)]
        if round_ % 2:
            order.reverse()  # alternate who goes first
        for name, fn in order:
            times[name].append(timed(fn))
        times["store"].append(timed(ours_from_store))
        if round_ < 3:
            times["per-sample"].append(timed(ours_per_sample))

    medians = {name: statistics.median(values) for name, values in times.items()}
    n = args.samples
    print(f"samples: {n}, rounds: {args.rounds}, medians:")
    print(
        f"  fiftyone ImageSegmentationDirectory: {medians['fiftyone']:.3f} s "
        f"({n / medians['fiftyone']:.0f} samples/s)"
    )
    print(
        f"  DiffuMaskDataset from the media folder: {medians['ours']:.3f} s "
        f"({n / medians['ours']:.0f} samples/s)"
    )
    print(f"  to_fiftyone(store), media reused: {medians['store']:.3f} s")
    print(
        f"  our labels through the Sample API (not used; reference): {medians['per-sample']:.3f} s"
    )
    ratio = medians["ours"] / medians["fiftyone"]
    print(f"ratio ours/fiftyone = {ratio:.2f} (goal <= 1.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
