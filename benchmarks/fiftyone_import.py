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

# the working tree's package, not an installed copy, and the tests' synthetic stores
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_store(path: Path, count: int, size: int):
    """The FiftyOne tests' synthetic store (a soft blob per class, the mask cut at 0.5),
    made once per folder."""
    from fiftyone_data import make_store as make_synthetic_store

    from diffumask_datasets.store import open_store

    if (path / "manifest.json").is_file():
        return open_store(path)
    # what generation stores by default
    return make_synthetic_store(path, count, size, shard_size=256, attention_size=max(8, size // 8))


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
