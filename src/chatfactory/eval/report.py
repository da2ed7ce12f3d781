"""The run report: ``report.md``, ``report.json`` and PNG plots of what every stage cost and achieved.

Written by ``chatfactory run`` (pipeline.py) from the run directory alone: each stage's
``metrics.jsonl``, the pipeline's ledger (``pipeline.json``: status, seconds and result per stage) and
the held-out evaluation (eval/heldout.py: ``eval/<stage>.json``, every policy's replies to the same
held-out prompts, scored by the rubric of data/rubric.py). Where the prompts are in more than one
language (the embedded tasks: English and Chinese), "By language" gives held-out accuracy, gold score,
win rate vs SFT, the reward model's accuracy and the tokenizer's characters per token for each. What a
stage chose on the dev prompts (a ``dev_choice`` in its result) is stated; the held-out numbers only
report. A stage that did not run is reported as "not run: <why>", never with a number. To rebuild the
report of a finished run:

    python -m chatfactory.eval.report runs/demo
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..stages import BY_NAME, STAGES, names, policies
from ..store.files import atomic_write_text
from ..text.tokenizer import Tokenizer
from ..train.meters import read_metrics
from .heldout import calculator_md, chars_per_token, read_rows, vs_sft_md
from .ifeval import ifeval_markdown
from .lm import bpb_markdown
from .plots import plot_losses, plot_rl

BARS = {  # the bars the demo is held to, checked in the report (on >= 200 held-out prompts)
    "sft_beats_base": "SFT held-out accuracy > base model's",
    "reward_accuracy": "reward model held-out accuracy >= 0.80",
    "ppo_win_rate": "PPO gold-judged win rate vs SFT >= 0.60 (ties half)",
}


def stage_cost(stage_dir: Path) -> dict:
    """Steps, tokens processed and training seconds from a stage's metrics.jsonl."""
    rows = [r for r in read_metrics(stage_dir / "metrics.jsonl") if "tok_s" in r]
    tokens, prev = 0.0, 0.0
    for r in rows:
        tokens += r["tok_s"] * max(0.0, r["elapsed"] - prev)
        prev = r["elapsed"]
    return {"steps": rows[-1]["step"] if rows else 0, "tokens": int(tokens), "train_seconds": round(prev, 1)}


def last_with(rows: list[dict], key: str):
    for r in reversed(rows):
        if key in r:
            return r[key]
    return None


