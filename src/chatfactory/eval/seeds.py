"""``chatfactory seeds RUN RUN RUN``: held-out results of repeats of one run, as mean ± standard error over seeds.

One seed on one host is an anecdote (eval/stats.py says why). A repeat of a run is the same config with
another ``pipeline.seed`` (config.py ``with_run_seed``: every stage's training and sampling seed and the
evaluation's seed move, ``tasks_seed`` does not), so every repeat answers the same held-out prompts and its
per-prompt verdicts pair with the others'. This module reads what eval/heldout.py cached in each run
(``RUN/eval/<stage>.json``: accuracy, per-prompt correctness, rubric scores, reply lengths, the prompts'
identity) and writes one table:

* per policy stage: held-out accuracy and gold score, mean ± SE over the runs; for each aligned stage
  (DPO, PPO, GRPO, RLOO) also its win rate vs SFT (with mean − 2 SE), its mean reply length in characters
  beside SFT's, and the length-controlled win rate (heldout.py ``versus_sft``);
* per aligned stage vs SFT: the seed-paired accuracy difference (the mean of each seed's stage − SFT, ± the
  SE of those differences, and mean − 2 SE as its lower bound) and McNemar's exact test on all seeds'
  prompts pooled (every seed's prompt is one paired item), with each seed's own p beside it;
* where the runs evaluated the calculator (``pipeline.calc_rows``): per stage, accuracy on its held-out
  problems with it, the right-call rate and accuracy without it over the runs, and each aligned stage's
  seed-paired difference to SFT with it;
* each run's own figures.

It refuses runs whose held-out prompts differ (the pairing would be meaningless) and warns, in the table
itself, when two runs used the same seeds or their configs differ in more than seeds.

    chatfactory seeds runs/demo runs/demo-seed1 runs/demo-seed2 --out runs/demo-seeds.md   # + .json beside it
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import yaml

from ..stages import policies
from ..store.files import atomic_write_text
from .heldout import prompts_sha, read_rows, versus_sft
from .stats import format_mean_se, mcnemar, mean_se, paired_seeds

NEEDED = ("n", "heldout_accuracy", "gold_score", "correct", "scores")  # what a cached evaluation must hold


# ---------------------------------------------------------------- reading the runs
def read_run(run_dir) -> dict:
    """One finished run's cached held-out evaluations: {"dir", "evals": {stage: cache}, "n", "prompts" (their
    hash), "config" (RUN/config.yaml as a dict, or None)}. A ValueError names what is missing or damaged."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: no such run directory")
    evals = {}
    for stage in policies():
        path = run_dir / "eval" / f"{stage}.json"
        if not path.exists():
            continue
        try:
            e = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as err:
            raise ValueError(f"{path}: unreadable held-out evaluation ({err})") from None
        missing = [k for k in NEEDED if k not in e] + ([] if "reply_chars" in e or "replies" in e else ["reply_chars"])
        if missing:
            raise ValueError(f"{path}: held-out evaluation without {', '.join(missing)} (written by an older "
                             "chatfactory? run `chatfactory run` on it again to redo the evaluation)")
        evals[stage] = e
    if not evals:
        raise ValueError(f"{run_dir}: no held-out evaluation (no eval/<stage>.json): give the directory of a "
                         "finished `chatfactory run`")
    shas = {s: e.get("prompts_sha") for s, e in evals.items()}
    if None in shas.values():  # caches written before the prompts' hash was kept: the run's own prompt file
        heldout = run_dir / "tasks" / "heldout.jsonl"
        if not heldout.exists():
            raise ValueError(f"{run_dir}: cannot tell which prompts were answered (no prompts_sha in its "
                             f"eval/<stage>.json and no {heldout})")
        sha = prompts_sha(read_rows(heldout))
        shas = {s: v or sha for s, v in shas.items()}
    ns = {s: e["n"] for s, e in evals.items()}  # items: prompts × replies to each (eval_replies)
    ks = {s: e.get("replies_per_prompt", 1) for s, e in evals.items()}
    if len(set(shas.values())) > 1 or len(set(ns.values())) > 1 or len(set(ks.values())) > 1:
        raise ValueError(f"{run_dir}: its stages answered different held-out prompts "
                         f"({', '.join(f'{s}: {ns[s]} prompts, {shas[s]}' for s in evals)}): rerun its evaluation")
    config = run_dir / "config.yaml"
    return {"dir": run_dir, "evals": evals, "n": next(iter(ns.values())), "prompts": next(iter(shas.values())),
            "replies": next(iter(ks.values())),
            "config": yaml.safe_load(config.read_text(encoding="utf-8")) if config.exists() else None}


