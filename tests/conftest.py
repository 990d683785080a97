"""Fixtures shared by the tests: one torch thread, a fixed seed, a finished tiny run. Helpers are in helpers.py."""

from pathlib import Path

import pytest
import torch
from helpers import run


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny tensors: thread start-up dominates, and on a busy 2-core machine 2 threads are ~5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """configs/tiny.yaml run to the end through the CLI; a test that writes into it works on a copy."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    run(out)
    return out
