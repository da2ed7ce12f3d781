import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data sets not found at {SHARED_DATA} (they live beside the repo, never in it)")
    return SHARED_DATA


def cli_cmd(*args):
    """The chatfactory CLI as a subprocess command line (same interpreter as the tests)."""
    return [sys.executable, "-m", "chatfactory.cli", *map(str, args)]


@pytest.fixture(autouse=True)
def grad_mode_is_left_alone():
    """A test (or the command it calls in-process) that turns autograd off for good breaks every test
    after it with 'element 0 of tensors does not require grad': name the culprit instead."""
    import torch

    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("this test left autograd disabled for the process (use torch.no_grad() as a context)")
