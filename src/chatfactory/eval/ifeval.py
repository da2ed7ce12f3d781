"""IFEval (Zhou et al. 2023): does the model follow verifiable instructions? 541 prompts, each with one to
three instructions a rule can check ("no commas", "at least 300 words", "wrap the answer in JSON", …);
no judge model. Every prompt goes through the model's own chat template (its default system prompt, if
it has one), greedy, at most ``max_tokens`` new tokens, all of them by continuous batching
(inference/batching.py: a finished row's slot takes the next prompt at once). The checkers are
data/constraints.py; the four figures are the paper's: prompt-level (every instruction of a prompt
followed) and instruction-level, each strict (the response as it is) and loose (also with its first
or last line or its asterisks removed).

    chatfactory eval --run runs/NAME --task ifeval [--stage S] [--max-tokens 512] [--limit N]

``--task ifeval`` reads ../shared/data/eval/ifeval/input_data.jsonl (``--task PATH`` any file in that
format, e.g. the constraint prompts' dev split: its files are then named after it). Written to
``RUN/eval/STAGE/``: ``ifeval_responses.jsonl`` (``key``, ``prompt``, ``response``: anyone can rescore them
with another checker) and ``ifeval.json`` (the settings, the figures, the
per-instruction table, the time). A pass that is interrupted resumes where it stopped; one whose
settings, data and weights match a finished pass is read back instead of generated again.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from ..data.constraints import INSTRUCTION_TYPES, score
from ..formats.jsonl import DataError, read_jsonl
from ..inference.generate import complete_all
from ..inference.sampling import SamplingParams
from ..store.checkpoint import stage_config
from ..store.files import append_text, atomic_write_text, read_appended

DEFAULT_DATA = Path("../shared/data/eval/ifeval/input_data.jsonl")


def files(path) -> tuple[str, str, str]:
    """The names a pass over the IFEval file ``path`` writes: (responses, results, partial responses). IFEval
    itself (``input_data.jsonl``) writes ifeval_responses.jsonl and ifeval.json; another file in its format
    (the constraint prompts' dev split, data/constraint_prompts.py) ifeval_<its stem>_…, beside them."""
    prefix = "ifeval" if Path(path).name == DEFAULT_DATA.name else f"ifeval_{Path(path).stem}"
    return f"{prefix}_responses.jsonl", f"{prefix}.json", f"{prefix}_responses.partial.jsonl"


def ifeval_path(spec: str) -> Path | None:
    """``--task`` -> the IFEval file it names ("ifeval": the default location), or None for another task."""
    if spec == "ifeval":
        if not DEFAULT_DATA.exists():
            raise FileNotFoundError(f"--task ifeval: {DEFAULT_DATA.resolve()} not found (give the path of an "
                                    f"IFEval input_data.jsonl instead)")
        return DEFAULT_DATA
    path = Path(spec)
    if not path.is_file():
        return None
    first = next(read_jsonl(path), (0, {}))[1]
    return path if "instruction_id_list" in first else None


def load_ifeval(path) -> list[dict]:
    """The rows of an IFEval file, checked: key (default: the line number), prompt, instruction ids the
    checkers know, one kwargs each."""
    rows, known = [], set(INSTRUCTION_TYPES)
    for n, row in read_jsonl(path):
        where = f"{path}:{n}"
        row.setdefault("key", n)
        for k, kind in (("key", int), ("prompt", str), ("instruction_id_list", list), ("kwargs", list)):
            if not isinstance(row.get(k), kind):
                raise DataError(f"{where}: {k!r} must be of type {kind.__name__}")
        unknown = [i for i in row["instruction_id_list"] if i not in known]
        if unknown:
            raise DataError(f"{where}: unknown instruction id(s) {unknown}")
        if len(row["kwargs"]) != len(row["instruction_id_list"]):
            raise DataError(f"{where}: {len(row['instruction_id_list'])} instructions but "
                            f"{len(row['kwargs'])} kwargs")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _settings(path: Path, rows: list[dict], stage_dir: Path, max_tokens: int, quantize) -> dict:
    """What a pass's responses depend on: the data, the weights (their save), the token cap, the precision."""
    info = stage_config(stage_dir) if (stage_dir / "config.json").exists() else {}
    return {"data": str(path), "data_sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
            "prompts": len(rows), "stage": str(stage_dir), "save_id": info.get("save_id"),
            "max_tokens": max_tokens, "decoding": "greedy", "quantize": quantize}


def _read_partial(path: Path, settings: dict) -> dict[int, str]:
    """key -> response of an interrupted pass with the same settings ({} if none, or another pass's)."""
    rows = [row for _, row in read_appended(path)]
    if not rows or rows[0].get("settings") != settings:
        return {}
    return {row["key"]: row["response"] for row in rows[1:] if "key" in row}


def run_ifeval(model, tok, path, out_dir, stage_dir, *, max_tokens: int = 512, limit: int = 0, slots: int = 64,
               quantize: str | None = None, progress: bool = True) -> dict:
    """IFEval on ``model`` -> {"prompt_strict", "inst_strict", "prompt_loose", "inst_loose", "per_type",
    "settings", "seconds", "tokens", ...}; writes ``out_dir``/ifeval_responses.jsonl and ifeval.json."""
    from tqdm import tqdm

    path, out_dir, stage_dir = Path(path), Path(out_dir), Path(stage_dir)
    rows = load_ifeval(path)[: limit or None]
    settings = _settings(path, rows, stage_dir, max_tokens, quantize)
    responses_file, results_file, partial_file = files(path)
    results = out_dir / results_file
    if results.exists() and (out_dir / responses_file).exists():
        saved = json.loads(results.read_text())
        if saved.get("settings") == settings:
            print(f"ifeval: reusing the finished pass in {out_dir} (same data, weights and settings)")
            return saved
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / partial_file
    done = _read_partial(partial, settings)
    todo = [r for r in rows if r["key"] not in done]
    if done:
        print(f"ifeval: resuming: {len(done)} of {len(rows)} responses already written in {partial}")
    else:
        atomic_write_text(partial, json.dumps({"settings": settings}) + "\n")
    prompts = [tok.chat_prompt([{"role": "user", "content": r["prompt"]}]) for r in todo]
    context = min(model.cfg.block_size, max((len(p) for p in prompts), default=1) + max_tokens)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_ids=tuple(tok.stop_ids))
    bar = tqdm(total=len(rows), initial=len(done), desc="ifeval", unit="prompt", disable=not progress)
    n_tokens = 0
    t0 = time.perf_counter()

    def save(i: int, ids: list[int]) -> None:
        nonlocal n_tokens
        n_tokens += len(ids)
        done[todo[i]["key"]] = tok.decode(ids)
        append_text(partial, json.dumps({"key": todo[i]["key"], "response": done[todo[i]["key"]]},
                                        ensure_ascii=False) + "\n")
        bar.update(1)
        bar.set_postfix_str(f"{n_tokens / (time.perf_counter() - t0):.0f} tok/s")

    complete_all(model, prompts, params, slots=slots, context=context, vocab_limit=tok.vocab_size, on_done=save)
    bar.close()
    seconds = time.perf_counter() - t0
    responses = [done[r["key"]] for r in rows]
    res = {**score(rows, responses), "settings": settings, "seconds": round(seconds, 1), "new_tokens": n_tokens,
           "tok_s": round(n_tokens / seconds, 1) if seconds > 0 else 0.0,
           "mean_response_chars": round(sum(map(len, responses)) / len(responses), 1)}
    atomic_write_text(out_dir / responses_file, "".join(
        json.dumps({"key": r["key"], "prompt": r["prompt"], "response": x}, ensure_ascii=False) + "\n"
        for r, x in zip(rows, responses)))
    atomic_write_text(results, json.dumps(res, indent=2))
    partial.unlink(missing_ok=True)
    return res


