"""Zero-, one- and few-shot evaluation from a task file: the GPT-3 paper's table for any task a user writes.

A task file is JSONL, one example per line, of one of two kinds:

    {"context": "Q: 2 + 2 =\\nA:", "choices": [" 3", " 4", " 5"], "gold": 1}     multiple choice
    {"context": "The capital of France is", "answer": " Paris"}                   cloze / generation

(``"answer": <int>`` or ``"label"`` may stand for ``"gold"``; a ``"task"`` key splits one file into
several tasks.) A continuation that does not begin with whitespace gets one space in front of it.

How a row is scored (as in the GPT-3 paper and EleutherAI's lm-eval, so the numbers compare):
* multiple choice: the log-likelihood of each choice given the prompt; ``acc`` takes the most likely,
  ``acc_norm`` the most likely per character of the choice (long answers are not penalised).
* cloze: ``acc`` counts a row right when every answer token is the model's greedy (argmax) choice;
  the answer's total log-likelihood is reported as ``ll``.
* generative (``mode="gen"``): greedy decoding through the Engine, right when the stripped text up to
  the first blank line (base models) or ``<|end|>`` (chat models) equals the stripped answer.

With k shots the prompt opens with k *other* rows of the same task, each completed with its right
answer, drawn at random (seeded by ``seed`` and the row's index, so a table is reproducible) and
separated by a blank line. A base model sees ``<|bos|>`` + plain text; a chat model sees the shots as
earlier user/assistant turns of one conversation, rendered by the chat template, and the choice as the
assistant's reply.

    from chatfactory.eval.fewshot import load_task, few_shot_table
    table = few_shot_table(model, tok, load_task("task.jsonl"), shots=(0, 1, 5))
    print(format_table({"my task": table}))

CLI: ``chatfactory eval --run runs/NAME --task task.jsonl --shots 0,1,5``.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F

from ..formats.jsonl import DataError, read_jsonl

SHOT_SEP = "\n\n"


# ---------------------------------------------------------------- task files
def _normalise_row(row: dict, where: str) -> dict:
    ctx = row.get("context")
    if not isinstance(ctx, str):
        raise DataError(f"{where}: a task row needs a string 'context' (keys: {', '.join(row)})")
    task = str(row.get("task", ""))
    if "choices" in row:
        ch = row["choices"]
        if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c for c in ch):
            raise DataError(f"{where}: 'choices' must be a list of at least two non-empty strings")
        gold = next((row[k] for k in ("gold", "label", "answer") if k in row), None)
        if isinstance(gold, str) and gold in ch:
            gold = ch.index(gold)
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(ch):
            raise DataError(f"{where}: multiple-choice row needs 'gold' (an index into its {len(ch)} choices), "
                            f"got {gold!r}")
        return {"kind": "mc", "context": ctx, "choices": ch, "gold": gold, "task": task}
    ans = row.get("answer")
    if not isinstance(ans, str) or not ans.strip():
        raise DataError(f"{where}: a row needs 'choices' + 'gold' (multiple choice) or a non-empty string "
                        "'answer' (cloze)")
    return {"kind": "cloze", "context": ctx, "answer": ans, "task": task}


def load_task(path) -> list[dict]:
    """Read and check a task file; a bad row raises DataError naming file:line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: task file not found")
    rows = [_normalise_row(r, f"{path}:{n}") for n, r in read_jsonl(path)]
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def task_rows_from(rows: list[dict], where: str = "rows") -> list[dict]:
    """Normalise rows given in memory (e.g. ``data.tasks.fewshot_rows()``)."""
    return [r if "kind" in r else _normalise_row(r, f"{where}[{i}]") for i, r in enumerate(rows)]


def _target(row: dict) -> str:
    t = row["choices"][row["gold"]] if row["kind"] == "mc" else row["answer"]
    return t if t[:1].isspace() else " " + t


def _cont(text: str) -> str:
    return text if text[:1].isspace() else " " + text


def pick_shots(rows: list[dict], i: int, k: int, seed: int) -> list[dict]:
    """k rows other than rows[i], drawn at random (seeded by seed and i): the examples shown to row i."""
    if k <= 0:
        return []
    others = [j for j in range(len(rows)) if j != i]
    if k > len(others):
        raise ValueError(f"{k} shots asked for but the task has only {len(others)} other rows")
    return [rows[j] for j in random.Random(f"{seed}:{i}").sample(others, k)]


