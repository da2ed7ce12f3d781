"""The gate a candidate version passes before people are served it (learn.py, issue 25's flywheel).

Both the candidate and the version served now answer the **dev** prompts (sampled as the held-out
evaluation samples: ``pipeline.eval_temperature``, ``eval_max_tokens``, ``eval_seed``); held-out prompts
only report. The candidate passes when all four hold:

    win rate     the judge prefers the candidate's reply on at least ``min_win`` of the prompts (ties half),
                 and the 95% interval of that rate lies above 0.5 (a coin flip never passes by luck)
    accuracy     on prompts a checker verifies (data/verifiers.py ``correct``), the candidate's accuracy is
                 not lower than the served version's by more than ``accuracy_se`` standard errors of the
                 paired difference (no checked prompts: the check is skipped and says so)
    KL           the candidate's KL to SFT, per reply on its own replies, is under ``max_kl``
    length       its mean reply length (characters) is within ``length_band`` of the served version's,
                 so a policy that wins the judge by writing more (or less) fails

The judge is a scorer ``module:function`` or a reward-model stage (eval/winrate.py ``load_judge``). The
decision and every figure go to ``versions/N/gate.json``.
"""

from __future__ import annotations

from pathlib import Path

from ..data.verifiers import correct
from ..store.load import load_model
from ..text.tokenizer import Tokenizer
from .heldout import policy_kl, read_rows, replies_of
from .stats import mean_se
from .winrate import load_judge

Z95 = 1.959964


def win_check(outcomes: list[float], min_win: float) -> dict:
    """Per-prompt outcomes (1 win, 0.5 tie, 0 loss) -> the win-rate check with its 95% interval."""
    n = len(outcomes)
    if n < 2:
        raise ValueError(f"the gate needs at least 2 dev prompts, got {n}")
    m, se = mean_se(outcomes)
    lo, hi = m - Z95 * se, m + Z95 * se
    return {"value": m, "lo": lo, "hi": hi, "need": min_win, "n": n, "passed": m >= min_win and lo > 0.5,
            "wins": sum(o == 1 for o in outcomes), "ties": sum(o == 0.5 for o in outcomes),
            "losses": sum(o == 0 for o in outcomes)}


def accuracy_check(cand: list[float | None], serv: list[float | None], max_se: float) -> dict:
    """Checker verdicts per prompt (None: no checker) -> accuracy of each and the paired-difference check."""
    pairs = [(a, b) for a, b in zip(cand, serv, strict=True) if a is not None and b is not None]
    if not pairs:
        return {"passed": True, "n": 0, "note": "no dev prompt has a checker: accuracy not gated"}
    d = [a - b for a, b in pairs]
    n = len(d)
    mean, se = mean_se(d)
    se = 0.0 if n == 1 else se  # one checked prompt: its difference alone decides
    return {"value": sum(a for a, _ in pairs) / n, "serving": sum(b for _, b in pairs) / n, "diff": mean, "se": se,
            "need": f"diff >= -{max_se:g} SE", "n": n, "passed": mean >= -max_se * se}


def length_check(cand_chars: list[int], serv_chars: list[int], band: float) -> dict:
    c, s = sum(cand_chars) / len(cand_chars), sum(serv_chars) / len(serv_chars)
    ratio = c / s if s else float("inf")
    return {"value": c, "serving": s, "ratio": ratio, "need": f"within ±{band:.0%}", "passed": abs(ratio - 1) <= band}


def decide(rows: list[dict], cand: list[str], serv: list[str], judge, kl: float, settings) -> dict:
    """The gate's decision from both versions' replies to ``rows`` (same order), the candidate's KL to SFT
    and ``settings`` (config.LearnConfig) -> {"passed", "checks": {...}, "n"}."""
    if not (len(rows) == len(cand) == len(serv)):
        raise ValueError(f"gate: {len(rows)} prompts but {len(cand)} candidate and {len(serv)} served replies")
    outcomes = []
    for row, a, b in zip(rows, cand, serv):
        x, y = float(judge(row, a)), float(judge(row, b))
        outcomes.append(1.0 if x > y else 0.5 if x == y else 0.0)
    checks = {
        "win_rate": win_check(outcomes, settings.min_win),
        "accuracy": accuracy_check([correct(r, a) for r, a in zip(rows, cand)],
                                   [correct(r, b) for r, b in zip(rows, serv)], settings.accuracy_se),
        "kl_to_sft": {"value": kl, "need": f"< {settings.max_kl:g}", "passed": kl < settings.max_kl},
        "length": length_check([len(a) for a in cand], [len(b) for b in serv], settings.length_band),
    }
    return {"passed": all(c["passed"] for c in checks.values()), "n": len(rows), "checks": checks}


def default_judge(rows: list[dict], reward_dir) -> str:
    """The rubric where every dev prompt is an embedded task (the gold judge the run reports with), else
    the round's reward model."""
    if rows and all(r.get("task") for r in rows):
        return "chatfactory.data.rubric:rubric_score"
    if reward_dir is None:
        raise ValueError("learn.judge is empty and the dev prompts are not the embedded tasks: name a judge "
                         "(learn.judge=module:function or a reward-model stage)")
    return str(reward_dir)


def run_gate(cfg, run_dir, cand_dir, serving_dir, sft_dir, reward_dir=None, device: str = "cpu") -> dict:
    """Sample both versions on the dev prompts and decide (``decide``); -> the gate record for gate.json."""
    run_dir, s = Path(run_dir), cfg.learn
    path = Path(s.dev_prompts) if s.dev_prompts else run_dir / "tasks" / "dev.jsonl"
    rows = read_rows(path)[: s.dev_rows or None]
    if not rows:
        raise ValueError(f"{path}: no dev prompts for the gate (learn.dev_prompts)")
    tok = Tokenizer.load(run_dir / "tokenizer.json")
    cand, _ = load_model(cand_dir, device)
    cand_replies, cand_ids = replies_of(cand, tok, rows, cfg.pipeline)
    serv_replies = replies_of(load_model(serving_dir, device)[0], tok, rows, cfg.pipeline)[0]
    T = cfg.pipeline.eval_temperature
    kl = policy_kl(cand, load_model(sft_dir, device)[0], tok, rows, cand_ids, T) if T > 0 else 0.0
    spec = s.judge or default_judge(rows, reward_dir)
    out = decide(rows, cand_replies, serv_replies, load_judge(spec, tok), kl, s)
    out.update(judge=spec, prompts=str(path), temperature=T, max_tokens=cfg.pipeline.eval_max_tokens,
               candidate=str(cand_dir), serving=str(serving_dir))
    return out
