"""The README and the documentation: their examples run, and the API reference is whole.

Every fenced code block of README.md and docs/ (less the lab log, a record of what was
run) is one of:

- ```python: executed, in page order, in one namespace per page;
- ```bash: each command (comments dropped, `\\` continuations joined) must be a
  `diffumask ...` command, run in-process through click's CliRunner;
- any other language (yaml, text, output): data, not run, except a block right after
  `<!-- file: NAME -->`, which is written to NAME for the blocks after it.

A page runs in its own empty working folder. A block that cannot run here (a GPU, the
network, a package that is not a dependency, a server that never returns) is marked on the
line before it with `<!-- skip: why -->`; an unmarked block that is not runnable fails the
test with a message saying so. Examples use the tiny built-in models at small sizes so the
whole file runs in well under a minute.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "diffumask_datasets"
PAGES = [ROOT / "README.md"] + sorted(
    p for p in (ROOT / "docs").rglob("*.md") if "lab" not in p.relative_to(ROOT / "docs").parts
)
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)\s*$")
MARK = re.compile(r"^\s*<!--\s*(?P<kind>skip|file):\s*(?P<value>.*?)\s*-->\s*$")


@dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    skip: str | None = None
    file: str | None = None


def code_blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown text, with the marker on the line before each."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, lang = len(opening["indent"]), opening["lang"]
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        body = "\n".join(line[indent:] for line in lines[i + 1 : end])
        block = Block(lang, body, i + 1)
        previous = MARK.match(lines[i - 1]) if i else None
        if previous:
            setattr(block, previous["kind"], previous["value"])
        blocks.append(block)
        i = end + 1
    return blocks


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a bash block: comments dropped, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", code)
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(words)
    return commands


def run_page(page: Path, folder: Path) -> None:
    from click.testing import CliRunner

    from diffumask_datasets.cli import main

    namespace: dict = {"__name__": f"docs:{page.name}"}
    for block in code_blocks(page.read_text(encoding="utf-8")):
        where = f"{page.relative_to(ROOT) if page.is_relative_to(ROOT) else page}:{block.line}"
        if block.skip is not None:
            assert block.skip, f"{where}: say why the block is skipped: <!-- skip: why -->"
            continue
        if block.file:
            (folder / block.file).write_text(block.code + "\n", encoding="utf-8")
        elif block.lang == "python":
            exec(compile(block.code, where, "exec"), namespace)  # noqa: S102
        elif block.lang in ("bash", "sh", "shell", "console"):
            for words in shell_commands(block.code):
                assert words[0] == "diffumask", (
                    f"{where}: `{' '.join(words)}` is not a diffumask command; "
                    "mark the block <!-- skip: why --> if it cannot run in the tests"
                )
                result = CliRunner().invoke(main, words[1:], catch_exceptions=False)
                assert result.exit_code == 0, f"{where}: {' '.join(words)}\n{result.output}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_code_blocks_of_the_page_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FIFTYONE_PLUGINS_DIR", str(tmp_path / "fiftyone-plugins"))
    monkeypatch.setenv("FIFTYONE_DEFAULT_DATASET_DIR", str(tmp_path / "fiftyone"))
    # load_dataset's cache: read from the environment when datasets is first imported
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    if "datasets" in sys.modules:
        monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", tmp_path / "hf-cache")
    run_page(page, tmp_path)


def test_the_block_runner_runs_python_and_cli_blocks_and_refuses_unmarked_commands(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- file: note.txt -->\n```text\nhello\n```\n"
        "```python\nfrom pathlib import Path\nseen = Path('note.txt').read_text()\n```\n"
        "```bash\ndiffumask --version   # a comment\n```\n"
        "<!-- skip: shows a server -->\n```bash\nmake serve\n```\n"
        "```python\nassert seen == 'hello\\n'\n```\n",
        encoding="utf-8",
    )
    os.chdir(tmp_path)
    run_page(page, tmp_path)
    page.write_text("```bash\npip install something\n```\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="not a diffumask command"):
        run_page(page, tmp_path)
    page.write_text("```python\nassert 1 == 2, 'rotted'\n```\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="rotted"):
        run_page(page, tmp_path)


def test_shell_commands_join_continuations_and_drop_comments():
    code = "# look\ndiffumask info out \\\n    --json   # figures\n\ndiffumask verify out\n"
    assert shell_commands(code) == [
        ["diffumask", "info", "out", "--json"],
        ["diffumask", "verify", "out"],
    ]


def public_modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(part.startswith("_") for part in parts):
            continue
        names.append(".".join(parts))
    return names


def test_every_public_module_is_in_the_api_reference():
    text = "\n".join(p.read_text() for p in (ROOT / "docs" / "reference").glob("*.md"))
    documented = set(re.findall(r"^::: ([\w.]+)", text, flags=re.MULTILINE))
    missing = [name for name in public_modules() if name not in documented]
    assert not missing, f"modules missing from docs/reference (add a `::: name` line): {missing}"


def test_every_public_function_and_class_has_a_docstring():
    missing = []
    for name in public_modules():
        path = ROOT / Path(*name.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if not ast.get_docstring(tree):
            missing.append(name)
        for node in tree.body:
            kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
            if isinstance(node, kinds) and not node.name.startswith("_"):
                if not ast.get_docstring(node):
                    missing.append(f"{name}.{node.name}")
    assert not missing, f"public functions and classes without a docstring: {missing}"


def test_the_datasets_bound_quoted_in_the_docs_is_the_tested_one():
    import _diffumask_datasets_hook as hook

    for page in (ROOT / "README.md", ROOT / "docs" / "guide" / "huggingface.md"):
        quoted = set(re.findall(r'"(datasets[<>=!~][^"]*)"', page.read_text(encoding="utf-8")))
        assert quoted == {hook.TESTED_DATASETS}, (
            f"{page.name} quotes {quoted}; pyproject and the hook say {hook.TESTED_DATASETS}"
        )
