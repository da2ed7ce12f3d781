"""``chatfactory run``: the whole GPT → InstructGPT → ChatGPT pipeline from one config, then a report.

    chatfactory run                                   # configs/demo.yaml into runs/demo
    chatfactory run --config pipeline-tiny --out runs/t pretrain.steps=20

Stages, in order, each writing ``RUN/<stage>/`` through its own ``run_<stage>``:

    tasks        RUN/tasks/{sft,prompts,heldout,fewshot}.jsonl from data/tasks.py (cheap; always rewritten)
    pretrain     tokenizer + GPT on the embedded text (``data.source: embedded+tasks``); or, with
                 ``pipeline.base`` set, a pretrained chat model imported with its tokenizer and template
                 (``chatfactory run --config smollm2``: SmolLM2-135M-Instruct, then LoRA for the rest)
    sft          demonstrations of the tasks (RUN/tasks/sft.jsonl)
    comparisons  K samples of the SFT policy per rl prompt, labeled by the rubric (the simulated labeler)
                 -> RUN/comparisons.jsonl; the same on held-out prompts -> RUN/comparisons_heldout.jsonl,
                 the reward model's held-out accuracy set
    reward       the reward model on those comparisons
    ppo · dpo    RLHF with a KL penalty to SFT, and DPO beside it on the same comparisons
    eval         every policy answers the same held-out prompts; the rubric is the gold judge
    report       RUN/report.md, RUN/report.json and PNG plots (eval/report.py)

A stage whose checkpoint says ``"finished": true`` is skipped, and so is a comparisons file or an
evaluation that is already written, so a killed run picks up where it was. Stage times accumulate
across restarts in RUN/pipeline.json. A stage whose module is not in this checkout is reported as
"not run: <stage> not available" — never with made-up numbers.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from pathlib import Path

import torch

from .checkpoint import atomic_write_text, has_checkpoint, load_model
from .config import Config, save_config
from .data import tasks as T
from .tokenizer import Tokenizer

# stage -> (module, entry point); run in this order
TRAIN_STAGES = {
    "pretrain": ("chatfactory.train.pretrain", "run_pretrain"),
    "sft": ("chatfactory.train.sft", "run_sft"),
    "comparisons": ("chatfactory.data.comparisons", "run_comparisons"),
    "reward": ("chatfactory.train.reward", "run_reward"),
    "ppo": ("chatfactory.train.ppo", "run_ppo"),
    "dpo": ("chatfactory.train.dpo", "run_dpo"),
    "grpo": ("chatfactory.train.grpo", "run_grpo"),
}
POLICIES = ("sft", "ppo", "dpo", "grpo")  # chat policies evaluated on the held-out prompts


class NotAvailable(Exception):
    """A stage's module is not part of this checkout."""


def entry_point(stage: str):
    module, fn = TRAIN_STAGES[stage]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise NotAvailable(f"{stage} not available ({module} is not in this checkout)") from None
        raise
    if not hasattr(mod, fn):
        raise NotAvailable(f"{stage} not available ({module} has no {fn})")
    return getattr(mod, fn)


def finished(stage_dir) -> bool:
    """A stage is done when its checkpoint's config.json says so (train/loop.py writes it)."""
    p = Path(stage_dir) / "config.json"
    if not (has_checkpoint(stage_dir) and p.exists()):
        return False
    try:
        return bool(json.loads(p.read_text(encoding="utf-8")).get("finished"))
    except json.JSONDecodeError:
        return False


class Ledger:
    """RUN/pipeline.json: per-stage status, seconds (summed over restarts of one stage's run; reset
    when a stage starts again from nothing) and results."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"stages": {}}

    def get(self, stage: str) -> dict:
        return self.data["stages"].setdefault(stage, {"seconds": 0.0})

    def update(self, stage: str, **kv) -> None:
        self.get(stage).update(kv)
        atomic_write_text(self.path, json.dumps(self.data, indent=2, default=float))

    def add_time(self, stage: str, seconds: float) -> None:
        self.update(stage, seconds=self.get(stage).get("seconds", 0.0) + seconds)


def _use_tasks(cfg: Config, paths: dict) -> None:
    """Point the stages' data at the task files (only what the config leaves at "tasks")."""
    if cfg.pipeline.tasks:
        cfg.sft.data = str(paths["sft"])
        for section in ("ppo", "grpo"):
            sec = getattr(cfg, section, None)
            if sec is None:
                continue
            sec.prompts = str(paths["prompts"])
            if hasattr(sec, "eval_prompts") and not sec.eval_prompts:  # the gold curve over RL iterations
                sec.eval_prompts, sec.gold = str(paths["heldout"]), sec.gold or "chatfactory.data.tasks:rubric_score"
    if hasattr(cfg, "reward") and not cfg.reward.val_data:
        cfg.reward.val_data = str(paths["comparisons_heldout"])
    if hasattr(cfg, "dpo") and not cfg.dpo.val_data:
        cfg.dpo.val_data = str(paths["comparisons_heldout"])


