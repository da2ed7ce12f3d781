"""Rollouts for the RL stages (PPO, GRPO, RLOO): sample answers with the engine, pad them into one
batch, and recompute per-token log-probabilities exactly as the trainer will.

A rollout batch is one rectangle per prompt+answer, prompts padded on the LEFT (so every answer starts
at the same column ``start``) and answers padded on the RIGHT, with the distinct ``<|pad|>`` id:

    [pad pad <|bos|> <|user|> … <|assistant|>] [a1 a2 … <|end|> pad pad]
                                         start ─┘

Positions count from each row's first real token, and the attention mask hides pad keys, so a row's
log-probs do not depend on how much padding its neighbours forced on it (tests check padded ==
unpadded). Log-probs are always taken from ``logits / temperature`` at the temperature that sampled the
answers, or the PPO ratio would compare two different distributions.

GRPO and RLOO sample K answers to each prompt, in contiguous rows (``batch["group"] = K``): the engine
prefills each prompt once, and ``forward_answers`` runs each prompt once per group, its keys and values
shared by the group's answers, in the reference and policy forwards alike (gradients included).

    prompts = [tok.chat_prompt(row["messages"]) for row in rows]
    batch = rollout(policy, prompts, max_new_tokens=32, temperature=1.0, end_id=tok.end_id, pad_id=tok.pad_id, seed=0)
    logits = forward_answers(policy, batch)                         # (B, A, V): the positions predicting answers
    logp = answer_logprobs(logits, batch["tokens"], batch["start"], 1.0) * batch["answer_mask"]   # (B, A)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..inference.engine import Engine
from ..inference.kv_cache import GradKVCache
from ..inference.sampling import SamplingParams
from .loop import all_reduce_sum


def pad_batch(prompts: list[list[int]], answers: list[list[int]], pad_id: int, end_id: int) -> dict:
    """Prompt and answer ids -> the padded rollout tensors.

    tokens (B, T) · positions (B, T) · valid (B, T) bool, real tokens · answer_mask (B, A) bool, real answer
    tokens (their ``<|end|>`` included) · last (B,) column of each row's last real token (where a reward
    model reads its score) · ended (B,) bool, the answer closed with ``<|end|>`` · start: the column where
    answers begin (an int). A = T - start."""
    if len(prompts) != len(answers) or not prompts:
        raise ValueError(f"need one answer per prompt (got {len(prompts)} prompts, {len(answers)} answers)")
    P = max(len(p) for p in prompts)
    A = max(1, max(len(a) for a in answers))  # at least one column, so every row has a slot
    T = P + A
    # one tensor from Python lists (not two small copies per row)
    tokens = torch.tensor([[pad_id] * (P - len(p)) + list(p) + list(a) + [pad_id] * (A - len(a))
                           for p, a in zip(prompts, answers)], dtype=torch.long)
    left = torch.tensor([P - len(p) for p in prompts])
    lengths = torch.tensor([len(a) for a in answers])
    cols = torch.arange(T)[None]
    valid = (cols >= left[:, None]) & (cols < P + lengths[:, None])
    positions = (cols - left[:, None]).clamp(min=0)
    return {
        "tokens": tokens, "positions": positions, "valid": valid,
        "answer_mask": valid[:, P:].clone(),
        "lengths": lengths,  # answer tokens, tool output included (answer_mask leaves the tool's out)
        "last": P + lengths - 1,  # an empty answer: the prompt's last token
        "ended": torch.tensor([bool(a) and a[-1] == end_id for a in answers]),
        "start": P,
    }


def attention_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, T) real-token flags -> (B, 1, T, T) bool: causal, pad keys hidden. The diagonal stays open so a
    pad query still has one key (an all-masked row would give NaN, which would poison the gradients)."""
    T = valid.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=valid.device)
    return ((causal[None] & valid[:, None, :]) | eye[None])[:, None]


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    x = logits.float()
    return F.log_softmax(x if temperature == 1.0 else x / temperature, dim=-1)


