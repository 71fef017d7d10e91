"""Noise learning against known truth: how much of each kind of bad mask `clean` finds.

One store of N rendered shapes-world scenes (1 to 3 objects each, in turn; exact masks,
`shapes_world.scene_records`) is written once under --work. For each kind of bad mask
(diffumask_datasets.quality.corruptions: a mask from another image, a partial mask, a
bleeding mask, a missing class, swapped classes) and each share (10%, 25%), a copy of the
store has that share of its masks made bad (seeded; missing and swap pick among the
samples with two classes or more), and `clean_store` runs on it with the settings given
(by default the library's: what `diffumask clean STORE --to DEST` does). Reported per
kind and share:

    pruned@0.7, pruned@0.5   the share of the bad masks that keep 0.7 / 0.5 drops
    spearman                 each score's Spearman correlation with the sample's true
                             object IoU (mean over its classes of the IoU of its mask
                             against the exact one); consistency, and the scores combined
    seconds                  the clean's wall time (reading, K trainings, writing)

and, for the 25% stores, the paper's synthetic-to-real protocol in small (the shapes
benchmark's (b)): one segmenter trained on the cleaned store (keep 0.7), one on the bad
store as it is, tested on held-out rendered scenes; each as a ratio to the same segmenter
trained on the same store with its exact masks (`after_clean_over_exact`).

With --relabel MODEL, the re-labelling signal (quality/agreement.py) besides: the truth
store's images are labelled once by MODEL (the shapes definition's refinement), and per
kind and share the agreement of each (bad) mask with that re-labelling is scored alone
and combined with consistency (their rank average), with pruned@0.7/0.5, Spearman and,
for the 25% stores, the synthetic-to-real result after keeping the top 70% by each.

With --natural N, the errors no one put there: N images `builtin:shapes` (or
--natural-model) generated from prompts naming 2 and 3 shapes (or --natural-counts; the
shapes benchmark's (c) prompts), masks by the shapes definition's refinement, each drawn
object named by (c)'s shape classifier as its reference. `clean` runs on that store with
its defaults (it re-labels: the samples name their model), and each score's Spearman with
the sample's true object IoU is reported, with the mean true IoU of the samples each score
alone would keep at 0.7 against all of them, and of the samples `clean` kept (the ranking
after its rules: a mask showing no object is never kept).

Each result is saved to --work/noise.json as soon as it is done (a restart resumes; the
key names the clean settings, so runs with other settings add rows beside them).

    python benchmarks/noise.py --work runs/noise                       # defaults
    python benchmarks/noise.py --work runs/noise --kinds partial --shares 0.25 \\
        --segmenter builtin:fcn --train-steps 600 --size 64            # one setting
    python benchmarks/noise.py --work runs/noise --relabel builtin:shapes  # + agreement
    python benchmarks/noise.py --work runs/noise --natural 256 --kinds none  # natural errors
    python benchmarks/noise.py --work runs/noise --natural 192 --kinds none \
        --natural-model builtin:shapes-mmdit --natural-counts 1,2,3   # another model's
    python benchmarks/noise.py --work runs/noise --report-only --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes_ablation import Rows, spearman  # noqa: E402

from diffumask_datasets import shapes_world as sw  # noqa: E402
from diffumask_datasets.quality import corruptions  # noqa: E402

NUM_LABELS = 1 + len(sw.SHAPES)


def truth_store(work: Path, n: int, seed: int):
    """N rendered scenes with exact masks as a store under work (written on first use)."""
    from diffumask_datasets.definitions import load_definition
    from diffumask_datasets.store import MANIFEST, make_manifest, open_store, write_store

    path = work / f"scenes-{n}-seed{seed}"
    if not (path / MANIFEST).is_file():
        config = {"rendered": n, "seed": seed, "max_objects": sw.MAX_OBJECTS}
        manifest = make_manifest(load_definition("shapes"), config, json.dumps(config), n, 64, 16)
        write_store(path, sw.scene_records(n, seed, max_objects=sw.MAX_OBJECTS), manifest)
    return open_store(path)


def bad_store(work: Path, truth, records, masks: list[np.ndarray], name: str):
    """A copy of the truth store with `masks` in place of its own (rewritten each run)."""
    from diffumask_datasets.store import open_store, write_store

    path = work / "bad" / name
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    copies = []
    for record, mask in zip(records, masks, strict=True):
        copy = type(record)(**{**record.__dict__, "mask": mask})
        copies.append(copy)
    write_store(path, copies, truth.manifest)
    return open_store(path)


def object_iou(mask: np.ndarray, exact: np.ndarray, class_ids: list[int]) -> float:
    """Mean over the sample's classes of its mask's IoU with the exact mask (ignored
    pixels left out); the truth every score is ranked against."""
    from diffumask_datasets.quality.metrics import sample_iou

    return sample_iou(mask, exact, class_ids)


def pruned_share(scores: np.ndarray, bad: list[int], keep: float) -> float:
    from diffumask_datasets.quality.clean import choose_kept

    kept = set(choose_kept(scores, np.ones(len(scores), dtype=bool), keep).tolist())
    return sum(i not in kept for i in bad) / len(bad) if bad else float("nan")


def main(argv=None) -> dict:
    from diffumask_datasets.quality.clean import CLEAN_SETTINGS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/noise"))
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--test-scenes", type=int, default=256)
    parser.add_argument("--kinds", default=",".join(corruptions.KINDS))
    parser.add_argument("--shares", default="0.25,0.1")
    # the clean's settings; left out: the library's defaults (what `diffumask clean` does)
    parser.add_argument("--segmenter", default=CLEAN_SETTINGS.segmenter)
    parser.add_argument("--train-steps", type=int, default=CLEAN_SETTINGS.steps)
    parser.add_argument("--size", type=int, default=CLEAN_SETTINGS.size)
    parser.add_argument("--learning-rate", type=float, default=CLEAN_SETTINGS.learning_rate)
    parser.add_argument("--folds", type=int, default=3)
    # the synthetic-to-real segmenter: builtin:fcn at 32 px (the shapes ablation's, fewer steps)
    parser.add_argument("--eval-steps", type=int, default=600)
    parser.add_argument("--eval-size", type=int, default=32)
    parser.add_argument("--no-transfer", action="store_true", help="skip synthetic-to-real")
    parser.add_argument(
        "--transfer-only",
        action="store_true",
        help="only the synthetic-to-real trainings, waiting for the clean rows that another "
        "process (the same command without this flag and with --no-transfer) writes",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default=None, help="torch device; default cuda if present")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--relabel", default=None, help="score the agreement with a re-labelling by this model"
    )
    parser.add_argument(
        "--natural", type=int, default=0, help="N generated multi-object images (0: none)"
    )
    parser.add_argument("--natural-model", default="builtin:shapes", help="their generator")
    parser.add_argument(
        "--natural-counts", default="2,3", help="objects per prompt, shared out in turn"
    )
    args = parser.parse_args(argv)

    import torch
    from PIL import Image

    from diffumask_datasets.quality import TrainSettings, clean_store, train_segmenter
    from diffumask_datasets.quality.clean import choose_kept, combine_scores
    from diffumask_datasets.quality.data import LabelledSet
    from diffumask_datasets.quality.evaluate import score_segmenter

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = Rows(args.work / "noise.json")  # the cleans
    transfers = Rows(args.work / "transfer.json")  # the synthetic-to-real trainings
    settings = TrainSettings(
        steps=args.train_steps,
        size=args.size,
        learning_rate=args.learning_rate,
        segmenter=args.segmenter or None,
        seed=args.seed,
        device=args.device,
    )
    tag = f"{args.segmenter or 'segformer'}-{args.size or 'auto'}px-{args.train_steps}x{args.folds}"
    eval_settings = TrainSettings(
        steps=args.eval_steps,
        size=args.eval_size,
        learning_rate=3e-3,
        segmenter="builtin:fcn",
        seed=args.seed,
        device=args.device,
    )

    truth = truth_store(args.work, args.samples, args.seed + 1)
    records = list(truth.records())
    exact = [r.mask for r in records]
    class_ids = [[truth.definition.class_ids[c] for c in r.classes] for r in records]
    images = [r.image for r in records]
    test_scenes = sw.sample_scenes(args.test_scenes, seed=args.seed + 2)
    test = LabelledSet(
        [Image.fromarray(s.image) for s in test_scenes],
        [s.mask for s in test_scenes],
        {0: "background", **{i: s for s, i in sw.CLASS_IDS.items()}},
        "test",
    )
    machine = {"threads": args.threads, "device": args.device or "auto"}

    def transfer(key: str, imgs, masks):
        if args.no_transfer or key in transfers or args.report_only:
            return
        began = time.time()
        segmenter = train_segmenter(imgs, masks, NUM_LABELS, eval_settings, progress=False)
        score = score_segmenter(segmenter, test)
        transfers.put(key, {"miou": score.miou, "images": len(imgs),
                            "seconds": round(time.time() - began, 1)})  # fmt: skip
        print(f"{key}  {score.miou:.3f}  ({time.time() - began:.0f} s)", flush=True)

    def clean_row(kind: str, share: float, key: str, masks, bad) -> None:
        store = bad_store(args.work, truth, records, masks, f"{kind}-{share}")
        cleaned = args.work / "cleaned" / f"{kind}-{share}"
        shutil.rmtree(cleaned, ignore_errors=True)
        began = time.time()
        _, summary = clean_store(
            store, cleaned, args.folds, 0.7, settings, use_priors=False, progress=False
        )
        seconds = time.time() - began
        consistency = np.array([summary["consistency"][str(r.index)] for r in records])
        quality = np.array([r.quality for r in records])
        truth_iou = np.array(
            [object_iou(m, e, c) for m, e, c in zip(masks, exact, class_ids, strict=True)]
        )
        scores = {"consistency": consistency}
        if np.ptp(quality) > 0:  # rendered scenes have no attention: their quality is 1
            scores["quality"] = quality
            scores["combined"] = combine_scores([consistency, quality])
        rows.put(key, {
            "kind": kind, "share": share, "bad": bad, "seconds": round(seconds, 1),
            "pruned": {str(k): pruned_share(consistency, bad, k) for k in (0.7, 0.5)},
            "spearman": {n: spearman(s, truth_iou) for n, s in scores.items()},
            "bad_iou": float(truth_iou[bad].mean()) if bad else None,
            "scores": consistency.tolist(), "settings": settings.to_dict(),
            "folds": args.folds, "machine": machine,
        })  # fmt: skip
        row = rows[key]
        print(f"{key:<48}pruned@0.7 {row['pruned']['0.7']:.2f}  @0.5 "
              f"{row['pruned']['0.5']:.2f}  spearman {row['spearman']['consistency']:.2f}"
              f"  ({seconds:.0f} s)", flush=True)  # fmt: skip

    if args.natural:
        natural_row(args, rows, settings)
    shares = [float(s) for s in args.shares.split(",")]
    kinds = [k for k in args.kinds.split(",") if k != "none"]
    corrupted = {
        (kind, share): corruptions.corrupt(exact, kind, share, args.seed + 3)
        for share in shares
        for kind in kinds
    }
    if not args.transfer_only:
        for (kind, share), (masks, bad) in corrupted.items():
            key = f"{tag}/{kind}/{share}"
            if key not in rows and not args.report_only:
                clean_row(kind, share, key, masks, bad)
    # synthetic-to-real on the 25% stores: exact masks, as they are, cleaned (keep 0.7);
    # with --transfer-only this waits for the clean rows another process writes
    transfer("transfer/exact", images, exact)
    # share 0 (--shares 0): the control, cleaning a store whose masks are all exact
    waiting = [(k, s) for k, s in corrupted if s in (0.0, 0.25)]
    for kind, share in waiting:
        transfer(f"transfer/{kind}/{share}/none", images, corrupted[kind, share][0])
    while waiting and not args.no_transfer and not args.report_only:
        rows = Rows(args.work / "noise.json")
        for kind, share in list(waiting):
            key = f"{tag}/{kind}/{share}"
            if key in rows:
                masks = corrupted[kind, share][0]
                kept = choose_kept(np.array(rows[key]["scores"]), np.ones(len(masks), bool), 0.7)
                transfer(
                    f"transfer/{key}/keep-0.7",
                    [images[i] for i in kept],
                    [masks[i] for i in kept],
                )
                waiting.remove((kind, share))
        if waiting:
            if not args.transfer_only:
                break
            time.sleep(30)
    report(rows, transfers, tag)
    if args.relabel:
        signals = Rows(args.work / "signals.json")
        signal_rows(args, signals, rows, truth, records, exact, class_ids, corrupted, tag)
        for (kind, share), (masks, _) in corrupted.items():
            for name in ("agreement", "consistency+agreement"):
                key = f"{tag}/{kind}/{share}/{name}"
                if share == 0.25 and key in signals:
                    kept = choose_kept(
                        np.array(signals[key]["scores"]), np.ones(len(masks), bool), 0.7
                    )
                    transfer(
                        f"transfer/{key}/keep-0.7",
                        [images[i] for i in kept],
                        [masks[i] for i in kept],
                    )
        report_signals(signals, transfers, tag)
        rows.data.update({f"signals/{k}": v for k, v in signals.data.items()})
    if args.json:
        args.json.write_text(json.dumps({**rows.data, **transfers.data}, indent=2))
    return {**rows.data, **transfers.data}


def natural_store(args):
    """--natural N generated multi-object samples as a store, and each one's reference
    (objects named by the shape classifier; 255 where unnamed) and the shapes found."""
    from shapes_quality import multi_object_prompts, named_objects, train_shape_classifier

    from diffumask_datasets import DiffuMask
    from diffumask_datasets.definitions import load_definition
    from diffumask_datasets.store import MANIFEST, Record, make_manifest, open_store, write_store

    n, seed = args.natural, args.seed + 5
    path = args.work / f"natural-{n}-seed{seed}{natural_variant(args)}"
    if not (path / MANIFEST).is_file():
        definition = load_definition("shapes")
        counts = [int(c) for c in args.natural_counts.split(",")]
        prompts = [
            prompt
            for i, objects in enumerate(counts)
            for prompt in multi_object_prompts(len(range(i, n, len(counts))), objects, seed)
        ]
        began = time.time()
        samples = DiffuMask(args.natural_model)(
            [p for p, _ in prompts],
            classes=[shapes for _, shapes in prompts],
            seed=seed,
            num_inference_steps=20,
            guidance_scale=4.0,
            class_ids=sw.CLASS_IDS,
            refinement=definition.defaults["refinement"],
            batch_size=16,
        )
        print(f"generated {n} multi-object samples ({time.time() - began:.0f} s)", flush=True)
        config = {"natural": n, "seed": seed, "model": args.natural_model, "counts": counts}
        manifest = make_manifest(definition, config, json.dumps(config), n, 64, 16)
        write_store(path, [Record.from_sample(i, s, 16) for i, s in enumerate(samples)], manifest)
    store = open_store(path)
    classifier = train_shape_classifier(args.seed)
    references = [
        named_objects(classifier, np.asarray(r.image), list(r.classes)) for r in store.records()
    ]
    return store, references


def natural_variant(args) -> str:
    """What names a --natural run other than the first one's (builtin:shapes, 2 and 3
    objects) in its folder and its row key: '' for that one."""
    model = args.natural_model.removeprefix("builtin:").replace("/", "_")
    parts = ([] if model == "shapes" else [model]) + (
        [] if args.natural_counts == "2,3" else [f"objects{args.natural_counts.replace(',', '')}"]
    )
    return "".join(f"-{p}" for p in parts)


def natural_row(args, rows, settings) -> None:
    """Clean (defaults) on --natural generated samples; each score against true object IoU."""
    from diffumask_datasets.quality import clean_store
    from diffumask_datasets.quality.clean import shows_object
    from diffumask_datasets.quality.metrics import IGNORE, sample_iou

    key = (
        f"natural/{args.natural}{natural_variant(args)}/"
        f"{settings.segmenter}-{settings.size}px-{settings.steps}"
    )
    if key in rows or args.report_only:
        return
    store, references = natural_store(args)
    records = list(store.records())
    truth = []
    for record, (ref, found) in zip(records, references, strict=True):
        ids = [sw.CLASS_IDS[s] for s in sorted(found)]
        mask = np.where(ref == IGNORE, IGNORE, record.mask)
        truth.append(sample_iou(mask, ref, [0, *ids]) if ids else np.nan)
    truth = np.array(truth)
    cleaned = args.work / "cleaned" / "natural"
    shutil.rmtree(cleaned, ignore_errors=True)
    began = time.time()
    _, summary = clean_store(
        store, cleaned, args.folds, 0.7, settings, use_priors=False, progress=False
    )
    seconds = time.time() - began
    scored = np.isfinite(truth)
    scores = {
        name: np.array([summary[name][str(r.index)] for r in records])
        for name in ("consistency", "agreement", "combined_score")
        if name in summary
    }
    scores["quality"] = np.array([r.quality for r in records])
    result = {"samples": len(records), "scored": int(scored.sum()), "seconds": round(seconds, 1)}
    result["mean_true_iou"] = float(truth[scored].mean())
    cleaned_kept = np.isin([r.index for r in records], summary["kept_indices"])
    result["clean"] = {
        "kept": int(cleaned_kept.sum()),
        "empty_rejected": summary["empty_rejected"],
        "kept_true_iou": float(truth[scored & cleaned_kept].mean()),
        "dropped_true_iou": float(truth[scored & ~cleaned_kept].mean()),
    }
    shown = np.array([shows_object(r.mask) for r in records])
    for name, score in scores.items():
        kept = np.zeros(len(records), bool)
        kept[np.argsort(-score, kind="stable")[: int(round(0.7 * len(records)))]] = True
        result[name] = {
            "spearman": spearman(score[scored], truth[scored]),
            # the ranking that decides among the masks clean may keep
            "spearman_shown": spearman(score[scored & shown], truth[scored & shown]),
            "kept_true_iou": float(truth[scored & kept].mean()),
            "dropped_true_iou": float(truth[scored & ~kept].mean()),
        }
    rows.put(key, result)
    print(f"{key}: mean true object IoU {result['mean_true_iou']:.3f} over {result['scored']}")
    print(
        "| score | Spearman (masks showing an object) | true IoU of the kept 70% "
        "| of the dropped 30% |"
    )
    print("|---|---|---|---|")
    for name in scores:
        r = result[name]
        print(
            f"| {name} | {r['spearman']:.3f} ({r['spearman_shown']:.3f}) "
            f"| {r['kept_true_iou']:.3f} | {r['dropped_true_iou']:.3f} |"
        )
    c = result["clean"]
    print(
        f"| clean's kept {c['kept']} (never the {c['empty_rejected']} showing no object) "
        f"| - | {c['kept_true_iou']:.3f} | {c['dropped_true_iou']:.3f} |"
    )


def relabelled(args, truth, records) -> list[np.ndarray]:
    """The truth store's images labelled by --relabel (cached under --work)."""
    from diffumask_datasets import DiffuMask
    from diffumask_datasets.quality.agreement import relabelled_masks

    path = args.work / f"relabel-{args.relabel.replace(':', '-').replace('/', '-')}.npz"
    if path.is_file():
        return list(np.load(path)["masks"])
    began = time.time()
    masks = relabelled_masks(
        DiffuMask(args.relabel),
        records,
        truth.definition.class_ids,
        refinement=truth.definition.defaults.get("refinement"),
        progress=False,
    )
    np.savez_compressed(path, masks=np.stack(masks))
    print(f"re-labelled {len(masks)} images with {args.relabel} ({time.time() - began:.0f} s)")
    return masks


