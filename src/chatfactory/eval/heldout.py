"""The pipeline's evaluation on prompts no training stage saw, judged by the rubric (data/rubric.py).

Two splits of the embedded tasks (data/tasks.py), two uses:

  heldout  only reports. ``evaluate_all`` has every finished policy answer the same held-out prompts
           (RUN/tasks/heldout.jsonl) and scores each reply: accuracy, gold (rubric) score, win rate vs
           SFT (ties half), KL vs SFT, and each of those per language of the prompts (``by_language``);
           the base model also gets its zero/one/few-shot table. Cached per stage in RUN/eval/<stage>.json
           with the per-prompt verdicts (``correct``, ``scores``, ``reply_chars``) and the prompts'
           identity (``prompts_sha``), which eval/seeds.py pairs across repeats of a run. Each aligned
           stage also gets ``vs_sft`` (``versus_sft``): mean reply length of both, the length-controlled
           win rate and McNemar's test of accuracy on the same prompts. With ``pipeline.eval_replies``
           k > 1 each prompt gets k sampled replies (``eval_items``): the per-reply lists and every figure
           run over prompts × k items, and a win pairs the policy's j-th reply with SFT's j-th.
           ``reward_accuracy`` scores the reward model on held-out pairs (overall and per language);
           ``chars_per_token`` measures the tokenizer on the held-out prompts' text, per language.
  dev      chooses. ``dev_scores`` judges one policy (a stage of the run, or a model in memory such as
           a PPO iteration under consideration) on RUN/tasks/dev.jsonl the same way, against SFT's
           replies to the same prompts; ``choose_on_dev`` (train/selection.py, where the RL stages'
           ``keep_best`` uses it) picks the best of several candidates and returns the record a stage
           puts in its result as ``dev_choice``, which the report states.

    from chatfactory.eval.heldout import dev_scores
    from chatfactory.train.selection import choose_on_dev
    scores = {str(it): dev_scores(cfg, run_dir, policy_at[it]) for it in (10, 20, 30)}
    result["dev_choice"] = choose_on_dev("ppo iteration", scores)

``chatfactory run`` (pipeline.py) calls ``evaluate_all`` and ``reward_accuracy`` after the training
stages; eval/report.py turns what they return into report.md.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import torch

from ..data.rubric import is_correct, lang_of, rubric_score
from ..data.tasks import plain_prompt, prompt_text
from ..formats.jsonl import read_jsonl
from ..inference.calculator import forced_mask
from ..inference.engine import Engine
from ..inference.replies import chat_replies
from ..inference.sampling import SamplingParams
from ..stages import policies
from ..store.checkpoint import has_checkpoint
from ..store.files import atomic_write_text
from ..store.load import load_model
from ..text.tokenizer import Tokenizer
from .fewshot import few_shot_table
from .stats import length_controlled_win_rate, mcnemar
from .winrate import compare


def read_rows(path) -> list[dict]:
    """The rows of a JSONL file the pipeline wrote (RUN/tasks/*.jsonl); a damaged line is a DataError naming it."""
    return [row for _, row in read_jsonl(path)]


def _device(cfg) -> str:
    return "cuda" if torch.cuda.is_available() and cfg.sft.device in ("auto", "cuda") else "cpu"


def _fingerprint(stage_dir: Path, settings: dict) -> str:
    st = (stage_dir / "model.safetensors").stat()
    return hashlib.sha256(json.dumps([st.st_mtime_ns, st.st_size, settings]).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- replies
@torch.no_grad()
def base_answers(model, tok, rows: list[dict], max_tokens: int, temperature: float, seed: int,
                 batch_size: int = 64) -> list[str]:
    """The base model has no chat template: it continues the plain-text form pretraining showed it
    (``User: …\\nAssistant:``); its reply is the text up to the first line break."""
    engine, out = Engine(model, vocab_limit=tok.vocab_size), []
    limit = model.cfg.block_size - max_tokens
    for b in range(0, len(rows), batch_size):
        prompts = [tok.document(plain_prompt(r))[-limit:] for r in rows[b:b + batch_size]]
        p = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + b, stop_ids=tok.stop_ids)
        for ids in engine.generate(prompts, p):
            text = tok.decode([t for t in ids if t not in p.stop_ids])
            out.append(text.strip().split("\n")[0].strip())
    return out


def replies_of(model, tok, rows: list[dict], settings, plain: bool = False, seed: int | None = None):
    """(texts, ids) of the replies the evaluation samples (``pipeline`` settings: temperature, length,
    seed; ``seed`` overrides ``eval_seed``); ``plain``: a base model without a chat template, prompted with
    plain text (ids None)."""
    seed = settings.eval_seed if seed is None else seed
    torch.manual_seed(seed)
    args = (model, tok, rows, settings.eval_max_tokens, settings.eval_temperature, seed)
    if plain:
        return base_answers(*args), None
    return chat_replies(*args, room=model.cfg.block_size - settings.eval_max_tokens,
                        calculator=getattr(settings, "calc_rows", 0) > 0)


REPLY_SEED_STRIDE = 100_003  # reply j samples with eval_seed + j × this: far from any repeat's own eval_seed


def eval_items(rows: list[dict], settings) -> list[dict]:
    """The held-out items: ``pipeline.eval_replies`` copies of the prompt rows, reply-major (item i is prompt
    i % len(rows)'s reply i // len(rows)), so two policies' replies pair item by item."""
    k = settings.eval_replies
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"pipeline.eval_replies={k!r}: the replies sampled per held-out prompt, at least 1")
    return rows * k


def sampled_replies(model, tok, rows: list[dict], settings, k: int, plain: bool = False):
    """(texts, ids) for ``eval_items(rows, settings)``, ``k`` replies to each prompt: reply j of every prompt
    samples with eval_seed + j × REPLY_SEED_STRIDE, so the first reply of each prompt is the one a single-reply
    evaluation samples."""
    texts, ids = [], []
    for j in range(k):
        t, i = replies_of(model, tok, rows, settings, plain, seed=settings.eval_seed + j * REPLY_SEED_STRIDE)
        texts += t
        ids = None if i is None else ids + i
    return texts, ids


@torch.no_grad()
def policy_kl(model, ref, tok, rows: list[dict], replies_ids: list[list[int]], temperature: float,
              batch_size: int = 32) -> float:
    """Mean over prompts of sum_t log pi(y_t) - log pi_ref(y_t) for the policy's own sampled replies:
    a Monte-Carlo estimate of KL(pi || pi_ref) per reply, in nats, at the sampling temperature."""
    from ..train.rollout import answer_logprobs, forward_answers, pad_batch

    total = 0.0
    for b in range(0, len(rows), batch_size):
        prompts = [tok.chat_prompt(r["messages"]) for r in rows[b:b + batch_size]]
        batch = pad_batch(prompts, replies_ids[b:b + batch_size], tok.pad_id, tok.end_id)
        device = next(model.parameters()).device
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        lp = answer_logprobs(forward_answers(model, batch), batch["tokens"], batch["start"], temperature)
        lr = answer_logprobs(forward_answers(ref, batch), batch["tokens"], batch["start"], temperature)
        mask, width = batch["answer_mask"], batch["answer_mask"].size(1)
        # a calculator's results were not sampled: not in the KL
        forced = torch.tensor([(forced_mask(tok, r) + [False] * width)[:width] for r in replies_ids[b:b + batch_size]],
                              device=mask.device)
        total += float(((lp - lr) * (mask & ~forced)).sum())
    return total / max(1, len(rows))


def calculator_figures(model, tok, rows: list[dict], replies: list[str], settings) -> dict:
    """On the calculator's held-out problems (task "calc", operands never seen in training): accuracy with the
    calculator running (the replies given), the right-call rate (the reply's first call evaluates to the right
    answer) and accuracy without it (the same prompts answered with no calculator: a call gets no result)."""
    from ..inference.calculator import CalcError, evaluate

    at = [i for i, r in enumerate(rows) if r.get("task") == "calc"]
    if not at:
        return {}
    calc_rows = [rows[i] for i in at]

    def right_call(reply: str, want: str) -> bool:
        m = re.search(r"<calc>(.*?)</calc>", reply)
        try:
            return m is not None and evaluate(m.group(1)) == want
        except CalcError:
            return False

    alone = chat_replies(model, tok, calc_rows, settings.eval_max_tokens, settings.eval_temperature,
                         settings.eval_seed, room=model.cfg.block_size - settings.eval_max_tokens)[0]
    correct = [bool(is_correct(r, replies[i])) for r, i in zip(calc_rows, at)]
    without = [bool(is_correct(r, a)) for r, a in zip(calc_rows, alone)]
    return {"n": len(at), "accuracy": sum(correct) / len(at),
            "right_call": sum(right_call(replies[i], r["answer"]) for r, i in zip(calc_rows, at)) / len(at),
            "accuracy_without": sum(without) / len(at), "correct": correct, "correct_without": without}


def calculator_md(evals: dict) -> list[str]:
    """The calculator's table: held-out multi-digit problems answered with it, the right-call rate, without it."""
    rows = [(s, e["calculator"]) for s, e in evals.items() if e.get("calculator")]
    if not rows:
        return []
    out = ["", f"The calculator (multi-digit problems whose operands no training prompt holds; "
               f"n = {rows[0][1]['n']}):", "", "| stage | accuracy with it | right call | accuracy without it | "
           "McNemar p |", "|---|---|---|---|---|"]
    for s, c in rows:
        p = mcnemar(c["correct"], c["correct_without"])["p"]
        out.append(f"| {s} | {c['accuracy']:.3f} | {c['right_call']:.3f} | {c['accuracy_without']:.3f} | {p:.2g} |")
    return out


# ---------------------------------------------------------------- scores
def score_replies(rows: list[dict], replies: list[str]) -> dict:
    """The rubric on each reply: accuracy (rules 1-2), mean gold score, accuracy per task, length."""
    scores = [rubric_score(r, a) for r, a in zip(rows, replies)]
    right = [is_correct(r, a) for r, a in zip(rows, replies)]
    by_task: dict[str, list] = {}
    for r, ok in zip(rows, right):
        by_task.setdefault(r["task"], []).append(ok)
    return {"accuracy": sum(right) / len(rows), "gold_score": sum(scores) / len(rows), "n": len(rows),
            "scores": scores, "correct": right,
            "accuracy_by_task": {k: sum(v) / len(v) for k, v in sorted(by_task.items())},
            "mean_words": sum(len(a.split()) for a in replies) / len(replies),
            "reply_chars": [len(a) for a in replies]}


def prompts_sha(rows: list[dict]) -> str:
    """The identity of a set of prompts, in order: a hash of their messages. Two runs whose held-out
    prompts hash alike answered the same prompts, so their per-prompt verdicts pair."""
    return hashlib.sha256(json.dumps([r["messages"] for r in rows], ensure_ascii=False).encode()).hexdigest()[:16]


def prompt_wins(scores_a: list[float], scores_b: list[float]) -> list[float]:
    """Per prompt, A's outcome against B under the rubric's scores: 1 win, 0.5 tie, 0 loss (``compare``'s count)."""
    return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_a, scores_b, strict=True)]


def versus_sft(res: dict, sft: dict) -> dict:
    """One aligned stage against SFT on the same prompts, from their cached per-prompt verdicts: the win rate
    with the mean reply length (characters) of both beside it, the length-controlled win rate (eval/stats.py:
    a logistic fit of the outcome on the length difference read at equal length, and the win rate over
    length-matched pairs), and McNemar's exact test of accuracy (``diff``: the stage's minus SFT's)."""
    chars = [e.get("reply_chars") or [len(a) for a in e["replies"]] for e in (res, sft)]
    lc = length_controlled_win_rate(prompt_wins(res["scores"], sft["scores"]), chars[0], chars[1])
    return {"n": lc["n"], "win_rate": lc["win_rate"], "lc_win_rate": lc["lc_win_rate"],
            "matched_win_rate": lc["matched_win_rate"], "n_matched": lc["n_matched"],
            "mean_chars": lc["mean_len_a"], "sft_mean_chars": lc["mean_len_b"],
            "mcnemar": mcnemar(sft["correct"], res["correct"])}


def vs_sft_md(evals: dict) -> list[str]:
    """report.md's lines beside the win rates: each aligned stage's ``vs_sft`` record in words ([] if none)."""
    lines = []
    for s in policies(after=1):
        v = (evals.get(s) or {}).get("vs_sft")
        if not v:
            continue
        matched = f" (length-matched pairs {v['matched_win_rate']:.3f} of {v['n_matched']})" if v["n_matched"] else ""
        mc = v["mcnemar"]
        lines.append(f"- {s}: mean reply {v['mean_chars']:.1f} characters (SFT {v['sft_mean_chars']:.1f}); win rate "
                     f"{v['win_rate']:.3f}, length-controlled {v['lc_win_rate']:.3f}{matched}; accuracy "
                     f"{mc['diff']:+.3f} vs SFT, McNemar p = {mc['p']:.3g} (right only here {mc['b_only']}, "
                     f"only in SFT {mc['a_only']})")
    if not lines:
        return []
    return ["", "Reply length beside each win rate; the length-controlled win rate is the logistic fit's at equal "
                "length (eval/stats.py); McNemar: exact test of accuracy on the same prompts.", ""] + lines


def by_language(rows: list[dict], res: dict, sft_replies: list[str] | None = None) -> dict:
    """One policy's scored replies (``score_replies``' result, with its replies) per language of the
    prompts: {lang: {"n", "accuracy", "gold_score"[, "win_rate_vs_sft"]}}, the win rate against SFT's
    replies to the same prompts when given."""
    out = {}
    for lang in sorted({lang_of(r) for r in rows}):
        idx = [i for i, r in enumerate(rows) if lang_of(r) == lang]
        sec = {"n": len(idx), "accuracy": sum(res["correct"][i] for i in idx) / len(idx),
               "gold_score": sum(res["scores"][i] for i in idx) / len(idx)}
        if sft_replies is not None:
            picked = [[xs[i] for i in idx] for xs in (rows, res["replies"], sft_replies)]
            sec["win_rate_vs_sft"] = win_vs(*picked)["win_rate"]
        out[lang] = sec
    return out


def chars_per_token(tok, rows: list[dict]) -> dict:
    """The tokenizer's characters per token on the text of prompt rows (every message and the reference
    reply, a line each), per language: {lang: {"chars", "tokens", "chars_per_token"}}."""
    out = {}
    for lang in sorted({lang_of(r) for r in rows}):
        texts = ["\n".join([m["content"] for m in r["messages"]] + [r.get("reference") or ""])
                 for r in rows if lang_of(r) == lang]
        chars, tokens = sum(map(len, texts)), sum(len(tok.encode(t)) for t in texts)
        out[lang] = {"chars": chars, "tokens": tokens, "chars_per_token": chars / max(1, tokens)}
    return out


def win_vs(rows, replies_a, replies_b) -> dict:
    """Gold-judged win rate of A over B on the same prompts; ties count half."""
    return compare(rows, replies_a, replies_b, rubric_score)


def few_shot(model, tok, path, settings) -> dict:
    """The base model's zero/one/few-shot multiple-choice accuracy per task (eval/fewshot.py)."""
    shots = tuple(int(s) for s in str(settings.fewshot_shots).split(",") if s.strip())
    rows = read_rows(path)
    count: dict[str, int] = {}
    for r in rows:
        count[r["task"]] = count.get(r["task"], 0) + 1
    rows = [r for r in rows if count[r["task"]] > max(shots)]  # k shots need k other rows of the task
    if not rows:
        return {"status": f"not run: no task has more than {max(shots)} rows"}
    table = few_shot_table(model, tok, rows, shots=shots, seed=settings.eval_seed)
    return {task: {str(k): v for k, v in per.items()} for task, per in table.items()}


# ---------------------------------------------------------------- held-out: the report's numbers
def evaluate_all(cfg, run_dir: Path, paths: dict, stages, log=print) -> dict:
    """Each of ``stages`` (finished policy stages: stages.policies()) answers the held-out prompts; the
    rubric scores each reply. Cached per stage in RUN/eval/<stage>.json (keyed by the checkpoint and
    the settings), so a resumed run reuses them."""
    settings = cfg.pipeline
    rows = read_rows(paths["heldout"])
    tok_path = run_dir / "tokenizer.json"
    if not rows or not tok_path.exists():
        return {}
    tok = Tokenizer.load(tok_path)
    items = eval_items(rows, settings)  # k replies to each prompt: every per-reply list below is over items
    k = len(items) // len(rows)
    key = {"n": len(rows), "T": settings.eval_temperature, "max_tokens": settings.eval_max_tokens,
           "seed": settings.eval_seed, "shots": settings.fewshot_shots} | ({"replies": k} if k > 1 else {})
    sha = prompts_sha(rows)
    device = _device(cfg)
    out = {}
    for stage in stages:
        sdir = run_dir / stage
        fp = _fingerprint(sdir, key)
        cache = run_dir / "eval" / f"{stage}.json"
        if cache.exists():
            got = json.loads(cache.read_text(encoding="utf-8"))
            # a cache written before prompts_sha was kept holds none: taken as answering these prompts
            if got.get("fingerprint") == fp and got.get("prompts_sha", sha) == sha:
                if "reply_chars" not in got or "prompts_sha" not in got:
                    got.update(reply_chars=[len(a) for a in got["replies"]], prompts_sha=sha)
                    atomic_write_text(cache, json.dumps(got, indent=1))
                out[stage] = got
                continue
        log(f"[run] eval {stage} on {len(rows)} held-out prompts" + (f" × {k} replies" if k > 1 else ""))
        t = time.perf_counter()
        model, _ = load_model(sdir, device)
        # a base model trained here knows no chat template
        replies, ids = sampled_replies(model, tok, rows, settings, k, plain=stage == "pretrain" and tok.chat is None)
        res = score_replies(items, replies)
        res["heldout_accuracy"] = res.pop("accuracy")
        res["replies_per_prompt"] = k  # "n" counts items: prompts × replies
        if settings.calc_rows and ids is not None:
            res["calculator"] = calculator_figures(model, tok, items, replies, settings)
        if stage == "pretrain" and settings.fewshot_shots:
            res["few_shot"] = few_shot(model, tok, paths["fewshot"], settings)
        if stage != "sft" and ids is not None and "sft" in stages and settings.eval_temperature > 0:
            ref, _ = load_model(run_dir / "sft", device)
            res["kl_vs_sft"] = policy_kl(model, ref, tok, items, ids, settings.eval_temperature)
        res.update(fingerprint=fp, prompts_sha=sha, seconds=time.perf_counter() - t, replies=replies)
        atomic_write_text(cache, json.dumps(res, indent=1))
        out[stage] = res
    if "sft" in out:
        for stage in policies(after=1) + ("pretrain",):
            if stage in out:
                out[stage]["win_rate_vs_sft"] = win_vs(items, out[stage]["replies"], out["sft"]["replies"])
        for stage in policies(after=1):
            if stage in out:
                out[stage]["vs_sft"] = versus_sft(out[stage], out["sft"])
    for stage, res in out.items():
        res["by_language"] = by_language(items, res, out["sft"]["replies"] if "sft" in out and stage != "sft" else None)
    return out


@torch.no_grad()
def reward_accuracy(stage_dir: Path, path: Path, tok, device: str = "cpu", n: int = 2000, batch_size: int = 64,
                    langs: dict[str, str] | None = None) -> dict:
    """The reward model's pairwise accuracy on a seeded sample of ``n`` held-out comparisons, on those of
    them between the policy's own samples alone (no reply to another prompt), and per language of the
    prompt (``langs``: prompt text (data/tasks.py's ``prompt_text``) -> language, from the rows the pairs
    were made from; a prompt not in it is Chinese when it holds a Han character)."""
    import random

    from ..data.preferences import collate, encode_pairs, parse_pair
    from ..data.sources import read_jsonl
    from ..train.reward import bradley_terry, load_reward_model, pair_right

    rm = load_reward_model(stage_dir, device)
    rows = list(read_jsonl(path))  # (line number, row)
    keep = sorted(random.Random(0).sample(range(len(rows)), min(n, len(rows))))
    pairs = [parse_pair(rows[i][1], f"{path}:{rows[i][0]}") for i in keep]
    own = [not rows[i][1].get("mismatched") for i in keep]
    enc = encode_pairs(tok, pairs, rm.backbone.cfg.block_size)
    right = []
    for i in range(0, len(enc), batch_size):
        b = collate(enc[i:i + batch_size], tok.pad_id)
        right += pair_right(bradley_terry(rm(b["idx"].to(device), b["last"].to(device)))[1]).tolist()
    mine = [r for r, o in zip(right, own) if o]
    by_lang: dict[str, list] = {}
    for pair, ok in zip(pairs, right):
        lang = (langs or {}).get(prompt_text({"messages": pair.prompt})) or lang_of({"messages": pair.prompt})
        by_lang.setdefault(lang, []).append(ok)
    return {"pairs": len(right), "accuracy": sum(right) / max(1, len(right)),
            "own_sample_pairs": len(mine), "own_sample_accuracy": sum(mine) / len(mine) if mine else None,
            "by_language": {k: {"pairs": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(by_lang.items())}}


# ---------------------------------------------------------------- dev: what settings and checkpoints are chosen on
def _sft_dev_replies(cfg, run_dir: Path, rows: list[dict], tok) -> list[str] | None:
    """SFT's replies to the dev prompts (what a candidate's win rate is counted against), sampled once
    and cached in RUN/eval/dev/sft.json; None without a finished SFT checkpoint."""
    sdir = run_dir / "sft"
    if not has_checkpoint(sdir):
        return None
    settings = cfg.pipeline
    fp = _fingerprint(sdir, {"dev": [r["messages"] for r in rows], "T": settings.eval_temperature,
                             "max_tokens": settings.eval_max_tokens, "seed": settings.eval_seed})
    cache = run_dir / "eval" / "dev" / "sft.json"
    if cache.exists():
        got = json.loads(cache.read_text(encoding="utf-8"))
        if got.get("fingerprint") == fp:
            return got["replies"]
    model, _ = load_model(sdir, _device(cfg))
    replies = replies_of(model, tok, rows, settings)[0]
    atomic_write_text(cache, json.dumps({"fingerprint": fp, "replies": replies}, indent=1))
    return replies


def dev_scores(cfg, run_dir, policy, n: int = 0) -> dict:
    """The rubric's verdict on one policy's replies to the dev prompts (RUN/tasks/dev.jsonl, the first
    ``n``; 0: all), sampled as the held-out evaluation samples: {"n", "accuracy", "gold_score",
    "win_rate_vs_sft" (None without an SFT checkpoint), "wins_ties_losses", "accuracy_by_task"}.
    ``policy``: a stage of the run ("ppo") or a model in memory (e.g. a PPO iteration under consideration)."""
    run_dir = Path(run_dir)
    rows = read_rows(run_dir / "tasks" / "dev.jsonl")[: n or None]
    if not rows:
        raise ValueError(f"{run_dir / 'tasks' / 'dev.jsonl'}: no dev prompts to choose on")
    tok = Tokenizer.load(run_dir / "tokenizer.json")
    model = load_model(run_dir / policy, _device(cfg))[0] if isinstance(policy, str) else policy
    was_training = model.training
    model.eval()
    replies = replies_of(model, tok, rows, cfg.pipeline)[0]
    model.train(was_training)
    res = score_replies(rows, replies)
    out = {k: res[k] for k in ("n", "accuracy", "gold_score", "accuracy_by_task")}
    sft = _sft_dev_replies(cfg, run_dir, rows, tok)
    wr = win_vs(rows, replies, sft) if sft is not None else {}
    out.update(win_rate_vs_sft=wr.get("win_rate"), wins_ties_losses=[wr.get(k) for k in ("wins", "ties", "losses")])
    return out
