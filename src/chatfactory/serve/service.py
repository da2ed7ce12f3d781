"""What the HTTP endpoints serve: the tokenizer, the feedback store, the server's limits
(``limits.ServerLimits``), and the model version served now (``Served``: one model with the continuous-batching
scheduler that owns it; generation and prompt scoring both run there). ``load_service`` builds one from a run
directory: the version that ``RUN/versions/serving.json`` names when there is one (serve/hotswap.py then
switches to a newly promoted version without a restart), else a stage.

A request holds a ``Lease`` on the ``Served`` it started on, taken once at its start (``Service.lease``), and
uses that one to the end: a swap is one assignment of ``Service.current``, so a request never sees half of
one version and half of another, and the old version's scheduler is closed only once the last lease on it
is given back (``Service.swap`` -> ``_retire``). Anything cached per model (the KV cache, and with it any
prefix kept there) belongs to a scheduler, hence to one version."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from pathlib import Path

import torch

from ..inference.batching import BatchOptions, Scheduler
from ..inference.grammar import Grammars
from ..model.offload import memory_mode
from ..text.tokenizer import Tokenizer
from .feedback import FILENAME as FEEDBACK_FILE
from .feedback import FeedbackStore
from .limits import ServerLimits
from .protocol import LIMITS, APIError

log = logging.getLogger("chatfactory.serve")


class Served:
    """One loaded model version as requests see it: its model, its scheduler, its name ("demo/v2", or
    "demo/sft" for a stage), its stage (where its weights came from, relative to the run), its version
    number (None for a stage). Versions of one run share the run's tokenizer."""

    def __init__(self, model, scheduler, name: str, stage: str, tok: Tokenizer, version: int | None = None,
                 max_prompt_chars: int = 0):
        self.model, self.scheduler, self.name, self.stage, self.tok = model, scheduler, name, stage, tok
        self.version = version
        # the context a request may use: the scheduler's (``--context``), at most the model's
        self.block_size = getattr(scheduler, "context", model.cfg.block_size)
        self.created = int(time.time())
        self.precision = precision_of(model)
        # what /v1/models says of where the weights live: {"memory": "resident"}, or with --max-memory
        # {"memory": "streamed", "memory_budget_mb": …} (model/offload.py); api.py merges it into the model card
        self.memory = memory_mode(model)
        # every special token ends a reply: a model that opens a new turn or document has finished
        self.stop_ids = tok.stop_ids
        self.grammars = Grammars(tok)  # response_format's and tool calls' grammars (built on first use)
        # past this many characters a prompt cannot fit the context, whatever its tokens: no token spells
        # more bytes than the longest one (and a character is at least a byte). Checked before tokenizing
        # (the model's block, not a smaller ``--context``: a loose bound, the token count decides)
        self.max_prompt_chars = max_prompt_chars or model.cfg.block_size * max((len(b) for b in tok.token_bytes),
                                                                          default=1)
        self.users = 0  # leases held (Service._lock)
        self.closed = threading.Event()  # set once its scheduler is closed (after a swap, when drained)

    def __repr__(self) -> str:
        return f"Served({self.name!r}, users={self.users})"


class Lease:
    """A request's hold on the ``Served`` it started on: ``served`` for the request's whole life, given back
    once with ``release`` (again: nothing). A lease dropped without a release (a streamed answer whose body
    never started: Starlette does not run an async generator it never began) is given back when it is
    garbage-collected, so that a retired version still drains."""

    def __init__(self, svc: Service, served: Served):
        self.served = served
        self._done = weakref.finalize(self, svc._release, served)

    def release(self) -> None:
        self._done()  # runs _release at most once, whoever calls first

    def __enter__(self) -> Served:
        return self.served

    def __exit__(self, *exc) -> None:
        self.release()


