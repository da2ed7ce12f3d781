"""Rejection-sampling fine-tuning (RFT): the policy's own best answers become its next demonstrations.

Llama 2 ran it before PPO, ReST and expert iteration repeat it, and it is the simplest way to turn a
verifier into training signal: for every RL prompt the policy samples ``rft.k`` answers, and one is kept:

    1. an answer counts only if it ended (``<|end|>`` within ``rft.max_new_tokens``) and decodes to clean
       text (no U+FFFD: a byte-level model can stop inside a multi-byte character);
    2. where the verifier (``rft.verifier``, data/verifiers.py) has a check for the prompt, only answers it
       passes remain, and a prompt with none is skipped: a wrong answer is never a demonstration;
    3. of what remains, the reward model's (``rft.reward``) highest-scored answer is kept — for small talk
       the reward model alone chooses (``rft.reward=""``: the first answer that remains, a random draw).

Then the SFT loss on the kept answers (train/sft.py ``fine_tune``), from ``rft.init_from``. Why it works
where RL on the same signal does not, on a small model: RL reinforces the single answers it samples, noise
included, while RFT imitates the best of K — it moves the model toward what it already does on its good
draws, so sampling at temperature 1 looks more like its greedy answers. The kept answers are written to
``RUN/rft/answers.jsonl`` (with their scores) before training, and a rerun with the same settings reuses
them, so an interrupted stage resumes where it was.

    chatfactory rft --config demo --out runs/demo        # after sft and reward
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from ..config import Config
from ..data.comparisons import sample_ids
from ..data.preferences import load_prompts
from ..data.verifiers import load_verifier
from ..inference.sampling import SamplingParams
from ..store.checkpoint import resolve_stage, stage_finished
from ..store.files import atomic_write_text
from ..store.load import load_model
from ..text.tokenizer import Tokenizer
from .reward import load_reward_model
from .rollout import attention_mask, pad_batch
from .sft import fine_tune

SAMPLE_KEYS = ("k", "temperature", "max_new_tokens", "batch_prompts", "verifier", "reward", "init_from", "seed")


@torch.no_grad()
def reward_scores(rm, tok, pairs: list[tuple[dict, list[int]]], batch: int = 256) -> list[float]:
    """The reward model's score of each (prompt row, answer ids), read at its last token (as the RL stages
    read it)."""
    scores: list[float] = []
    block, device = rm.cfg.block_size, next(rm.parameters()).device
    rendered: dict[int, list[int]] = {}  # a row's prompt ids, rendered once for all of its answers

    def prompt(row: dict) -> list[int]:
        if id(row) not in rendered:
            rendered[id(row)] = tok.chat_prompt(row["messages"])
        return rendered[id(row)]

    for s in range(0, len(pairs), batch):
        part = pairs[s:s + batch]
        # the answer fits whole; a long prompt keeps its end
        prompts = [prompt(row)[-(block - len(a)):] for row, a in part]
        b = {k: (v.to(device) if torch.is_tensor(v) else v)
             for k, v in pad_batch(prompts, [a for _, a in part], tok.pad_id, tok.end_id).items()}
        scores += rm.score(b["tokens"], b["last"], positions=b["positions"],
                           attn_mask=attention_mask(b["valid"])).float().tolist()
    return scores


def candidates(row: dict, texts: list[str], ended: list[bool], verifier) -> list[int]:
    """The answers rules 1-2 leave (the module docstring), one index per distinct text."""
    ok = [j for j, t in enumerate(texts) if ended[j] and t.strip() and "\ufffd" not in t]
    if verifier is not None:
        checked = [(j, verifier(row, texts[j])) for j in ok]
        if any(v is not None for _, v in checked):
            ok = [j for j, v in checked if v is not None and v >= 1.0]
    first = {}
    for j in ok:
        first.setdefault(texts[j], j)
    return list(first.values())


def pick_best(row: dict, texts: list[str], ended: list[bool], scores: list[float], verifier) -> int | None:
    """The index of the answer to keep (rules 1-3), or None."""
    ok = candidates(row, texts, ended, verifier)
    return max(ok, key=lambda j: scores[j]) if ok else None


def best_answers(cfg: Config, run_dir: Path, tok, policy_dir: Path, seed: int, out: Path) -> dict:
    """Sample from ``policy_dir``, score and keep (rules 1-3); writes ``out`` (JSONL: messages with the kept
    answer, its reward score and verdict) and returns the counts."""
    s = cfg.rft
    rows = load_prompts(s.prompts)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy, _ = load_model(policy_dir, device)
    rm = load_reward_model(resolve_stage(run_dir, s.reward, "rft.reward"), device).eval() if s.reward else None
    verifier = load_verifier(s.verifier) if s.verifier else None
    t0 = time.perf_counter()
    p = SamplingParams(max_tokens=s.max_new_tokens, temperature=s.temperature, seed=seed)
    answers = sample_ids(policy, tok, rows, s.k, p, s.batch_prompts, progress=s.progress, desc="rft: sampling",
                         setting="rft.max_new_tokens")
    counts = {"prompts": len(rows), "answers": len(rows) * s.k, "kept": 0, "no_passing_answer": 0, "ended": 0,
              "scored": 0}
    texts, ended, left = [], [], []
    for row, group in zip(rows, answers):
        ended.append([bool(a) and a[-1] == tok.end_id for a in group])
        texts.append([tok.decode([t for t in a if t != tok.end_id]) for a in group])
        left.append(candidates(row, texts[-1], ended[-1], verifier))
        counts["ended"] += sum(ended[-1])
    # the reward model reads only where it has a choice to make: two or more distinct answers remain
    # (without one every remaining answer ties, and the first, a random draw, is kept)
    todo = [(i, j) for i, c in enumerate(left) if len(c) > 1 and rm is not None for j in c]
    scores = dict(zip(todo, reward_scores(rm, tok, [(rows[i], answers[i][j]) for i, j in todo]))) if todo else {}
    counts["scored"] = len(todo)
    kept = []
    for i, (row, c) in enumerate(zip(rows, left)):
        if not c:
            counts["no_passing_answer"] += 1
            continue
        j = pick_best(row, texts[i], ended[i], [scores.get((i, j), 0.0) for j in range(s.k)], verifier)
        v = verifier(row, texts[i][j]) if verifier is not None else None
        kept.append({"messages": row["messages"] + [{"role": "assistant", "content": texts[i][j]}],
                     "reward": scores.get((i, j)), "verified": v} | ({"task": row["task"]} if "task" in row else {}))
    counts["kept"] = len(kept)
    counts["verified_kept"] = sum(r["verified"] is not None for r in kept)
    counts["sample_seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    return counts


def _fingerprint(cfg: Config, round_: int) -> str:
    s = cfg.rft
    key = {k: getattr(s, k) for k in SAMPLE_KEYS} | {"prompts": s.prompts, "round": round_}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def run_rft(cfg: Config, run_dir) -> dict:
    """``rft.rounds`` rounds of: keep the policy's best answers to ``rft.prompts``, fine-tune on them. Round 1
    samples from and starts at ``rft.init_from``; each later round samples from and continues the round before
    (expert iteration). Round r < last writes ``run_dir/rft/round<r>``, the last ``run_dir/rft``. Safe to
    re-run: finished rounds are skipped, kept answers reused, training resumes."""
    s, run_dir = cfg.rft, Path(run_dir)
    if not s.prompts:
        raise ValueError("rft.prompts is empty: name a prompts JSONL (`chatfactory run` points it at the RL prompts)")
    if s.k < 1 or s.rounds < 1:
        raise ValueError(f"rft.k={s.k}, rft.rounds={s.rounds}: each must be at least 1")
    tok = Tokenizer.load(run_dir / "tokenizer.json")
    policy = resolve_stage(run_dir, s.init_from, "rft.init_from")
    home = run_dir / "rft"
    result: dict = {"rounds": []}
    for r in range(1, s.rounds + 1):
        last = r == s.rounds
        stage_dir = home if last else home / f"round{r}"
        work = home / f"round{r}"  # the round's kept answers
        out, meta = work / "answers.jsonl", work / "answers.json"
        if not last and stage_finished(stage_dir):
            policy = stage_dir
            result["rounds"].append({k: v for k, v in json.loads(meta.read_text()).items() if k != "fingerprint"})
            continue
        fp = _fingerprint(cfg, r)
        counts = json.loads(meta.read_text()) if meta.exists() and out.exists() else None
        if counts is None or counts.get("fingerprint") != fp:
            counts = best_answers(cfg, run_dir, tok, policy, s.seed + 1000 * r, out) | {"fingerprint": fp, "round": r}
            atomic_write_text(meta, json.dumps(counts, indent=1))
        print(f"rft round {r}/{s.rounds}: kept {counts['kept']:,} of {counts['prompts']:,} prompts' best answers "
              f"({s.k} sampled each at T={s.temperature} from {policy}; {counts['no_passing_answer']:,} prompts had "
              f"no answer that ended" + (f" and passed verifier {s.verifier}" if s.verifier else "") + ")")
        if not counts["kept"]:
            raise ValueError(f"rft round {r}: no answer was kept from {s.prompts}; nothing to fine-tune on")
        convs = [row["messages"] for row in map(json.loads, out.read_text(encoding="utf-8").splitlines())]
        res = fine_tune(cfg, run_dir, "rft", convs, f"kept from {s.k} samples of {policy}", src=policy, out=stage_dir)
        result["rounds"].append({k: v for k, v in counts.items() if k != "fingerprint"})
        policy = stage_dir
    seconds = sum(x["sample_seconds"] for x in result["rounds"])
    return res | result | {"kept": result["rounds"][-1]["kept"], "sample_seconds": seconds}