# ---------------------------------------------------------------- prompts -> (context ids, continuation ids)
def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Base model: ``<|bos|>`` + context, and the continuation's ids. Trailing spaces of the context move
    to the continuation, and the continuation's ids are the tail of the whole string's ids (so a merge
    across the boundary is tokenized the way the model would see it) — lm-eval's convention exactly."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tok.document(context)
    whole = tok.document(context + continuation)
    return ctx, whole[len(ctx):]


def base_prompt(row: dict, shots: list[dict]) -> str:
    return "".join(s["context"] + _target(s) + SHOT_SEP for s in shots) + row["context"]


def chat_messages(row: dict, shots: list[dict]) -> list[dict]:
    msgs = []
    for s in shots:
        msgs += [{"role": "user", "content": s["context"]}, {"role": "assistant", "content": _target(s).strip()}]
    return msgs + [{"role": "user", "content": row["context"]}]


def request_pairs(tok, row: dict, shots: list[dict], chat: bool) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) for each candidate of a row: its choices, or its answer."""
    cands = row["choices"] if row["kind"] == "mc" else [row["answer"]]
    if chat:
        ctx = tok.chat_prompt(chat_messages(row, shots))
        return [(ctx, tok.encode(c.strip())) for c in cands]
    prompt = base_prompt(row, shots)
    return [encode_pair(tok, prompt, _cont(c)) for c in cands]


# ---------------------------------------------------------------- scoring
@torch.no_grad()
def score_continuations(model, pairs, batch_size: int = 16) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): (sum of log p(continuation tokens | everything before),
    True if every continuation token is the argmax). Sequences longer than the model's context keep
    their last ``block_size`` tokens (the continuation is never cut)."""
    limit = model.cfg.block_size
    device = next(model.parameters()).device
    out = []
    for b in range(0, len(pairs), batch_size):
        chunk = pairs[b:b + batch_size]
        seqs, conts = [], []
        for ctx, cont in chunk:
            if not cont:
                raise ValueError("an empty continuation cannot be scored")
            if len(cont) >= limit:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit the {limit}-token context")
            s = (list(ctx) + list(cont))[-limit:]
            seqs.append(s)
            conts.append(len(cont))
        T = max(len(s) for s in seqs) - 1
        # right padding: causal attention keeps every real position independent of the pads after it
        idx = torch.zeros(len(seqs), T, dtype=torch.long)
        tgt = torch.zeros(len(seqs), T, dtype=torch.long)
        for r, s in enumerate(seqs):
            idx[r, : len(s) - 1] = torch.tensor(s[:-1])
            tgt[r, : len(s) - 1] = torch.tensor(s[1:])
        logp = F.log_softmax(model(idx.to(device)).float(), dim=-1).cpu()
        for r, s in enumerate(seqs):
            end = len(s) - 1
            lp = logp[r, end - conts[r]: end]
            t = tgt[r, end - conts[r]: end]
            ll = lp.gather(1, t[:, None]).sum().item()
            out.append((ll, bool((lp.argmax(-1) == t).all())))
    return out


def _generate_exact(model, tok, rows, shot_lists, chat: bool, batch_size: int = 16) -> list[bool]:
    from ..inference.engine import Engine
    from ..inference.sampling import SamplingParams

    engine = Engine(model, vocab_limit=tok.vocab_size)
    right = []
    for b in range(0, len(rows), batch_size):
        rs, ss = rows[b:b + batch_size], shot_lists[b:b + batch_size]
        if chat:
            prompts = [tok.chat_prompt(chat_messages(r, s)) for r, s in zip(rs, ss)]
        else:
            prompts = [tok.document(base_prompt(r, s)) for r, s in zip(rs, ss)]
        limit = model.cfg.block_size
        n_new = max(len(tok.encode(r["answer"])) for r in rs) + 8
        prompts = [p[-(limit - n_new):] for p in prompts]
        outs = engine.generate(prompts, SamplingParams(max_tokens=n_new, temperature=0,
                                                               stop_ids=tok.stop_ids))
        for r, o in zip(rs, outs):
            text = tok.decode([t for t in o if t not in tok.stop_ids])
            text = text.split(SHOT_SEP)[0] if not chat else text
            right.append(text.strip() == r["answer"].strip())
    return right


