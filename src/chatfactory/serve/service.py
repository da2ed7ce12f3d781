"""What the HTTP endpoints serve: one model, its tokenizer, the continuous-batching scheduler that owns
the model (generation and prompt scoring both run there), the feedback store, and the server's limits
(``limits.ServerLimits``). ``load_service`` builds one from a run directory."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..inference.batching import Scheduler
from ..model.offload import memory_mode
from ..text.tokenizer import Tokenizer
from .feedback import FILENAME as FEEDBACK_FILE
from .feedback import FeedbackStore
from .limits import ServerLimits
from .protocol import LIMITS


class Service:
    """What the endpoints need: the tokenizer, the scheduler (which owns the model), names, limits
    (``limits``: the request shapes protocol.py checks; ``server_limits``: what one client may cost)."""

    def __init__(self, model, tok: Tokenizer, name: str, stage: str = "", feedback_path=None,
                 api_key: str | None = None, slots: int = 16, scheduler=None,
                 server_limits: ServerLimits | None = None):
        server_limits = server_limits or ServerLimits()
        self.model, self.tok, self.name, self.stage = model, tok, name, stage
        self.block_size = model.cfg.block_size
        self.server_limits = server_limits
        self.scheduler = (scheduler if scheduler is not None
                          else Scheduler(model, slots=slots, vocab_limit=tok.vocab_size,
                                         max_waiting=server_limits.max_waiting,
                                         max_client_waiting=server_limits.max_client_waiting))
        self.feedback = (FeedbackStore(feedback_path, server_limits.feedback_rows_per_conversation,
                                       server_limits.feedback_pairs_per_conversation) if feedback_path else None)
        self.api_key = api_key or None
        self.limits = LIMITS
        # past this many characters a prompt cannot fit the context, whatever its tokens: no token spells
        # more bytes than the longest one (and a character is at least a byte). Checked before tokenizing
        self.max_prompt_chars = server_limits.max_prompt_chars or self.block_size * max(
            (len(b) for b in tok.token_bytes), default=1)
        self.created = int(time.time())
        self.precision = precision_of(model)
        # what /v1/models says of where the weights live: {"memory": "resident"}, or with --max-memory
        # {"memory": "streamed", "memory_budget_mb": …} (model/offload.py); api.py merges it into the model card
        self.memory = memory_mode(model)
        # every special token ends a reply: a model that opens a new turn or document has finished
        self.stop_ids = tok.stop_ids

    def close(self) -> None:
        self.scheduler.close()


def load_service(run_dir, stage: str | None = None, api_key: str | None = None, slots: int = 16,
                 device: str = "cpu", quantize: str | None = None, max_memory: int | str | None = None,
                 server_limits: ServerLimits | None = None) -> Service:
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
    return Service(model, tok, f"{run_dir.name}/{stage}", stage, run_dir / FEEDBACK_FILE, api_key, slots,
                   server_limits=server_limits)


def precision_of(model) -> str:
    """What /v1/models reports: "int8", "int4 (groups of 64)" for a quantized model (model/quant.py), else the
    weights' floating-point type ("float32", "bfloat16")."""
    q = getattr(model, "quantization", None)
    if q:
        return q["scheme"] + (f" (groups of {q['group']})" if q.get("group") and q["scheme"] == "int4" else "") \
            + (", LM head too" if q.get("include_head") else "")
    return str(next(model.parameters()).dtype).removeprefix("torch.")