def _fmt(x, digits=3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


# ---------------------------------------------------------------- the report
def build_json(run_dir: Path, ledger: dict, evals: dict) -> dict:
    st = ledger.get("stages", {})
    first = next((e for e in evals.values() if "n" in e), {"n": 0})
    k = first.get("replies_per_prompt", 1)  # an evaluation's "n" counts its items: prompts × replies
    rep: dict = {"total_seconds": round(sum(v.get("seconds", 0.0) for v in st.values()), 1),
                 "heldout_prompts": first["n"] // k, "replies_per_prompt": k}

    def status(s):
        return st.get(s, {}).get("status", "not run")

    def base_section(s):
        sec = {"status": status(s), "seconds": round(st.get(s, {}).get("seconds", 0.0), 1)}
        if (run_dir / s / "metrics.jsonl").exists():
            sec.update(stage_cost(run_dir / s))
        return sec

    rep["ifeval"], rep["bpb"] = st.get("ifeval", {}).get("results", {}), st.get("eval", {}).get("bpb", {})
    pre = base_section("pretrain")
    imported = (st.get("pretrain", {}).get("result") or {}).get("source")
    if imported:  # pipeline.base: a pretrained model took pretraining's place
        pre["imported"] = {k: st["pretrain"]["result"].get(k) for k in ("source", "params", "quantization")}
    m = read_metrics(run_dir / "pretrain" / "metrics.jsonl")
    pre.update(val_bpb=last_with(m, "val_bpb"), val_loss=last_with(m, "val_loss"), final_loss=last_with(m, "loss"))
    rep["pretrain"] = pre

    e = evals.get("pretrain", {})
    rep["base"] = {"status": "done" if e else "not run: no finished pretrain checkpoint",
                   "heldout_accuracy": e.get("heldout_accuracy"), "gold_score": e.get("gold_score"),
                   "accuracy_by_task": e.get("accuracy_by_task"), "few_shot": e.get("few_shot")}

    sft = base_section("sft")
    m = read_metrics(run_dir / "sft" / "metrics.jsonl")
    sft.update(val_loss=last_with(m, "val_loss"))
    rep["sft"] = sft

    comp = {"status": status("comparisons"), "seconds": round(st.get("comparisons", {}).get("seconds", 0.0), 1)}
    for key, name in (("pairs", "comparisons.jsonl"), ("heldout_pairs", "comparisons_heldout.jsonl")):
        p = run_dir / name
        comp[key] = sum(1 for line in open(p, encoding="utf-8") if line.strip()) if p.exists() else None
    rep["comparisons"] = comp

    rw = base_section("reward")
    m = read_metrics(run_dir / "reward" / "metrics.jsonl")
    rw.update(heldout_accuracy=last_with(m, "val_accuracy"), val_loss=last_with(m, "val_loss"),
              val_margin=last_with(m, "val_margin"))
    full = st.get("reward", {}).get("heldout")  # 2,000 held-out pairs, scored after training (pipeline.py)
    if full:
        rw.update(heldout_accuracy=full["accuracy"], heldout_pairs=full["pairs"],
                  own_sample_accuracy=full["own_sample_accuracy"], own_sample_pairs=full["own_sample_pairs"])
    rep["reward"] = rw

    for s in policies(after=1):  # the aligned policies
        sec = base_section(s)
        m = read_metrics(run_dir / s / "metrics.jsonl")
        if s in names(method="rl"):  # an RL curve and a gold curve on dev
            sec.update(train_kl=last_with(m, "kl"), train_score=last_with(m, "score"), train_gold=last_with(m, "gold"))
        if s == "rft":  # the answers its last round kept as demonstrations
            sec["kept"] = (st.get(s, {}).get("result") or {}).get("kept")
        rep[s] = sec

    for s in policies(after=0):
        e = evals.get(s)
        if not e:
            rep[s].setdefault("heldout_accuracy", None)
            if s != "sft":
                rep[s].update(win_rate_vs_sft=None, kl=None, vs_sft=None)
            continue
        rep[s].update(heldout_accuracy=e["heldout_accuracy"], gold_score=e["gold_score"],
                      accuracy_by_task=e["accuracy_by_task"], mean_words=e["mean_words"])
        if s != "sft":
            wr = e.get("win_rate_vs_sft") or {}
            rep[s].update(win_rate_vs_sft=wr.get("win_rate"),
                          wins_ties_losses=[wr.get("wins"), wr.get("ties"), wr.get("losses")], kl=e.get("kl_vs_sft"))
            rep[s]["vs_sft"] = e.get("vs_sft")  # reply lengths, length-controlled win rate, McNemar (heldout.py)
    if "pretrain" in evals and evals["pretrain"].get("win_rate_vs_sft"):
        rep["base"]["sft_win_rate_vs_base"] = 1 - evals["pretrain"]["win_rate_vs_sft"]["win_rate"]

    rep["by_language"] = by_language(run_dir, st, evals)
    rep["dev"] = dev_choices(run_dir, st)
    rep["eval"] = {"seconds": round(st.get("eval", {}).get("seconds", 0.0), 1),
                   "temperature": None, "note": "every policy answers the held-out prompts; the rubric scores them"}

    def acc(s):
        return rep.get(s, {}).get("heldout_accuracy")

    rep["bars"] = {
        "sft_beats_base": None if acc("sft") is None or acc("base") is None else acc("sft") > acc("base"),
        "reward_accuracy": None if acc("reward") is None else acc("reward") >= 0.8,
        "ppo_win_rate": None if rep["ppo"].get("win_rate_vs_sft") is None else rep["ppo"]["win_rate_vs_sft"] >= 0.6,
        "heldout_prompts_at_least_200": rep["heldout_prompts"] >= 200,
    }
    return rep


def by_language(run_dir: Path, stages: dict, evals: dict) -> dict:
    """The figures per language of the prompts: {"langs", "heldout": {model: {lang: {"n", "accuracy",
    "gold_score", "win_rate_vs_sft"}}}, "reward": {lang: {"pairs", "accuracy"}} (held-out pairs),
    "tokenizer": {lang: {"chars", "tokens", "chars_per_token"}} (the held-out prompts' text)}."""
    heldout = {s: e["by_language"] for s, e in evals.items() if e.get("by_language")}
    reward = ((stages.get("reward") or {}).get("heldout") or {}).get("by_language")
    tp, hp = run_dir / "tokenizer.json", run_dir / "tasks" / "heldout.jsonl"
    tok = chars_per_token(Tokenizer.load(tp), read_rows(hp)) if tp.exists() and hp.exists() else None
    langs = sorted({lang for per in (*heldout.values(), reward or {}, tok or {}) for lang in per})
    return {"langs": langs, "heldout": heldout, "reward": reward, "tokenizer": tok}


def _languages_md(bl: dict, replies: int = 1) -> list[str]:
    """``replies``: per prompt (each language's "n" counts replies)."""
    langs = bl["langs"]
    if len(langs) < 2:
        return []
    cols = [("accuracy", "accuracy"), ("gold_score", "gold"), ("win_rate_vs_sft", "win rate vs SFT")]
    L = ["## By language", "", "The same figures for the prompts of each language (held-out prompts; the reward "
         "model's held-out pairs by their prompt's language; the tokenizer on the held-out prompts' text).", "",
         "| model | " + " | ".join(f"{name} {lang}" for _, name in cols for lang in langs) + " |",
         "|---|" + "---|" * (3 * len(langs))]
    for s, per in bl["heldout"].items():
        L.append(f"| {'base' if s == 'pretrain' else s} | "
                 + " | ".join(_fmt(per.get(lang, {}).get(k)) for k, _ in cols for lang in langs) + " |")
    n = {lang: next((per[lang]["n"] // replies for per in bl["heldout"].values() if lang in per), None)
         for lang in langs}
    rw, tok = bl["reward"] or {}, bl["tokenizer"] or {}
    L += ["", "| | " + " | ".join(langs) + " |", "|---|" + "---|" * len(langs),
          "| held-out prompts | " + " | ".join(_fmt(n[lang]) for lang in langs) + " |",
          "| reward model: held-out pairwise accuracy (pairs) | " + " | ".join(
              f"{_fmt(rw[lang]['accuracy'])} ({rw[lang]['pairs']:,})" if lang in rw else "—" for lang in langs) + " |",
          "| tokenizer: characters per token | " + " | ".join(
              _fmt(tok.get(lang, {}).get("chars_per_token"), 2) for lang in langs) + " |", ""]
    return L


def dev_choices(run_dir: Path, stages: dict) -> dict:
    """What the dev split chose: {"prompts": rows of RUN/tasks/dev.jsonl, "chose": [each ``dev_choice``
    record (eval/heldout.py's ``choose_on_dev``) a stage returned in its result, with the stage named]}."""
    path = run_dir / "tasks" / "dev.jsonl"
    n = sum(1 for line in open(path, encoding="utf-8") if line.strip()) if path.exists() else 0
    chose = []
    for stage, entry in stages.items():
        result = entry.get("result") if isinstance(entry.get("result"), dict) else {}
        records = result.get("dev_choice") or []
        for record in records if isinstance(records, list) else [records]:
            chose.append({"stage": stage, **record})
    return {"prompts": n, "chose": chose}


def _dev_md(dev: dict) -> str:
    head = (f"Chosen on the dev split ({dev['prompts']} prompts no stage trained on, judged by the rubric; "
            "the held-out prompts only report): ")
    if not dev["chose"]:
        return head + "nothing in this run — every setting and checkpoint is the config's."
    said = []
    for c in dev["chose"]:
        # the kept policy scored on dev again after training (its replies, its win rate vs SFT's), or else
        # the score that chose it
        best = c.get("kept") or c.get("candidates", {}).get(str(c["chose"]), {})
        said.append(f"{c['stage']} {c['what']} **{c['chose']}** by {c['by'].replace('_', ' ')} "
                    f"(accuracy {_fmt(best.get('accuracy'))}, gold {_fmt(best.get('gold_score'))}, "
                    f"win rate vs SFT {_fmt(best.get('win_rate_vs_sft'))}; "
                    f"of {', '.join(map(str, c.get('candidates', {})))})")
    return head + "; ".join(said) + "."


def _few_shot_md(fs: dict) -> list[str]:
    if not isinstance(fs, dict) or not fs or "status" in fs:
        return [f"Few-shot table: {fs.get('status') if isinstance(fs, dict) and fs else 'not run'}.", ""]
    shots = sorted({k for per in fs.values() for k in per}, key=int)
    metrics = ("acc", "acc_norm")
    lines = ["| task | " + " | ".join(f"{k}-shot {m}" for m in metrics for k in shots) + " | n |",
             "|---|" + "---|" * (2 * len(shots) + 1)]
    for task, per in sorted(fs.items()):
        n = next(iter(per.values())).get("n", "")
        lines.append(f"| {task} | " + " | ".join(_fmt(per.get(k, {}).get(m)) for m in metrics for k in shots)
                     + f" | {n} |")
    means = [sum(per[k].get(m, 0.0) * per[k]["n"] for per in fs.values() if k in per)
             / max(1, sum(per[k]["n"] for per in fs.values() if k in per)) for m in metrics for k in shots]
    lines.append("| **all** | " + " | ".join(f"**{v:.3f}**" for v in means) + " | |")
    return lines + ["", "Multiple choice (4 options, chance 0.25), scored by log-likelihood as in the GPT-3 paper "
                        "(acc: the likeliest choice; acc_norm: the likeliest per character); k solved examples "
                        "of the same task precede the question. The chat tasks' questions say what to do; the "
                        "`pattern_*` tasks (`word -> output`) do not: only the examples show which "
                        "transformation is meant, the case few-shot prompting is for.", ""]


def _base_name(rep: dict, short: bool = False) -> str:
    """What the report calls the model the pipeline started from."""
    if rep["pretrain"].get("imported"):
        return "base" if short else "base (imported, its own chat template)"
    return "base" if short else "base (pretrain)"


def _samples_md(run_dir: Path, rep: dict, evals: dict, n: int) -> list[str]:
    path = run_dir / "tasks" / "heldout.jsonl"
    if not path.exists() or not evals:
        return []
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    picks, seen = [], set()
    for i, r in enumerate(rows):  # one prompt per task and language, as many as asked
        if (r["task"], r.get("lang")) not in seen:
            seen.add((r["task"], r.get("lang")))
            picks.append(i)
        if len(picks) >= n:
            break
    out = ["## Sample conversations (held-out prompts, sampled replies, rubric score)", ""]
    for i in picks:
        r = rows[i]
        convo = " / ".join(f"**{m['role']}**: {m['content']}" for m in r["messages"])
        out += [f"**{r['task']}** — {convo}", ""]
        for s, e in evals.items():
            name = (("base (plain-text prompt)" if not rep["pretrain"].get("imported") else _base_name(rep))
                    if s == "pretrain" else s)
            reply = e["replies"][i].replace("\n", " ").replace("|", "\\|")
            out.append(f"- {name} ({e['scores'][i]:.2f}): {reply[:200]!s}")
        out.append("")
    return out


def write_markdown(run_dir: Path, rep: dict, evals: dict, plots: dict, samples: int, rubric: str) -> str:
    L = [f"# chatfactory run report: `{run_dir}`", "",
         f"Total time: **{rep['total_seconds']:.0f} s** · held-out prompts: **{rep['heldout_prompts']}** "
         + (f"× **{rep['replies_per_prompt']}** sampled replies each " if rep["replies_per_prompt"] > 1 else "")
         + "(never seen by any training stage, pretraining included).", ""]
    L += ["## What each stage cost and achieved", "", "| stage | status | seconds | tokens | achieved |",
          "|---|---|---|---|---|"]
    imp = rep["pretrain"].get("imported")
    ach = {
        "pretrain": f"imported {Path(imp['source']).name} ({(imp.get('params') or 0) / 1e6:.0f}M parameters)" if imp
        else f"val bits/byte {_fmt(rep['pretrain'].get('val_bpb'))}",
        "sft": f"held-out accuracy {_fmt(rep['sft'].get('heldout_accuracy'))} "
               f"(base {_fmt(rep['base'].get('heldout_accuracy'))})",
        "comparisons": f"{_fmt(rep['comparisons'].get('pairs'))} pairs "
                       f"(+{_fmt(rep['comparisons'].get('heldout_pairs'))} held out)",
        "reward": f"held-out pairwise accuracy {_fmt(rep['reward'].get('heldout_accuracy'))}",
        "rft": f"kept {_fmt(rep['rft'].get('kept'))} answers; win rate vs SFT "
               f"{_fmt(rep['rft'].get('win_rate_vs_sft'))} at KL {_fmt(rep['rft'].get('kl'), 2)} nats",
        "ppo": f"win rate vs SFT {_fmt(rep['ppo'].get('win_rate_vs_sft'))} at KL {_fmt(rep['ppo'].get('kl'), 2)} nats",
        "dpo": f"win rate vs SFT {_fmt(rep['dpo'].get('win_rate_vs_sft'))} at KL {_fmt(rep['dpo'].get('kl'), 2)} nats",
        "grpo": f"win rate vs SFT {_fmt(rep['grpo'].get('win_rate_vs_sft'))} "
                f"at KL {_fmt(rep['grpo'].get('kl'), 2)} nats",
        "rloo": f"win rate vs SFT {_fmt(rep['rloo'].get('win_rate_vs_sft'))} "
                f"at KL {_fmt(rep['rloo'].get('kl'), 2)} nats",
    }
    for s in names():
        sec = rep[s]
        if _left_out(s, sec):
            continue
        done = sec["status"] == "done"
        L.append(f"| {s} | {sec['status']} | {_fmt(sec.get('seconds'), 1)} | "
                 f"{sec.get('tokens', '—') if done else '—'} | {ach[s] if done else '—'} |")
    L.append(f"| evaluation | done | {_fmt(rep['eval']['seconds'], 1)} | — | "
             f"{len(evals)} models × {rep['heldout_prompts']} held-out prompts, few-shot table |")
    L.append("")

    L += ["## Held-out evaluation (gold judge: the rubric)", "",
          "Every policy answers the same held-out prompts (replies sampled at temperature "
          f"{rep['eval'].get('temperature')}, "
          f"at most {rep['eval'].get('max_tokens')} tokens"
          + (f", {rep['replies_per_prompt']} replies to each prompt: every figure is their mean, and reply j is "
             "compared with SFT's reply j" if rep["replies_per_prompt"] > 1 else "")
          + "); the rubric below scores each. "
          "Accuracy: the reply holds the right answer. Win rate: the policy's reply scores higher than SFT's on "
          "the same prompt (ties count half). KL: mean over replies of log π(reply) − log π_SFT(reply), nats.", "",
          "| policy | accuracy | gold score | win rate vs SFT | KL vs SFT | mean words |", "|---|---|---|---|---|---|"]
    for s in policies():
        e = evals.get(s)
        if not e:
            continue
        wr = (e.get("win_rate_vs_sft") or {}).get("win_rate")
        name = _base_name(rep) if s == "pretrain" else s
        L.append(f"| {name} | {_fmt(e['heldout_accuracy'])} | {_fmt(e['gold_score'])} | "
                 f"{_fmt(wr) if s != 'sft' else '—'} | {_fmt(e.get('kl_vs_sft'), 2)} | {e['mean_words']:.1f} |")
    L += vs_sft_md(evals)
    L += ["", _dev_md(rep["dev"])]
    tasks = sorted({t for e in evals.values() for t in e.get("accuracy_by_task", {})})
    if tasks:
        L += ["", "Accuracy by task:", "",
              "| task | " + " | ".join("base" if s == "pretrain" else s for s in evals) + " |",
              "|---|" + "---|" * len(evals)]
        for t in tasks:
            L.append(f"| {t} | "
                     + " | ".join(_fmt(e.get("accuracy_by_task", {}).get(t), 2) for e in evals.values()) + " |")
    L += calculator_md(evals) + [""] + _languages_md(rep["by_language"], rep["replies_per_prompt"])
    if not imp:  # the demo's bars (a model trained here from nothing, on the embedded default)
        L += ["", "Bars of the issue:", ""]
        for k, ok in rep["bars"].items():
            L.append(f"- {BARS.get(k, k)}: {'not measured' if ok is None else 'met' if ok else 'MISSED'}")
    L.append("")

    pre = rep["pretrain"]
    if imp:
        L += ["## The base model (imported, not pretrained here)", "",
              f"`{imp['source']}`: {(imp.get('params') or 0) / 1e6:.1f}M parameters"
              + (f", stored as {', '.join(imp['quantization'])} and dequantized to fp32"
                 if imp.get("quantization") else "")
              + ". Prompted through its own chat template (no examples), it is right on "
              f"{_fmt(rep['base'].get('heldout_accuracy'))} of the held-out prompts.", ""]
        if plots.get("losses"):
            L += [f"![loss curves]({plots['losses']})", ""]
    else:
        L += ["## Pretraining", "",
              f"{pre['status']}; {pre.get('steps', 0)} steps, {pre.get('tokens', 0):,} tokens, "
              f"{pre.get('train_seconds', 0)} s of training; "
              f"validation loss {_fmt(pre.get('val_loss'))} nats/token, **{_fmt(pre.get('val_bpb'))} bits/byte**.", ""]
        if plots.get("losses"):
            L += [f"![loss curves]({plots['losses']})", ""]
    if rep["base"].get("few_shot") or not imp:
        L += ["## Base model: zero-, one- and few-shot (prompt engineering, as in GPT-3)", ""]
        L += _few_shot_md(rep["base"].get("few_shot") or {})
    if not imp:
        L += [f"Generating a reply to the plain-text prompt `User: …\\nAssistant:` (no examples), the base model "
              f"is right on {_fmt(rep['base'].get('heldout_accuracy'))} of the held-out prompts.", ""]
    L += ["## SFT", "", f"{rep['sft']['status']}; held-out accuracy **{_fmt(rep['sft'].get('heldout_accuracy'))}**, "
          f"validation loss on assistant tokens {_fmt(rep['sft'].get('val_loss'))}.", ""]
    c = rep["comparisons"]
    L += ["## Comparisons (the simulated labeler)", "",
          f"{c['status']}; {_fmt(c.get('pairs'))} pairs from the SFT policy's own "
          f"samples on rl prompts, {_fmt(c.get('heldout_pairs'))} on held-out prompts, labeled by the rubric."]
    if c.get("k"):
        more = (f" plus {c['mismatched']} replies it gave to prompts of other tasks (a fluent answer to the wrong "
                f"question, which RL drifts to and SFT samples alone never show)") if c.get("mismatched") else ""
        L += [f"Each prompt's candidates: {c['k']} samples of the SFT policy{more}; every two candidates whose "
              f"rubric scores differ make a pair, the higher-scored one chosen."]
    L.append("")
    rw = rep["reward"]
    L += ["## Reward model", "", f"{rw['status']}; held-out pairwise accuracy **{_fmt(rw.get('heldout_accuracy'))}**"
          + (f" on {rw['heldout_pairs']:,} held-out pairs; {_fmt(rw.get('own_sample_accuracy'))} on the "
             f"{rw['own_sample_pairs']:,} between the SFT policy's own samples" if rw.get("heldout_pairs") else "")
          + f" (mean margin {_fmt(rw.get('val_margin'))} on the sample evaluated in training).", ""]
    for s in policies(after=1):
        sec = rep[s]
        if _left_out(s, sec):
            continue
        L += [f"## {s.upper()}", ""]
        if sec["status"] != "done":
            L += [sec["status"], ""]
            continue
        L += [f"Held-out: accuracy **{_fmt(sec.get('heldout_accuracy'))}**, "
              f"gold-judged win rate vs SFT **{_fmt(sec.get('win_rate_vs_sft'))}** "
              f"(wins/ties/losses {sec.get('wins_ties_losses')}), "
              f"KL vs SFT {_fmt(sec.get('kl'), 2)} nats per reply.", ""]
        if plots.get(s):
            L += [f"![{s} curves]({plots[s]})", ""]
    L += ifeval_markdown(rep.get("ifeval") or {}) + bpb_markdown(rep.get("bpb") or {})
    L += _samples_md(run_dir, rep, evals, samples)
    L += ["## The rubric (simulated labeler and gold judge)", "", "```", rubric.rstrip(), "```", ""]
    return "\n".join(L)


def _left_out(stage: str, sec: dict) -> bool:
    """A stage `chatfactory run` runs only on request (stages.py: in_run false) that the pipeline did not ask for
    stays out of the tables."""
    return not BY_NAME[stage].in_run and sec["status"].startswith("not run: not in")


def write_report(cfg, run_dir, ledger: dict, evals: dict) -> dict:
    """Write report.md, report.json and the plots; return report.json's content."""
    from ..data.rubric import RUBRIC

    run_dir = Path(run_dir)
    rep = build_json(run_dir, ledger, evals)
    settings = getattr(cfg, "pipeline", None)
    if settings is not None:
        rep["eval"].update(temperature=settings.eval_temperature, max_tokens=settings.eval_max_tokens)
    if getattr(cfg, "comparisons", None) is not None:
        rep["comparisons"].update(k=cfg.comparisons.k, mismatched=cfg.comparisons.mismatched)
    trained = [s.name for s in STAGES if s.kind != "data" and s.method != "rl"]
    plots = {"losses": plot_losses(run_dir, trained)}
    for s in names(method="rl"):
        plots[s] = plot_rl(run_dir, s)
    samples = getattr(settings, "samples", 4)
    atomic_write_text(run_dir / "report.md", write_markdown(run_dir, rep, evals, plots, samples, RUBRIC))
    atomic_write_text(run_dir / "report.json", json.dumps(
        rep, indent=2, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)))
    return rep


if __name__ == "__main__":
    import sys

    from ..config import load_config
    from .heldout import by_language as per_language
    from .heldout import versus_sft, win_vs

    rd = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
    ev = {p.stem: json.loads(p.read_text()) for p in sorted((rd / "eval").glob("*.json"))}
    rows = [json.loads(line) for line in open(rd / "tasks" / "heldout.jsonl", encoding="utf-8") if line.strip()]
    rows *= next(iter(ev.values()), {}).get("replies_per_prompt", 1)  # the cached lists run over prompts × replies
    for s, e in ev.items():
        sft = ev["sft"]["replies"] if s != "sft" and "sft" in ev else None
        if sft is not None:
            e["win_rate_vs_sft"] = win_vs(rows, e["replies"], sft)
            e["vs_sft"] = versus_sft(e, ev["sft"]) if s in policies(after=1) else None
        e["by_language"] = per_language(rows, e, sft)
    led = json.loads((rd / "pipeline.json").read_text())
    rep = write_report(load_config(str(rd / "config.yaml")), rd, led, ev)
    print(f"{rd / 'report.md'}: total {rep['total_seconds']} s; bars {rep['bars']}")
