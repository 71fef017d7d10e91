"""The paper's ablation on the shapes world: what splicing and noise learning are worth.

One pool of N generated single-object samples (`builtin:shapes`, affinity masks with the
default ignore band) is generated once and cached as a store under --work. Every row trains
the library's segmenter (diffumask_datasets.quality, the one `evaluate` and `clean` use)
on a variant of the pool and tests it on held-out rendered scenes with one or two objects:

    exact masks      the pool's images, masks read off their pixels (the ceiling for masks)
    rendered         N rendered scenes with exact masks (the "real" training set)
    none             the pool as generated (our masks)
    + splicing       the same, half of each batch spliced into 2x2 mosaics on the fly
    + NL keep F      noise learning: 3-fold consistency, the top F kept (0.7, 0.5, 0.3)
    + NL 0.7 + spl.  both
    quality 0.7      the top 70% by the training-free quality score (the filter we had)

and again with a quarter of the masks corrupted (each replaced by another sample's object
mask, relabelled as its own class). Reported: test mIoU, synthetic_over_real (row /
rendered), mask efficiency (row / exact masks), seconds; the Spearman correlation of
consistency and of the quality score with each sample's object IoU against the exact mask;
the share of corrupted samples each filter prunes.

Each row is saved to --work/rows.json as soon as it is done, so a restart resumes.

    python benchmarks/shapes_ablation.py --work runs/shapes-ablation   # ~40 min, 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes_quality import (  # noqa: E402
    object_iou,
    reference_mask,
    single_object_prompts,
)

from diffumask_datasets import shapes_world as sw  # noqa: E402

FOLDS = 3


# ---------------------------------------------------------------- the pool, cached
def load_pool(work: Path, n: int, seed: int, steps: int, guidance: float, batch: int):
    """N generated samples as a store under work/pool (generated on the first run)."""
    from diffumask_datasets.store import MANIFEST, open_store

    path = work / f"pool-{n}-seed{seed}-steps{steps}"
    if not (path / MANIFEST).is_file():
        from diffumask_datasets import DiffuMask
        from diffumask_datasets.definitions import load_definition
        from diffumask_datasets.store import Record, make_manifest, write_store

        start = time.time()
        prompts = single_object_prompts(n, seed)
        samples = DiffuMask("builtin:shapes")(
            [p for p, _, _ in prompts],
            classes=[[s] for _, s, _ in prompts],
            seed=seed,
            num_inference_steps=steps,
            guidance_scale=guidance,
            class_ids=sw.CLASS_IDS,
            refinement={"method": "affinity", "affinity_factor": 1},
            batch_size=batch,
        )
        config = {"n": n, "seed": seed, "steps": steps, "guidance": guidance}
        manifest = make_manifest(load_definition("shapes"), config, json.dumps(config), n, 64, 16)
        manifest["generation_seconds"] = round(time.time() - start, 1)
        write_store(path, (Record.from_sample(i, s, 16) for i, s in enumerate(samples)), manifest)
    return open_store(path)


def corrupt(masks: list[np.ndarray], classes: list[int], share: float, seed: int):
    """A copy of masks where `share` of them are replaced by another sample's object mask,
    relabelled as their own class (ignore pixels kept); returns (masks, corrupted ids)."""
    rng = np.random.default_rng(seed)
    n = len(masks)
    chosen = sorted(rng.choice(n, size=round(share * n), replace=False).tolist())
    out = [m.copy() for m in masks]
    for i in chosen:
        j = int(rng.integers(n - 1))
        j += j >= i
        other = masks[j]
        out[i] = np.where(other == 255, 255, np.where(other > 0, classes[i], 0)).astype(np.uint8)
    return out, chosen


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


# ---------------------------------------------------------------- rows
class Rows:
    """Rows of results, saved after each (resume skips rows already there)."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def __getitem__(self, key: str):
        return self.data[key]

    def put(self, key: str, value) -> None:
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/shapes-ablation"))
    parser.add_argument("--train-images", type=int, default=256)
    parser.add_argument("--test-scenes", type=int, default=256)
    # 32x32, 1200 steps, the small FCN: what 22 trainings on 2 shared cores allow in ~40
    # minutes (the small SegFormer learnt only background and circles in that budget)
    parser.add_argument("--segmenter", default="builtin:fcn")
    parser.add_argument("--train-steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--corrupt", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--report-only", action="store_true", help="print the table of the rows done so far"
    )
    args = parser.parse_args(argv)

    import torch

    from diffumask_datasets.quality import TrainSettings, consistency_scores, train_segmenter
    from diffumask_datasets.quality.clean import choose_kept
    from diffumask_datasets.quality.data import LabelledSet
    from diffumask_datasets.quality.evaluate import score_segmenter

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = Rows(args.work / "rows.json")
    settings = TrainSettings(
        steps=args.train_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        size=args.size,
        seed=args.seed,
        segmenter=args.segmenter or None,
    )
    if not args.report_only:
        rows.put(
            "settings",
            {**vars(args), "work": str(args.work), "segmenter": settings.to_dict()},
        )

    start = time.time()
    pool = load_pool(args.work, args.train_images, args.seed + 1, args.steps, args.guidance, 16)
    records = list(pool.records())
    images = [r.image for r in records]
    ours = [r.mask for r in records]
    class_of = [sw.CLASS_IDS[r.classes[0]] for r in records]
    exact = [reference_mask(r.image, r.classes[0]) for r in records]
    quality = np.array([r.quality for r in records])
    real = sw.sample_scenes(args.train_images, seed=args.seed + 2, count=1)
    rng = np.random.default_rng(args.seed + 3)
    test_scenes = [sw.random_scene(rng, count=1 + i % 2) for i in range(args.test_scenes)]
    from PIL import Image

    names = {0: "background", **{i: s for s, i in sw.CLASS_IDS.items()}}
    test = LabelledSet(
        [Image.fromarray(s.image) for s in test_scenes],
        [s.mask for s in test_scenes],
        names,
        "test",
    )
    corrupted_masks, corrupted = corrupt(ours, class_of, args.corrupt, args.seed + 4)
    rows.put(
        "pool",
        {
            "seconds_generate": pool.manifest.get("generation_seconds"),
            "seconds_load": round(time.time() - start, 1),
            "corrupted": corrupted,
        },
    )

    def train_row(key: str, label: str, imgs, masks, splice: bool = False, extra=None, **change):
        if key in rows or args.report_only:
            return
        began = time.time()
        run = TrainSettings(**{**settings.to_dict(), "splice": splice, **change})
        segmenter = train_segmenter(imgs, masks, 5, run, desc=key)
        score = score_segmenter(segmenter, test)
        rows.put(key, {"label": label, "miou": score.miou, "per_class": score.per_class,
                       "images": len(imgs), "seconds": round(time.time() - began, 1),
                       **(extra or {})})  # fmt: skip
        print(f"{key:<28}{score.miou:.3f}  ({time.time() - began:.0f} s)", flush=True)

    def consistency(condition: str, masks, known: bool = False):
        # known: the held-out prediction limited to background and the prompt's class
        # (consistency_scores(known_classes=True)); without: free among all (the default)
        key = f"consistency{'-known' if known else ''}/{condition}"
        if key not in rows and args.report_only:
            return np.zeros(len(images))
        if key not in rows:
            began = time.time()
            scores = consistency_scores(
                images, masks, [[c] for c in class_of], 5, FOLDS, settings, True, known
            )
            rows.put(key, {"scores": scores.tolist(), "seconds": round(time.time() - began, 1)})
        return np.array(rows[key]["scores"])

    def subset(idx, masks):
        return [images[i] for i in idx], [masks[i] for i in idx]

    everyone = np.ones(len(images), dtype=bool)

    def filtered(condition: str, masks, keep: float, splice: bool = False, known=False):
        kept = choose_kept(consistency(condition, masks, known), everyone, keep)
        pruned = sorted(set(corrupted) - set(kept.tolist())) if condition != "clean" else []
        key = f"{condition}/nl{'k' if known else ''}-{keep}" + ("+splice" if splice else "")
        label = f"+ noise learning{' (known classes)' if known else ''}, keep {keep}"
        label += " + splicing" if splice else ""
        extra = {"corrupted_pruned": len(pruned)}
        train_row(key, label, *subset(kept, masks), splice=splice, extra=extra)

    def by_quality(condition: str, masks):
        kept = choose_kept(quality, everyone, 0.7)
        pruned = sorted(set(corrupted) - set(kept.tolist())) if condition != "clean" else []
        train_row(f"{condition}/quality-0.7", "quality score, keep 0.7",
                  *subset(kept, masks), extra={"corrupted_pruned": len(pruned)})  # fmt: skip

    # The rows the goals need first (a run cut short still answers them), then the rest.
    train_row("rendered", "rendered scenes, exact masks",
              [Image.fromarray(s.image) for s in real], [s.mask for s in real])  # fmt: skip
    train_row("exact", "generated images, exact masks", images, exact)
    train_row("clean/none", "our masks", images, ours)
    train_row("corrupted/none", "our masks", images, corrupted_masks)
    filtered("corrupted", corrupted_masks, 0.7)
    consistency("clean", ours)
    filtered("clean", ours, 0.7)
    train_row("clean/splice", "+ splicing", images, ours, splice=True)
    filtered("clean", ours, 0.7, splice=True)
    by_quality("corrupted", corrupted_masks)
    filtered("clean", ours, 0.5)
    filtered("clean", ours, 0.3)
    train_row("corrupted/splice", "+ splicing", images, corrupted_masks, splice=True)
    filtered("corrupted", corrupted_masks, 0.5)
    filtered("corrupted", corrupted_masks, 0.3)
    filtered("corrupted", corrupted_masks, 0.7, splice=True)
    by_quality("clean", ours)
    # the library's default segmenter (the small SegFormer) in the same budget
    train_row("rendered/segformer", "rendered scenes, small SegFormer",
              [Image.fromarray(s.image) for s in real], [s.mask for s in real],
              segmenter=None)  # fmt: skip
    # consistency with the prediction limited to the classes the prompt names
    filtered("corrupted", corrupted_masks, 0.7, known=True)
    filtered("clean", ours, 0.7, known=True)

    # rankings: each sample's object IoU (its mask against the exact one)
    rankings = {}
    for condition, masks in (("clean", ours), ("corrupted", corrupted_masks)):
        iou = np.array(
            [object_iou(m, e, c) for m, e, c in zip(masks, exact, class_of, strict=True)]
        )
        drawn = np.array([(e > 0).sum() >= 20 for e in exact])
        entry = {"quality": spearman(quality[drawn], iou[drawn])}
        for name in ("consistency", "consistency-known"):
            if f"{name}/{condition}" in rows:
                scores = np.array(rows[f"{name}/{condition}"]["scores"])
                entry[name] = spearman(scores[drawn], iou[drawn])
        rankings[condition] = entry
    rows.put("rankings", rankings)
    report(rows, len(corrupted))
    return rows.data


