"""Collecting comparisons: K answers per prompt from the current policy, labeled by a scorer.

InstructGPT's labelers ranked K samples of the policy per prompt; here a *scorer* does it — a plain
function ``score(row, answer) -> float`` (higher is better) named in the config as "module:function"
(``comparisons.labeler``; the embedded default's is ``chatfactory.data.tasks:rubric_score``). People's
comparisons come through the same format from the serving feedback store.

Which pairs are written (``comparisons.pairs``):
  * ``best_worst`` (default): one pair per prompt, the highest-scored answer against the lowest — the
    clearest signal per prompt, and no prompt weighs more than another;
  * ``all``: every pair of distinct answers whose scores differ (up to K(K−1)/2 per prompt; more pairs,
    correlated within a prompt, as InstructGPT trained on all pairs of a ranking).
``comparisons.mismatched`` = M adds to each prompt's K answers M that the policy gave to other prompts
(of another task) before labeling, so the reward model also learns that a fluent reply to a different
question is a bad one — the kind of reply a policy drifts to under RL, which samples of one prompt alone
never show it. A pair holding such a reply carries ``"mismatched": true``.
A prompt whose K answers all score alike gives no pair (counted as ``ties``). Each row is
``{"prompt": [messages], "chosen": str, "rejected": str, "chosen_score": x, "rejected_score": y}``.

    chatfactory comparisons --run runs/NAME --prompts prompts.jsonl --k 4 [--out FILE] [comparisons.key=value …]
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import Config
from ..inference.calculator import CalcRow
from ..inference.engine import Engine
from ..inference.sampling import SamplingParams
from ..store.checkpoint import latest_stage
from ..store.load import load_model
from ..text.tokenizer import Tokenizer
from .preferences import load_prompts, write_comparisons
from .scorer import load_scorer


def pick_pairs(answers: list[str], scores: list[float], mode: str) -> list[tuple[int, int]]:
    """(chosen, rejected) index pairs among one prompt's answers (see the module docstring)."""
    if mode == "best_worst":
        best = max(range(len(scores)), key=lambda i: scores[i])
        worst = min(range(len(scores)), key=lambda i: scores[i])
        return [(best, worst)] if scores[best] > scores[worst] else []
    if mode == "all":
        out, seen = [], set()
        for i in range(len(answers)):
            for j in range(len(answers)):
                if scores[i] > scores[j] and (answers[i], answers[j]) not in seen:
                    seen.add((answers[i], answers[j]))
                    out.append((i, j))
        return out
    raise ValueError(f"comparisons.pairs must be 'best_worst' or 'all', got {mode!r}")


def sample_ids(model, tok, rows: list[dict], k: int, p: SamplingParams, batch_prompts: int,
               progress: bool = False, desc: str = "comparisons",
               setting: str = "comparisons.max_tokens") -> list[list[list[int]]]:
    """K sampled answers per prompt row as ids (``<|end|>`` kept where it was sampled), through the Engine in
    batches. Batch b samples with seed ``p.seed + b``, so the output is a function of the inputs alone.
    ``desc``: the progress bar's name; ``setting``: the config key an error about ``p.max_tokens`` names."""
    engine = Engine(model, vocab_limit=tok.vocab_size)
    calculator = any(r.get("task") == "calc" for r in rows)  # its tasks' answers are written with it running
    room = model.cfg.block_size - p.max_tokens
    if room < 2:
        raise ValueError(f"{setting}={p.max_tokens} leaves no room for a prompt in a "
                         f"{model.cfg.block_size}-token context")
    out: list[list[list[int]]] = []
    starts = range(0, len(rows), batch_prompts)
    for b, start in enumerate(tqdm(starts, desc=desc, disable=not progress)):
        chunk = rows[start:start + batch_prompts]
        # a long conversation keeps its end: that is what the answer continues
        ids = [x for r in chunk for x in [tok.chat_prompt(r["messages"])[-room:]] * k]  # rendered once a row
        seed = None if p.seed is None else p.seed + b
        gen = engine.generate(ids, SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                                                  seed=seed, stop_ids=(tok.end_id,)),
                              tools=[CalcRow(tok) for _ in ids] if calculator else None)
        out += [gen[i * k:(i + 1) * k] for i in range(len(chunk))]
    return out


