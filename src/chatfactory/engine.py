"""Inference: prefill then decode with a preallocated KV cache, on token ids only.

The engine knows nothing of text: callers encode prompts and decode what it yields (so stop strings
are the caller's business; stop *ids* such as ``<|end|>`` are the engine's). Prompts of different
lengths share a batch by padding on the left; padded keys are masked out and every row gets its own
position ids, so a row's tokens do not depend on its neighbours.

    engine = Engine(model)
    for step in engine.stream([ids], SamplingParams(max_tokens=50, temperature=0.8, seed=0)):
        print(step[0])                           # the new id of row 0, or None once it has stopped
    outs = engine.generate([ids_a, ids_b], SamplingParams(temperature=0))   # greedy, batched
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from .model import GPT


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off; >1 discourages tokens already in the row (CTRL's rule)
    seed: int | None = None
    stop_ids: tuple[int, ...] = field(default_factory=tuple)


def sample_next(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None = None, generator=None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,)."""
    logits = logits.float()
    if p.repetition_penalty != 1.0 and seen is not None:
        picked = logits.gather(1, seen)
        picked = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        logits = logits.scatter(1, seen, picked)
    if p.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.size(-1):
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > p.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


class Engine:
    def __init__(self, model: GPT):
        self.model = model.eval()
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def stream(self, prompts: list[list[int]], p: SamplingParams) -> Iterator[list[int | None]]:
        """Yield, per decode step, the new id of each row (None for rows already stopped)."""
        if not prompts or any(len(x) == 0 for x in prompts):
            raise ValueError("every prompt needs at least one token")
        B, L = len(prompts), max(len(x) for x in prompts)
        limit = self.model.cfg.block_size
        if L >= limit:
            raise ValueError(f"prompt of {L} tokens leaves no room in the {limit}-token context")
        max_new = min(p.max_tokens, limit - L)
        gen = torch.Generator(device=self.device).manual_seed(p.seed) if p.seed is not None else None
        pad = torch.tensor([L - len(x) for x in prompts], device=self.device)
        idx = torch.tensor([[0] * (L - len(x)) + list(x) for x in prompts], device=self.device)
        valid = torch.arange(L, device=self.device)[None] >= pad[:, None]  # (B, L) real tokens
        positions = (torch.arange(L, device=self.device)[None] - pad[:, None]).clamp(min=0)
        # causal and not a pad key; the diagonal stays open so pad queries never see an empty row (NaN)
        causal = torch.ones(L, L, dtype=torch.bool, device=self.device).tril()
        mask = (causal[None] & valid[:, None, :]) | torch.eye(L, dtype=torch.bool, device=self.device)[None]
        cache = self.model.new_cache(B, L + max_new)
        logits = self.model(idx, cache=cache, positions=positions, attn_mask=mask[:, None])[:, -1]
        seen = idx.masked_fill(~valid, idx[0, -1].item())  # pads repeat a real id: harmless to the penalty
        stop = torch.tensor(list(p.stop_ids) or [-1], device=self.device)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        pos = positions[:, -1]
        key_valid = torch.cat([valid, torch.ones(B, max_new, dtype=torch.bool, device=self.device)], 1)
        for i in range(max_new):
            nxt = sample_next(logits, p, seen, gen)
            yield [None if d else int(t) for t, d in zip(nxt.tolist(), done.tolist())]
            done |= torch.isin(nxt, stop)
            if bool(done.all()) or i == max_new - 1:
                return
            seen = torch.cat([seen, nxt[:, None]], 1)
            pos = pos + 1
            step_mask = key_valid[:, None, None, : cache.pos + 1]
            logits = self.model(nxt[:, None], cache=cache, positions=pos[:, None], attn_mask=step_mask)[:, -1]

    def generate(self, prompts: list[list[int]], p: SamplingParams) -> list[list[int]]:
        """New ids per row, up to and including a stop id."""
        outs: list[list[int]] = [[] for _ in prompts]
        for step in self.stream(prompts, p):
            for row, t in enumerate(step):
                if t is not None:
                    outs[row].append(t)
        return outs
