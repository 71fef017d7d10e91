"""Make `load_dataset("diffumask-voc")` work without importing diffumask_datasets first.

The wheel installs this file as the top-level module `_diffumask_datasets_hook` (outside
the package, so that importing it never imports the package) and `diffumask_datasets.pth`,
which imports it at interpreter start.
At that point it only adds an import finder (no torch, no datasets, no package import:
start-up stays as fast as before). When a program later imports `datasets`, the finder
lets it load normally and then, right after, registers the builder names in datasets'
table of packaged builders (`_PACKAGED_DATASETS_MODULES`, the table `load_dataset`
consults before it looks anywhere else) and teaches the packaged-builder factory that
these names bring their own definition file instead of scanning the working directory
for data files. `diffumask_datasets.datasets_builder` runs the same registration on import, so an
explicit `import diffumask_datasets.datasets_builder` works where the .pth file is absent (a source
checkout run from its root, where this file lies next to the package).

This module imports nothing outside the standard library at start-up and never raises:
a failure here must not break `import datasets` for programs that never use us.
"""

from __future__ import annotations

import sys

# Builder name -> built-in definition (None: the user's file from data_files).
NAMES = {
    "diffumask-voc": "voc",
    "diffumask-cityscapes": "cityscapes",
    "diffumask-shapes": "shapes",
    "diffumask": None,
}
BUILDER_MODULE = "diffumask_datasets.datasets_builder"
_HASHED_FILES = (
    "datasets_builder.py",
    "store.py",
    "build.py",
    "config.py",
    "shards.py",
    "prompts.py",
    "definitions.py",
)


def _package_dir() -> str | None:
    from importlib.machinery import PathFinder

    # PathFinder finds the package on sys.path without importing it.
    spec = PathFinder.find_spec("diffumask_datasets")
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def module_hash() -> str:
    """A hash of the builder's code: datasets keys its Arrow cache on it, so a new
    version of the package never reads a cache an older one wrote."""
    import hashlib
    import os

    digest = hashlib.sha256()
    folder = _package_dir()
    for name in _HASHED_FILES:
        try:
            with open(os.path.join(folder or "", name), "rb") as handle:
                digest.update(handle.read())
        except OSError:
            digest.update(name.encode())
    return digest.hexdigest()


# The parts of `datasets` outside its public API that this hook and the builder
# (diffumask_datasets.datasets_builder) rely on. A release may move any of them: then
# load_dataset("diffumask-...") cannot work, and register() says so instead of failing late.
PRIVATE_PARTS = {
    "datasets.packaged_modules": ("_PACKAGED_DATASETS_MODULES",),
    "datasets.load": ("PackagedDatasetModuleFactory", "DatasetModule"),
    "datasets.data_files": ("DataFilesDict", "sanitize_patterns"),
}
# The packaged-builder factory is made as Factory(name, data_dir=, data_files=,
# download_config=, download_mode=) and asked for get_module().
FACTORY_PARAMETERS = ("name", "data_dir", "data_files", "download_config", "download_mode")
TESTED_DATASETS = "datasets>=4.0,<5.3"


def _stock_factory(load) -> type:
    """datasets' own factory class, also after register() subclassed it."""
    for cls in load.PackagedDatasetModuleFactory.__mro__:
        if "_diffumask" not in vars(cls):
            return cls
    return load.PackagedDatasetModuleFactory  # pragma: no cover