def signal_rows(args, signals, rows, truth, records, exact, class_ids, corrupted, tag) -> None:
    """Per kind and share: the agreement alone and combined with the clean's consistency
    (when its row is there), each as pruned@0.7/0.5 and Spearman with true object IoU."""
    from diffumask_datasets.quality.agreement import agreement_of
    from diffumask_datasets.quality.clean import combine_scores

    others = relabelled(args, truth, records)
    for (kind, share), (masks, bad) in corrupted.items():
        truth_iou = np.array(
            [object_iou(m, e, c) for m, e, c in zip(masks, exact, class_ids, strict=True)]
        )
        agreement = agreement_of(masks, others, class_ids)
        scores = {"agreement": agreement}
        clean_key = f"{tag}/{kind}/{share}"
        if clean_key in rows:
            consistency = np.array(rows[clean_key]["scores"])
            scores["consistency+agreement"] = combine_scores([consistency, agreement])
        for name, score in scores.items():
            signals.put(f"{clean_key}/{name}", {
                "kind": kind, "share": share, "signal": name, "relabel": args.relabel,
                "pruned": {str(k): pruned_share(score, bad, k) for k in (0.7, 0.5)},
                "spearman": spearman(score, truth_iou), "scores": score.tolist(),
            })  # fmt: skip