def sample_answers(model, tok, rows: list[dict], k: int, p: SamplingParams, batch_prompts: int,
                   progress: bool = False) -> list[list[str]]:
    """K sampled answers (text, up to <|end|>) per prompt row (``sample_ids``, decoded)."""
    return [[tok.decode([t for t in a if t != tok.end_id]) for a in group]
            for group in sample_ids(model, tok, rows, k, p, batch_prompts, progress)]


def add_mismatched(rows: list[dict], samples: list[list[str]], m: int, seed: int) -> list[list[str]]:
    """Each prompt's answers plus ``m`` answers sampled for other prompts — of another task where the
    rows name tasks — drawn with a seeded generator, so the result is a function of the inputs."""
    import random

    pools: dict = {}  # a task -> the rows of other tasks (built once per task, not once per row)
    out = []
    for i, (row, answers) in enumerate(zip(rows, samples)):
        task = row.get("task")
        if task:
            others = pools.get(task)
            if others is None:
                others = pools[task] = [j for j, r in enumerate(rows) if r.get("task") != task]
        else:
            others = [j for j in range(len(rows)) if j != i]
        rng = random.Random(f"{seed}:{i}")
        picked = rng.sample(others, min(m, len(others)))
        out.append(answers + [samples[j][rng.randrange(len(samples[j]))] for j in picked])
    return out


def run_comparisons(cfg: Config, run_dir, prompts_path, out_path=None, k: int | None = None) -> dict:
    """Sample ``k`` answers per prompt of ``prompts_path`` from the run's policy, label them with
    ``cfg.comparisons.labeler`` and write pairs to ``out_path`` (default RUN/comparisons.jsonl)."""
    settings, run_dir = cfg.comparisons, Path(run_dir)
    k = k or settings.k
    if k < 2:
        raise ValueError(f"comparisons: k={k}; at least 2 answers per prompt are needed to compare")
    out_path = Path(out_path) if out_path else run_dir / "comparisons.jsonl"
    scorer = load_scorer(settings.labeler)
    rows = load_prompts(str(prompts_path))
    stage = settings.stage or latest_stage(run_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = load_model(run_dir / stage, device)
    tok = Tokenizer.load(run_dir / "tokenizer.json")
    t0 = time.perf_counter()
    p = SamplingParams(max_tokens=settings.max_tokens, temperature=settings.temperature, top_p=settings.top_p,
                       seed=settings.seed)
    samples = sample_answers(model, tok, rows, k, p, settings.batch_prompts, progress=True)
    if settings.mismatched:
        samples = add_mismatched(rows, samples, settings.mismatched, settings.seed)
    pairs, ties, all_scores = [], 0, []
    for row, answers in zip(rows, samples):
        scores = []
        for a in answers:
            s = scorer(row, a)
            if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s):
                raise ValueError(f"scorer {settings.labeler!r} returned {s!r} (expected a finite number) "
                                 f"for a prompt of {prompts_path}")
            scores.append(float(s))
        all_scores += scores
        chosen = pick_pairs(answers, scores, settings.pairs)
        ties += not chosen
        pairs += [{"prompt": row["messages"], "chosen": answers[i], "rejected": answers[j],
                   "chosen_score": scores[i], "rejected_score": scores[j]}
                  | ({"mismatched": True} if max(i, j) >= k else {}) for i, j in chosen]
    write_comparisons(out_path, pairs)
    res = {"prompts": len(rows), "pairs": len(pairs), "ties": ties,
           "mean_score": sum(all_scores) / max(1, len(all_scores)), "seconds": time.perf_counter() - t0}
    print(f"comparisons: {len(pairs)} pairs from {len(rows)} prompts x {k} samples of {stage} "
          f"(mean score {res['mean_score']:.3f}; {ties} prompts with all answers tied) -> {out_path}")
    return res