def run_seeds(config: dict | None) -> dict:
    """The seeds a run used, from its saved config (the dial already applied): {"eval_seed", "tasks_seed",
    "<section>.seed", …}; {} without a config."""
    if not config:
        return {}
    out = {k: config.get("pipeline", {}).get(k) for k in ("eval_seed", "tasks_seed")}
    out.update({f"{name}.seed": sec["seed"] for name, sec in config.items() if isinstance(sec, dict) and "seed" in sec})
    return out


def _without_seeds(config: dict, run_dir: Path) -> dict:
    """A run's config with its seeds left out and its own directory written as RUN (the pipeline points the
    stages' data at RUN/tasks/…), so repeats of one config compare equal. The directory the run was written in
    counts as its own too (the one most of those RUN/tasks/… paths name): a run's files copied elsewhere pair."""
    written = Counter(m.group(1) for sec in config.values() if isinstance(sec, dict) for v in sec.values()
                      if isinstance(v, str) and (m := re.fullmatch(r"(.+)/tasks/[^/]+", v))).most_common(1)
    spellings = sorted({str(run_dir), str(run_dir.resolve()), os.path.relpath(run_dir.resolve())}
                       | {d for d, _ in written}, key=len, reverse=True)

    def norm(v):
        if isinstance(v, str):
            for s in spellings:
                v = v.replace(s, "RUN")
        return v

    drop = {"seed", "eval_seed"}
    return {name: {k: norm(v) for k, v in sec.items() if k not in drop} if isinstance(sec, dict) else sec
            for name, sec in config.items()}


def check_runs(runs: list[dict]) -> list[str]:
    """Refuse (ValueError) runs that cannot be paired: fewer than two, one directory twice, or held-out prompts
    that differ. Return warnings for what may still be compared but should be said: two runs with the same
    seeds (repeats of one seed understate the spread), configs that differ in more than seeds."""
    if len(runs) < 2:
        raise ValueError(f"seeds needs at least 2 runs to estimate a standard error, got {len(runs)}")
    where = [r["dir"].resolve() for r in runs]
    twice = sorted({str(r["dir"]) for r, w in zip(runs, where) if where.count(w) > 1})
    if twice:
        raise ValueError(f"the same run given more than once: {', '.join(twice)}")
    first = runs[0]
    for r in runs[1:]:
        if r["replies"] != first["replies"]:
            raise ValueError(f"{first['dir']} sampled {first['replies']} replies to each held-out prompt, {r['dir']} "
                             f"{r['replies']}: rerun one's evaluation with the other's pipeline.eval_replies")
        if (r["prompts"], r["n"]) != (first["prompts"], first["n"]):
            ts = [run_seeds(x["config"]).get("tasks_seed", "?") for x in (first, r)]
            raise ValueError(
                f"held-out prompts differ: {first['dir']} answered {first['n']} prompts ({first['prompts']}, "
                f"tasks_seed {ts[0]}), {r['dir']} {r['n']} ({r['prompts']}, tasks_seed {ts[1]}); repeats must keep "
                "pipeline.tasks_seed and pipeline.heldout and change only pipeline.seed")
    warnings = []
    seeds = [run_seeds(r["config"]) for r in runs]
    for i in range(len(runs)):
        for j in range(i + 1, len(runs)):
            if seeds[i] and seeds[i] == seeds[j]:
                warnings.append(f"{runs[i]['dir']} and {runs[j]['dir']} used the same seeds: repeats of one seed "
                                "make the standard errors too small")
    base = runs[0]["config"] and _without_seeds(runs[0]["config"], runs[0]["dir"])
    for r in runs[1:]:
        if not (base and r["config"]):
            continue
        other = _without_seeds(r["config"], r["dir"])
        diff = sorted(f"{s}.{k}" for s in set(base) | set(other)
                      for k in set(base.get(s) or {}) | set(other.get(s) or {})
                      if (base.get(s) or {}).get(k) != (other.get(s) or {}).get(k))
        if diff:
            warnings.append(f"{r['dir']}'s config differs from {runs[0]['dir']}'s in more than seeds: "
                            + ", ".join(diff[:12]) + (f" and {len(diff) - 12} more" if len(diff) > 12 else ""))
    return warnings


# ---------------------------------------------------------------- the numbers
def _over_seeds(values: list[float]) -> dict:
    m, se = mean_se(values)
    return {"mean": m, "se": se, "values": values}


