"""The networks an RL stage runs: the trained policy and critic as one module (``ActorCritic``), what
scores an answer (``Reward``), and the switches that make a model a fixed function (``no_dropout``,
``frozen``; DPO's reference uses them too)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from ..data.scorer import load_scorer
from ..data.verifiers import load_verifier
from ..store.checkpoint import resolve_stage
from .reward import load_reward_model
from .rollout import attention_mask, forward_answers


def no_dropout(model: nn.Module) -> nn.Module:
    """Dropout off, for good: RL needs the sampling policy and the trained one to be the same function,
    and DPO the policy and its reference."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "cfg") and hasattr(m.cfg, "dropout"):
            m.cfg.dropout = 0.0
    return model


def frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return no_dropout(model).eval()


class ActorCritic(nn.Module):
    """The trained networks as one module (one optimizer, one DDP wrapper): the policy GPT and an
    optional critic with ``values(idx, positions, attn_mask) -> (B, T)`` (a RewardModel)."""

    def __init__(self, policy: nn.Module, critic: nn.Module | None = None):
        super().__init__()
        self.policy, self.critic = no_dropout(policy), (no_dropout(critic) if critic is not None else None)

    def forward(self, batch: dict, ptx=None, policy: bool = True) -> dict:
        """-> {"logits": (B, A, V) predicting the answer tokens (None if not ``policy``), "values": (B, A)
        or None, "ptx_loss": next-token loss on ``ptx = (x, y)`` or None}."""
        out = {"logits": forward_answers(self.policy, batch) if policy else None, "values": None, "ptx_loss": None}
        if self.critic is not None:
            # V(state before each answer token), aligned with the logits; the last column is not needed
            v = self.critic.values(batch["tokens"][:, :-1], positions=batch["positions"][:, :-1],
                                   attn_mask=attention_mask(batch["valid"][:, :-1]))
            out["values"] = v[:, batch["start"] - 1:]
        if ptx is not None:
            out["ptx_loss"] = self.policy(ptx[0], targets=ptx[1])
        return out


class Reward:
    """What scores a rollout: a reward model (read at the last real token), a scorer function of the
    prompt row and the decoded answer, or zero; plus ``verifier_weight`` times a verifier's score
    (data/verifiers.py) where the verifier has a check for the row."""

    def __init__(self, spec: str, run_dir, tok, device, verifier: str = "", verifier_weight: float = 1.0):
        self.spec, self.tok, self.model, self.fn = spec, tok, None, None
        self.verifier_spec, self.verifier_weight = verifier, verifier_weight
        self.verifier = load_verifier(verifier) if verifier else None
        self.last: dict = {}  # the parts of the last call's scores, for the iteration's log
        if spec == "zero":
            pass
        elif ":" in spec and not Path(spec).exists():
            self.fn = load_scorer(spec)
        else:
            self.dir = resolve_stage(run_dir, spec, "reward")
            self.model = frozen(load_reward_model(self.dir, device))

    def describe(self) -> str:
        base = f"reward model {self.dir}" if self.model is not None else f"reward {self.spec}"
        return base + (f" + {self.verifier_weight:g} x verifier {self.verifier_spec}" if self.verifier else "")

    @torch.no_grad()
    def __call__(self, batch: dict, rows: list[dict]) -> torch.Tensor:
        # the answers as text, decoded once for the scorer and the verifier (a reward model reads the ids)
        texts = self.answer_texts(batch) if (self.fn is not None or self.verifier is not None) else None
        base = self._base(batch, rows, texts)
        self.last = {}
        if self.verifier is None:
            return base
        scores = [self._verify(r, text) for r, text in zip(rows, texts)]
        checked = [s for s in scores if s is not None]
        # the rows the verifier checked, and the share of them it passed: what the verifier term taught
        self.last = {"verified": torch.tensor(len(checked) / len(scores)),
                     "verifier": torch.tensor(sum(checked) / len(checked) if checked else 0.0)}
        extra = torch.tensor([0.0 if s is None else s for s in scores], device=base.device)
        return base + self.verifier_weight * extra

    def _verify(self, row: dict, text: str) -> float | None:
        s = self.verifier(row, text)
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s <= 1):
            raise ValueError(f"verifier {self.verifier_spec!r} returned {s!r} (expected a number in [0, 1] or None) "
                             f"for prompt {row['messages']!r}")
        return s

    def _base(self, batch: dict, rows: list[dict], texts: list[str] | None) -> torch.Tensor:
        dev = batch["tokens"].device
        if self.model is not None:
            return self.model.score(batch["tokens"], batch["last"], positions=batch["positions"],
                                    attn_mask=attention_mask(batch["valid"])).float()
        if self.fn is None:
            return torch.zeros(len(rows), device=dev)
        scores = []
        for r, text in zip(rows, texts):
            s = self.fn(r, text)
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
                raise ValueError(f"scorer {self.spec!r} returned {s!r} (expected a finite number) "
                                 f"for prompt {r['messages']!r}")
            scores.append(float(s))
        return torch.tensor(scores, device=dev)

    def answer_texts(self, batch: dict) -> list[str]:
        """Each row's answer as text (``<|end|>`` dropped); answers are right-padded, so a row's real
        tokens are its first ``lengths`` (one transfer for the batch, not one per row)."""
        ids = batch["tokens"][:, batch["start"]:].tolist()
        lengths = batch["lengths"].tolist() if "lengths" in batch else batch["answer_mask"].sum(1).tolist()
        return [self.tok.decode([t for t in row[:n] if t != self.tok.end_id]) for row, n in zip(ids, lengths)]
