"""Inference: prefill then decode with the KV cache (kv_cache.py), on token ids only.

The engine knows nothing of text: callers encode prompts and decode what it yields (so stop strings
are the caller's business; stop *ids* such as ``<|end|>`` are the engine's). Prompts of different
lengths share a batch by padding on the left; padded keys are masked out and every row gets its own
position ids, so a row's tokens do not depend on its neighbours.

    engine = Engine(model)
    for step in engine.stream([ids], SamplingParams(max_tokens=50, temperature=0.8, seed=0)):
        print(step[0])                           # the new id of row 0, or None once it has stopped
    outs = engine.generate([ids_a, ids_b], SamplingParams(temperature=0))   # greedy, batched

Batches whose prompts have equal lengths run without any mask (plain causal prefill, mask-free decode
steps); only the last position's logits are computed at prefill. ``Engine(model, compile=True)``
swaps the decode step for the faster one of ``decode_step.py``. When a conversation outgrows the
context, ``fit_messages`` drops its oldest turns (keeping the system prompt) before it reaches here.
``bench/decode_speed.py`` measures this engine against Hugging Face ``generate``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch

from ..model.gpt import GPT
from .decode_step import DecodeStep, compile_failure
from .grammar import Constraint, constrain
from .kv_cache import KVCache
from .sampling import SamplingParams, sample_next


def distinct_rows(prompts: list[list[int]]) -> tuple[list[int], list[int]]:
    """-> (the first row of each distinct prompt, each row's index into that list)."""
    firsts, share, seen = [], [], {}
    for i, x in enumerate(prompts):
        j = seen.setdefault(tuple(x), len(firsts))
        if j == len(firsts):
            firsts.append(i)
        share.append(j)
    return firsts, share


def fit_messages(messages: list[dict], count, budget: int) -> tuple[list[dict], int]:
    """The context-overflow policy: drop the oldest turns until ``count(messages) <= budget``.

    The system prompt (if first) and the newest message always stay; turns go oldest first, and a
    kept history always starts at a user message. ``count`` measures a conversation in tokens (e.g.
    ``lambda m: len(tok.chat_prompt(m))``), so the engine still never sees a tokenizer. Returns the
    kept messages and how many were dropped, so the caller can say so. Raises ValueError when even
    the system prompt and the newest message do not fit."""
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = list(messages[len(head):])
    dropped = 0
    while count(head + rest) > budget:
        if len(rest) <= 1:
            raise ValueError(f"the message alone is {count(head + rest)} tokens with the system prompt, "
                             f"over the {budget} that fit the context: shorten it")
        rest.pop(0)
        dropped += 1
        while len(rest) > 1 and rest[0]["role"] != "user":
            rest.pop(0)
            dropped += 1
    return head + rest, dropped


def default_threads(batch_size: int) -> int | None:
    """Torch threads for CPU decoding of a batch; None keeps torch's own setting (every core).

    On an idle machine every core helps at every batch size (``bench/decode_speed.py`` measures it), so
    no batch size is pinned. On a machine shared with other busy processes one thread is faster
    (oversubscribed threads wait on each other): pass ``Engine(model, threads={1: 1})`` there."""
    return None


class Engine:
    """Generation for one fixed batch of prompts, start to finish (serving's continuous batching
    lives in batching.py and reuses ``sample_next``).

    ``threads`` maps a batch size to the torch thread count used while decoding it on CPU
    (default: ``default_threads``); the caller's setting is restored between steps.

    ``compile=True`` decodes with ``decode_step.DecodeStep``: the one-token step compiled by
    ``torch.compile`` with static shapes, or, for larger batches of wide models on a CPU, an eager step
    on oneDNN-packed weights (see decode_step.py for which takes what). The first generation of each
    batch size (and, where the span depends on it, each power-of-two span of prompt + answer) pays the
    compile; later ones, in any engine over the model, reuse it. Where compiling fails (no C++
    compiler, an unsupported Python) the engine says so in one warning and decodes eagerly from then
    on. Prefill stays eager either way.

    ``vocab_limit``: the tokenizer's vocabulary size (callers holding a tokenizer pass
    ``tok.vocab_size``; the engine never sees the tokenizer): an imported model's vocabulary is often
    padded past it, and an id there has no text. A row whose logits are not finite raises
    ``SamplingError`` (see ``sample_next``)."""

    def __init__(self, model: GPT, threads: dict[int, int] | None = None, compile: bool = False,
                 vocab_limit: int | None = None):
        self.model = model.eval()
        self.vocab_limit = vocab_limit  # the tokenizer's size: ids at or above it are never sampled
        self.device = next(model.parameters()).device
        self.threads = threads or {}
        self.compiled = None
        if compile:
            try:
                self.compiled = DecodeStep(self.model)
            except Exception as e:  # torch.compile refuses at once on an unsupported Python
                self._compile_failed(e)

    def _compile_failed(self, e: Exception) -> None:
        self.compiled = None
        warnings.warn(f"Engine(compile=True): {compile_failure(e)}; decoding eagerly instead", RuntimeWarning,
                      stacklevel=3)

    def _threads_for(self, batch_size: int) -> int | None:
        if self.device.type != "cpu":
            return None
        return self.threads.get(batch_size, default_threads(batch_size))

    def stream(self, prompts: list[list[int]], p: SamplingParams, logprobs: list | None = None,
               constraints: list[Constraint | None] | None = None, tools: list | None = None,
               forced: list | None = None) -> Iterator[list[int | None]]:
        """Yield, per decode step, the new id of each row (None for rows already stopped). ``logprobs``: a
        list that receives, per step, every row's new id's log-probability under logits / temperature.
        ``constraints``: per row, a grammar (grammar.py) its reply must follow, or None; a row whose grammar
        is complete can only end its turn. ``tools``: per row, a tool that reads each sampled id and returns ids
        to write next instead of sampling (calculator.py's ``CalcRow``: a call's result), or None; ``forced``: a
        list that receives, per step, which rows wrote a tool's id rather than a sampled one."""
        want = self._threads_for(len(prompts))
        steps = self._stream(prompts, p, logprobs, constraints, tools, forced)
        if not want:
            yield from steps
            return
        while True:
            # set the thread count only while our own code runs: the caller's code between two
            # yields (and after the last) keeps the caller's setting
            before = torch.get_num_threads()
            if want != before:
                torch.set_num_threads(want)
            try:
                out = next(steps)
            except StopIteration:
                return
            finally:
                if want != before:
                    torch.set_num_threads(before)
            yield out

    @torch.inference_mode()
    def _stream(self, prompts: list[list[int]], p: SamplingParams, logprobs: list | None = None,
                constraints: list[Constraint | None] | None = None, tools: list | None = None,
                forced: list | None = None) -> Iterator[list[int | None]]:
        if not prompts or any(len(x) == 0 for x in prompts):
            raise ValueError("every prompt needs at least one token")
        if constraints is not None and len(constraints) != len(prompts):
            raise ValueError(f"{len(constraints)} constraints for {len(prompts)} prompts")
        dev = self.device
        B, L = len(prompts), max(len(x) for x in prompts)
        limit = self.model.cfg.block_size
        if L >= limit:
            raise ValueError(f"prompt of {L} tokens leaves no room in the {limit}-token context "
                             f"(shorten it; chat drops the oldest turns, see fit_messages)")
        max_new = min(p.max_tokens, limit - L)
        gen = torch.Generator(device=dev).manual_seed(p.seed) if p.seed is not None else None
        pad = torch.tensor([L - len(x) for x in prompts], device=dev)
        padded = bool(pad.any())
        idx = torch.tensor([[0] * (L - len(x)) + list(x) for x in prompts], device=dev)
        # rows asking for the same prompt (GRPO's groups, several samples per prompt) share one
        # prefill: it runs on the distinct prompts, whose cache rows are then copied to every row
        # that asked for them (the decode steps are the same as without sharing)
        firsts, share = distinct_rows(prompts)
        distinct = torch.tensor(firsts, device=dev) if len(firsts) < B else None
        pre = (lambda t: t) if distinct is None else (lambda t: t[distinct])
        cache = KVCache.for_model(self.model, len(firsts), L + max_new)
        if padded:
            valid = torch.arange(L, device=dev)[None] >= pad[:, None]  # (B, L) real tokens
            positions = (torch.arange(L, device=dev)[None] - pad[:, None]).clamp(min=0)
            # causal and not a pad key; the diagonal stays open so pad queries never see an empty row (NaN)
            causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
            mask = (causal[None] & valid[:, None, :]) | torch.eye(L, dtype=torch.bool, device=dev)[None]
            hidden = self.model.hidden_states(pre(idx), cache=cache, positions=pre(positions),
                                              attn_mask=pre(mask)[:, None])
            # decode steps see every real key: one mask over the whole cache, sliced per step; additive
            # (0 or -inf), which attention reads faster than a boolean one and to the same bits
            key_bias = torch.zeros(B, 1, 1, L + max_new, dtype=hidden.dtype, device=dev)
            key_bias[:, 0, 0, :L].masked_fill_(~valid, float("-inf"))
            pos = positions[:, -1:]
        else:  # equal lengths: plain causal prefill, and decode steps need no mask at all
            hidden = self.model.hidden_states(pre(idx), cache=cache)
            pos = torch.full((B, 1), L - 1, device=dev)
        logits = self.model.lm_head(hidden[:, -1])  # only the last position's logits are needed
        if distinct is not None:
            cache.fork(share)
            logits = logits.index_select(0, torch.tensor(share, device=dev))
        seen = None
        if p.repetition_penalty != 1.0:  # ids each row has seen, preallocated (no torch.cat per step)
            seen = torch.empty(B, L + max_new, dtype=torch.long, device=dev)
            seen[:, :L] = torch.where(pad[:, None] > torch.arange(L, device=dev)[None],
                                      idx[:, -1:], idx)  # pads repeat a real id
        stop = set(p.stop_ids)
        done = [False] * B  # rows that have emitted a stop id (plain Python: no tensor op per step)
        # the fast step never moves the cache's length (it copies the prefill's keys/values, or writes
        # past them), so the eager step can still take over if the first fast step fails
        compiled = self.compiled.begin(cache, valid if padded else None) if self.compiled else None
        pending: list[list[int]] = [[] for _ in range(B)]  # per row: tool output still to be written
        for i in range(max_new):
            if constraints is not None:  # rows with a grammar sample under its mask (a copy: logits may be a buffer)
                logits = logits.float().clone()
                broken = constrain(logits, [None if d else c for c, d in zip(constraints, done)])
                if broken:
                    raise ValueError(f"rows {sorted(broken)}: {next(iter(broken.values()))}")
            nxt = sample_next(logits, p, None if seen is None else seen[:, : L + i], gen, self.vocab_limit)
            ids = nxt.tolist()
            if tools is not None:  # a tool's output (the calculator's result) replaces what was sampled
                was_forced = [bool(q) and not d for q, d in zip(pending, done)]
                for row, tool in enumerate(tools):
                    if was_forced[row]:
                        ids[row] = pending[row].pop(0)
                    elif tool is not None and not done[row]:
                        pending[row] = tool.add(ids[row])
                if any(was_forced):
                    nxt = torch.tensor(ids, device=dev)
                if forced is not None:
                    forced.append(was_forced)
            # what an RL trainer recomputes for these tokens (train/experience.py compares the two)
            if logprobs is not None:
                logprobs.append(torch.log_softmax(logits.float() / p.temperature, -1)
                                .gather(1, nxt[:, None]).squeeze(1))
            if constraints is not None:
                for row, (c, t, d) in enumerate(zip(constraints, ids, done)):
                    if c is not None and not d and not (tools is not None and was_forced[row]) and not c.accept(t):
                        raise ValueError(f"row {row}: the output grammar refused token {t}: {c.error}")
            yield [None if d else t for t, d in zip(ids, done)]
            done = [d or t in stop for t, d in zip(ids, done)]
            if i == max_new - 1 or all(done):
                return
            if seen is not None:
                seen[:, L + i] = nxt
            pos = pos + 1
            if compiled is not None:
                try:
                    logits = compiled(nxt[:, None], pos)
                    continue
                except Exception as e:  # compiling happens on the first call: fall back once, loudly
                    if i > 0:
                        raise
                    self._compile_failed(e)
                    compiled = None
            step_mask = key_bias[..., : cache.length + 1] if padded else None
            logits = self.model(nxt[:, None], cache=cache, positions=pos, attn_mask=step_mask)[:, -1]

    def generate(self, prompts: list[list[int]], p: SamplingParams, logprobs: list | None = None,
                 constraints: list[Constraint | None] | None = None, tools: list | None = None,
                 forced: list | None = None) -> list[list[int]]:
        """New ids per row, up to and including a stop id. ``logprobs``: a list that receives, per row, the
        log-probability of each new id under the model's logits / temperature. ``constraints``, ``tools``: see
        stream; ``forced``: a list that receives, per row, a flag per new id (True: a tool wrote it)."""
        outs: list[list[int]] = [[] for _ in prompts]
        steps: list | None = [] if logprobs is not None else None
        flags: list | None = [] if forced is not None else None
        for step in self.stream(prompts, p, steps, constraints, tools, flags):
            for row, t in enumerate(step):
                if t is not None:
                    outs[row].append(t)
        if logprobs is not None:
            table = torch.stack(steps, 1).tolist() if steps else [[] for _ in prompts]
            logprobs.extend(row[:len(o)] for row, o in zip(table, outs))
        if forced is not None:
            forced.extend([step[r] for step in flags][:len(o)] if flags else [False] * len(o)
                          for r, o in enumerate(outs))
        return outs