def evaluate_rows(model, tok, rows: list[dict], k: int, chat: bool = False, mode: str = "ll", seed: int = 0,
                  batch_size: int = 16, pool: list[dict] | None = None) -> dict:
    """Metrics of one task at k shots. ``pool``: the rows shots are drawn from (default ``rows``;
    rows are matched by position, so a row never sees itself)."""
    pool = rows if pool is None else pool
    shot_lists = [pick_shots(pool, i, k, seed) for i in range(len(rows))]
    kinds = {r["kind"] for r in rows}
    if len(kinds) > 1:
        raise ValueError("a task mixes multiple-choice and cloze rows; split them with a 'task' key")
    if mode == "gen":
        if kinds != {"cloze"}:
            raise ValueError("generative exact match needs rows with an 'answer'")
        right = _generate_exact(model, tok, rows, shot_lists, chat, batch_size)
        return {"acc": sum(right) / len(rows), "n": len(rows)}
    reqs, owner = [], []
    for i, (r, s) in enumerate(zip(rows, shot_lists)):
        for p in request_pairs(tok, r, s, chat):
            reqs.append(p)
            owner.append(i)
    scores = score_continuations(model, reqs, batch_size)
    per_row: list[list[tuple[float, bool]]] = [[] for _ in rows]
    for i, sc in zip(owner, scores):
        per_row[i].append(sc)
    if kinds == {"mc"}:
        acc = acc_norm = 0
        for r, sc in zip(rows, per_row):
            lls = [ll for ll, _ in sc]
            acc += max(range(len(lls)), key=lambda j: lls[j]) == r["gold"]
            normed = [ll / len(c) for ll, c in zip(lls, r["choices"])]
            acc_norm += max(range(len(lls)), key=lambda j: normed[j]) == r["gold"]
        return {"acc": acc / len(rows), "acc_norm": acc_norm / len(rows), "n": len(rows)}
    return {"acc": sum(sc[0][1] for sc in per_row) / len(rows),
            "ll": sum(sc[0][0] for sc in per_row) / len(rows), "n": len(rows)}


def few_shot_table(model, tok, task_rows: list[dict], shots=(0, 1, 5), chat: bool = False, mode: str = "ll",
                   seed: int = 0, limit: int = 0, batch_size: int = 16) -> dict:
    """The zero/one/few-shot table of one task file.

    -> ``{task name: {k: {"acc": …, ["acc_norm" | "ll"]: …, "n": …}}}`` with one entry per ``task`` value
    in the rows (``"all"`` when the rows carry none). ``limit`` evaluates only the first rows of each
    task (shots still come from all of them)."""
    rows = task_rows_from(task_rows)
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["task"] or "all", []).append(r)
    was_training = model.training
    model.eval()
    table = {}
    try:
        for name, grp in groups.items():
            evald = grp[:limit] if limit else grp
            try:
                table[name] = {k: evaluate_rows(model, tok, evald, k, chat, mode, seed, batch_size, pool=grp)
                               for k in shots}
            except ValueError as e:
                raise ValueError(f"task {name!r}: {e}") from None
    finally:
        model.train(was_training)
    return table


def format_table(table: dict, metric: str = "acc") -> str:
    """A Markdown table: one line per task, one column per shot count (the GPT-3 paper's layout)."""
    shots = sorted({k for t in table.values() for k in t})
    head = "| task | n | " + " | ".join(f"{k}-shot" for k in shots) + " |"
    lines = [head, "|" + "---|" * (len(shots) + 2)]
    for name, t in table.items():
        n = next(iter(t.values()))["n"]
        lines.append(f"| {name} | {n} | " + " | ".join(f"{t[k][metric]:.3f}" if k in t else "" for k in shots) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the same task for EleutherAI's lm-eval
def lm_eval_task_yaml(path, name: str) -> str:
    """An lm-eval task definition (YAML) for a multiple-choice task file, scored as ``chatfactory eval``
    scores it at 0 shots. Put it in a folder, pass ``--include_path FOLDER --tasks NAME`` (docs/evaluation.md)."""
    import json

    path = Path(path).resolve()
    raw = [r for _, r in read_jsonl(path)]
    rows = load_task(path)
    if any(r["kind"] != "mc" for r in rows):
        raise ValueError(f"{path}: only multiple-choice task files translate to an lm-eval task")
    spaced = {c[:1].isspace() for r in rows for c in r["choices"]}
    if len(spaced) > 1:
        raise ValueError(f"{path}: some choices start with a space and some do not; lm-eval needs one delimiter")
    gold_key = next(k for k in ("gold", "label", "answer") if k in raw[0])
    if any(isinstance(r.get(gold_key), str) for r in raw):
        raise ValueError(f"{path}: lm-eval needs the gold answer as an index")
    return "\n".join([
        f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {json.dumps(str(path))}",
        "test_split: test", "output_type: multiple_choice", "doc_to_text: context", "doc_to_choice: choices",
        f"doc_to_target: {gold_key}", f"target_delimiter: {json.dumps('' if spaced == {True} else ' ')}",
        "metric_list:", "  - metric: acc", "  - metric: acc_norm", ""])
