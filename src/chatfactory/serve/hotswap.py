"""Serving a run's versions without a restart: load a newly promoted version, warm it, swap it in.

``chatfactory learn`` promotes a version by rewriting ``RUN/versions/serving.json`` (store/versions.py);
``chatfactory rollback`` does too. A server that serves the run's versions (``serve --run R`` without
``--stage``) follows that file: ``HotSwap``'s watcher thread looks at it about once a second (its size, mtime
and inode: a stat, nothing read while it is unchanged), and ``POST /v1/admin/reload`` asks for a look now.
When it names another version, ``reload``:

1. loads that version's policy (``VersionLoader``: as the first one was loaded, the run's tokenizer shared);
2. builds its own scheduler (its own KV cache: nothing cached for one version is read by another) and
   warms it with one short generation, so the first request it takes pays no first-call costs and a
   version that cannot generate never takes traffic;
3. swaps it in (``Service.swap``: one assignment). Requests that started on the old version hold a lease
   on it and finish there; its scheduler is closed once the last of them has finished.

A version that fails to load or warm is logged (and the admin route answers the error); the served one
stays. The arena's versions (serve/arena.py) are loaded and warmed the same way, and a promoted arena
candidate is swapped in as it is, already warm.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from ..inference.batching import Request
from ..inference.sampling import SamplingParams
from ..store.files import CheckpointError
from ..store.versions import Versions

log = logging.getLogger("chatfactory.serve")
WARM_TIMEOUT = 600.0  # seconds one short generation may take on a new version (a large model on a CPU)


class VersionLoader:
    """How this server loads weights: its device, quantization and memory budget; the run's tokenizer."""

    def __init__(self, run_dir, tok, device: str = "cpu", quantize: str | None = None,
                 max_memory: int | str | None = None):
        self.run_dir, self.tok = Path(run_dir), tok
        self.device, self.quantize, self.max_memory = device, quantize, max_memory
        self.versions = Versions(run_dir)

    def load_model(self, stage_dir: Path):
        from ..store.load import load_model

        model, _ = load_model(stage_dir, device=self.device, inference=True, quantize=self.quantize,
                              max_memory=self.max_memory)
        if self.tok.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"{self.run_dir}/tokenizer.json has {self.tok.vocab_size} tokens but the model at "
                             f"{stage_dir} only {model.cfg.vocab_size}")
        return model

    def version_policy(self, n: int) -> tuple[Path, str]:
        """-> (version ``n``'s policy directory, where that is relative to the run)."""
        info = self.versions.info(n)
        if not info.get("policy"):
            raise CheckpointError(f"{self.versions.dir(n)}: version {n} ({info.get('status')}) has no policy yet")
        where = self.versions.policy_dir(n)
        try:
            shown = str(where.relative_to(self.run_dir))
        except ValueError:
            shown = str(where)
        return where, shown


def warm(served, timeout: float = WARM_TIMEOUT) -> None:
    """One short greedy generation through ``served``'s scheduler; an error (or no answer in ``timeout``
    seconds) is a RuntimeError naming the version."""
    done, result = threading.Event(), {}

    def emit(step):
        if step.finish:
            result["finish"] = step.finish
            done.set()

    prompt = served.tok.chat_prompt([{"role": "user", "content": "Hello"}])
    served.scheduler.submit(Request(prompt, SamplingParams(max_tokens=2, temperature=0.0, stop_ids=served.stop_ids),
                                    emit=emit, client="warm-up"))
    if not done.wait(timeout):
        raise RuntimeError(f"{served.name}: the warm-up generation did not finish within {timeout:g} s")
    if result["finish"].startswith("error"):
        raise RuntimeError(f"{served.name}: the warm-up generation failed ({result['finish']})")


