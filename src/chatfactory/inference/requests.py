"""What the scheduler (batching.py) takes and gives: its options, a request, the step a request receives per
token, and the error for a full queue."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .grammar import Constraint
from .sampling import SamplingParams


@dataclass(frozen=True)
class BatchOptions:
    """How the scheduler runs its batch (``chatfactory serve --compile --prefix-cache-mb
    --prefill-chunk --context``)."""

    compile: bool = False  # decode with the compiled step (decode_step.py SlotStep), compiled before it serves
    prefix_cache_mb: float = 256.0  # keys/values of ended rows kept for prompts that start the same (0: off)
    prefix_block: int = 16  # tokens a prefix-cache block holds: prefixes are found a whole block at a time
    prefill_chunk: int = 512  # prompt tokens prefilled per iteration at most (0: no limit), decodes between chunks
    context: int = 0  # positions a slot holds, prompt and reply (0: the model's block): the KV cache is slots x this

    def __post_init__(self):
        if self.prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb must be >= 0 (0 = off), got {self.prefix_cache_mb}")
        if self.context < 0:
            raise ValueError(f"context must be >= 0 (0 = the model's block size), got {self.context}")
        if self.prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be >= 0 (0 = no limit), got {self.prefill_chunk}")


@dataclass
class Step:
    """What a request receives per sampled token; ``finish`` is set on its last Step.

    finish: "stop" (a stop id was sampled; ``token`` is that id), "length" (max_tokens or the context
    is full), "cancelled", or "error: …". ``token`` is None on a finish-only Step."""

    token: int | None
    logprob: float | None = None  # log-probability of ``token`` under the model (temperature 1)
    top: list[tuple[int, float]] | None = None  # the ``logprobs`` most likely ids and their log-probs
    finish: str | None = None
    # a scoring request's answer (finish "scored"): log-prob of each prompt[i] given prompt[:i] (i >= 1),
    # and the ``logprobs`` likeliest ids and their log-probs there
    scored: tuple[list[float], list[list[tuple[int, float]]]] | None = None
    forced: bool = False  # ``token`` was written by the request's tool (a calculator result), not sampled


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Step], None]
    logprobs: int | None = None  # report log-probs (and this many alternatives) per token
    client: str = ""  # who asked: slots and queue places are shared fairly between clients
    score: bool = False  # score the prompt (one Step with ``scored``) instead of generating
    # the reply must follow this grammar (grammar.py): sampled under its mask, log-probs of the masked distribution
    constraint: Constraint | None = None
    # reads each sampled id, returns ids to write next instead of sampling (calculator.py's CalcRow), or None
    tool: object | None = None
    # scheduler state
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False
    slot: int = -1
    prefilling: bool = False  # admitted, its prompt (+ what it generated before a preemption) not all in yet
    filled: int = 0  # while prefilling: the positions of prompt + generated its row holds
    admitted: int = 0  # the iteration it last took a slot (the newest row is preempted first)
    _gen: torch.Generator | None = None
    _pending: list[int] = field(default_factory=list)  # the tool's ids still to write
    # set by the scheduler's submit: takes a waiting request out of its queue (the scheduler's ``_withdraw``)
    _withdraw: Callable[[Request], None] | None = None

    def cancel(self) -> None:
        """Safe from any thread: a waiting request leaves the queue now (it must not count toward the
        429 limit), a running one frees its slot at the scheduler's next iteration."""
        self.cancelled = True
        if self._withdraw is not None:
            self._withdraw(self)


class QueueFull(RuntimeError):
    """More requests are waiting than the scheduler accepts, in all or from one client (the server answers
    429); ``retry_after``: seconds, a rough guess at when a place is free."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after