def report(rows: Rows, corrupted: int) -> None:
    real = rows["rendered"]["miou"] if "rendered" in rows else float("nan")
    exact = rows["exact"]["miou"] if "exact" in rows else float("nan")
    print(f"rendered {real:.3f}  exact masks {exact:.3f}  (exact/rendered {exact / real:.3f})")
    print("| masks | training set | images | test mIoU | synthetic/real | efficiency | seconds |")
    print("|---|---|---|---|---|---|---|")
    for key, row in rows.data.items():
        if "/" not in key or key.startswith("consistency") or "miou" not in row:
            continue
        condition = key.split("/")[0]
        pruned = row.get("corrupted_pruned")
        label = row["label"] + (
            f" (prunes {pruned}/{corrupted} corrupted)"
            if condition == "corrupted" and pruned is not None
            else ""
        )
        print(
            f"| {condition} | {label} | {row['images']} | {row['miou']:.3f} | "
            f"{row['miou'] / real:.3f} | {row['miou'] / exact:.3f} | {row['seconds']:.0f} |"
        )
    for condition, entry in rows.data.get("rankings", {}).items():
        cells = ", ".join(f"{k} {v:.3f}" for k, v in entry.items())
        print(f"Spearman with object IoU ({condition}): {cells}")


if __name__ == "__main__":
    main()
