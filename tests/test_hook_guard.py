"""The `load_dataset("diffumask-voc")` hook relies on private parts of `datasets`: the
installed version must have them all, and a version that lacks one is named clearly."""

from __future__ import annotations

import re
from pathlib import Path

import datasets
import datasets.packaged_modules
from packaging.requirements import Requirement

import _diffumask_datasets_hook as hook

REPO = Path(__file__).resolve().parents[1]


def test_the_installed_datasets_has_every_private_part_the_hook_uses():
    missing = hook.missing_private_parts()
    assert not missing, (
        f"datasets {datasets.__version__} lacks {', '.join(missing)}, which "
        "_diffumask_datasets_hook and diffumask_datasets/datasets_builder.py use: "
        'load_dataset("diffumask-voc") cannot work with it. Adapt the hook to this '
        "version (and its PRIVATE_PARTS), or keep the pyproject bound below it."
    )


def test_pyproject_allows_the_tested_datasets_and_no_newer_minor_release():
    text = (REPO / "pyproject.toml").read_text()
    line = re.search(r'^\s*"(datasets[^"]*)",', text, re.M).group(1)
    requirement = Requirement(line)
    assert line == hook.TESTED_DATASETS
    assert requirement.specifier.contains(datasets.__version__), (
        f"datasets {datasets.__version__} is installed but pyproject says {line}"
    )
    major, minor = (int(v) for v in datasets.__version__.split(".")[:2])
    upper = [s for s in requirement.specifier if s.operator in ("<", "<=")]
    assert upper, f"{line} has no upper bound: a new datasets could break the hook silently"
    assert not requirement.specifier.contains(f"{major}.{minor + 1}.0"), line


def test_a_missing_part_is_named_and_registering_says_so(monkeypatch, capsys):
    monkeypatch.delattr(datasets.packaged_modules, "_PACKAGED_DATASETS_MODULES")
    assert hook.missing_private_parts() == ["datasets.packaged_modules._PACKAGED_DATASETS_MODULES"]
    assert hook.register() is False
    message = capsys.readouterr().err
    assert "datasets.packaged_modules._PACKAGED_DATASETS_MODULES" in message
    assert hook.TESTED_DATASETS in message and "diffumask generate" in message


def test_a_changed_factory_signature_is_named(monkeypatch):
    import datasets.load

    stock = hook._stock_factory(datasets.load)

    def changed(self, name, data_dir=None, data_files=None, download_config=None):
        pass  # a release without download_mode

    monkeypatch.setattr(stock, "__init__", changed)
    assert hook.missing_private_parts() == [
        "datasets.load.PackagedDatasetModuleFactory(download_mode=...)"
    ]
