"""Continuous batching: many generation requests share one running batch, token by token.

``Engine`` (engine.py) generates a fixed batch from start to finish. A server cannot wait for a
batch to fill or to drain: requests arrive and finish at any time. This scheduler keeps a fixed
number of *slots*, each a row of one KV cache (kv_cache.py) with its own length. Every iteration:

1. rows that are generating run one decode step together (each writes its key/value at its own
   length, attends to its own keys only, and has its own position id);
2. waiting requests take the free slots; a prompt that starts with blocks the prefix cache holds
   (prefix_cache.py: what earlier rows held when they ended, e.g. a conversation's earlier turns) gets
   them copied into its row;
3. rows still prefilling take their next chunk, ``prefill_chunk`` tokens in all, in one forward
   (right-padded), each from its own position: a long prompt is spread over iterations and the rows
   generating decode between its chunks;
4. every row with logits samples its next token (``sampling.sample_next``, with the request's own
   settings), the token goes to the request's callback, and finished or cancelled rows free their slot,
   their positions kept in the prefix cache.

So a request joins the running batch at the next iteration and leaves as soon as it is done; a
client that disconnects calls ``cancel`` and its slot is free one iteration later. The scheduler
runs in one background thread that owns the model from its load on (owner.py); callbacks run there.

Sharing between clients (each request names its ``client``): a group of requests is admitted whole
or not at all (``submit_all``), and not when it would take the queue past ``max_waiting`` or its
client past ``max_client_waiting`` (waiting and running together): ``QueueFull``, which says when to
retry. A free slot goes to the waiting client with the fewest running rows; when none is free and a
waiting client has fewer than its share (slots / clients), the newest row of the client furthest over
its share goes back to the queue, keeping what it generated, and resumes later by prefilling its
prompt and tokens (vLLM's preemption by recompute). Prompt scoring (``Request(score=True)``: the
log-probability of each prompt token, what ``echo`` + ``logprobs`` ask) is queued, counted and
cancelled like generation and runs here too, one prompt per iteration, its LM head a chunk of
positions at a time, so that scoring cannot run beside the model's other work nor hold every
position's logits at once.

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

import torch

from ..model.gpt import GPT
from .decode_step import SlotStep
from .grammar import constrain
from .kv_cache import KVCache
from .owner import start_owner
from .prefix_cache import PrefixCache
from .requests import BatchOptions, QueueFull, Request, Step
from .sampling import bad_rows, sample_next

__all__ = ["BatchOptions", "QueueFull", "Request", "Scheduler", "Step"]  # requests.py's, imported from here too


class Scheduler:
    def __init__(self, model: GPT | Callable[[], GPT], slots: int = 16, max_waiting: int = 256, start: bool = True,
                 vocab_limit: int | None = None, max_client_waiting: int | None = None, score_chunk: int = 256,
                 options: BatchOptions | None = None):
        """``model``: the model, or a function that loads it (called in the scheduler's thread: owner.py says
        why the thread that runs a model should be the one that loaded it). With ``start`` the thread is
        running, and the model loaded, warm and compiled, when this returns; a load that fails raises here."""
        self.slots = slots
        self.max_waiting = max_waiting
        # one client's requests, waiting and running (default: as many as the whole queue)
        self.max_client_waiting = max_client_waiting or max_waiting
        self.score_chunk = score_chunk  # positions of a prompt scored per iteration
        self._scoring = None  # (request, its scoring generator) while a prompt is being scored
        self.preempted = 0  # rows sent back to the queue for another client's (for tests and stats)
        self._scored: collections.Counter[str] = collections.Counter()  # prompts scored per client lately
        self.options = options or BatchOptions()
        self.rows: list[Request | None] = [None] * slots  # the request in each slot
        self.waiting: collections.deque[Request] = collections.deque()
        self.cv = threading.Condition()
        self.steps = 0  # iterations run (for tests and stats)
        self.max_batch = 0  # most rows ever generating at once
        self._closed = False
        self._thread = None
        if start:
            self._thread = start_owner("chatfactory-scheduler", lambda: self._setup(model, vocab_limit), self._loop)
        else:
            self._setup(model, vocab_limit)

    def _setup(self, model: GPT | Callable[[], GPT], vocab_limit: int | None) -> None:
        """What the model needs before the first request (in the thread that will run it): loaded, its KV
        cache, its compiled step."""
        if not isinstance(model, torch.nn.Module):
            model = model()
        self.model = model.eval()
        # a model's vocabulary is often padded past the tokenizer's: never sample an id with no text
        self.vocab_limit = vocab_limit if vocab_limit and vocab_limit < model.cfg.vocab_size else None
        self.cfg = model.cfg
        self.device = next(model.parameters()).device
        options = self.options
        # a row per slot, each ``options.context`` positions (0: the model's whole block): a model with a long
        # block (SmolLM2's 8192) serving short conversations needs a fraction of it
        self.context = min(options.context or self.cfg.block_size, self.cfg.block_size)
        self.cache = KVCache.for_model(model, self.slots, self.context)
        # compile: decode with the compiled step (decode_step.py SlotStep: static shapes, every slot a row),
        # each attention window compiled here, before the first request; eager, with a warning, if it fails
        self.fast, self.eager_reason = None, "" if options.compile else "compile=False"
        if options.compile:
            self.fast, self.eager_reason = SlotStep.ready(model, self.cache)
        self.prefix = (PrefixCache(options.prefix_block, int(options.prefix_cache_mb * 2**20))
                       if options.prefix_cache_mb > 0 else None)

    # ---- the public side (any thread) ----
    def submit(self, req: Request) -> Request:
        self._check(req)
        with self.cv:
            if self._closed:
                raise RuntimeError("scheduler is closed")
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests already waiting")
            req._withdraw = self._withdraw
            self.waiting.append(req)
            self.cv.notify()
        return req

    def submit_all(self, reqs: list[Request]) -> list[Request]:
        """Queue every request of ``reqs`` (one client's: ``reqs[0].client``), or none: ValueError for a
        bad one, QueueFull when the queue or the client's share of it has no room for them all."""
        client = reqs[0].client if reqs else ""
        with self.cv:  # (re-entrant: each goes through submit, under the same lock, so the group fits)
            if self._closed:
                raise RuntimeError("scheduler is closed")
            retry = max(1, min(60, len(self.waiting) // max(1, self.slots)))
            if len(self.waiting) + len(reqs) > self.max_waiting:
                room = max(0, self.max_waiting - len(self.waiting))
                raise QueueFull(f"{len(self.waiting)} requests already waiting, room for {room} more, this asks for "
                                f"{len(reqs)}", retry)
            held = sum(r.client == client for r in self.waiting) + sum(r is not None and r.client == client
                                                                       for r in self.rows)
            if held + len(reqs) > self.max_client_waiting:
                raise QueueFull(f"this client already has {held} generations queued or running and asks for "
                                f"{len(reqs)} more; one client may hold {self.max_client_waiting}", retry)
            done = []
            try:
                for req in reqs:
                    done.append(self.submit(req))
            except BaseException:  # none or all: those already queued would run for no reader
                for r in done:
                    r.cancel()
                raise
        return reqs

    def _check(self, req: Request) -> None:
        n, limit = len(req.prompt), (self.cfg.block_size + 1 if req.score else self.context)
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
        """Rows generating, and the prompt being scored if one is."""
        return sum(r is not None for r in self.rows) + (self._scoring is not None)

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
        scoring, self._scoring = self._scoring, None
        for r in [r for r in self.rows if r is not None] + pending + ([scoring[0]] if scoring else []):
            self._finish(r, Step(None, finish=reason), keep=False)  # after a failure the rows may be half written
        for s in range(self.slots):
            self.cache.free(s)

    def _finish(self, req: Request, step: Step, keep: bool = True) -> None:
        req.finished = True
        if req.slot >= 0:
            if keep and not (step.finish or "").startswith("error"):
                self._remember(req)
            self.rows[req.slot] = None
            self.cache.free(req.slot)
            req.slot = -1
        _safe_emit(req, step)

    def _remember(self, req: Request) -> None:
        """The prefix cache keeps the full blocks of what ``req``'s row holds (prompt, then what it generated)."""
        if self.prefix is not None:
            slot, n = req.slot, self.cache.lengths[req.slot]
            self.prefix.store((req.prompt + req.generated)[:n], lambda a, b: self.cache.read(slot, a, b))

    @torch.no_grad()
    def step(self) -> None:
        """One iteration: decode the running rows, admit new ones, prefill (a chunk of) theirs, sample, emit."""
        for r in self.rows:  # disconnected clients leave before any work is spent on them
            if r is not None and r.cancelled:
                self._finish(r, Step(None, finish="cancelled"))
        self._preempt()
        logits: dict[int, torch.Tensor] = {}
        decoding = [r for r in self.rows if r is not None and not r.prefilling]
        if decoding:
            logits.update(self._decode(decoding))
        self._admit()
        logits.update(self._prefill())
        if logits:
            self.steps += 1
            self.max_batch = max(self.max_batch, len(logits))
            self._sample_and_emit(logits)
        self._score_one()

    def _take(self, ranks: dict[str, int], scoring: bool) -> Request | None:
        """Under the lock: out of the queue, the first request of the kind asked for whose client ranks lowest
        (fewest running rows; for scoring, fewest prompts scored lately); cancelled ones are dropped."""
        for r in [r for r in self.waiting if r.cancelled]:  # (a row cancelled as it was preempted)
            self.waiting.remove(r)
            r.finished = True
            _safe_emit(r, Step(None, finish="cancelled"))
        best = None
        for i, r in enumerate(self.waiting):
            if r.score == scoring and (best is None or ranks.get(r.client, 0) < best[1]):
                best = (i, ranks.get(r.client, 0))
        if best is None:
            return None
        req = self.waiting[best[0]]
        del self.waiting[best[0]]
        return req

    def _running(self) -> collections.Counter[str]:
        return collections.Counter(r.client for r in self.rows if r is not None)

    def _admit(self) -> None:
        """Waiting requests take the free slots (the client with the fewest running rows first); a prompt that
        starts with blocks the prefix cache holds gets them in its row, to prefill only the rest."""
        new = []
        with self.cv:
            free = [s for s, r in enumerate(self.rows) if r is None]
            running = self._running()
            while free:
                req = self._take(running, scoring=False)
                if req is None:
                    break
                req.slot = free.pop(0)  # lowest free slot: keeps the decoded range 0..n-1 short
                req.admitted = self.steps
                self.rows[req.slot] = req
                running[req.client] += 1
                new.append(req)
        for req in new:
            req.prefilling, req.filled = True, 0
            if self.prefix is not None:
                seq = req.prompt + req.generated
                n, kv = self.prefix.match(seq, limit=len(seq) - 1)  # the last token's logits are computed here
                if n:
                    self.cache.load(req.slot, kv)
                    req.filled = n

    def _preempt(self) -> None:
        """No free slot, and a client waits with fewer rows than its share: the newest row of the client
        furthest over its share goes back to the front of the queue (it keeps its tokens)."""
        with self.cv:
            if all(r is not None for r in self.rows) and self.waiting:
                running = self._running()
                waiting = {r.client for r in self.waiting if not r.score and not r.cancelled}
                share = max(1, self.slots // len(waiting | set(running)))
                for client in waiting:
                    over = max(running, key=running.get)
                    if running[client] >= share or running[over] <= share:
                        continue
                    victim = max((r for r in self.rows if r is not None and r.client == over), key=lambda r: r.admitted)
                    self._remember(victim)  # its resume finds its prompt and tokens in the prefix cache
                    self.rows[victim.slot] = None
                    self.cache.free(victim.slot)
                    victim.slot = -1
                    self.waiting.appendleft(victim)
                    running[over] -= 1
                    running[client] += 1  # its turn: _admit gives it the slot
                    self.preempted += 1

    def _decode(self, reqs: list[Request]) -> dict[int, torch.Tensor]:
        out = self.fast([r.slot for r in reqs], [r.generated[-1] for r in reqs]) if self.fast is not None else None
        if out is not None:  # the compiled step ran (None: this many rows are the eager step's)
            return {r.slot: out[r.slot] for r in reqs}
        n = max(r.slot for r in reqs) + 1  # free slots below n ride along, masked, on key 0
        tokens = [0] * n
        for r in reqs:
            tokens[r.slot] = r.generated[-1]
        span = max(self.cache.lengths[:n]) + 1
        tokens = torch.tensor(tokens, device=self.device)
        at = self.cache.decode([r.slot for r in reqs])  # each row's new key goes here; also its position
        mask = torch.arange(span, device=self.device)[None] <= at[:, None]  # own keys + the new one
        out = self.model(tokens[:, None], cache=self.cache, positions=at[:, None], attn_mask=mask[:, None, None])
        return {r.slot: out[r.slot, -1] for r in reqs}

    def _prefill(self) -> dict[int, torch.Tensor]:
        """The rows still prefilling take their next chunk, oldest admitted first, ``prefill_chunk`` tokens in all
        (0: no limit), in one forward -> the logits of the rows whose prefill it completes."""
        pending = sorted((r for r in self.rows if r is not None and r.prefilling), key=lambda r: (r.admitted, r.slot))
        budget = self.options.prefill_chunk or float("inf")
        reqs, seqs, starts = [], [], []
        for r in pending:
            seq = r.prompt + r.generated  # a preempted row resumes with what it generated
            n = int(min(len(seq) - r.filled, budget))
            if n <= 0:
                break
            budget -= n
            reqs.append(r)
            seqs.append(seq[r.filled:r.filled + n])
            starts.append(r.filled)
        if not reqs:
            return {}
        # right padding: a causal mask keeps real tokens from seeing pads, whose keys are never written (extend)
        # or written past each row's length, masked out at decode and later overwritten (prefill)
        T = max(len(x) for x in seqs)
        idx = torch.tensor([x + [0] * (T - len(x)) for x in seqs], device=self.device)
        slots, lengths = [r.slot for r in reqs], [len(x) for x in seqs]
        if any(starts):  # rows that hold a cached prefix or an earlier chunk: each from its own position
            self.cache.extend(slots, starts, lengths)
            positions, mask = KVCache.extend_mask(starts, lengths, self.device)
        else:
            self.cache.prefill(slots, lengths)
            positions, mask = torch.arange(T, device=self.device), None
        hidden = self.model.hidden_states(idx, cache=self.cache, positions=positions, attn_mask=mask)
        done = []
        for i, r in enumerate(reqs):
            r.filled += lengths[i]
            if r.filled == len(r.prompt) + len(r.generated):
                r.prefilling = False
                done.append(i)
        if not done:
            return {}
        # the LM head on each finished row's last real position only, as the engine does: every position's
        # logits would be rows x T x vocab floats (gigabytes at a real vocabulary and context)
        at = torch.tensor(done, device=self.device)
        picked = self.model.lm_head(hidden[at, torch.tensor([lengths[i] - 1 for i in done], device=self.device)])
        return {reqs[i].slot: picked[j] for j, i in enumerate(done)}

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
        # rows with an output grammar sample under its mask (and report the masked distribution's log-probs)
        failed.update({i: why for i, why in constrain(stacked, [r.constraint for r in reqs]).items()
                       if i not in failed})
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
            t, forced = picked[i], False
            if r.tool is not None:  # the tool's output replaces what was sampled, one id per iteration
                if r._pending:
                    t, forced = r._pending.pop(0), True
                else:
                    r._pending = r.tool.add(t)
            lp = top = None
            if r.logprobs is not None:
                logp = torch.log_softmax(stacked[i].float(), -1)
                lp = float(logp[t])
                if r.logprobs > 0:
                    vals, ids = logp.topk(min(r.logprobs, logp.numel()))
                    top = list(zip(ids.tolist(), vals.tolist()))
            r.generated.append(t)
            finish = None
            if r.constraint is not None and not forced and not r.constraint.accept(t):
                self._finish(r, Step(None, finish=f"error: the output grammar refused token {t}: {r.constraint.error}"))
                continue
            if t in r.params.stop_ids:
                finish = "stop"
            elif len(r.generated) >= r.params.max_tokens or len(r.prompt) + len(r.generated) >= self.context:
                finish = "length"
            if finish:
                self._finish(r, Step(t, lp, top, finish, forced=forced))
            else:
                _safe_emit(r, Step(t, lp, top, forced=forced))

    def _score_one(self) -> None:
        """One chunk of prompt scoring: ``score_chunk`` positions of the prompt being scored (taking the next
        waiting one, the client with the fewest lately scored first, when none is), so a long prompt's forward
        is spread over iterations and the running rows decode between its chunks."""
        if self._scoring is None:
            with self.cv:
                req = self._take(self._scored, scoring=True)
                if req is None:
                    self._scored.clear()  # nobody waits: start the count again
                    return
                self._scored[req.client] += 1
            self._scoring = (req, self._score(req))
        req, steps = self._scoring
        try:
            next(steps)
            return  # more chunks to go
        except StopIteration as done:
            scored, finish = done.value, "cancelled" if done.value is None else "scored"
        except Exception as e:  # fails this prompt only
            scored, finish = None, f"error: {type(e).__name__}: {e}"
        self._scoring = None
        self._finish(req, Step(None, finish=finish, scored=scored))

    def _score(self, req: Request):
        """A generator: each step runs the forward of the next ``score_chunk`` positions through a KV cache of
        the prompt's own and their log-probs (memory: that many positions x vocabulary floats, not the whole
        prompt's); returns (log-probs, top alternatives), or None when the client left."""
        x = torch.tensor([req.prompt], device=self.device)
        n, vocab, chunk = x.size(1), self.vocab_limit or self.cfg.vocab_size, self.score_chunk
        cache = KVCache.for_model(self.model, 1, max(1, n - 1))
        lps, tops = [], []
        for a in range(0, n - 1, chunk):  # position i predicts prompt[i + 1]: the last one predicts nothing
            if req.cancelled:  # its client left: stop here
                return None
            b = min(a + chunk, n - 1)
            hidden = self.model.hidden_states(x[:, a:b], cache=cache)[0]
            logp = torch.log_softmax(self.model.lm_head(hidden)[:, :vocab].float(), -1)
            lps += logp.gather(1, x[0, a + 1:b + 1, None])[:, 0].tolist()
            if req.logprobs:
                vals, idx = logp.topk(min(req.logprobs, vocab), -1)
                tops += [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
            else:
                tops += [[] for _ in range(logp.size(0))]
            if b < n - 1:
                yield  # the next chunk in the next iteration
        return lps, tops


def _safe_emit(req: Request, step: Step) -> None:
    # a broken callback (its client gone) must not take the other rows down with it
    try:
        req.emit(step)
    except Exception:
        req.cancelled = True
