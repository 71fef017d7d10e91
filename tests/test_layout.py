"""Where things live: the CLI package and its entry point, the `load_dataset` hook's
builder module and hashed files, the library's filter (moved out of the CLI)."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import _diffumask_datasets_hook as hook
from diffumask_datasets.definitions import load_definition
from diffumask_datasets.errors import DiffuMaskError
from diffumask_datasets.store import Record, make_manifest, write_store

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "diffumask_datasets"


def test_the_console_entry_point_is_the_cli_group_with_every_verb_in_order():
    entry = re.search(r'^diffumask = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M)
    module, attribute = entry.group(1).split(":")
    main = getattr(importlib.import_module(module), attribute)
    assert main.list_commands(None) == [
        "generate",
        "label",
        "info",
        "verify",
        "export",
        "filter",
        "evaluate",
        "score",
        "clean",
        "splice",
        "shapes",
        "app",
        "plugin",
    ]


def test_the_hook_hashes_files_that_exist_and_names_an_importable_builder():
    # A renamed module would otherwise be hashed as its bare name, silently: the Arrow
    # cache would then outlive a change of the generation code.
    missing = [name for name in hook._HASHED_FILES if not (PACKAGE / name).is_file()]
    assert not missing, f"_HASHED_FILES names files the package lacks: {missing}"
    builder = importlib.import_module(hook.BUILDER_MODULE)
    assert callable(builder.dataset_module)
    # every module that decides what a generated sample is takes part in the hash
    for name in ("config.py", "shards.py", "build.py", "prompts.py", "store.py"):
        assert name in hook._HASHED_FILES, name


def _records(count: int = 6):
    rng = np.random.default_rng(0)
    for index in range(count):
        name, class_id = [("bird", 3), ("dog", 12)][index % 2]
        mask = np.zeros((8, 8), np.uint8)
        mask[:4, :4] = class_id
        yield Record(
            index=index,
            image=Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)),
            mask=mask,
            prompt=f"a photo of a {name}",
            seed=index,
            classes=[name],
            quality=index / 10,
            attention={name: rng.random((4, 4)).astype(np.float32)},
        )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    manifest = make_manifest(load_definition("voc"), {"model": "x"}, "layout", 6, 4, 4)
    return write_store(tmp_path_factory.mktemp("layout") / "ds", _records(), manifest)


def test_filter_store_keeps_the_good_samples_in_a_new_store(store, tmp_path):
    from diffumask_datasets.filtering import filter_store

    kept = filter_store(store, tmp_path / "good", min_quality=0.25, classes=["dog"])
    assert Path(kept.path).resolve() == (tmp_path / "good").resolve()
    assert [r.index for r in kept.records()] == [3, 5]
    assert kept.manifest["filter"] == {
        "source": str(store.path),
        "min_quality": 0.25,
        "classes": ["dog"],
    }
    with pytest.raises(DiffuMaskError, match="is not empty"):
        filter_store(store, tmp_path / "good", min_quality=0.0)
    with pytest.raises(DiffuMaskError, match="'dgo'.*dog"):
        filter_store(store, tmp_path / "typo", min_quality=0.0, classes=["dgo"])
    assert not (tmp_path / "typo").exists()


def _imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """The package modules `module` imports anywhere in its file (late imports too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name in modules and name != module}


def test_no_import_cycle_in_the_package():
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {m: _imports(p, m, set(files)) for m, p in files.items()}

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            module, path = stack.pop()
            for target in graph[module]:
                if target == start:
                    return [*path, start]
                if target not in path and target > start:  # each cycle once, from its least
                    stack.append((target, [*path, target]))
        return None

    cycles = [c for m in sorted(graph) if (c := cycle_from(m))]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_generate_help_shows_the_setting_each_option_sets():
    import dataclasses

    from click.testing import CliRunner

    from diffumask_datasets.cli import main
    from diffumask_datasets.cli.generate import SETTING_NAMES, generation_config
    from diffumask_datasets.config import GenerationConfig

    assert SETTING_NAMES == {
        "per_class": "images_per_class",
        "steps": "num_inference_steps",
        "size": "resolution",
    }
    assert set(SETTING_NAMES.values()) <= {f.name for f in dataclasses.fields(GenerationConfig)}
    text = CliRunner().invoke(main, ["generate", "--help"], terminal_width=200).output
    for option, setting in SETTING_NAMES.items():
        assert f"--{option.replace('_', '-')}" in text and f"-> {setting}" in text
        assert f"[setting: {setting}]" in text
    # the options reach the settings the help names
    config = generation_config(
        load_definition("voc"), classes=["dog"], per_class=3, steps=5, size=72, seed=None
    )
    assert (config.images_per_class, config.num_inference_steps, config.resolution) == (3, 5, 72)
    assert config.classes == ["dog"] and config.seed == 0


def test_only_the_store_reads_shard_files():
    readers = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "pyarrow" in _imports_text(path)
    )
    assert readers == ["store.py"], readers


def _imports_text(path: Path) -> str:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
    return " ".join(names)