def run_pipeline(cfg: Config, run_dir, log=print) -> dict:
    """Run every stage that is not finished, evaluate, and write the report. Returns report.json's dict."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    pc = cfg.pipeline
    ledger = Ledger(run_dir / "pipeline.json")
    wanted = [s.strip() for s in pc.stages.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in TRAIN_STAGES]
    if unknown:
        raise ValueError(f"pipeline.stages: unknown stage(s) {', '.join(unknown)} (known: {', '.join(TRAIN_STAGES)})")

    t0 = time.perf_counter()
    tdir = run_dir / "tasks"
    paths = T.write_task_files(tdir, pc.tasks_seed, pc.sft_rows, pc.rl_prompts, pc.heldout, pc.fewshot)
    paths["comparisons"] = run_dir / "comparisons.jsonl"
    paths["comparisons_heldout"] = run_dir / "comparisons_heldout.jsonl"
    _use_tasks(cfg, paths)
    save_config(cfg, run_dir / "config.yaml")
    ledger.update("tasks", status="done", rows={k: _count_lines(p) for k, p in paths.items() if p.exists()})
    ledger.add_time("tasks", time.perf_counter() - t0)

    for stage in TRAIN_STAGES:
        if stage not in wanted:
            ledger.update(stage, status="not run: not in pipeline.stages")
            continue
        try:
            fn = entry_point(stage)
        except NotAvailable as e:
            log(f"[run] {stage}: {e}")
            ledger.update(stage, status=f"not run: {e}")
            continue
        if stage == "comparisons":
            done = paths["comparisons"].exists() and paths["comparisons_heldout"].exists()
        else:
            done = finished(run_dir / stage)
        if done:
            log(f"[run] {stage}: finished earlier, skipped")
            if ledger.get(stage).get("status") != "done":
                ledger.update(stage, status="done")
            continue
        if stage != "pretrain" and stage != "comparisons" and _init_missing(cfg, run_dir, stage):
            ledger.update(stage, status=f"not run: {_init_missing(cfg, run_dir, stage)}")
            log(f"[run] {stage}: {ledger.get(stage)['status']}")
            continue
        log(f"[run] {stage} ...")
        if stage == "comparisons" or not has_checkpoint(run_dir / stage):
            ledger.update(stage, seconds=0.0)  # a fresh start: time spent on a result since deleted no longer counts
        t = time.perf_counter()
        if stage == "pretrain" and pc.base:
            res = import_base(cfg, run_dir)
        elif stage == "comparisons":
            if not has_checkpoint(run_dir / "sft"):
                ledger.update(stage, status="not run: no sft checkpoint to sample from")
                continue
            k = cfg.comparisons.k
            cfg.comparisons.stage = cfg.comparisons.stage or "sft"  # label the SFT policy's samples (InstructGPT step 2)
            res = {"train": fn(cfg, run_dir, str(paths["prompts"]), str(paths["comparisons"]), k),
                   "heldout": fn(cfg, run_dir, str(paths["heldout"]), str(paths["comparisons_heldout"]), k)}
        else:
            res = fn(cfg, run_dir)
        ledger.add_time(stage, time.perf_counter() - t)
        ledger.update(stage, status="done", result=_jsonable(res))

    t = time.perf_counter()
    evals = evaluate_all(cfg, run_dir, paths, log)
    if finished(run_dir / "reward") and paths["comparisons_heldout"].exists() and (run_dir / "tokenizer.json").exists():
        ledger.update("reward", heldout=reward_accuracy(run_dir / "reward", paths["comparisons_heldout"],
                                                        Tokenizer.load(run_dir / "tokenizer.json")))
    ledger.add_time("eval", time.perf_counter() - t)
    ledger.update("eval", status="done")

    from .eval.report import write_report

    t = time.perf_counter()
    report = write_report(cfg, run_dir, ledger.data, evals)
    ledger.add_time("report", time.perf_counter() - t)
    log(f"[run] report: {run_dir / 'report.md'} ({report['total_seconds']:.0f} s in all)")
    return report


def import_base(cfg: Config, run_dir: Path) -> dict:
    """``pipeline.base``: a pretrained model, imported into RUN/pretrain (with its tokenizer and chat
    template), takes pretraining's place; the later stages start from it as from a model trained here."""
    from .gguf import import_model
    from .model import GPTConfig

    res = import_model(cfg.pipeline.base, run_dir, "pretrain")
    cfg.model = GPTConfig.from_dict(res["model"])
    save_config(cfg, run_dir / "config.yaml")  # the import wrote the model section alone
    return {k: res.get(k) for k in ("source", "params", "vocab_size", "quantization", "chat_template")}