def answer_logprobs(logits: torch.Tensor, tokens: torch.Tensor, start: int, temperature: float) -> torch.Tensor:
    """Log-probs of the answer tokens under ``logits / temperature``.

    logits: (B, A, V) for the positions that PREDICT the answer tokens (columns start-1 … T-2), tokens:
    (B, T). Returns (B, A); callers multiply by the answer mask."""
    return _log_softmax(logits, temperature).gather(-1, tokens[:, start:, None]).squeeze(-1)


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, start: int, temperature: float):
    """``answer_logprobs`` and the per-position entropy (nats, without gradient) of the sampling
    distribution, from one log-softmax -> two (B, A)."""
    logp = _log_softmax(logits, temperature)
    with torch.no_grad():
        ent = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, tokens[:, start:, None]).squeeze(-1), ent


def forward_answers(model, batch: dict):
    """A GPT over a rollout batch -> logits of the positions that predict answer tokens, (B, A, V).
    Only those positions go through the LM head (the prompt's logits are never needed). A batch whose
    rows come in groups sharing one prompt (``batch["group"]`` > 1: GRPO) runs each prompt once."""
    if batch.get("group", 1) > 1:
        return _forward_groups(model, batch)
    # the last column predicts nothing and, attention being causal, changes no other column: left out
    h = model.hidden_states(batch["tokens"][:, :-1], positions=batch["positions"][:, :-1],
                            attn_mask=attention_mask(batch["valid"][:, :-1]))
    return model.lm_head(h[:, batch["start"] - 1:])


def _forward_groups(model, batch: dict):
    """``forward_answers`` for rows in contiguous groups of ``batch["group"]`` with the same (padded)
    prompt: the prompt columns run once per group, so the prompt's share of the work shrinks by the
    group size — the same function up to float rounding (tests/test_rollout.py)."""
    s, g = batch["start"], batch["group"]
    tokens, positions, valid = batch["tokens"], batch["positions"], batch["valid"]
    n = tokens.size(0) // g
    kv = GradKVCache(n)  # the prompt's keys/values, gradients flowing
    p_valid = valid[::g, :s]
    # equal-length prompts: plain causal attention; else pad keys hidden
    p_mask = None if bool(p_valid.all()) else attention_mask(p_valid)
    h_prompt = model.hidden_states(tokens[::g, :s], cache=kv, positions=positions[::g, :s], attn_mask=p_mask)
    # the last prompt position predicts the first answer token
    h = h_prompt[:, -1:].repeat_interleave(g, 0)
    if tokens.size(1) > s + 1:  # the answers but their last token (it predicts nothing)
        kv.fork([r for r in range(n) for _ in range(g)])  # each answer row continues its group's prompt
        # answer queries see their group's real prompt keys and their own earlier answer tokens
        a_mask = attention_mask(valid[:, :-1])[:, :, s:].contiguous()
        h_answer = model.hidden_states(tokens[:, s:-1], cache=kv, positions=positions[:, s:-1], attn_mask=a_mask)
        h = torch.cat([h, h_answer], 1)
    return model.lm_head(h)


def select(batch: dict, idx: torch.Tensor) -> dict:
    """Rows ``idx`` of every per-row tensor of a rollout batch (the padding width is kept). Rows that
    share a prompt stay marked as groups (``group``, see rollout.forward_answers) only if ``idx`` takes
    whole groups, each in order."""
    out = {k: (v[idx] if torch.is_tensor(v) and v.dim() > 0 and v.size(0) == len(batch["tokens"]) else v)
           for k, v in batch.items()}
    g = batch.get("group", 1)
    if g > 1 and not _whole_groups(idx, g):
        out["group"] = 1
    return out


def _whole_groups(idx: torch.Tensor, g: int) -> bool:
    """``idx`` lists whole groups of ``g`` rows (rows k*g … k*g+g-1), each in order."""
    if len(idx) % g:
        return False
    rows = idx.view(-1, g)
    return bool(((rows[:, :1] % g == 0) & (rows == rows[:, :1] + torch.arange(g, device=idx.device))).all())