class Service:
    """What the endpoints need: the tokenizer, the served version (``current``, read through the properties
    below by code that does not hold a lease: /health, tests), the feedback store, limits (``limits``: the
    request shapes protocol.py checks; ``server_limits``: what one client may cost). ``model``: the model, or
    a function that loads it in the scheduler's thread (``make_served``)."""

    def __init__(self, model, tok: Tokenizer, name: str, stage: str = "", feedback_path=None,
                 api_key: str | None = None, slots: int = 16, scheduler=None,
                 server_limits: ServerLimits | None = None, version: int | None = None,
                 options: BatchOptions | None = None):
        self.server_limits = server_limits = server_limits or ServerLimits()
        self.tok, self.slots = tok, slots
        self.options = options or BatchOptions()  # how every served version's scheduler runs (compile, prefix cache)
        self.feedback = (FeedbackStore(feedback_path, server_limits.feedback_rows_per_conversation,
                                       server_limits.feedback_pairs_per_conversation) if feedback_path else None)
        self.api_key = api_key or None
        self.limits = LIMITS
        self._lock = threading.Condition()  # guards current, arena, leases' counts
        self.current = self.make_served(model, name, stage, version, scheduler)
        # the arena's versions (serve/arena.py): version number -> Served, loaded beside the current one
        self.arena: dict[int, Served] = {}
        self.arena_pair: tuple[int | None, int] | None = None  # (None, N): current vs N; (N, M): N vs M
        self.retired_names: set[str] = set()  # names served before a swap: still accepted, answered by current
        self.hotswap = None  # serve/hotswap.HotSwap when serving a run's versions (not a pinned --stage)

    def make_served(self, model, name: str, stage: str, version: int | None = None, scheduler=None) -> Served:
        """``model``: the model, or a function that loads it, which the new scheduler's thread calls: the thread
        that runs a model loads it (inference/owner.py)."""
        lim = self.server_limits
        if scheduler is None:
            scheduler = Scheduler(model, slots=self.slots, vocab_limit=self.tok.vocab_size,
                                  max_waiting=lim.max_waiting, max_client_waiting=lim.max_client_waiting,
                                  options=self.options)
            model = scheduler.model  # loaded by its thread where ``model`` was a loader
        return Served(model, scheduler, name, stage, self.tok, version, lim.max_prompt_chars)

    # ---- the served version, for code that holds no lease (a request takes one: ``lease``)
    model = property(lambda self: self.current.model)
    scheduler = property(lambda self: self.current.scheduler)
    name = property(lambda self: self.current.name)
    stage = property(lambda self: self.current.stage)
    version = property(lambda self: self.current.version)
    block_size = property(lambda self: self.current.block_size)
    precision = property(lambda self: self.current.precision)
    memory = property(lambda self: self.current.memory)
    created = property(lambda self: self.current.created)
    stop_ids = property(lambda self: self.current.stop_ids)
    max_prompt_chars = property(lambda self: self.current.max_prompt_chars)

    def names(self) -> list[str]:
        """The model ids a request may name: the served version first, then the arena's."""
        with self._lock:
            return [self.current.name] + [s.name for s in self.arena.values() if s is not self.current]

    def _resolve(self, name: str | None) -> Served:
        """(under the lock) The version a request naming ``name`` is answered by: the served one for no name,
        its own name, or a name served before a swap (a client that read /v1/models a moment before must
        not fail; the answer's ``model`` says which version wrote it); an arena version by its name."""
        if name is None or name == self.current.name or (isinstance(name, str) and name in self.retired_names):
            return self.current
        for s in self.arena.values():
            if s.name == name:
                return s
        raise APIError(404, f"The model {name!r} does not exist; this server serves {self.current.name!r}"
                            + (f" (and the arena's {', '.join(s.name for s in self.arena.values())})"
                               if self.arena else "") + ".", "model", "model_not_found")

    def check_name(self, name: str | None) -> None:
        """404 (model_not_found) for a model this server does not answer to."""
        with self._lock:
            self._resolve(name)

    def lease(self, name: str | None = None) -> Lease:
        """A hold on the version that answers ``name`` (default the served one), taken atomically with
        respect to a swap: the version cannot be closed until the lease is released."""
        with self._lock:
            served = self._resolve(name)
            served.users += 1
        return Lease(self, served)

    def lease_pair(self) -> tuple[Lease, Lease]:
        """Leases on the arena's two versions (serve/arena.py), or 409 when the arena is not set up."""
        with self._lock:
            pair = self.arena_pair
            if pair is None:
                raise APIError(409, "the arena has no versions to compare: an admin sets them up with POST "
                                    "/v1/admin/arena {\"candidate\": N}", code="arena_closed")
            sides = [self.current if n is None else self.arena[n] for n in pair]
            if sides[0] is sides[1]:
                raise APIError(409, f"the arena's two sides are both {sides[0].name} now (its candidate was "
                                    "promoted); set up a new pair with POST /v1/admin/arena", code="arena_closed")
            for s in sides:
                s.users += 1
        return Lease(self, sides[0]), Lease(self, sides[1])

    def _release(self, served: Served) -> None:
        with self._lock:
            served.users -= 1
            self._lock.notify_all()

    def _in_use(self, served: Served) -> bool:
        return served is self.current or any(s is served for s in self.arena.values())

    def swap(self, new: Served) -> Served:
        """Serve ``new`` from the next request on -> the one it replaces, which is closed once drained (unless
        the arena still uses it). ``new`` must be loaded and warm: it takes traffic at once."""
        with self._lock:
            old, self.current = self.current, new
            self.retired_names.add(old.name)
            self.retired_names.discard(new.name)
        log.info("serving %s (was %s)", new.name, old.name)
        self._retire(old)
        return old

    def set_arena(self, pair: tuple[int | None, int] | None, loaded: dict[int, Served]) -> None:
        """The arena's pair (see ``arena_pair``) and the versions it needs, loaded; versions it no longer needs
        are closed once drained."""
        with self._lock:
            before = list(self.arena.values())
            self.arena_pair, self.arena = pair, dict(loaded)
        for s in before:
            self._retire(s)

    def _retire(self, served: Served) -> None:
        """Close ``served``'s scheduler once no request holds it, unless it is still served (in a background
        thread: a long answer may hold it for minutes)."""
        if self._in_use(served) or served.closed.is_set():
            return

        def drain():
            with self._lock:
                while served.users > 0 or self._in_use(served):
                    if self._in_use(served):
                        return  # served again (a rollback to it) before it drained: it stays open
                    self._lock.wait(timeout=1.0)
            served.scheduler.close()
            served.closed.set()
            log.info("closed %s: its last request finished", served.name)

        threading.Thread(target=drain, name=f"chatfactory-drain-{served.name}", daemon=True).start()

    def start(self) -> None:
        """When the server starts: watch serving.json (serving a run's versions)."""
        if self.hotswap is not None:
            self.hotswap.start()

    def close(self) -> None:
        if self.hotswap is not None:
            self.hotswap.stop()
        with self._lock:
            everything = {id(s): s for s in [self.current, *self.arena.values()]}
        for s in everything.values():
            s.scheduler.close()
            s.closed.set()