def missing_private_parts() -> list[str]:
    """The private parts of `datasets` the hook needs that the installed `datasets`
    lacks, by their dotted names (empty when every one is there)."""
    import importlib
    import inspect

    missing = []
    modules = {}
    for module_name, names in PRIVATE_PARTS.items():
        try:
            modules[module_name] = importlib.import_module(module_name)
        except ImportError:
            missing.append(module_name)
            continue
        missing += [f"{module_name}.{n}" for n in names if not hasattr(modules[module_name], n)]
    if missing:
        return missing
    table = modules["datasets.packaged_modules"]._PACKAGED_DATASETS_MODULES
    if not isinstance(table, dict):
        missing.append("datasets.packaged_modules._PACKAGED_DATASETS_MODULES (a dict)")
    factory = _stock_factory(modules["datasets.load"])
    parameters = inspect.signature(factory.__init__).parameters
    missing += [
        f"datasets.load.PackagedDatasetModuleFactory({name}=...)"
        for name in FACTORY_PARAMETERS
        if name not in parameters
    ]
    if not callable(getattr(factory, "get_module", None)):
        missing.append("datasets.load.PackagedDatasetModuleFactory.get_module")
    if not hasattr(modules["datasets.data_files"].DataFilesDict, "from_patterns"):
        missing.append("datasets.data_files.DataFilesDict.from_patterns")
    return missing


def register() -> bool:
    """Register the builder names with an imported `datasets`; True when done (False,
    with a message on stderr, when this `datasets` lacks a part the hook relies on)."""
    load = sys.modules.get("datasets.load")
    packaged = sys.modules.get("datasets.packaged_modules")
    if load is None or packaged is None or _package_dir() is None:
        return False
    missing = missing_private_parts()
    if missing:
        version = getattr(sys.modules.get("datasets"), "__version__", "?")
        print(
            f"diffumask-datasets: load_dataset('diffumask-...') is unavailable: datasets "
            f"{version} lacks {', '.join(missing)}; install a tested version "
            f"(pip install '{TESTED_DATASETS}') or use `diffumask generate` and "
            "load_dataset(OUT_FOLDER)",
            file=sys.stderr,
        )
        return False
    table = packaged._PACKAGED_DATASETS_MODULES
    if not all(name in table for name in NAMES):
        digest = module_hash()
        for name in NAMES:
            table.setdefault(name, (BUILDER_MODULE, digest))
    if not getattr(load.PackagedDatasetModuleFactory, "_diffumask", False):
        load.PackagedDatasetModuleFactory = _factory_class(load.PackagedDatasetModuleFactory)
    return True


def _factory_class(base: type) -> type:
    class DiffuMaskModuleFactory(base):
        """datasets' packaged-builder factory, except for the diffumask names: those take
        their data files from the definition, never from a scan of the working directory."""

        _diffumask = True

        def __init__(
            self, name, data_dir=None, data_files=None, download_config=None, download_mode=None
        ):
            if name not in NAMES:
                super().__init__(
                    name,
                    data_dir=data_dir,
                    data_files=data_files,
                    download_config=download_config,
                    download_mode=download_mode,
                )
                return
            # No download-count request: nothing of ours is on the Hub.
            self.name = name
            self.data_dir = data_dir
            self.data_files = data_files
            self.download_config = download_config
            self.download_mode = download_mode

        def get_module(self):
            if self.name not in NAMES:
                return super().get_module()
            from diffumask_datasets.datasets_builder import dataset_module

            return dataset_module(self.name, self.data_dir, self.data_files, self.download_config)

    return DiffuMaskModuleFactory


class _RegisteringLoader:
    """Wraps the loader of `datasets`: loads it as usual, then registers."""

    def __init__(self, loader, finder):
        self._loader = loader
        self._finder = finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        # The module keeps its real loader (datasets and inspect look at it).
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        if self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        try:
            register()
        except Exception as exc:  # never break `import datasets`
            print(f"diffumask-datasets: could not register its builders: {exc}", file=sys.stderr)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _DatasetsImportFinder:
    """A meta-path finder that only notices `import datasets`."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "datasets":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader, self)
        return spec


def install() -> None:
    """Register now if datasets is already imported, else when it is."""
    if "datasets.load" in sys.modules:
        try:
            register()
        except Exception as exc:
            print(f"diffumask-datasets: could not register its builders: {exc}", file=sys.stderr)
        return
    if not any(isinstance(f, _DatasetsImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _DatasetsImportFinder())


if __name__ == "_diffumask_datasets_hook":  # imported by diffumask_datasets.pth
    install()
