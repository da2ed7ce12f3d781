"""Sampling: the settings of one generation (``SamplingParams``) and the next id of each row from its logits
(``sample_next``: temperature, top-k, top-p, repetition penalty; ``sample_probs``: one uniform draw per row).
The engine and the server's continuous batching both sample through here. A row whose logits hold no
distribution (NaN, +inf, nothing finite) is refused with ``SamplingError``, naming the rows, so a server can
fail those requests only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off; >1 discourages tokens already in the row (CTRL's rule)
    seed: int | None = None
    stop_ids: tuple[int, ...] = field(default_factory=tuple)


class SamplingError(ValueError):
    """Rows whose logits hold no distribution to sample (a NaN or +inf, or no finite entry): the model
    broke on them. ``rows`` are their indices in the batch, so a server can fail those requests only."""

    def __init__(self, rows: list[int]):
        self.rows = rows
        super().__init__(f"the model gave non-finite logits (NaN or inf) for batch row(s) {rows}: "
                         f"refusing to sample from them")


def bad_rows(logits: torch.Tensor) -> list[int]:
    """Indices of the rows of logits (B, V) that ``sample_next`` refuses (one host sync).

    amax propagates NaN, so one reduction finds NaN, +inf and all--inf rows alike."""
    return (~torch.isfinite(logits.amax(-1))).nonzero().flatten().tolist()


def sample_next(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None = None, generator=None,
                vocab_limit: int | None = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,), each below ``vocab_limit`` (default V).

    ``vocab_limit``: the tokenizer's size, when the model's vocabulary is padded past it (imported
    models): an id at or above it has no text, so it is never picked. Raises ``SamplingError`` when a
    row's logits are not finite, rather than return an id from NaN probabilities (that id would be V:
    out of range). Any temperature > 0 and penalty > 0 is safe: a tiny temperature samples greedily,
    its limit (below float32's smallest normal number, greedily outright), because logits are shifted
    by their maximum before they are divided."""
    logits = logits.float()
    V = logits.size(-1)
    if vocab_limit is not None and vocab_limit < V:
        logits = logits.masked_fill(torch.arange(V, device=logits.device) >= vocab_limit, float("-inf"))
    bad = bad_rows(logits)
    if bad:
        raise SamplingError(bad)
    if p.repetition_penalty != 1.0 and seen is not None:
        picked = logits.gather(1, seen)
        picked = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        # a tiny penalty overflows a positive logit to +inf (NaN after the shift below): keep it finite
        logits = logits.scatter(1, seen, picked).clamp(max=torch.finfo(torch.float32).max)
    # a temperature below float32's smallest normal number is greedy, its limit: as a float32 divisor it
    # would be 0 (or lose its precision), and 0 / 0 at the maximum is NaN
    if p.temperature < torch.finfo(torch.float32).tiny:
        return logits.argmax(-1)
    # the maximum becomes 0 and every other logit <= 0, so dividing by a tiny temperature gives -inf,
    # never inf - inf = NaN; softmax is unchanged by the shift
    logits = (logits - logits.amax(-1, keepdim=True)) / p.temperature
    if p.top_k and p.top_k < logits.size(-1):
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > p.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return sample_probs(logits.softmax(-1), generator, check=False)  # the maximum's prob is >= 1/V: valid


def sample_probs(probs: torch.Tensor, generator=None, check: bool = True) -> torch.Tensor:
    """One id per row of probs (B, V), by inverse CDF: one uniform number per row.

    The same distribution as ``torch.multinomial(probs, 1)``, which on CPU draws an exponential
    number for every entry: B x V random draws where this takes B, and on a small model those draws
    are most of the sampling time. A zero-probability id is never picked: its CDF step is empty, and
    the draw stays strictly below the total (searchsorted right=True returns the first id whose CDF
    exceeds it). A row whose total is not a positive finite number would give id V (out of range):
    ``check`` raises ``SamplingError`` for it instead (``sample_next`` has checked its rows already)."""
    cdf = probs.float().cumsum(-1)
    total = cdf[:, -1:]
    if check:
        bad = (~(torch.isfinite(total) & (total > 0))).flatten().nonzero().flatten().tolist()
        if bad:
            raise SamplingError(bad)
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=cdf.dtype)
    draw = torch.minimum(u * total, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, draw, right=True).squeeze(1)