def summarize(runs: list[dict]) -> dict:
    """The seeds table's numbers (``check_runs`` first). Stages evaluated in only some runs are left out
    (named in "left_out")."""
    stages = [s for s in policies() if all(s in r["evals"] for r in runs)]
    left_out = {s: [str(r["dir"]) for r in runs if s not in r["evals"]] for s in policies()
                if s not in stages and any(s in r["evals"] for r in runs)}
    out = {"runs": [{"dir": str(r["dir"]), "seeds": run_seeds(r["config"])} for r in runs],
           "prompts": {"n": runs[0]["n"] // runs[0]["replies"], "replies": runs[0]["replies"],
                       "sha": runs[0]["prompts"]}, "stages": {}, "vs_sft": {}, "left_out": left_out,
           "mcnemar": "exact; pooled over every seed's prompts (each seed's prompt one paired item), p per seed beside"}
    for s in stages:
        es = [r["evals"][s] for r in runs]
        chars = [sum(e.get("reply_chars") or map(len, e["replies"])) / e["n"] for e in es]
        out["stages"][s] = {"accuracy": _over_seeds([e["heldout_accuracy"] for e in es]),
                            "gold_score": _over_seeds([e["gold_score"] for e in es]),
                            "mean_chars": _over_seeds(chars)}
    out["calculator"] = _calculator(runs, stages)
    if "sft" not in stages:
        return out
    sft = [r["evals"]["sft"] for r in runs]
    for s in (s for s in policies(after=1) if s in stages):
        es = [r["evals"][s] for r in runs]
        vs = [versus_sft(e, b) for e, b in zip(es, sft)]
        win = _over_seeds([v["win_rate"] for v in vs])
        out["stages"][s].update(win_rate=dict(win, lower=win["mean"] - 2 * win["se"]),
                                lc_win_rate=_over_seeds([v["lc_win_rate"] for v in vs]),
                                sft_mean_chars=_over_seeds([v["sft_mean_chars"] for v in vs]))
        pooled = mcnemar([x for b in sft for x in b["correct"]], [x for e in es for x in e["correct"]])
        out["vs_sft"][s] = {"accuracy": paired_seeds([b["heldout_accuracy"] for b in sft],
                                                     [e["heldout_accuracy"] for e in es]),
                            "mcnemar_pooled": pooled, "mcnemar_p_per_seed": [v["mcnemar"]["p"] for v in vs]}
    return out


def _calculator(runs: list[dict], stages: list[str]) -> dict:
    """The calculator's held-out problems over the runs, for the stages every run evaluated with it: accuracy
    with it, right-call rate and accuracy without it (mean ± SE), McNemar with vs without on all runs'
    problems pooled, and for stages after SFT the seed-paired accuracy difference to SFT."""
    out = {}
    for s in (s for s in stages if all(r["evals"][s].get("calculator") for r in runs)):
        cs = [r["evals"][s]["calculator"] for r in runs]
        out[s] = {k: _over_seeds([c[k] for c in cs]) for k in ("accuracy", "right_call", "accuracy_without")}
        out[s]["n"] = cs[0]["n"]
        out[s]["mcnemar_vs_without"] = mcnemar([x for c in cs for x in c["correct_without"]],
                                               [x for c in cs for x in c["correct"]])
        if s != "sft" and "sft" in out:
            out[s]["vs_sft"] = paired_seeds(out["sft"]["accuracy"]["values"], out[s]["accuracy"]["values"])
    return out


def _calculator_md(calc: dict) -> list[str]:
    if not calc:
        return []
    L = ["", "## The calculator", "",
         f"Held-out multi-digit problems whose operands no training prompt holds (n = {next(iter(calc.values()))['n']} "
         "per run), answered with the calculator running; right call: the reply's first call evaluates to the "
         "right answer; without: the same problems with no calculator (a call gets no result). McNemar with vs "
         "without pools every run's problems; with − SFT is seed-paired.", "",
         "| policy | accuracy with it | right call | accuracy without it | McNemar with vs without | with − SFT |",
         "|---|---|---|---|---|---|"]
    for s, c in calc.items():
        d = c.get("vs_sft")
        vs = f"{_num(d['diff'], sign=True)} ± {_num(d['se_diff'])}" if d else "—"
        L.append(f"| {'base' if s == 'pretrain' else s} | {_ms(c['accuracy'])} | {_ms(c['right_call'])} | "
                 f"{_ms(c['accuracy_without'])} | p = {c['mcnemar_vs_without']['p']:.2g} | {vs} |")
    return L


# ---------------------------------------------------------------- the table
def _ms(d: dict, digits: int = 3) -> str:
    return format_mean_se(d["mean"], d["se"], digits)