def load_service(run_dir, stage: str | None = None, api_key: str | None = None, slots: int = 16,
                 device: str = "cpu", quantize: str | None = None, max_memory: int | str | None = None,
                 server_limits: ServerLimits | None = None, watch: float = 1.0,
                 options: BatchOptions | None = None) -> Service:
    """The Service of ``run_dir``: the version ``RUN/versions/serving.json`` names, else ``stage`` (default: the
    last trained); a ``stage`` given by name wins over the versions. Without one, the service follows
    serving.json (``watch``: seconds between looks, 0 for none; ``POST /v1/admin/reload`` in any case). The
    model loads as ``load_model`` does for inference (a quantized stage as it is; ``quantize``, ``max_memory``);
    ``options``: how the scheduler runs (inference/batching.py ``BatchOptions``; a compiled step is compiled before
    this returns)."""
    from ..store.versions import Versions
    from .hotswap import HotSwap, VersionLoader

    run_dir = Path(run_dir)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = Tokenizer.load(run_dir / "tokenizer.json")
    loader = VersionLoader(run_dir, tok, device, quantize, max_memory)
    versions = Versions(run_dir)
    n = versions.serving() if stage is None else None  # a corrupt serving.json is an error naming it
    if n is not None:
        path, where = loader.version_policy(n)
        name = versions.name(n)
    else:
        from ..store.checkpoint import latest_stage

        where = stage or latest_stage(run_dir)
        path, name = run_dir / where, f"{run_dir.name}/{where}"
    # loaded by the scheduler's thread, not this one (inference/owner.py)
    svc = Service(lambda: loader.load_model(path), tok, name, where, run_dir / FEEDBACK_FILE, api_key, slots,
                  server_limits=server_limits, version=n, options=options)
    if stage is None:
        svc.hotswap = HotSwap(svc, loader, watch)
    return svc


def precision_of(model) -> str:
    """What /v1/models reports: "int8", "int4 (groups of 64)" for a quantized model (model/quant.py), else the
    weights' floating-point type ("float32", "bfloat16")."""
    q = getattr(model, "quantization", None)
    if q:
        return q["scheme"] + (f" (groups of {q['group']})" if q.get("group") and q["scheme"] == "int4" else "") \
            + (", LM head too" if q.get("include_head") else "")
    return str(next(model.parameters()).dtype).removeprefix("torch.")
