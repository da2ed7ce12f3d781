"""What the HTTP endpoints serve: one model, its tokenizer, the continuous-batching scheduler that owns
the model, the feedback store, and the server's limits. ``load_service`` builds one from a run directory."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..inference.batching import Scheduler
from ..model.offload import memory_mode
from ..text.tokenizer import Tokenizer
from .feedback import FILENAME as FEEDBACK_FILE
from .feedback import FeedbackStore
from .protocol import LIMITS


class Service:
    """What the endpoints need: the tokenizer, the scheduler (which owns the model), names, limits."""

    def __init__(self, model, tok: Tokenizer, name: str, stage: str = "", feedback_path=None,
                 api_key: str | None = None, slots: int = 16, scheduler=None):
        self.model, self.tok, self.name, self.stage = model, tok, name, stage
        self.block_size = model.cfg.block_size
        self.scheduler = (scheduler if scheduler is not None
                          else Scheduler(model, slots=slots, vocab_limit=tok.vocab_size))
        self.feedback = FeedbackStore(feedback_path) if feedback_path else None
        self.api_key = api_key or None
        self.limits = LIMITS
        self.created = int(time.time())
        self.precision = precision_of(model)
        # what /v1/models says of where the weights live: {"memory": "resident"}, or with --max-memory
        # {"memory": "streamed", "memory_budget_mb": …} (model/offload.py); api.py merges it into the model card
        self.memory = memory_mode(model)
        # every special token ends a reply: a model that opens a new turn or document has finished
        self.stop_ids = tok.stop_ids

    def close(self) -> None:
        self.scheduler.close()

    @torch.no_grad()
    def score(self, ids: list[int], top: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
        """Log-probability of each ids[i] given ids[:i] (i >= 1), and the ``top`` likeliest ids there."""
        x = torch.tensor([ids], device=next(self.model.parameters()).device)
        logp = torch.log_softmax(self.model(x)[0, :-1, : self.tok.vocab_size].float(), -1)  # as sampling does
        target = x[0, 1:]
        lps = logp.gather(1, target[:, None])[:, 0].tolist()
        tops = [[]] * len(lps)
        if top > 0:
            vals, idx = logp.topk(min(top, logp.size(-1)), -1)
            tops = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
        return lps, tops


def load_service(run_dir, stage: str | None = None, api_key: str | None = None, slots: int = 16,
                 device: str = "cpu", quantize: str | None = None, max_memory: int | str | None = None) -> Service:
    """The Service of ``run_dir``'s ``stage`` (default: the last trained); the model loads as ``load_model``
    does for inference (a quantized stage as it is; ``quantize``, ``max_memory``)."""
    from ..store.checkpoint import latest_stage
    from ..store.load import load_model

    run_dir = Path(run_dir)
    stage = stage or latest_stage(run_dir)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = load_model(run_dir / stage, device=device, inference=True, quantize=quantize, max_memory=max_memory)
    tok = Tokenizer.load(run_dir / "tokenizer.json")
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"{run_dir}/tokenizer.json has {tok.vocab_size} tokens but the {stage} model only "
                         f"{model.cfg.vocab_size}")
    return Service(model, tok, f"{run_dir.name}/{stage}", stage, run_dir / FEEDBACK_FILE, api_key, slots)


def precision_of(model) -> str:
    """What /v1/models reports: "int8", "int4 (groups of 64)" for a quantized model (model/quant.py), else the
    weights' floating-point type ("float32", "bfloat16")."""
    q = getattr(model, "quantization", None)
    if q:
        return q["scheme"] + (f" (groups of {q['group']})" if q.get("group") and q["scheme"] == "int4" else "") \
            + (", LM head too" if q.get("include_head") else "")
    return str(next(model.parameters()).dtype).removeprefix("torch.")
