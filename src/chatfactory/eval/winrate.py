"""Win rate of one checkpoint against another on a prompt set, under a judge (InstructGPT's headline number).

Both policies answer every prompt (greedy by default, or sampled with a seed) through the Engine and
the chat template; a judge scores each answer; A wins a prompt when its score is higher, ties count
half. The judge is either a trained reward model (``runs/NAME/reward``) or a scorer function
``score(row, answer) -> float`` named ``"module:function"`` (e.g. ``chatfactory.data.tasks:rubric_score``).

    from chatfactory.eval.winrate import win_rate, load_judge
    res = win_rate(policy_a, policy_b, tok, prompt_rows, load_judge("runs/x/reward", tok))
    res["win_rate"]      # in [0, 1]; 0.5 = no better than B

CLI: ``chatfactory eval --run runs/NAME --stage ppo --against sft --prompts heldout.jsonl --judge runs/NAME/reward``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..data.scorer import load_scorer
from ..inference.replies import chat_replies

Judge = Callable[[dict, str], float]


def reward_judge(rm, tok, batch_size: int = 16) -> Judge:
    """A reward model as a judge: the conversation with the answer as the assistant's last turn is
    rendered by the chat template (ending in ``<|end|>``) and scored at its last token."""

    @torch.no_grad()
    def judge(row: dict, answer: str) -> float:
        ids = tok.render_chat(row["messages"] + [{"role": "assistant", "content": answer}])[0]
        ids = ids[-rm.backbone.cfg.block_size:]
        device = next(rm.parameters()).device
        return float(rm.score(torch.tensor([ids], device=device), torch.tensor([len(ids) - 1], device=device))[0])

    return judge


def load_judge(spec: str, tok) -> Judge:
    """A reward-model stage directory, or a ``module:function`` scorer."""
    if Path(spec).is_dir():
        from ..train.reward import load_reward_model

        return reward_judge(load_reward_model(spec).eval(), tok)
    return load_scorer(spec)


def answers(model, tok, rows: list[dict], max_tokens: int = 64, temperature: float = 0.0, seed: int = 0,
            batch_size: int = 16) -> list[str]:
    """One reply per prompt row (``{"messages": [... ending in a user turn]}``), decoded up to ``<|end|>``;
    a prompt keeps at least half the context (inference/replies.py)."""
    room = model.cfg.block_size - max(1, min(max_tokens, model.cfg.block_size // 2))
    return chat_replies(model, tok, rows, max_tokens, temperature, seed, batch_size, room)[0]


def win_rate(model_a, model_b, tok, rows: list[dict], judge: Judge, max_tokens: int = 64, temperature: float = 0.0,
             seed: int = 0, batch_size: int = 16) -> dict:
    """-> {"win_rate", "wins", "ties", "losses", "n", "score_a", "score_b"} (scores are means)."""
    if not rows:
        raise ValueError("win rate needs at least one prompt")
    replies_a = answers(model_a, tok, rows, max_tokens, temperature, seed, batch_size)
    replies_b = answers(model_b, tok, rows, max_tokens, temperature, seed, batch_size)
    return compare(rows, replies_a, replies_b, judge)


def compare(rows: list[dict], replies_a: list[str], replies_b: list[str], judge: Judge) -> dict:
    """Score two sets of replies to the same prompts and count wins, ties (half a win) and losses."""
    wins = ties = losses = 0
    sa = sb = 0.0
    for row, a, b in zip(rows, replies_a, replies_b, strict=True):
        x, y = float(judge(row, a)), float(judge(row, b))
        sa, sb = sa + x, sb + y
        wins, ties, losses = wins + (x > y), ties + (x == y), losses + (x < y)
    n = len(rows)
    return {"win_rate": (wins + 0.5 * ties) / n, "wins": wins, "ties": ties, "losses": losses, "n": n,
            "score_a": sa / n, "score_b": sb / n}