def format_ifeval(res: dict) -> str:
    """The four figures, the token cap and time, and the per-instruction table."""
    s = res["settings"]
    lines = [f"IFEval on {s['prompts']} prompts (greedy, at most {s['max_tokens']} new tokens; "
             f"{res['seconds']:.0f} s, {res['new_tokens']:,} tokens generated at {res['tok_s']:.0f} tok/s)",
             f"  prompt-level strict {res['prompt_strict']:.1%}   instruction-level strict {res['inst_strict']:.1%}",
             f"  prompt-level loose  {res['prompt_loose']:.1%}   instruction-level loose  {res['inst_loose']:.1%}",
             "", f"  {'instruction':45s} {'n':>4s} {'strict':>7s} {'loose':>7s}"]
    for name, t in sorted(res["per_type"].items()):
        lines.append(f"  {name:45s} {t['n']:4d} {t['strict']:7.1%} {t['loose']:7.1%}")
    return "\n".join(lines)


# ---------------------------------------------------------------- in the pipeline's report
def instruction_verdicts(out_dir, data) -> dict[int, list[tuple[str, bool]]]:
    """key -> (instruction id, followed under the loose rule) for each instruction of the prompt, rescored
    from a pass's responses file against the IFEval file ``data``."""
    from ..data.constraints import follows

    rows = {r["key"]: r for _, r in read_jsonl(Path(out_dir) / files(data)[0])}
    data = {r["key"]: r for r in load_ifeval(data)}
    return {k: list(zip(data[k]["instruction_id_list"], follows(data[k], r["response"], loose=True)))
            for k, r in rows.items()}


def prompt_verdicts(out_dir, data) -> dict[int, bool]:
    """key -> every instruction of the prompt followed (loose)."""
    return {k: all(ok for _, ok in v) for k, v in instruction_verdicts(out_dir, data).items()}


def _by_group(verdicts: dict, held_back) -> dict[str, list[bool]]:
    """Instruction-level loose verdicts in a fixed order, split into the types training held back and the rest."""
    out: dict[str, list[bool]] = {"held_back": [], "trained": []}
    for k in sorted(verdicts):
        for inst, ok in verdicts[k]:
            out["held_back" if inst in held_back else "trained"].append(ok)
    return out