def _num(x: float, digits: int = 3, sign: bool = False) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    x = 0.0 if abs(x) < 0.5 * 10 ** -digits else x  # a difference that rounds to zero is "+0.000", not "-0.000"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def markdown(summary: dict, warnings: list[str]) -> str:
    k, n, per = len(summary["runs"]), summary["prompts"]["n"], summary["prompts"].get("replies", 1)
    runs = ", ".join(f"{r['dir']} (eval_seed {r['seeds'].get('eval_seed', '?')})" for r in summary["runs"])
    replies = (f" with {per} sampled replies to each (`pipeline.eval_replies`: a run's figure is the mean over its "
               f"replies, and a win pairs a policy's reply j with SFT's reply j)" if per > 1 else "")
    L = [f"# Held-out results over {k} seeds", "",
         f"{k} runs of one config with different `pipeline.seed`, each answering the same {n} held-out prompts"
         f"{replies} (prompts {summary['prompts']['sha']}): {runs}. Figures are the mean ± standard error over the "
         "runs (sample standard deviation / √runs); the rubric is the judge (eval/heldout.py).", ""]
    L += [f"**Warning:** {w}" for w in warnings] + ([""] if warnings else [])
    left = [f"Left out: {s}, not evaluated in {', '.join(d)}." for s, d in summary["left_out"].items()]
    L += left + ([""] if left else [])
    L += ["| policy | accuracy | gold score | win rate vs SFT | mean reply (characters) | length-controlled win rate |",
          "|---|---|---|---|---|---|"]
    for s, st in summary["stages"].items():
        name = "base" if s == "pretrain" else s
        win = f"{_ms(st['win_rate'])} (− 2 SE: {_num(st['win_rate']['lower'])})" if "win_rate" in st else "—"
        chars = _ms(st["mean_chars"], 1) + (f" (SFT {_ms(st['sft_mean_chars'], 1)})" if "sft_mean_chars" in st else "")
        lc = _ms(st["lc_win_rate"]) if "lc_win_rate" in st else "—"
        L.append(f"| {name} | {_ms(st['accuracy'])} | {_ms(st['gold_score'])} | {win} | {chars} | {lc} |")
    if summary["vs_sft"]:
        L += ["", "## Aligned stages vs SFT, paired by seed", "",
              "Accuracy − SFT is the mean over seeds of each seed's stage minus the same seed's SFT, ± the standard "
              "error of those differences: a seed's luck in SFT, shared by every stage trained from it, cancels. "
              "Lower bound = mean − 2 SE: above 0, the stage is ahead of SFT by two standard errors (with 3 seeds "
              "a rough band; a t quantile would be wider). McNemar: exact test on all seeds' replies pooled "
              "(each seed's reply to a prompt a paired item; replies to one prompt are not independent, so read "
              "the pooled p beside the per-seed ones).", "",
              "| policy | accuracy − SFT | lower bound | McNemar, seeds pooled | McNemar p per seed |",
              "|---|---|---|---|---|"]
        for s, v in summary["vs_sft"].items():
            a, mc = v["accuracy"], v["mcnemar_pooled"]
            L.append(f"| {s} | {_num(a['diff'], sign=True)} ± {_num(a['se_diff'])} | {_num(a['lower'], sign=True)} | "
                     f"p = {mc['p']:.3g} (right only here {mc['b_only']}, only in SFT {mc['a_only']}; "
                     f"{mc['n']} items) | "
                     + ", ".join(f"{p:.3g}" for p in v["mcnemar_p_per_seed"]) + " |")
    L += _calculator_md(summary.get("calculator") or {})
    stages = list(summary["stages"])
    wins = [s for s in stages if "win_rate" in summary["stages"][s]]
    L += ["", "## Each run", "", "| run | " + " | ".join(f"{s} accuracy" for s in stages)
          + "".join(f" | {s} win rate" for s in wins) + " |", "|---|" + "---|" * (len(stages) + len(wins))]
    for i, r in enumerate(summary["runs"]):
        cells = [_num(summary["stages"][s]["accuracy"]["values"][i]) for s in stages]
        cells += [_num(summary["stages"][s]["win_rate"]["values"][i]) for s in wins]
        L.append(f"| {r['dir']} | " + " | ".join(cells) + " |")
    return "\n".join(L) + "\n"


def _no_nan(x):
    """JSON has no NaN: an SE of one value (nan) is written as null."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_no_nan(v) for v in x]
    return x


def seeds_report(run_dirs: list, out=None) -> tuple[str, dict]:
    """Read the runs, check they pair, and return (markdown, numbers); with ``out`` (a .md path) also write
    the markdown there and the numbers beside it (same name, .json)."""
    if out is not None and Path(out).suffix == ".json":
        raise ValueError(f"--out {out}: give the markdown file (its numbers go beside it as .json)")
    runs = [read_run(d) for d in run_dirs]
    warnings = check_runs(runs)
    summary = dict(summarize(runs), warnings=warnings)
    md = markdown(summary, warnings)
    if out is not None:
        out = Path(out)
        atomic_write_text(out, md)
        atomic_write_text(out.with_suffix(".json"), json.dumps(_no_nan(summary), indent=2, ensure_ascii=False))
    return md, summary
