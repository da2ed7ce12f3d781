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


CHROMIUM = "/usr/bin/chromium"  # Debian's package, driven by Playwright through executable_path
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    """A real Chromium for the web UI tests (one per test module); skips, saying why, where there is none."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium); CI does")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield b
        b.close()
