"""Offline batch generation under a memory budget: ``chatfactory generate --max-memory`` (model/offload.py's
streamed layers and block schedule) against Hugging Face ``transformers`` + ``accelerate``'s offload
(``device_map="auto"``, ``max_memory={"cpu": budget}``, ``offload_folder``), same weights, same budget.

The budget is ``budget_frac`` (default a quarter) of the stage's fp32 weights. Both sides get the same
``prompts`` chat prompts (our tokenizer renders them once; the transformers side receives the ids,
left-padded with an attention mask), one batch of ``batch`` rows, greedy, at most ``new_tokens`` new
tokens, stopping at the template's end tokens (a row's count includes its stop token, on both sides).
The transformers model is the stage exported with formats/hf.py (``chatfactory export``), fp32. Each side runs in
its own subprocess, so its peak resident memory (VmHWM) is its own; the baseline (the interpreter and
libraries, before any weight is loaded) is printed beside it. Tokens/s = generated tokens / the
generation's wall time (loading excluded, on both sides); ``ours_stalled_seconds`` is how much of ours
was spent waiting for a layer the prefetch thread had not loaded yet. ``agree`` is the fraction of rows whose
answers are the same ids on both sides (greedy over identical weights: ~1, round-off aside).

    .venv/bin/python bench/offload_compare.py [--run runs/smol --stage pretrain --prompts 64 --new-tokens 32]
    .venv/bin/python bench/offload_compare.py --quick     # smoke test: SmolLM2's 2-layer stand-in, 4 prompts

Last line: ``RESULT offload_vs_accelerate=… ours_tok_s=… accelerate_tok_s=… ours_peak_rss_mb=…
accelerate_peak_rss_mb=… budget_mb=… agree=… rows=… skipped=…`` (rows: answers written by ours; skipped:
``accelerate`` where transformers + accelerate are not installed: ours is measured alone, nan for theirs,
else ``none``). Run it alone: on a shared 2-core machine anything else
running is noise. The stage defaults to ``pretrain``: a LoRA stage (runs/smol's sft) streams too, but
merges its adapters at every load of a block, which the exported (merged) transformers side never pays.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# --quick (tests/test_benches.py): SmolLM2's stand-in (tests/builders/standin.py) in a temp dir, 4 prompts, 4 tokens
QUICK = dict(run=None, prompts=4, new_tokens=4, batch=4)
TOPICS = ["the sea", "a library", "winter", "bread", "the moon", "trains", "a garden", "music", "rain", "mountains",
          "a cat", "coffee", "the city at night", "old maps", "bicycles", "the desert"]
ASKS = ["Write two sentences about {}.", "What is interesting about {}?", "Give three facts about {}.",
        "Describe {} to a child."]


def prompt_rows(n: int) -> list[dict]:
    return [{"prompt": ASKS[(i // len(TOPICS)) % len(ASKS)].format(TOPICS[i % len(TOPICS)])} for i in range(n)]


STATUS = """
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
"""

OURS = STATUS + """
import contextlib, io, json, re, sys
import torch  # the libraries first, as the other side's baseline has them: the baseline is what precedes the weights
from chatfactory import cli
from chatfactory.inference import engine
from chatfactory.model import offload
from chatfactory.text import tokenizer
base = status("VmRSS")
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    rc = cli.main(sys.argv[1:])
m = re.search(r"(\\d+) tokens in ([0-9.]+)s(?:, ([0-9.]+)s of it waiting)?", buf.getvalue())
print(json.dumps({"rc": rc, "base": base, "hwm": status("VmHWM"), "tokens": int(m.group(1)),
                  "seconds": float(m.group(2)), "stalled": float(m.group(3) or 0)}))
"""

THEIRS = STATUS + """
import json, sys, time, torch
from transformers import AutoModelForCausalLM
hf_dir, offload_dir, budget, ids_path, new_tokens = sys.argv[1:6]
job = json.load(open(ids_path))
base = status("VmRSS")
model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, device_map="auto",
                                             max_memory={"cpu": int(budget)}, offload_folder=offload_dir)
model.eval()
rows, stops = job["ids"], job["stop_ids"]
L = max(map(len, rows))
x = torch.tensor([[stops[0]] * (L - len(r)) + r for r in rows])
mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
t = time.perf_counter()
with torch.no_grad():
    out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=int(new_tokens), do_sample=False,
                         eos_token_id=stops, pad_token_id=stops[0])
seconds = time.perf_counter() - t
answers = []
for row in out[:, L:].tolist():
    cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
    answers.append(row[:cut])
print(json.dumps({"base": base, "hwm": status("VmHWM"), "tokens": sum(map(len, answers)), "seconds": seconds,
                  "answers": answers, "device_map": sorted(set(map(str, model.hf_device_map.values())))}))
