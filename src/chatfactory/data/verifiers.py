"""Verifiers: rewards a program can check. A verifier is a function ``(prompt row, reply) -> float in [0, 1]``,
or None where it has no check for that row (a small-talk prompt has no right answer to verify). Where a
checker exists, modern practice rewards it rather than a learned reward model (Tülu 3's RLVR, DeepSeek-R1,
nanochat's GSM8K RL): a reward model cannot check arithmetic, so RL against it learns style.

    correct       the embedded tasks' right answer (data/rubric.py ``is_correct``: arithmetic, comparisons,
                  counting, sorting, string tasks, recall, Python facts, declining a harmful request): 1 or 0;
                  None for small talk and for rows that are not embedded tasks
    constraints   every IFEval-type constraint of a row followed (loose rule, data/constraints.py): 1 or 0,
                  IF-RLVR's all-or-nothing reward; None for rows without constraints
    constraints_fraction   the share of the row's constraints followed

An RL stage adds ``verifier_weight`` times its verifier's score to its reward (``ppo.verifier=correct``);
with ``reward=zero`` the verifier is the whole reward. Any scorer ``"module:function"`` (data/scorer.py)
is a verifier too.

    from chatfactory.data.verifiers import load_verifier
    v = load_verifier("correct")
    v({"task": "arithmetic", "answer": "7", "messages": [...]}, "3 + 4 = 7.")   # 1.0
"""

from __future__ import annotations

from collections.abc import Callable

from .rubric import is_correct
from .scorer import load_scorer

# the embedded tasks whose right answer a rule checks (small talk is judged by the rubric's style rules only)
CHECKED_TASKS = ("arithmetic", "compare", "string_count", "sort", "recall_name", "recall_color", "string_reverse",
                 "string_upper", "string_first", "python_fact", "calc")


def correct(row: dict, answer: str) -> float | None:
    if row.get("decline"):
        return float(is_correct(row, answer))
    if row.get("task") not in CHECKED_TASKS:
        return None
    return float(is_correct(row, answer))


def _constraint_verdicts(row: dict, answer: str) -> list[bool] | None:
    if not row.get("instruction_id_list"):
        return None
    from .constraints import follows

    prompt = row.get("prompt") or row["messages"][-1]["content"]
    return follows({**row, "prompt": prompt}, answer, loose=True)


def constraints(row: dict, answer: str) -> float | None:
    verdicts = _constraint_verdicts(row, answer)
    return None if verdicts is None else float(all(verdicts))


def constraints_fraction(row: dict, answer: str) -> float | None:
    verdicts = _constraint_verdicts(row, answer)
    return None if verdicts is None else sum(verdicts) / len(verdicts)


VERIFIERS: dict[str, Callable] = {"correct": correct, "constraints": constraints,
                                  "constraints_fraction": constraints_fraction}


def load_verifier(spec: str) -> Callable:
    """A verifier by name (``VERIFIERS``) or a scorer ``"module:function"``."""
    if spec in VERIFIERS:
        return VERIFIERS[spec]
    if ":" not in spec:
        raise ValueError(f"verifier {spec!r}: expected one of {', '.join(VERIFIERS)} or 'package.module:function'")
    return load_scorer(spec)
