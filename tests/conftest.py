"""Test-wide settings: without a GPU, Triton kernels run on the CPU interpreter (must be set before import)."""

import logging
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests/support: the stand-in model (`standin_model:create_standin`) and the CLI runner (`cli_runs`), importable by
# name here and, through cli_runs.cli_env's PYTHONPATH, in the commands the tests start
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` when no CUDA device is present, naming the reason."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _amfor_logger_restored():
    """A command run in-process (`train.main`) points the "amfor" logger at its own handlers and stops it
    propagating; put it back after each test, so a later test's `caplog` sees the library's log lines."""
    log = logging.getLogger("amfor")
    propagate, level, handlers = log.propagate, log.level, list(log.handlers)
    yield
    for handler in [h for h in log.handlers if h not in handlers]:
        log.removeHandler(handler)
        handler.close()
    log.propagate, log.level = propagate, level


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A data root holding the tiny synthetic dataset (generated once per session)."""
    from amfor.data import build_dataset

    root = tmp_path_factory.mktemp("data")
    build_dataset("synthetic", str(root), size="tiny")
    return root