def ifeval_stages(run_dir, stages: list[str], data, max_tokens: int, log=print) -> dict:
    """IFEval on each finished stage of ``stages`` (a pass reused where its data, weights and settings match)
    -> {stage: the four figures, per-type table, time, mean response length, instruction-level loose on the
    types the constraint prompts hold back from training and on the rest; from the second stage on, McNemar
    against the first on prompt-level loose and on each group's instructions}."""
    from ..data.constraint_prompts import HELD_BACK
    from ..store.checkpoint import stage_finished
    from ..store.load import load_model
    from ..text.tokenizer import Tokenizer
    from .stats import mcnemar

    run_dir, out = Path(run_dir), {}
    tok = Tokenizer.load(run_dir / "tokenizer.json")
    verdicts = {}
    for stage in stages:
        if not stage_finished(run_dir / stage):
            log(f"[run] ifeval: {stage} is not finished, left out")
            continue
        log(f"[run] ifeval on {stage} ...")
        model = load_model(run_dir / stage, inference=True)[0]
        res = run_ifeval(model, tok, data, run_dir / "eval" / stage, run_dir / stage, max_tokens=max_tokens)
        del model
        out[stage] = {k: res[k] for k in ("prompt_strict", "inst_strict", "prompt_loose", "inst_loose", "per_type",
                                          "seconds", "new_tokens", "mean_response_chars")}
        verdicts[stage] = instruction_verdicts(run_dir / "eval" / stage, data)
        groups = _by_group(verdicts[stage], HELD_BACK)
        out[stage]["groups"] = {g: {"n": len(v), "inst_loose": sum(v) / max(len(v), 1)} for g, v in groups.items()}
        first = next(iter(verdicts))
        if stage != first:
            keys = sorted(verdicts[first])
            out[stage]["vs"] = {"stage": first, **mcnemar([all(ok for _, ok in verdicts[first][k]) for k in keys],
                                                          [all(ok for _, ok in verdicts[stage][k]) for k in keys])}
            base = _by_group(verdicts[first], HELD_BACK)
            for g, v in groups.items():
                if v:
                    out[stage]["groups"][g]["vs"] = mcnemar(base[g], v)
    return out


def ifeval_markdown(res: dict) -> list[str]:
    """The report's IFEval section: the four figures per stage, McNemar against the first, the instruction
    types that moved most."""
    if not res:
        return []
    stages = list(res)
    L = ["## IFEval (instruction following, checked by rules)", "",
         "541 prompts with verifiable instructions, each through the model's chat template, greedy "
         "(eval/ifeval.py). Loose also accepts a reply without its first or last line or its asterisks.", "",
         "| stage | prompt strict | inst strict | prompt loose | inst loose | vs first (prompt loose) | "
         "mean reply chars | seconds |", "|---|---|---|---|---|---|---|---|"]
    for s in stages:
        r, vs = res[s], res[s].get("vs")
        cmp = (f"{vs['diff']:+.3f} (McNemar p={vs['p']:.3g}; {vs['b_only']} gained, {vs['a_only']} lost)"
               if vs else "")
        L.append(f"| {s} | {r['prompt_strict']:.3f} | {r['inst_strict']:.3f} | {r['prompt_loose']:.3f} | "
                 f"{r['inst_loose']:.3f} | {cmp} | {r['mean_response_chars']:.0f} | {r['seconds']:.0f} |")
    if all("groups" in res[s] for s in stages):
        L += ["", "Instruction level, loose, on the 7 types the constraint prompts hold back from training "
              "(data/constraint_prompts.py: HELD_BACK) and on the 18 they train:", "",
              "| stage | held back | trained |", "|---|---|---|"]
        for s in stages:
            cells = []
            for g in ("held_back", "trained"):
                r = res[s]["groups"][g]
                vs = r.get("vs")
                cells.append(f"{r['inst_loose']:.3f} of {r['n']}" + (
                    f" ({vs['diff']:+.3f}, McNemar p={vs['p']:.3g})" if vs else ""))
            L.append(f"| {s} | {cells[0]} | {cells[1]} |")
    if len(stages) > 1:
        a, b = res[stages[0]]["per_type"], res[stages[-1]]["per_type"]
        moved = sorted(a, key=lambda t: b[t]["loose"] - a[t]["loose"])
        L += ["", f"Instruction types that moved most, {stages[0]} → {stages[-1]} (loose, instruction level):", "",
              "| instruction | n | " + f"{stages[0]} | {stages[-1]} | change |", "|---|---|---|---|---|"]
        for t in moved[-5:][::-1] + moved[:5]:
            L.append(f"| {t} | {a[t]['n']} | {a[t]['loose']:.3f} | {b[t]['loose']:.3f} | "
                     f"{b[t]['loose'] - a[t]['loose']:+.3f} |")
    return L + [""]