@torch.no_grad()
def generate(policy, prompts: list[list[int]], max_new_tokens: int, temperature: float, end_id: int,
             seed: int | None = None, engine: Engine | None = None, logprobs: list | None = None,
             tools: list | None = None, forced: list | None = None) -> list[list[int]]:
    """Sample one answer per prompt with the KV-cache engine (stops at ``end_id``, which is kept).
    ``engine``: one kept across rollouts (e.g. ``Engine(policy, compile=True)``, compiled once);
    ``logprobs``: a list that receives each answer's tokens' log-probs as the engine sampled them;
    ``tools``, ``forced``: the engine's (a calculator per row; which tokens it wrote)."""
    if temperature <= 0:
        raise ValueError("RL rollouts need temperature > 0 (log-probs of a greedy policy are undefined)")
    was_training = policy.training
    engine = engine or Engine(policy)
    policy.eval()
    out = engine.generate(prompts, SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                                  seed=seed, stop_ids=(end_id,)), logprobs, tools=tools, forced=forced)
    policy.train(was_training)  # the engine decodes in eval mode; put it back
    return out


def rollout(policy, prompts: list[list[int]], max_new_tokens: int, temperature: float, end_id: int, pad_id: int,
            seed: int | None = None, engine: Engine | None = None, tools: list | None = None) -> dict:
    """Sample answers and return the padded batch (see ``pad_batch``) on the policy's device, with
    ``rollout_logp`` (B, A): each answer token's log-prob as the engine sampled it (0 on padding).

    ``tools``: per prompt, a tool the engine runs as the answer is written (the calculator, calculator.py);
    the tokens it writes are taken out of ``answer_mask``, so that the policy ratio, the KL and the value loss
    never count them (they are not the policy's choices), while ``lengths`` still counts them."""
    sampled: list[list[float]] = []
    forced: list[list[bool]] | None = [] if tools is not None else None
    answers = generate(policy, prompts, max_new_tokens, temperature, end_id, seed, engine, sampled, tools, forced)
    batch = pad_batch(prompts, answers, pad_id, end_id)
    width = batch["answer_mask"].size(1)
    if forced and any(any(f) for f in forced):
        flags = torch.tensor([f + [False] * (width - len(f)) for f in forced])
        batch["answer_mask"] &= ~flags
        batch["forced_tokens"] = flags.sum(1)
    batch["rollout_logp"] = torch.tensor([row + [0.0] * (width - len(row)) for row in sampled])
    dev = next(policy.parameters()).device
    return {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}


class LogpMismatch:
    """|log pi_rollout - log pi_train| on the sampled tokens: the log-probs the engine sampled with (its
    decode step, compiled or not) against the trainer's forward pass over the same tokens with the same
    weights. On CPU in fp32 the two agree to round-off; a large value means the answers come from
    another distribution than the one trained (and PPO's first ratio is not 1)."""

    def __init__(self):
        self.total, self.count, self.max = 0.0, 0.0, None

    def add(self, train_logp: torch.Tensor, batch: dict) -> None:
        mask = batch["answer_mask"]
        gap = (train_logp.detach().float() - batch["rollout_logp"]).abs() * mask
        self.total, self.count = self.total + gap.sum(), self.count + mask.sum()
        self.max = gap.max() if self.max is None else torch.maximum(self.max, gap.max())

    def result(self, device) -> dict:
        """{"logp_mismatch_mean", "logp_mismatch_max"} over every rank's tokens; starts a new count."""
        total = all_reduce_sum(torch.tensor([float(self.total), float(self.count)], dtype=torch.float64, device=device))
        worst = torch.tensor(float(self.max if self.max is not None else 0.0), dtype=torch.float64, device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
        self.__init__()
        return {"logp_mismatch_mean": (total[0] / total[1].clamp(min=1)).item(), "logp_mismatch_max": worst.item()}
