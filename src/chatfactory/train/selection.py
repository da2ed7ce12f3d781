"""The RL stages' gold evaluation (``gold_score``), and which iteration to keep, chosen on the dev prompts
(``<stage>.keep_best=true``).

A small reward model is easy to fool: under PPO its score keeps rising while the answers' true quality
(the gold score) peaks and then falls. InstructGPT's labelers judged a validation set to pick among
policies; here the RL stage's periodic gold evaluation runs on prompts no stage trains on (the pipeline
points ``eval_prompts`` at RUN/tasks/dev.jsonl, scored by the rubric), and the stage keeps the policy of
the iteration that scored highest there, not merely the last one. The held-out prompts only report.

The best policy so far lives in the resume state (state.pt), so a killed run resumes exactly; when
training ends the stage writes the kept weights and only then marks the checkpoint finished
(``Stage.finishes_itself``), with the choice in config.json and in the stage's result as ``dev_choice``
(the report states it).
"""

from __future__ import annotations

import torch

from ..inference.replies import chat_replies
from ..store.checkpoint import load_checkpoint, save_checkpoint, unique_state_dict


def gold_score(policy, tok, rows: list[dict], scorer, max_new_tokens: int = 32, temperature: float = 1.0,
               seed: int = 0, batch_size: int = 64) -> float:
    """Mean ``scorer(row, answer_text)`` of the policy's sampled answers to prompt ``rows`` (an answer that
    never ends is scored as it stands). Temperature 0 is greedy."""
    texts = chat_replies(policy, tok, rows, max_new_tokens, temperature, seed, batch_size,
                         calculator=any(r.get("task") == "calc" for r in rows))[0]
    return sum(float(scorer(r, text)) for r, text in zip(rows, texts)) / max(1, len(rows))


def choose_on_dev(what: str, candidates: dict[str, dict], by: str = "gold_score") -> dict:
    """The candidate (e.g. a PPO iteration, a β) whose dev scores (eval/heldout.py ``dev_scores``) are
    highest on ``by``; the first listed wins a tie. Returns the record the report states: {"what", "chose",
    "by", "n", "candidates": {name: {"accuracy", "gold_score", "win_rate_vs_sft"}}}."""
    if not candidates:
        raise ValueError(f"choose_on_dev({what!r}): no candidates")
    best = max(candidates, key=lambda name: (candidates[name][by] is not None, candidates[name][by] or 0.0))
    keep = ("accuracy", "gold_score", "win_rate_vs_sft")
    return {"what": what, "chose": best, "by": by, "n": next(iter(candidates.values())).get("n"),
            "candidates": {name: {k: s.get(k) for k in keep} for name, s in candidates.items()}}


class BestIteration:
    """The gold score of every evaluated iteration, and a copy of the best one's trainable weights."""

    def __init__(self, n_rows: int):
        self.n_rows = n_rows
        self.curve: dict[int, float] = {}  # iteration -> gold on the dev prompts
        self.best: dict | None = None  # {"iteration", "gold", "weights": trainable tensors on the CPU}

    @classmethod
    def for_stage(cls, name: str, settings, eval_rows: list, gold) -> BestIteration | None:
        if not settings.keep_best:
            return None
        if not (eval_rows and gold is not None):
            raise ValueError(f"{name}.keep_best=true needs eval_prompts and gold: the prompts and the scorer that "
                             f"choose the iteration to keep (chatfactory run sets the dev split and the rubric)")
        return cls(len(eval_rows[: settings.eval_rows]))

    def observe(self, iteration: int, gold: float, policy: torch.nn.Module) -> None:
        """Record an evaluation; keep a copy of the policy if it is the best so far (the earlier of two
        equal scores stays: less drift from SFT for the same quality)."""
        self.curve[iteration] = gold
        if self.best is None or gold > self.best["gold"]:
            trainable = {n for n, p in policy.named_parameters() if p.requires_grad}  # LoRA: the adapters only
            weights = {k: v.detach().to("cpu", copy=True) for k, v in unique_state_dict(policy).items()
                       if k in trainable}
            self.best = {"iteration": iteration, "gold": gold, "weights": weights}

    def state(self) -> dict:
        return {"curve": dict(self.curve), "best": self.best, "n_rows": self.n_rows}

    def load_state(self, state: dict | None) -> None:
        if state:
            self.curve = {int(k): float(v) for k, v in state["curve"].items()}
            self.best, self.n_rows = state["best"], state["n_rows"]

    def record(self) -> dict:
        """The choice as the report states it: ``choose_on_dev`` over the evaluated
        iterations in order (the earlier of equal scores wins there too, so it names the kept one)."""
        scores = {str(it): {"n": self.n_rows, "gold_score": g} for it, g in sorted(self.curve.items())}
        choice = choose_on_dev("iteration", scores)
        assert choice["chose"] == str(self.best["iteration"]), (choice["chose"], self.best["iteration"])
        return choice


def finish_with_best(stage_dir, main: bool) -> dict | None:
    """After training: put the best iteration's weights in the stage's checkpoint and mark it finished,
    the mark written last. A stage found finished was done by an earlier run. Returns the choice."""
    if not main:
        return None
    weights, info, state = load_checkpoint(stage_dir, with_state=True)
    if info.get("finished"):
        return info.get("dev_choice")
    tracked = BestIteration(0)
    tracked.load_state(state.get("selection"))
    if tracked.best is None:
        raise ValueError(f"{stage_dir}: keep_best is set but no iteration was evaluated on the dev prompts "
                         f"(set eval_prompts, gold and an eval_every that the run reaches)")
    weights.update(tracked.best["weights"])
    choice = tracked.record()
    info.update(finished=True, dev_choice=choice, kept_iteration=tracked.best["iteration"])
    save_checkpoint(stage_dir, weights, {k: v for k, v in info.items() if k != "step"}, state, info["step"])
    return choice
