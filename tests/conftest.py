"""What the test modules share: the tiny served run and its servers, the builders' run directories as
fixtures, Chromium, the markers' rules. The builders themselves (tiny tasks and runs, one module each)
live in tests/builders/; no test module imports another.

Markers (pyproject.toml): ``slow`` (end to end: subprocesses, torchrun, whole pipelines), ``browser``
(Chromium through Playwright), ``gpu`` (needs CUDA; skipped without). ``make test`` runs all of them,
``make test-fast`` the rest."""
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cli_cmd(*args):
    """The chatfactory CLI as a subprocess command line (same interpreter as the tests)."""
    return [sys.executable, "-m", "chatfactory.cli", *map(str, args)]


# ---------------------------------------------------------------- the process, markers, shared data
@pytest.fixture(autouse=True)
def grad_mode_is_left_alone():
    """A test (or the command it calls in-process) that turns autograd off for good breaks every test
    after it with 'element 0 of tensors does not require grad': name the culprit instead."""
    import torch

    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("this test left autograd disabled for the process (use torch.no_grad() as a context)")


def pytest_sessionstart(session):
    """Build model/kernels.py's int8/int4 kernels once, before any test: a server a test starts then loads them
    from the cache instead of compiling them inside its start-up deadline."""
    from chatfactory.model import kernels

    kernels.available()


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests skip, saying why, where there is no CUDA device; a test that drives Chromium (it asks
    for the ``browser`` fixture) is a ``browser`` test whether or not its module says so."""
    import torch

    no_cuda = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if no_cuda and "gpu" in item.keywords:
            item.add_marker(no_cuda)
        if "browser" in getattr(item, "fixturenames", ()) and "browser" not in item.keywords:
            item.add_marker(pytest.mark.browser)


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data sets not found at {SHARED_DATA} (they live beside the repo, never in it)")
    return SHARED_DATA


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


# ---------------------------------------------------------------- the tiny served run
TEXT = ["the quick brown fox jumps over the lazy dog. hello world, how are you today? " * 4,
        "def add(x, y):\n    return x + y\n" * 4, "Markdown has **bold**, *italic* and `code`. " * 4]


def make_run(root, vocab=320, block=128, flavour="modern"):
    """A run directory: tokenizer.json (300 tokens, trained on TEXT) and a random-init one-layer GPT saved
    as the 'sft' stage, its vocabulary ``vocab`` padded past the tokenizer's (as an imported model's may be)."""
    import torch

    from chatfactory.model.gpt import GPT, GPTConfig
    from chatfactory.store.checkpoint import save_checkpoint, unique_state_dict
    from chatfactory.text.tokenizer import Tokenizer

    root = Path(root)
    tok = Tokenizer.train(TEXT, vocab_size=300)
    tok.save(root / "tokenizer.json")
    torch.manual_seed(0)
    cfg = GPTConfig(flavour=flavour, depth=1, n_embd=64, head_dim=32, vocab_size=vocab, block_size=block)
    save_checkpoint(root / "sft", unique_state_dict(GPT(cfg)), {"model": cfg.to_dict()})
    return root


def post(url, path, body, headers=None, raw=None):
    """-> (status, parsed JSON body) using the standard library only; no body: a GET."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    conn.request("POST" if data is not None else "GET", path, body=data,
                 headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    return r.status, (json.loads(payload) if payload else None)


class Served(NamedTuple):
    """A server running in this process: its URL, the Service behind it and the FastAPI app."""
    url: str
    svc: object
    app: object


@contextmanager
def serving(run_dir, stage="sft", *, allow_origins=(), scheduler=None, wrap=None, feedback_path=None,
            **service_kw):
    """A real uvicorn server on 127.0.0.1 (serve/server.py's ServerThread) serving ``run_dir``'s ``stage`` as
    ``chatfactory serve`` does: ``load_service(run_dir, stage, **service_kw)`` behind ``create_app(svc,
    allow_origins)`` -> Served(url, svc, app); the service is closed after.

    ``scheduler``: a function of the loaded Service that returns the scheduler to serve with instead of
    its own (a stand-in, or one that never runs); ``feedback_path`` goes with it (default the run's file).
    ``wrap``: a function of the app that returns the ASGI app the server runs (the app as another server
    would see it)."""
    from chatfactory.serve.api import create_app
    from chatfactory.serve.server import ServerThread
    from chatfactory.serve.service import Service, load_service

    svc = load_service(run_dir, stage, **service_kw)
    if scheduler is not None:
        svc.close()  # its own scheduler goes; the model and tokenizer stay
        svc = Service(svc.model, svc.tok, svc.name, svc.stage, feedback_path or svc.feedback.path,
                      svc.api_key, scheduler=scheduler(svc))
    app = create_app(svc, allow_origins)
    try:
        with ServerThread(wrap(app) if wrap else app) as url:
            yield Served(url, svc, app)
    finally:
        svc.close()


@pytest.fixture(scope="module")
def serve_run():
    """The one way the tests start a server in-process: ``serve_run(run_dir, stage="sft", **kw)`` ->
    Served(url, svc, app), as ``serving`` (above) takes its arguments. Every server a module starts
    stops when the module ends, so a module-scoped fixture can share one server among its tests."""
    with ExitStack() as stack:
        yield lambda run_dir, stage="sft", **kw: stack.enter_context(serving(run_dir, stage, **kw))


def start_serve(run, *args, env=None, **popen) -> tuple[subprocess.Popen, str]:
    """`chatfactory serve --run RUN ARGS` on a free port, as a user starts it, once /health answers ->
    (the process, its URL); the caller stops it (``popen``: more Popen arguments, e.g. a session of its own)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(cli_cmd("serve", "--run", run, "--port", port, *args), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, **popen)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("chatfactory serve did not start: " + proc.stdout.read().decode(errors="replace"))
            time.sleep(0.3)


@contextmanager
def serve_subprocess(run, *args, env=None):
    """``start_serve`` -> its URL while it runs, stopped afterwards."""
    proc, url = start_serve(run, *args, env=env)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


# ---------------------------------------------------------------- the builders' runs, as fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny RL world (builders/rl_world.py): (root, run, tokenizer), with ``root`` on sys.path so that
    the reward spec ``rl_gold:score`` imports. One copy per module: the stages a module trains stay in it."""
    from builders.rl_world import build_world

    root = tmp_path_factory.mktemp("rl_world")
    run, tok = build_world(root)
    sys.path.insert(0, str(root))
    yield root, run, tok
    sys.path.remove(str(root))


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A run of the good/bad topics task (builders/preferences.py): (run, tokenizer), its policy SFT'd on
    answers half good, half bad. One copy per module: the reward and DPO stages a module trains stay in it."""
    from builders.preferences import make_sft_run

    run = tmp_path_factory.mktemp("topics") / "run"
    return run, make_sft_run(run)


@pytest.fixture(scope="session")
def pretrain_tokenizer(tmp_path_factory):
    """tokenizer.json of the tiny preset with builders/pretrain.py's SMALL overrides, trained once by the CLI."""
    from builders.pretrain import SMALL

    run = tmp_path_factory.mktemp("tok")
    subprocess.run(cli_cmd("tokenizer", "--config", "tiny", "--out", run, *SMALL), check=True, capture_output=True)
    return run / "tokenizer.json"


@pytest.fixture
def seeded_run(pretrain_tokenizer):
    """-> a function of a path that makes it a run directory holding only the pretraining tokenizer."""
    def make(path):
        path.mkdir(parents=True)
        shutil.copy(pretrain_tokenizer, path / "tokenizer.json")
        return path
    return make
