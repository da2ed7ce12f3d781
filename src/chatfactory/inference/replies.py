"""A chat model's replies to prompt rows (``{"messages": [... ending in a user turn]}``): each rendered
by the chat template and answered through the Engine, a batch at a time, up to the template's end token.
The win rate and the held-out evaluation (eval/) and the RL stages' gold score (train/selection.py) all
sample their answers here.

    texts, ids = chat_replies(model, tok, rows, max_tokens=32, temperature=0.0)
"""

from __future__ import annotations

import torch

from .calculator import CalcRow
from .engine import Engine
from .sampling import SamplingParams


@torch.no_grad()
def chat_replies(model, tok, rows: list[dict], max_tokens: int, temperature: float = 0.0, seed: int = 0,
                 batch_size: int = 64, room: int | None = None,
                 calculator: bool = False) -> tuple[list[str], list[list[int]]]:
    """-> (texts, ids): one reply per row; ids keep the end token, texts drop it. The batch of rows
    starting at row b samples with ``seed + b`` (temperature 0: greedy). ``room``: each prompt keeps only
    its last ``room`` tokens (None: all of it), the caller's rule for leaving the answer its space.
    ``calculator``: the engine answers the replies' ``<calc>`` calls (calculator.py) as they are written."""
    engine, texts, ids_out = Engine(model, vocab_limit=tok.vocab_size), [], []
    for b in range(0, len(rows), batch_size):
        prompts = [tok.chat_prompt(r["messages"]) for r in rows[b:b + batch_size]]
        if room is not None:
            prompts = [p[-room:] for p in prompts]
        p = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + b, stop_ids=(tok.end_id,))
        tools = [CalcRow(tok) for _ in prompts] if calculator else None
        for ids in engine.generate(prompts, p, tools=tools):
            ids_out.append(ids)
            texts.append(tok.decode([t for t in ids if t != tok.end_id]))
    return texts, ids_out