class HotSwap:
    """Follows ``RUN/versions/serving.json`` for ``svc`` (see the module docstring); ``interval``: seconds
    between the watcher's looks (0: no watcher; ``reload`` still works)."""

    def __init__(self, svc, loader: VersionLoader, interval: float = 1.0):
        self.svc, self.loader, self.interval = svc, loader, interval
        self.versions = loader.versions
        self._busy = threading.Lock()  # one load at a time: the watcher's, an admin's
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen = None  # the file's (size, mtime, inode) at the last look
        self.last_error: str | None = None

    # ---- loading
    def load(self, n: int):
        """Version ``n`` loaded and warm, as a Served not yet serving anything (the arena's one if loaded)."""
        for s in list(self.svc.arena.values()):
            if s.version == n and not s.closed.is_set():
                return s
        path, where = self.loader.version_policy(n)
        # the new scheduler's thread loads it (inference/owner.py); a load that fails raises here
        served = self.svc.make_served(lambda: self.loader.load_model(path), self.versions.name(n), where, n)
        try:
            warm(served)
        except BaseException:
            served.scheduler.close()
            served.closed.set()
            raise
        return served

    def reload(self) -> dict:
        """Serve the version serving.json names, if it is not the one served -> what happened:
        ``{"changed", "version", "model", "previous"}``. Errors (a corrupt file, weights that do not load or
        generate) raise; the served version stays."""
        with self._busy:
            want = self.versions.serving()
            svc = self.svc
            if want is None or want == svc.current.version:
                return {"changed": False, "version": svc.current.version, "model": svc.current.name,
                        "previous": None}
            new = self.load(want)
            old = svc.swap(new)
            if svc.arena_pair is not None and svc.arena_pair[0] is None and svc.arena_pair[1] == want:
                svc.set_arena(None, {})  # the candidate was promoted: it battled the version it replaced
                log.info("arena closed: its candidate %s is served now", new.name)
            return {"changed": True, "version": want, "model": new.name, "previous": old.name}

    def rollback(self, to: int | None = None) -> dict:
        """``chatfactory rollback`` through the server: serving.json moves back (store/versions.py's rules),
        then ``reload``."""
        with self._busy:
            self.versions.rollback(to)
        return self.reload()

    def set_arena(self, candidate: int | None = None, pair: tuple[int, int] | None = None) -> dict:
        """Battle the served version against version ``candidate``, or the two versions ``pair``; neither:
        close the arena. The versions load and warm before the arena changes."""
        svc = self.svc
        with self._busy:
            if candidate is None and pair is None:
                svc.set_arena(None, {})
                return self.arena_state()
            wanted = [candidate] if pair is None else list(pair)
            for n in wanted:
                if n == svc.current.version and pair is None:
                    raise ValueError(f"candidate: version {n} is the one served; the arena needs another version")
                self.versions.info(n)  # a version on record (CheckpointError naming the file otherwise)
            loaded = {n: (svc.current if n == svc.current.version else self.load(n)) for n in wanted}
            svc.set_arena((None, candidate) if pair is None else tuple(pair), loaded)
            return self.arena_state()

    def arena_state(self) -> dict:
        svc = self.svc
        pair = svc.arena_pair
        if pair is None:
            return {"object": "arena", "open": False, "models": []}
        names = [svc.current.name if n is None else svc.arena[n].name for n in pair]
        return {"object": "arena", "open": True, "models": names,
                "versions": [svc.current.version if n is None else n for n in pair]}

    # ---- the watcher
    def start(self) -> None:
        if self.interval and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="chatfactory-versions", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _signature(self, path=None):
        try:
            st = os.stat(path or self.versions.serving_file)
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mtime_ns, st.st_ino

    def follow_arena(self) -> None:
        """Battle the candidate ``RUN/versions/arena.json`` names (``learn.gate=arena``) against the served
        version; close the arena when it names none (a file that never named one leaves the arena alone)."""
        n = self.versions.arena_candidate()
        pair = self.svc.arena_pair
        if n is None:
            if pair is not None and pair[0] is None:
                self.set_arena(None)
        elif pair != (None, n) and n != self.svc.current.version:
            self.set_arena(candidate=n)
            log.warning("arena: %s battles the served %s", self.versions.name(n), self.svc.current.name)

    def _watch(self) -> None:
        arena_seen = None
        while not self._stop.is_set():
            seen_arena = self._signature(self.versions.arena_file)
            if seen_arena != arena_seen:
                arena_seen = seen_arena
                try:
                    if seen_arena is not None:
                        self.follow_arena()
                except Exception as e:  # the arena stays as it was; the served version is not touched
                    log.error("arena.json changed but could not be followed: %s: %s", type(e).__name__, e)
            seen = self._signature()
            if seen != self._seen:
                self._seen = seen
                try:
                    result = self.reload()
                    self.last_error = None
                    if result["changed"]:
                        log.warning("now serving %s (was %s)", result["model"], result["previous"])
                except Exception as e:  # keep serving the old version; a later change is looked at again
                    self.last_error = f"{type(e).__name__}: {e}"
                    log.error("serving.json changed but the version it names is not served: %s", self.last_error)
            self._stop.wait(self.interval)
