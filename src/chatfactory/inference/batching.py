"""Continuous batching: many generation requests share one running batch, token by token.

``Engine`` (engine.py) generates a fixed batch from start to finish. A server cannot wait for a
batch to fill or to drain: requests arrive and finish at any time. This scheduler keeps a fixed
number of *slots*, each a row of one preallocated KV cache with its own fill level. Every iteration:

1. rows that are generating run one decode step together (each writes its key/value at its own
   length, attends to its own keys only, and has its own position id);
2. waiting requests take the free slots and are prefilled (right-padded, one batched forward);
3. every row samples its next token (``engine.sample_next``, with the request's own settings), the
   token goes to the request's callback, and finished or cancelled rows free their slot.

So a request joins the running batch at the next iteration and leaves as soon as it is done; a
client that disconnects calls ``cancel`` and its slot is free one iteration later. The scheduler
runs in one background thread that owns the model; callbacks are called from that thread.

    sched = Scheduler(model, slots=16)                      # starts its thread
    req = sched.submit(Request(prompt_ids, SamplingParams(max_tokens=50), emit=print))
    ...                                                     # emit(Step(token, logprob, top, finish))
    sched.close()

With ``start=False`` nothing runs in the background and ``run_until_idle()`` drives it (tests).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..model.gpt import GPT, GPTConfig
from .engine import SamplingParams, bad_rows, sample_next


class SlotCache:
    """A KV cache whose rows ("slots") fill independently: ``lengths[s]`` positions of slot s are real.

    ``GPT.forward`` calls ``update(layer, k, v)`` once per layer; the scheduler says beforehand what
    the call means with ``prefill(slots)`` (write the new keys at 0.. of those slots) or
    ``decode(at)`` (slots 0..n-1 each append one key at its own length ``at[s]``, a device tensor).
    ``lengths`` is a plain list: bookkeeping stays on the host, so a GPU never waits on it."""

    def __init__(self, cfg: GPTConfig, slots: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.depth, slots, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = [0] * slots
        self.max_len = max_len
        self._rows = None  # prefill: slot indices being written
        self._at = None  # decode: where slots 0..n-1 write their new key (n = len(at))
        self._span = 0  # decode: keys to attend over, max(at) + 1

    # GPT.hidden_states reads and advances ``pos`` (the shared fill level of the plain KVCache). Rows
    # here have their own lengths and the scheduler always passes positions and masks, so the shared
    # level stays 0: that also keeps the model from building its own chunk mask.
    @property
    def pos(self) -> int:
        return 0

    @pos.setter
    def pos(self, value) -> None:
        pass

    def prefill(self, rows: torch.Tensor) -> None:
        self._rows, self._at = rows, None

    def decode(self, at: torch.Tensor, span: int) -> None:
        self._rows, self._at, self._span = None, at, span
        # where row r's new key for head h goes in a layer's buffer flattened to (slot*head*pos, dim):
        # one index_copy_ per layer instead of a strided scatter
        _, S, H, T, _ = self.k.shape
        heads = torch.arange(H, device=at.device)
        rows = torch.arange(at.size(0), device=at.device)
        self._flat = ((rows[:, None] * H + heads[None]) * T + at[:, None]).reshape(-1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self._rows is not None:  # prefill from position 0: attention needs only the new keys
            t = k.size(2)
            self.k[layer, self._rows, :, :t] = k
            self.v[layer, self._rows, :, :t] = v
            return k, v
        n, span, d = self._at.size(0), self._span, k.size(-1)
        self.k[layer].view(-1, d).index_copy_(0, self._flat, k.reshape(-1, d))  # k: (n, heads, 1, dim)
        self.v[layer].view(-1, d).index_copy_(0, self._flat, v.reshape(-1, d))
        return self.k[layer, :n, :, :span], self.v[layer, :n, :, :span]  # views: no copy


@dataclass
class Step:
    """What a request receives per sampled token; ``finish`` is set on its last Step.

    finish: "stop" (a stop id was sampled; ``token`` is that id), "length" (max_tokens or the context
    is full), "cancelled", or "error: …". ``token`` is None on a finish-only Step."""

    token: int | None
    logprob: float | None = None  # log-probability of ``token`` under the model (temperature 1)
    top: list[tuple[int, float]] | None = None  # the ``logprobs`` most likely ids and their log-probs
    finish: str | None = None


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Step], None]
    logprobs: int | None = None  # report log-probs (and this many alternatives) per token
    # scheduler state
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False
    slot: int = -1
    _gen: torch.Generator | None = None
    _scheduler: Scheduler | None = None  # set by submit: where a waiting request is withdrawn from

    def cancel(self) -> None:
        """Safe from any thread: a waiting request leaves the queue now (it must not count toward the
        429 limit), a running one frees its slot at the scheduler's next iteration."""
        self.cancelled = True
        if self._scheduler is not None:
            self._scheduler._withdraw(self)