def _init_missing(cfg: Config, run_dir: Path, stage: str) -> str:
    """Why a stage cannot start ("" if it can): the stage it starts from has no weights."""
    sec = getattr(cfg, stage, None)
    if sec is None:
        return ""
    if stage in ("reward", "dpo") and not sec.data and not (run_dir / "comparisons.jsonl").exists():
        return "no comparisons to train on"
    needs = [getattr(sec, "init_from", "")]
    if stage in ("ppo", "grpo") and sec.reward == "reward":
        needs.append("reward")
    for src in filter(None, needs):
        if not (has_checkpoint(Path(src).expanduser()) or has_checkpoint(run_dir / src)):
            return f"no {src} checkpoint to start from"
    return ""


def _count_lines(p: Path) -> int:
    return sum(1 for line in open(p, encoding="utf-8") if line.strip())


def _jsonable(x):
    return json.loads(json.dumps(x, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


# ---------------------------------------------------------------- evaluation on held-out prompts
def _read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


@torch.no_grad()
def base_answers(model, tok, rows: list[dict], max_tokens: int, temperature: float, seed: int, batch_size: int = 64) -> list[str]:
    """The base model has no chat template: it continues the plain-text form pretraining showed it
    (``User: …\\nAssistant:``); its reply is the text up to the first line break."""
    from .engine import Engine, SamplingParams

    engine, out = Engine(model, vocab_limit=tok.vocab_size), []
    limit = model.cfg.block_size - max_tokens
    for b in range(0, len(rows), batch_size):
        prompts = [tok.document(T.plain_prompt(r))[-limit:] for r in rows[b:b + batch_size]]
        p = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + b, stop_ids=tok.stop_ids)
        for ids in engine.generate(prompts, p):
            text = tok.decode([t for t in ids if t not in p.stop_ids])
            out.append(text.strip().split("\n")[0].strip())
    return out


def _fingerprint(stage_dir: Path, settings: dict) -> str:
    st = (stage_dir / "model.safetensors").stat()
    return hashlib.sha256(json.dumps([st.st_mtime_ns, st.st_size, settings]).encode()).hexdigest()[:16]


@torch.no_grad()
def policy_kl(model, ref, tok, rows: list[dict], replies_ids: list[list[int]], temperature: float, batch_size: int = 32) -> float:
    """Mean over prompts of sum_t log pi(y_t) - log pi_ref(y_t) for the policy's own sampled replies:
    a Monte-Carlo estimate of KL(pi || pi_ref) per reply, in nats, at the sampling temperature."""
    from .train.rollout import answer_logprobs, forward_answers, pad_batch

    total = 0.0
    for b in range(0, len(rows), batch_size):
        prompts = [tok.chat_prompt(r["messages"]) for r in rows[b:b + batch_size]]
        batch = pad_batch(prompts, replies_ids[b:b + batch_size], tok.pad_id, tok.end_id)
        dev = next(model.parameters()).device
        batch = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}
        lp = answer_logprobs(forward_answers(model, batch), batch["tokens"], batch["start"], temperature)
        lr = answer_logprobs(forward_answers(ref, batch), batch["tokens"], batch["start"], temperature)
        total += float(((lp - lr) * batch["answer_mask"]).sum())
    return total / max(1, len(rows))


@torch.no_grad()
def chat_replies(model, tok, rows, max_tokens: int, temperature: float, seed: int, batch_size: int = 64):
    """(texts, ids) of one sampled reply per prompt row; ids keep their <|end|>, texts do not."""
    from .engine import Engine, SamplingParams

    engine, texts, ids_out = Engine(model, vocab_limit=tok.vocab_size), [], []
    limit = model.cfg.block_size - max_tokens
    for b in range(0, len(rows), batch_size):
        prompts = [tok.chat_prompt(r["messages"])[-limit:] for r in rows[b:b + batch_size]]
        p = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + b, stop_ids=(tok.end_id,))
        for ids in engine.generate(prompts, p):
            ids_out.append(ids)
            texts.append(tok.decode([t for t in ids if t != tok.end_id]))
    return texts, ids_out