def report_signals(signals: Rows, transfers: Rows, tag: str) -> None:
    exact = transfers["transfer/exact"]["miou"] if "transfer/exact" in transfers else float("nan")
    print(f"\nsignals beside clean settings {tag}")
    print("| kind | share | signal | pruned @0.7 | pruned @0.5 | Spearman | after clean / exact |")
    print("|---|---|---|---|---|---|---|")
    for key, row in signals.data.items():
        if not key.startswith(f"{tag}/"):
            continue
        cleaned = transfers.data.get(f"transfer/{key}/keep-0.7", {}).get("miou")
        ratio = f"{cleaned / exact:.3f}" if cleaned is not None else ""
        print(
            f"| {row['kind']} | {row['share']:.0%} | {row['signal']} | {row['pruned']['0.7']:.0%} "
            f"| {row['pruned']['0.5']:.0%} | {row['spearman']:.3f} | {ratio} |"
        )


def report(rows: Rows, transfers: Rows, tag: str) -> None:
    exact = transfers["transfer/exact"]["miou"] if "transfer/exact" in transfers else float("nan")
    print(f"\nclean settings {tag}; segmenter on exact masks: test mIoU {exact:.3f}")
    print("| kind | share | pruned @0.7 | pruned @0.5 | Spearman (consistency) | "
          "bad masks' IoU | seconds | after clean / exact | as is / exact |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for key, row in rows.data.items():
        if not key.startswith(f"{tag}/"):
            continue
        kind, share = row["kind"], row["share"]
        cleaned = transfers.data.get(f"transfer/{tag}/{kind}/{share}/keep-0.7", {}).get("miou")
        as_is = transfers.data.get(f"transfer/{kind}/{share}/none", {}).get("miou")
        ratio = lambda v: f"{v / exact:.3f}" if v is not None else ""  # noqa: E731
        print(
            f"| {kind} | {share:.0%} | {row['pruned']['0.7']:.0%} | {row['pruned']['0.5']:.0%} "
            f"| {row['spearman']['consistency']:.3f} | {row['bad_iou'] or float('nan'):.2f} | "
            f"{row['seconds']:.0f} | {ratio(cleaned)} | {ratio(as_is)} |"
        )


if __name__ == "__main__":
    main()