"""


def _child(code: str, args: list[str], timeout: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"child failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def accelerate_missing() -> str:
    """Why the transformers + accelerate side cannot run here ('' when it can)."""
    import importlib.util

    missing = [m for m in ("transformers", "accelerate") if importlib.util.find_spec(m) is None]
    return f"{' and '.join(missing)} not installed (pip install accelerate)" if missing else ""


def compare(run="runs/smol", stage="pretrain", budget_frac=0.25, prompts=64, new_tokens=32, batch=64,
            workdir=None, timeout=3600) -> dict:
    """Both sides at the same budget -> the figures (the accelerate side's are nan, and ``skipped`` says
    so, where it is not installed)."""
    sys.path.insert(0, str(ROOT / "src"))
    from chatfactory.formats.hf import export_run
    from chatfactory.store.safetensors import SafetensorsFile
    from chatfactory.text.tokenizer import Tokenizer

    run = Path(run)
    with SafetensorsFile(run / stage / "model.safetensors") as reader:
        weights = sum(reader.nbytes(k) for k in reader.keys() if not k.endswith(("lora_A", "lora_B")))
    budget = int(weights * budget_frac)
    work = Path(workdir or tempfile.mkdtemp(prefix="offload_compare_"))
    work.mkdir(parents=True, exist_ok=True)
    hf_dir = work / "hf"
    why_not = accelerate_missing()
    if why_not:
        print(f"transformers + accelerate offload: {why_not}: skipped, ours measured alone")
    elif not (hf_dir / "config.json").exists():
        export_run(str(run), stage, str(hf_dir))
    rows = prompt_rows(prompts)
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = Tokenizer.load(run / "tokenizer.json")
    ids = [tok.chat_prompt([{"role": "user", "content": r["prompt"]}]) for r in rows]
    (work / "ids.json").write_text(json.dumps({"ids": ids, "stop_ids": list(tok.stop_ids)}))

    out = work / "answers.jsonl"
    out.unlink(missing_ok=True)
    ours = _child(OURS, ["generate", "--run", str(run), "--stage", stage, "--prompts", str(work / "prompts.jsonl"),
                         "--out", str(out), "--batch", str(batch), "--max-new-tokens", str(new_tokens),
                         "--temperature", "0", "--max-memory", f"{budget}B"], timeout)
    answers = [json.loads(x) for x in out.read_text().splitlines()]
    (work / "offload").mkdir(exist_ok=True)
    theirs = {"tokens": 0, "seconds": 0.0, "base": 0, "hwm": 0, "answers": []}
    for b in range(0, 0 if why_not else prompts, batch):  # the same batches as ours
        (work / "ids_b.json").write_text(json.dumps({"ids": ids[b: b + batch], "stop_ids": list(tok.stop_ids)}))
        r = _child(THEIRS, [str(hf_dir), str(work / "offload"), str(budget), str(work / "ids_b.json"), str(new_tokens)],
                   timeout)
        theirs = {**r, "tokens": theirs["tokens"] + r["tokens"], "seconds": theirs["seconds"] + r["seconds"],
                  "hwm": max(theirs["hwm"], r["hwm"]), "answers": theirs["answers"] + r["answers"]}
    agree = sum(a["answer"] == tok.decode([t for t in b if t not in tok.stop_ids])
                for a, b in zip(answers, theirs["answers"])) / max(1, len(answers))
    ours_tps, theirs_tps = ours["tokens"] / ours["seconds"], theirs["tokens"] / max(theirs["seconds"], 1e-9)
    if why_not:
        agree = theirs_tps = theirs["hwm"] = theirs["base"] = theirs["seconds"] = float("nan")
    return {"offload_vs_accelerate": ours_tps / theirs_tps, "ours_tok_s": ours_tps, "accelerate_tok_s": theirs_tps,
            "ours_peak_rss_mb": ours["hwm"] / 1e6, "accelerate_peak_rss_mb": theirs["hwm"] / 1e6,
            "ours_base_rss_mb": ours["base"] / 1e6, "accelerate_base_rss_mb": theirs["base"] / 1e6,
            "budget_mb": budget / 1e6, "model_mb": weights / 1e6, "ours_tokens": ours["tokens"],
            "accelerate_tokens": theirs["tokens"], "ours_seconds": ours["seconds"],
            "accelerate_seconds": theirs["seconds"], "ours_stalled_seconds": ours["stalled"],
            "accelerate_devices": theirs.get("device_map"), "agree": agree, "rows": len(answers),
            "skipped": "accelerate" if why_not else "none"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/smol")
    ap.add_argument("--stage", default="pretrain")
    ap.add_argument("--budget-frac", type=float, default=0.25)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workdir", default=None, help="keeps the exported HF directory between runs")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny sizes on SmolLM2's 2-layer stand-in")
    a = ap.parse_args()
    if a.quick:  # the quick sizes are defaults: an option on the command line still wins
        ap.set_defaults(**QUICK)
        a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if a.run is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the stand-ins: tests/builders
            from builders.standin import smollm2_run

            a.run = str(smollm2_run(Path(tmp)))
        r = compare(a.run, a.stage, a.budget_frac, a.prompts, a.new_tokens, a.batch, a.workdir)
    for k, v in r.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    keys = ["offload_vs_accelerate", "ours_tok_s", "accelerate_tok_s", "ours_peak_rss_mb", "accelerate_peak_rss_mb",
            "budget_mb", "agree"]
    print("RESULT " + " ".join(f"{k}={r[k]:.2f}" for k in keys) + f" rows={r['rows']} skipped={r['skipped']}")


if __name__ == "__main__":
    main()
