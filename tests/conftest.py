"""Shared test set-up: offline, no telemetry, a private FiftyOne database."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")
os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
os.environ.setdefault("FIFTYONE_DATABASE_DIR", tempfile.mkdtemp(prefix="fo-db-"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """The engine on the built-in tiny SD 1.x model (built once per test session)."""
    from diffumask_datasets import DiffuMask

    return DiffuMask("builtin:tiny-random")


@pytest.fixture(scope="module")
def one_thread():
    """One torch CPU thread for the module: kernels round differently with other thread
    counts, so runs compared byte for byte (subprocesses too) use one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
