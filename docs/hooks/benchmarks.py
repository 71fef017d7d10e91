"""MkDocs hook: BENCHMARKS.md at the repository root becomes the site's benchmarks page.

The file stays where contributors look for it (beside the README); its links into the lab
log are written from the repository root (`docs/lab/...`), so the page's copy has them
rewritten relative to the docs folder.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]


def on_files(files: Files, config) -> Files:
    text = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    files.append(File.generated(config, "benchmarks.md", content=text.replace("](docs/", "](")))
    return files
