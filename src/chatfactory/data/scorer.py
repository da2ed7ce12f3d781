"""Scorer plug-ins: a scorer is a plain function ``score(row, answer) -> float`` (higher is better), named
in a config or on the command line as ``"package.module:function"``.

Scorers label comparisons (``comparisons.labeler``), give PPO a reward without a reward model
(``ppo.reward=module:function``), and judge held-out answers (``gold``, ``--judge``). The embedded
default's is ``chatfactory.data.tasks:rubric_score``.

    from chatfactory.data.scorer import load_scorer
    score = load_scorer("chatfactory.data.tasks:rubric_score")
    score({"messages": [...], "task": "arithmetic", "answer": "15"}, "15")
"""

from __future__ import annotations

import importlib


def load_scorer(spec: str):
    """"package.module:function" -> the function. Errors name the spec and what is wrong with it."""
    mod, sep, name = (spec or "").partition(":")
    if not sep or not mod or not name:
        raise ValueError(f"scorer {spec!r} must look like 'package.module:function' "
                         f"(e.g. chatfactory.data.tasks:rubric_score)")
    try:
        module = importlib.import_module(mod)
    except ImportError as e:
        raise ValueError(f"scorer {spec!r}: cannot import module {mod!r} ({e})") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise ValueError(f"scorer {spec!r}: module {mod!r} has no {name!r}")
    if not callable(fn):
        raise ValueError(f"scorer {spec!r}: {name!r} is not a function")
    return fn
