"""Repeated RLHF rounds, as InstructGPT ran them: sample comparisons from the current policy, retrain
the reward model on every comparison so far, then PPO against it — and again.

Round r lives in ``RUN/rlhf/round<r>/``: ``comparisons.jsonl`` (K answers per prompt from the policy
of round r-1 — SFT for round 1 — labeled by ``comparisons.labeler``), ``reward/`` (from SFT, trained on
the comparisons of rounds 1..r), ``ppo/`` (from the previous round's policy, KL always to SFT). A
finished piece is skipped when the command is run again, and an interrupted one resumes.

    chatfactory rlhf --config tiny --out runs/NAME --rounds 3 ppo.prompts=prompts.jsonl
"""

from __future__ import annotations

import copy
from pathlib import Path

from ..config import Config
from ..store.checkpoint import resolve_stage, stage_finished


def run_rlhf(cfg: Config, run_dir, rounds: int, prompts: str = "", k: int = 0) -> list[dict]:
    """``rounds`` rounds of comparisons -> reward model -> PPO. Returns one dict of results per round."""
    from ..data.comparisons import run_comparisons
    from .ppo import run_ppo
    from .reward import run_reward

    if rounds < 1:
        raise ValueError(f"rlhf: --rounds must be >= 1, got {rounds}")
    run_dir = Path(run_dir)
    prompts = prompts or cfg.ppo.prompts
    if not prompts:
        raise ValueError("rlhf: no prompts (give --prompts FILE or ppo.prompts=FILE)")
    sft = resolve_stage(run_dir, cfg.ppo.init_from, "ppo.init_from").resolve()
    policy, all_pairs, results = sft, [], []
    for r in range(1, rounds + 1):
        rdir = run_dir / "rlhf" / f"round{r}"
        rdir.mkdir(parents=True, exist_ok=True)
        res = {"round": r, "policy": str(policy)}
        c = copy.deepcopy(cfg)
        pairs = rdir / "comparisons.jsonl"
        if not pairs.exists():
            c.comparisons.stage = str(policy)  # an absolute path: run_dir / it is itself
            res["comparisons"] = run_comparisons(c, run_dir, prompts, pairs, k or None)
        all_pairs.append(str(pairs))
        # the reward model starts from SFT each round and sees every comparison collected so far
        c.reward.init_from, c.reward.data = str(sft), ",".join(all_pairs)
        if not stage_finished(rdir / "reward"):
            res["reward"] = run_reward(c, rdir)
        c.ppo.init_from, c.ppo.ref_from = str(policy), c.ppo.ref_from or str(sft)
        c.ppo.reward, c.ppo.prompts = str((rdir / "reward").resolve()), prompts
        if not stage_finished(rdir / "ppo"):
            res["ppo"] = run_ppo(c, rdir)
        policy = (rdir / "ppo").resolve()
        print(f"rlhf round {r}/{rounds}: policy {policy}")
        results.append(res)
    return results