def evaluate_all(cfg: Config, run_dir: Path, paths: dict, log=print) -> dict:
    """Every trained policy answers the held-out prompts; the rubric scores each reply. Cached per stage
    in RUN/eval/<stage>.json (keyed by the checkpoint and the settings), so a resumed run reuses them."""
    pc = cfg.pipeline
    rows = _read_jsonl(paths["heldout"])
    tok_path = run_dir / "tokenizer.json"
    if not rows or not tok_path.exists():
        return {}
    tok = Tokenizer.load(tok_path)
    settings = {"n": len(rows), "T": pc.eval_temperature, "max_tokens": pc.eval_max_tokens, "seed": pc.eval_seed,
                "shots": pc.fewshot_shots}
    edir = run_dir / "eval"
    device = "cuda" if torch.cuda.is_available() and cfg.sft.device in ("auto", "cuda") else "cpu"
    out = {}
    for stage in ("pretrain",) + POLICIES:
        sdir = run_dir / stage
        if not finished(sdir):
            continue
        fp = _fingerprint(sdir, settings)
        cache = edir / f"{stage}.json"
        if cache.exists():
            got = json.loads(cache.read_text(encoding="utf-8"))
            if got.get("fingerprint") == fp:
                out[stage] = got
                continue
        log(f"[run] eval {stage} on {len(rows)} held-out prompts")
        t = time.perf_counter()
        model, _ = load_model(sdir, device)
        torch.manual_seed(pc.eval_seed)
        if stage == "pretrain" and tok.chat is None:  # a base model trained here knows no chat template
            replies, ids = base_answers(model, tok, rows, pc.eval_max_tokens, pc.eval_temperature, pc.eval_seed), None
        else:
            replies, ids = chat_replies(model, tok, rows, pc.eval_max_tokens, pc.eval_temperature, pc.eval_seed)
        res = score_replies(rows, replies)
        if stage == "pretrain" and pc.fewshot_shots:
            res["few_shot"] = few_shot(model, tok, paths["fewshot"], pc)
        if stage != "sft" and ids is not None and finished(run_dir / "sft") and pc.eval_temperature > 0:
            ref, _ = load_model(run_dir / "sft", device)
            res["kl_vs_sft"] = policy_kl(model, ref, tok, rows, ids, pc.eval_temperature)
        res.update(fingerprint=fp, seconds=time.perf_counter() - t, replies=replies)
        atomic_write_text(cache, json.dumps(res, indent=1))
        out[stage] = res
    if "sft" in out:
        for stage in ("ppo", "dpo", "grpo", "pretrain"):
            if stage in out:
                out[stage]["win_rate_vs_sft"] = win_vs(rows, out[stage]["replies"], out["sft"]["replies"])
    return out


@torch.no_grad()
def reward_accuracy(stage_dir: Path, path: Path, tok, device: str = "cpu", n: int = 2000, batch_size: int = 64) -> dict:
    """The reward model's pairwise accuracy on a seeded sample of ``n`` held-out comparisons, and on
    those of them between the policy's own samples alone (no reply to another prompt)."""
    import random

    from .data.preferences import collate, encode_pairs, parse_pair
    from .data.sources import read_jsonl
    from .train.reward import bradley_terry, load_reward_model, pair_right

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
    return {"pairs": len(right), "accuracy": sum(right) / max(1, len(right)),
            "own_sample_pairs": len(mine), "own_sample_accuracy": sum(mine) / len(mine) if mine else None}


def score_replies(rows: list[dict], replies: list[str]) -> dict:
    scores = [T.rubric_score(r, a) for r, a in zip(rows, replies)]
    right = [T.is_correct(r, a) for r, a in zip(rows, replies)]
    by_task: dict[str, list] = {}
    for r, ok in zip(rows, right):
        by_task.setdefault(r["task"], []).append(ok)
    return {"heldout_accuracy": sum(right) / len(rows), "gold_score": sum(scores) / len(rows), "n": len(rows),
            "scores": scores, "correct": right,
            "accuracy_by_task": {k: sum(v) / len(v) for k, v in sorted(by_task.items())},
            "mean_words": sum(len(a.split()) for a in replies) / len(replies)}


def win_vs(rows, replies_a, replies_b) -> dict:
    """Gold-judged win rate of A over B on the same prompts; ties count half."""
    from .eval.winrate import compare

    return compare(rows, replies_a, replies_b, T.rubric_score)


def few_shot(model, tok, path, pc) -> dict:
    """The base model's zero/one/few-shot multiple-choice accuracy per task (eval/fewshot.py)."""
    from .eval.fewshot import few_shot_table

    shots = tuple(int(s) for s in str(pc.fewshot_shots).split(",") if s.strip())
    rows = _read_jsonl(path)
    count: dict[str, int] = {}
    for r in rows:
        count[r["task"]] = count.get(r["task"], 0) + 1
    rows = [r for r in rows if count[r["task"]] > max(shots)]  # k shots need k other rows of the task
    if not rows:
        return {"status": f"not run: no task has more than {max(shots)} rows"}
    table = few_shot_table(model, tok, rows, shots=shots, seed=pc.eval_seed)
    return {task: {str(k): v for k, v in per.items()} for task, per in table.items()}
