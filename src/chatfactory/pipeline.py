"""``chatfactory run``: the whole GPT → InstructGPT → ChatGPT pipeline from one config, then a report.

    chatfactory run                                   # configs/demo.yaml into runs/demo
    chatfactory run --config pipeline-tiny --out runs/t pretrain.steps=20

This module only sequences the stages; each lives in its own module and writes ``RUN/<stage>/``:

    tasks        RUN/tasks/{sft,prompts,dev,heldout,fewshot}.jsonl from data/tasks.py (cheap; always rewritten)
    pretrain     tokenizer + GPT on the embedded text (``data.source: embedded+tasks``); or, with
                 ``pipeline.base`` set, a pretrained chat model imported with its tokenizer and template
                 (``chatfactory run --config smollm2``: SmolLM2-135M-Instruct, then LoRA for the rest)
    sft          demonstrations of the tasks (RUN/tasks/sft.jsonl)
    comparisons  K samples of the SFT policy per rl prompt, labeled by the rubric (the simulated labeler)
                 -> RUN/comparisons.jsonl; the same on held-out prompts -> RUN/comparisons_heldout.jsonl,
                 the reward model's held-out accuracy set
    reward       the reward model on those comparisons
    ppo · dpo    RLHF with a KL penalty to SFT, and DPO beside it on the same comparisons
    grpo · rloo  group-baseline RL against the same reward model (when in pipeline.stages)
    eval         every policy answers the same held-out prompts; the rubric is the gold judge
                 (eval/heldout.py, which also scores policies on the dev prompts that choices are made on);
                 the embedded tasks are English and Chinese, so every figure is also given per language
    report       RUN/report.md, RUN/report.json and PNG plots (eval/report.py)

A stage whose checkpoint says ``"finished": true`` is skipped, and so is a comparisons file or an
evaluation that is already written, so a killed run picks up where it was. Stage times accumulate
across restarts in RUN/pipeline.json. A stage whose module is not in this checkout is reported as
"not run: <stage> not available" — never with made-up numbers.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .config import Config, save_config, with_run_seed
from .data.tasks import prompt_text, write_task_files
from .eval.heldout import dev_scores, evaluate_all, read_rows, reward_accuracy
from .eval.report import write_report
from .stages import STAGES, NotAvailable, entry_point, names, policies
from .store.checkpoint import has_checkpoint, stage_config, stage_finished
from .store.files import atomic_write_text
from .text.tokenizer import Tokenizer


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


def _append_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _use_tasks(cfg: Config, paths: dict) -> None:
    """Point the stages' data at the task files (only what the config leaves at "tasks"); with
    ``pipeline.if_prompts`` the RL stages train on the constraint prompts instead, chosen on their dev split
    by the constraints verifier."""
    if cfg.pipeline.tasks:
        cfg.sft.data = str(paths["sft"])
        constrained = "if_train" in paths
        for section in names(method="rl") + names(method="rft"):
            sec = getattr(cfg, section, None)
            if sec is None:
                continue
            sec.prompts = str(paths["if_train" if constrained else "prompts"])
            if hasattr(sec, "eval_prompts") and not sec.eval_prompts:
                # the gold curve over RL iterations, on the dev prompts: keep_best chooses the iteration on
                # it, and held-out prompts must only report
                sec.eval_prompts = str(paths["if_dev" if constrained else "dev"])
                sec.gold = sec.gold or ("chatfactory.data.verifiers:constraints_fraction" if constrained
                                        else "chatfactory.data.tasks:rubric_score")
    if hasattr(cfg, "reward") and not cfg.reward.val_data:
        cfg.reward.val_data = str(paths["comparisons_heldout"])
    if hasattr(cfg, "dpo") and not cfg.dpo.val_data:
        cfg.dpo.val_data = str(paths["comparisons_heldout"])


def run_pipeline(cfg: Config, run_dir, log=print) -> dict:
    """Run every stage that is not finished, evaluate, and write the report. Returns report.json's dict."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # pipeline.seed, the repeat dial, is added to every stage's seed and eval_seed on a copy, once per call:
    # the caller builds cfg from the preset and overrides each time (a resumed run gets the same seeds), and
    # the copy, saved below as RUN/config.yaml, holds the seeds used with the dial back at 0, so a run started
    # from that file does not add it twice
    cfg = with_run_seed(cfg)
    settings = cfg.pipeline
    ledger = Ledger(run_dir / "pipeline.json")
    wanted = [s.strip() for s in settings.stages.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in names()]
    if unknown:
        raise ValueError(f"pipeline.stages: unknown stage(s) {', '.join(unknown)} (known: {', '.join(names())})")

    t0 = time.perf_counter()
    tdir = run_dir / "tasks"
    paths = write_task_files(tdir, settings.tasks_seed, n_sft=settings.sft_rows, n_prompts=settings.rl_prompts,
                             n_heldout=settings.heldout, n_fewshot=settings.fewshot, n_dev=settings.dev)
    if settings.calc_rows:
        from .data.calc_tasks import calc_rows
        from .data.tasks import sft_row

        n = settings.calc_rows
        for split, k in {"sft": n, "rl": n, "dev": n // 10, "heldout": n // 4}.items():
            rows = calc_rows(split, k, settings.tasks_seed)  # (the rl split's file is prompts.jsonl)
            demos = split == "sft"
            _append_jsonl(paths["prompts" if split == "rl" else split], [sft_row(r) for r in rows] if demos else rows)
    if settings.if_prompts:
        # constraint-augmented prompts (data/constraint_prompts.py): comparisons and RL train on if_train; their
        # dev split holds the held-out comparisons that DPO and the reward model report on
        from .data.constraint_prompts import write_prompt_files

        write_prompt_files(tdir, settings.if_prompts, settings.if_dev, settings.tasks_seed)
        paths.update({n: tdir / f"{n}.jsonl" for n in ("if_train", "if_dev", "if_dev_heldback")})
    paths["comparisons"] = run_dir / "comparisons.jsonl"
    paths["comparisons_heldout"] = run_dir / "comparisons_heldout.jsonl"
    _use_tasks(cfg, paths)
    save_config(cfg, run_dir / "config.yaml")
    ledger.update("tasks", status="done", rows={k: _count_lines(p) for k, p in paths.items() if p.exists()})
    ledger.add_time("tasks", time.perf_counter() - t0)

    for spec in STAGES:
        stage = spec.name
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
            done = stage_finished(run_dir / stage)
        if done:
            log(f"[run] {stage}: finished earlier, skipped")
            if stage == "pretrain" and settings.base:  # RUN/config.yaml names the imported model, not the preset's
                _record_model(cfg, run_dir, stage_config(run_dir / stage))
            if ledger.get(stage).get("status") != "done":
                ledger.update(stage, status="done")
            continue
        if spec.level > 0 and spec.kind != "data" and _init_missing(cfg, run_dir, spec):
            ledger.update(stage, status=f"not run: {_init_missing(cfg, run_dir, spec)}")
            log(f"[run] {stage}: {ledger.get(stage)['status']}")
            continue
        log(f"[run] {stage} ...")
        if stage == "comparisons" or not has_checkpoint(run_dir / stage):
            ledger.update(stage, seconds=0.0)  # a fresh start: time spent on a result since deleted no longer counts
        t = time.perf_counter()
        if stage == "pretrain" and settings.base:
            res = import_base(cfg, run_dir)
        elif stage == "comparisons":
            # label the SFT policy's samples (InstructGPT step 2), or those of the stage the config names
            cfg.comparisons.stage = cfg.comparisons.stage or "sft"
            if not has_checkpoint(run_dir / cfg.comparisons.stage):
                ledger.update(stage, status=f"not run: no {cfg.comparisons.stage} checkpoint to sample from")
                continue
            k = cfg.comparisons.k
            train, held = ("if_train", "if_dev") if settings.if_prompts else ("prompts", "heldout")
            res = {"train": fn(cfg, run_dir, str(paths[train]), str(paths["comparisons"]), k),
                   "heldout": fn(cfg, run_dir, str(paths[held]), str(paths["comparisons_heldout"]), k)}
        else:
            res = fn(cfg, run_dir)
            if isinstance(res, dict) and res.get("dev_choice"):  # the kept policy's own dev scores, for the report
                res["dev_choice"]["kept"] = {k: v for k, v in dev_scores(cfg, run_dir, stage).items()
                                             if k != "accuracy_by_task"}
        ledger.add_time(stage, time.perf_counter() - t)
        ledger.update(stage, status="done", result=_jsonable(res))

    t = time.perf_counter()
    evaluated = [s for s in policies() if stage_finished(run_dir / s)]
    evals = evaluate_all(cfg, run_dir, paths, evaluated, log)
    if (stage_finished(run_dir / "reward") and paths["comparisons_heldout"].exists()
            and (run_dir / "tokenizer.json").exists()):
        langs = {prompt_text(r): r.get("lang") for r in read_rows(paths["heldout"])}  # each pair's prompt language
        ledger.update("reward", heldout=reward_accuracy(run_dir / "reward", paths["comparisons_heldout"],
                                                        Tokenizer.load(run_dir / "tokenizer.json"), langs=langs))
    if settings.bpb_text:
        from .eval.lm import text_bpb_stages

        ledger.update("eval", bpb=text_bpb_stages(run_dir, evaluated, settings.bpb_text, settings.bpb_split,
                                                  settings.bpb_tokens, log))
    ledger.add_time("eval", time.perf_counter() - t)
    ledger.update("eval", status="done")
    if settings.ifeval:
        from .eval.ifeval import ifeval_stages

        t = time.perf_counter()
        wanted_if = [s.strip() for s in settings.ifeval.split(",") if s.strip()]
        ledger.update("ifeval", status="done", results=ifeval_stages(run_dir, wanted_if, settings.ifeval_data,
                                                                     settings.ifeval_max_tokens, log))
        ledger.add_time("ifeval", time.perf_counter() - t)

    t = time.perf_counter()
    report = write_report(cfg, run_dir, ledger.data, evals)
    ledger.add_time("report", time.perf_counter() - t)
    log(f"[run] report: {run_dir / 'report.md'} ({report['total_seconds']:.0f} s in all)")
    return report


def import_base(cfg: Config, run_dir: Path) -> dict:
    """``pipeline.base``: a pretrained model, imported into RUN/pretrain (with its tokenizer and chat
    template), takes pretraining's place; the later stages start from it as from a model trained here."""
    from .formats.gguf import import_model

    res = import_model(cfg.pipeline.base, run_dir, "pretrain")
    _record_model(cfg, run_dir, res)  # the import wrote the model section alone
    return {k: res.get(k) for k in ("source", "params", "vocab_size", "quantization", "chat_template")}


def _record_model(cfg: Config, run_dir: Path, info: dict) -> None:
    """RUN/config.yaml names the imported model (``info``: its pretrain checkpoint's config), not the preset's
    placeholder: after the import, and on a resume that skips the finished import."""
    from .store.load import model_config

    cfg.model = model_config(info, run_dir / "pretrain")
    save_config(cfg, run_dir / "config.yaml")


def _init_missing(cfg: Config, run_dir: Path, spec) -> str:
    """Why a stage cannot start ("" if it can): the stage it starts from has no weights, or no comparisons
    to train on."""
    sec = getattr(cfg, spec.name, None)
    if sec is None:
        return ""
    if spec.method in ("pairs", "dpo") and not sec.data and not (run_dir / "comparisons.jsonl").exists():
        return "no comparisons to train on"
    needs = [getattr(sec, "init_from", "")]
    if spec.method == "rl" and sec.reward == "reward":
        needs.append("reward")
    for src in filter(None, needs):
        if not (has_checkpoint(Path(src).expanduser()) or has_checkpoint(run_dir / src)):
            return f"no {src} checkpoint to start from"
    return ""


def _count_lines(p: Path) -> int:
    return sum(1 for line in open(p, encoding="utf-8") if line.strip())


def _jsonable(x):
    return json.loads(json.dumps(x, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