class QueueFull(RuntimeError):
    """More requests are waiting than the scheduler accepts (the server answers 429)."""


class Scheduler:
    def __init__(self, model: GPT, slots: int = 16, max_waiting: int = 256, start: bool = True,
                 vocab_limit: int | None = None):
        self.model = model.eval()
        # a model's vocabulary is often padded past the tokenizer's: never sample an id with no text
        self.vocab_limit = vocab_limit if vocab_limit and vocab_limit < model.cfg.vocab_size else None
        self.cfg = model.cfg
        self.device = next(model.parameters()).device
        self.slots = slots
        self.max_waiting = max_waiting
        p = model.tok_emb.weight
        self.cache = SlotCache(self.cfg, slots, self.cfg.block_size, device=p.device, dtype=p.dtype)
        self.rows: list[Request | None] = [None] * slots  # the request in each slot
        self.waiting: collections.deque[Request] = collections.deque()
        self.cv = threading.Condition()
        self.steps = 0  # iterations run (for tests and stats)
        self.max_batch = 0  # most rows ever generating at once
        self._closed = False
        self._thread = None
        if start:
            self._thread = threading.Thread(target=self._loop, name="chatfactory-scheduler", daemon=True)
            self._thread.start()

    # ---- the public side (any thread) ----
    def submit(self, req: Request) -> Request:
        n, limit = len(req.prompt), self.cfg.block_size
        if n == 0:
            raise ValueError("a prompt needs at least one token")
        if n >= limit:
            raise ValueError(f"prompt of {n} tokens leaves no room in the {limit}-token context")
        if any(not 0 <= t < self.cfg.vocab_size for t in req.prompt):
            raise ValueError(f"prompt has token ids outside the vocabulary [0, {self.cfg.vocab_size})")
        if req.params.seed is not None:
            if not -2**63 <= req.params.seed < 2**64:
                raise ValueError(f"seed {req.params.seed!r} is outside the generator's range [-2**63, 2**64)")
            req._gen = torch.Generator(device=self.device).manual_seed(req.params.seed)
        with self.cv:
            if self._closed:
                raise RuntimeError("scheduler is closed")
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests already waiting")
            req._scheduler = self
            self.waiting.append(req)
            self.cv.notify()
        return req

    def _withdraw(self, req: Request) -> None:
        with self.cv:
            # under the lock, so _admit cannot take it meanwhile; by identity (dataclass == compares fields)
            at = next((i for i, r in enumerate(self.waiting) if r is req), None)
            if at is None:
                return  # running (its slot is freed at the next step) or already done
            del self.waiting[at]
        req.finished = True
        _safe_emit(req, Step(None, finish="cancelled"))

    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    def close(self) -> None:
        with self.cv:
            self._closed = True
            self.cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def run_until_idle(self, max_steps: int = 100_000) -> None:
        """Drive the scheduler in the calling thread until nothing is left (``start=False`` only)."""
        for _ in range(max_steps):
            if not self.waiting and not self.active():
                return
            self.step()
        raise RuntimeError(f"still busy after {max_steps} iterations")

    # ---- the scheduler thread ----
    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self._closed and not self.waiting and not self.active():
                    self.cv.wait()
                if self._closed:
                    break
            try:
                self.step()
            except Exception as e:  # keep serving: fail what was running, start clean
                self._fail_all(f"error: {type(e).__name__}: {e}")
        self._fail_all("cancelled")

    def _fail_all(self, reason: str) -> None:
        with self.cv:
            pending = list(self.waiting)
            self.waiting.clear()
        for r in [r for r in self.rows if r is not None] + pending:
            self._finish(r, Step(None, finish=reason))
        self.cache.lengths = [0] * self.slots

    def _finish(self, req: Request, step: Step) -> None:
        req.finished = True
        if req.slot >= 0:
            self.rows[req.slot] = None
            self.cache.lengths[req.slot] = 0
            req.slot = -1
        _safe_emit(req, step)

    @torch.no_grad()
    def step(self) -> None:
        """One iteration: decode the running rows, admit and prefill new ones, sample, emit."""
        for r in self.rows:  # disconnected clients leave before any work is spent on them
            if r is not None and r.cancelled:
                self._finish(r, Step(None, finish="cancelled"))
        logits: dict[int, torch.Tensor] = {}
        decoding = [r for r in self.rows if r is not None]
        if decoding:
            logits.update(self._decode(decoding))
        new = self._admit()
        if new:
            logits.update(self._prefill(new))
        if not logits:
            return
        self.steps += 1
        self.max_batch = max(self.max_batch, len(logits))
        self._sample_and_emit(logits)

    def _admit(self) -> list[Request]:
        new = []
        with self.cv:
            free = [s for s, r in enumerate(self.rows) if r is None]
            while free and self.waiting:
                req = self.waiting.popleft()
                if req.cancelled:
                    _safe_emit(req, Step(None, finish="cancelled"))
                    req.finished = True
                    continue
                req.slot = free.pop(0)  # lowest free slot: keeps the decoded range 0..n-1 short
                self.rows[req.slot] = req
                new.append(req)
        return new

    def _decode(self, reqs: list[Request]) -> dict[int, torch.Tensor]:
        n = max(r.slot for r in reqs) + 1  # free slots below n ride along, masked, on key 0
        tokens = [0] * n
        for r in reqs:
            tokens[r.slot] = r.generated[-1]
        lengths = self.cache.lengths[:n]
        span = max(lengths) + 1
        tokens = torch.tensor(tokens, device=self.device)
        at = torch.tensor(lengths, device=self.device)  # each row's new key goes here; also its position
        mask = torch.arange(span, device=self.device)[None] <= at[:, None]  # own keys + the new one
        self.cache.decode(at, span)
        out = self.model(tokens[:, None], cache=self.cache, positions=at[:, None], attn_mask=mask[:, None, None])
        for r in reqs:
            self.cache.lengths[r.slot] += 1
        return {r.slot: out[r.slot, -1] for r in reqs}

    def _prefill(self, reqs: list[Request]) -> dict[int, torch.Tensor]:
        T = max(len(r.prompt) for r in reqs)
        # right padding: a causal mask alone keeps real tokens from seeing pads, and the pads' keys
        # (written past each row's length) are masked out at decode and later overwritten
        idx = torch.tensor([r.prompt + [0] * (T - len(r.prompt)) for r in reqs], device=self.device)
        rows = torch.tensor([r.slot for r in reqs], device=self.device)
        self.cache.prefill(rows)
        hidden = self.model.hidden_states(idx, cache=self.cache, positions=torch.arange(T, device=self.device))
        last = torch.tensor([len(r.prompt) - 1 for r in reqs], device=self.device)
        for r in reqs:
            self.cache.lengths[r.slot] = len(r.prompt)
        # the LM head on each row's last real position only, as the engine does: every position's
        # logits would be rows x T x vocab floats (gigabytes at a real vocabulary and context)
        picked = self.model.lm_head(hidden[torch.arange(len(reqs), device=self.device), last])
        return {r.slot: picked[i] for i, r in enumerate(reqs)}

    def _sample_and_emit(self, logits: dict[int, torch.Tensor]) -> None:
        slots = list(logits)
        reqs = [self.rows[s] for s in slots]
        # rows with the same plain settings are sampled in one call; seeded rows (own generator) and
        # repetition-penalised rows (own history) one by one
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            p = r.params
            key = (p.temperature, p.top_k, p.top_p) if r._gen is None and p.repetition_penalty == 1.0 else ("own", i)
            groups.setdefault(key, []).append(i)
        stacked = torch.stack([logits[s] for s in slots])
        if self.vocab_limit is not None:
            stacked[:, self.vocab_limit:] = float("-inf")
        # a row the model broke on (NaN or inf logits) fails its own request only; the rest sample on
        failed: dict[int, str] = {i: "error: SamplingError: the model gave non-finite logits (NaN or inf) "
                                     "for this request"
                                  for i in bad_rows(stacked)}
        picked: list[int | None] = [None] * len(reqs)
        for _key, members in groups.items():
            members = [i for i in members if i not in failed]
            if not members:
                continue
            r0 = reqs[members[0]]
            seen = None
            if r0.params.repetition_penalty != 1.0:
                seen = torch.tensor([r0.prompt + r0.generated], device=self.device)
            try:
                ids = sample_next(stacked[members], r0.params, seen, r0._gen, self.vocab_limit).tolist()
            except Exception as e:  # whatever breaks one group's sampling fails that group only
                failed.update({i: f"error: {type(e).__name__}: {e}" for i in members})
                continue
            for i, t in zip(members, ids):
                picked[i] = t
        for i, r in enumerate(reqs):
            if i in failed:
                self._finish(r, Step(None, finish=failed[i]))
                continue
            t = picked[i]
            lp = top = None
            if r.logprobs is not None:
                logp = torch.log_softmax(stacked[i].float(), -1)
                lp = float(logp[t])
                if r.logprobs > 0:
                    vals, ids = logp.topk(min(r.logprobs, logp.numel()))
                    top = list(zip(ids.tolist(), vals.tolist()))
            r.generated.append(t)
            finish = None
            if t in r.params.stop_ids:
                finish = "stop"
            elif len(r.generated) >= r.params.max_tokens or len(r.prompt) + len(r.generated) >= self.cfg.block_size:
                finish = "length"
            if finish:
                self._finish(r, Step(t, lp, top, finish))
            else:
                _safe_emit(r, Step(t, lp, top))


def _safe_emit(req: Request, step: Step) -> None:
    # a broken callback (its client gone) must not take the other rows down with it
    try:
        req.emit(step)
    except Exception:
        req.cancelled = True
