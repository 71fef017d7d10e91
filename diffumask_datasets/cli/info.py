"""`diffumask info` (the figures of a dataset) and `diffumask verify` (its shards)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from .common import PROG, open_dataset, progress


def _histogram_line(counts: list[int]) -> str:
    blocks = " ▁▂▃▄▅▆▇█"
    top = max(counts) or 1
    return "".join(blocks[round(c / top * 8)] for c in counts)


def format_statistics(path: Path, stats: Mapping[str, Any], manifest: Mapping[str, Any]) -> str:
    """The figures of `statistics.dataset_statistics` (plus the shard summary) as text."""
    from ..statistics import IGNORE, class_rows

    lines = [f"{path}: {stats['samples']} samples"]
    if stats["image_sizes"]:
        sizes = ", ".join(f"{size} ({n})" for size, n in stats["image_sizes"].items())
        lines.append(f"  image sizes: {sizes}")
    lines.append("")
    lines.append(f"  {'class':<20} {'id':>4} {'prompted':>9} {'in mask':>8} {'pixels':>8}")
    # A dataset of a few classes from a large definition: list the classes it has.
    rows = class_rows(stats) or list(stats["classes"].values())
    for row in rows:
        lines.append(
            f"  {row['name']:<20} {row['id']:>4} {row['prompted_images']:>9} "
            f"{row['images_with_pixels']:>8} {row['pixel_share']:>8.1%}"
        )
    lines.append(f"  {'background':<20} {0:>4} {'':>9} {'':>8} {stats['background_share']:>8.1%}")
    lines.append(f"  {'ignore':<20} {IGNORE:>4} {'':>9} {'':>8} {stats['ignore_share']:>8.1%}")
    absent = len(stats["classes"]) - len(rows)
    if absent:
        lines.append(f"  ({absent} more classes of the definition have no samples here)")
    quality = stats["quality"]
    lines.append("")
    if quality["count"]:
        lines.append(
            "  quality: mean {mean:.3f}  min {min:.3f}  p25 {p25:.3f}  median {median:.3f}  "
            "p75 {p75:.3f}  max {max:.3f}".format(**quality)
        )
        lines.append(f"  quality histogram 0..1: |{_histogram_line(quality['histogram'])}|")
    lines.append("")
    store_keys = ("name", "num_shards", "shard_size", "attention_size", "fingerprint")
    summary = "  ".join(f"{k} {manifest[k]}" for k in store_keys if k in manifest)
    if summary:
        lines.append(f"  store: {summary}")
    shards = stats.get("shards")
    if shards:
        line = f"  shards: {shards['sha256_verified']} of {shards['total']} match their sha256"
        if shards["no_digest"]:
            line += f"; {shards['no_digest']} have no digest recorded (readable)"
        lines.append(line)
    if "filter" in manifest:
        lines.append(f"  filtered: {json.dumps(manifest['filter'], default=str)}")
    config = manifest.get("config") or {}
    if config:
        lines.append("  config:")
        for key, value in sorted(config.items()):
            shown = json.dumps(value, sort_keys=True, default=str)
            if len(shown) > 200:
                shown = shown[:197] + "..."
            lines.append(f"    {key}: {shown}")
    return "\n".join(lines)


INFO_EPILOG = f"""\b
Examples:
  {PROG} info out/tiny
  {PROG} info out/tiny --json | jq .quality
"""


@click.command(epilog=INFO_EPILOG, short_help="Figures and config of a dataset.")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def info(directory: Path, as_json: bool) -> None:
    """Counts and pixels per class, quality distribution and config of a dataset DIRECTORY."""
    from ..statistics import shard_summary, store_statistics

    store = open_dataset(directory)
    stats = {"shards": shard_summary(store, store.verify())}
    masks = progress(store.masks(), len(store), "reading")
    stats.update(store_statistics(store, masks))
    if as_json:
        click.echo(
            json.dumps(
                {"path": str(store.path), **stats, "manifest": store.manifest},
                indent=2,
                default=str,
            )
        )
    else:
        click.echo(format_statistics(Path(store.path), stats, store.manifest))


VERIFY_EPILOG = f"""\b
Examples:
  {PROG} verify out/tiny
  {PROG} verify /shared/voc || {PROG} generate voc ... --out /shared/voc --resume
"""


@click.command(epilog=VERIFY_EPILOG, short_help="Check every shard against its digest.")
@click.argument("directory", type=click.Path(path_type=Path))
def verify(directory: Path) -> None:
    """Read every shard of the dataset in DIRECTORY and compare it with the sha256 recorded
    when it was written. Exits 1 when a shard is missing or damaged."""
    from ..statistics import shard_summary
    from ..store import open_store

    store = open_store(directory, allow_incomplete=True)
    checks = store.verify(progress=True)
    for check in checks:
        if not check.ok:
            click.echo(check.describe())
    summary = shard_summary(store, checks)
    line = f"{store.path}: all {summary['total']} shards intact"
    if summary["no_digest"]:
        line += (
            f" ({summary['sha256_verified']} match their sha256; {summary['no_digest']} have no "
            "digest recorded, so only their Parquet footers were checked)"
        )
    else:
        line += " (sha256 matches)"
    click.echo(line)
