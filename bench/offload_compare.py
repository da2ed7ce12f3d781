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

A budget that binds: accelerate's weights are memory-mapped, so in the first pass the page cache holds what its
budget left out. With ``--cgroup``, where the host allows (root, cgroup v1's memory controller), each side runs
again inside a memory cgroup of its own, the page cache dropped before each pass. The process joins its group
before the interpreter starts, so everything it touches is charged there, the libraries' files included. A first
pass without a limit measures the process's fixed overhead: its anonymous memory's peak (the interpreter and
libraries, the weights within the budget, the KV cache, activations) and the page cache its imports read. The
second pass runs under that plus one block's weights of room for the page cache (15% more at each retry where
the kernel stops the side at the limit, or where it thrashes: ten times its free pass's wall time): page cache
and process memory together cannot hold the model, and each side reads from the disk what it did not keep.
``/proc/PID/io``'s ``read_bytes`` over the generation gives the disk bytes per generated token, beside the least
a step can read (the model's bytes over the batch).

Last line: ``RESULT offload_vs_accelerate=… ours_tok_s=… accelerate_tok_s=… ours_peak_rss_mb=…
accelerate_peak_rss_mb=… budget_mb=… agree=… offload_vs_accelerate_cgroup=… ours_cgroup_tok_s=…
accelerate_cgroup_tok_s=… disk_bytes_per_token_vs_min=… accelerate_disk_bytes_per_token_vs_min=…
cgroup_same_answers=… rows=… killed=… skipped=…`` (rows: answers written by ours; killed: a side the kernel stopped
at its limit, or that thrashed; skipped: ``accelerate`` where transformers + accelerate are not installed: ours is
measured alone, nan for theirs; ``cgroup`` without ``--cgroup`` or where the binding pass cannot run; else
``none``). Run it alone: on a shared 2-core machine anything else running is noise. The stage defaults to
``pretrain``: a LoRA stage (runs/smol's sft) streams too, but merges its adapters at every load of a block, which
the exported (merged) transformers side never pays.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
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
import os
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
def read_bytes():  # bytes this process (all its threads) had read from the block device
    return next(int(l.split()[1]) for l in open("/proc/self/io") if l.startswith("read_bytes"))
def charge():  # what the memory cgroup this process started in holds: {"rss": anonymous, "cache": page cache}
    if not os.environ.get("BENCH_CGROUP"):
        return {"rss": 0, "cache": 0}
    stat = dict(l.split() for l in open(os.path.join(os.environ["BENCH_CGROUP"], "memory.stat")))
    return {"rss": int(stat["rss"]), "cache": int(stat["cache"])}
"""

OURS = STATUS + """
import contextlib, io, json, re, sys
import torch  # the libraries first, as the other side's baseline has them: the baseline is what precedes the weights
from chatfactory import cli
from chatfactory.inference import engine
from chatfactory.model import offload
from chatfactory.text import tokenizer
base, base_charge = status("VmRSS"), charge()
disk = [0]
generate = engine.Engine.generate
def counted(self, *args, **kwargs):  # the disk bytes read while generating (the prefetch thread's included)
    start = read_bytes()
    try:
        return generate(self, *args, **kwargs)
    finally:
        disk[0] += read_bytes() - start
engine.Engine.generate = counted
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    rc = cli.main(sys.argv[1:])
m = re.search(r"(\\d+) tokens in ([0-9.]+)s(?:, ([0-9.]+)s of it waiting)?", buf.getvalue())
print(json.dumps({"rc": rc, "base": base, "base_charge": base_charge, "hwm": status("VmHWM"), "tokens": int(m.group(1)),
                  "seconds": float(m.group(2)), "stalled": float(m.group(3) or 0), "disk": disk[0]}))
"""

THEIRS = STATUS + """
import json, sys, time, torch
from transformers import AutoModelForCausalLM
hf_dir, offload_dir, budget, ids_path, new_tokens = sys.argv[1:6]
job = json.load(open(ids_path))
base, base_charge = status("VmRSS"), charge()
model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, device_map="auto",
                                             max_memory={"cpu": int(budget)}, offload_folder=offload_dir)
model.eval()
rows, stops = job["ids"], job["stop_ids"]
L = max(map(len, rows))
x = torch.tensor([[stops[0]] * (L - len(r)) + r for r in rows])
mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
t, disk = time.perf_counter(), read_bytes()
with torch.no_grad():
    out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=int(new_tokens), do_sample=False,
                         eos_token_id=stops, pad_token_id=stops[0])
seconds, disk = time.perf_counter() - t, read_bytes() - disk
answers = []
for row in out[:, L:].tolist():
    cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
    answers.append(row[:cut])
print(json.dumps({"base": base, "base_charge": base_charge, "hwm": status("VmHWM"), "tokens": sum(map(len, answers)),
                  "seconds": seconds,
                  "disk": disk,
                  "answers": answers, "device_map": sorted(set(map(str, model.hf_device_map.values())))}))
"""


def _child(code: str, args: list[str], timeout: int, cgroup: Path | None = None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"), "BENCH_CGROUP": str(cgroup or "")}
    cmd = [sys.executable, "-c", code, *args]
    if cgroup is not None:  # joined before the interpreter starts: every page it ever touches is charged to the group
        cmd = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup), *cmd]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"child failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- a binding budget: each side in a memory cgroup
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_ATTEMPTS = 6  # limits tried per side, each 15% above the last


def own_memory_cgroup() -> Path | None:
    """This process's cgroup v1 memory group (None without the v1 memory controller)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, where = line.split(":", 2)
        if "memory" in controllers.split(","):
            return CGROUP_V1 / where.lstrip("/")
    return None


def cgroup_missing() -> str:
    """Why a side cannot run in a memory cgroup of its own here ('' when it can)."""
    parent = own_memory_cgroup()
    if parent is None or not (parent / "memory.limit_in_bytes").exists():
        return "no cgroup v1 memory controller"
    if not os.access(parent, os.W_OK) or not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        return "a memory cgroup and dropping the page cache need root"
    return ""


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


class MemoryCgroup:
    """A child of this process's memory cgroup that a side's process joins (``BENCH_CGROUP``), charged for its
    anonymous memory and page cache alike: ``limit`` bytes of both (swap included where it is accounted), or no
    limit; a thread samples the peak of its anonymous memory (the ``rss`` of memory.stat)."""

    def __init__(self, name: str, limit: int | None = None):
        self.path = own_memory_cgroup() / f"{name}-{os.getpid()}"
        self.path.mkdir()
        if limit is not None:
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
            if (self.path / "memory.memsw.limit_in_bytes").exists():
                (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit))
        self.anon_peak, self._stop = 0, threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _stat(self) -> dict:
        return {k: int(v) for k, v in (line.split() for line in (self.path / "memory.stat").read_text().splitlines())}

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            self.anon_peak = max(self.anon_peak, self._stat()["rss"])

    def close(self) -> int:
        """Stop watching and remove the group -> its anonymous memory's sampled peak."""
        self._stop.set()
        self._watcher.join()
        for _ in range(100):  # the side's process has exited; the kernel lets go of the group a moment later
            try:
                self.path.rmdir()
                break
            except OSError:
                time.sleep(0.05)
        return self.anon_peak


def accelerate_missing() -> str:
    """Why the transformers + accelerate side cannot run here ('' when it can)."""
    import importlib.util

    missing = [m for m in ("transformers", "accelerate") if importlib.util.find_spec(m) is None]
    return f"{' and '.join(missing)} not installed (pip install accelerate)" if missing else ""


def compare(run="runs/smol", stage="pretrain", budget_frac=0.25, prompts=64, new_tokens=32, batch=64,
            workdir=None, timeout=3600, binding=False) -> dict:
    """Both sides at the same budget -> the figures (the accelerate side's are nan, and ``skipped`` says
    so, where it is not installed). ``binding``: each side runs twice, first in a memory cgroup without a limit
    (its figures as before, its anonymous memory's peak, the page cache its imports read), then in one whose
    limit is those plus one block's weights, after the page cache is dropped (the ``_cgroup`` figures;
    ``skipped`` names ``cgroup`` where the host cannot: no v1 memory controller, or not root)."""
    sys.path.insert(0, str(ROOT / "src"))
    from chatfactory.formats.hf import export_run
    from chatfactory.store.safetensors import SafetensorsFile
    from chatfactory.text.tokenizer import Tokenizer

    run = Path(run)
    with SafetensorsFile(run / stage / "model.safetensors") as reader:
        weights = sum(reader.nbytes(k) for k in reader.keys() if not k.endswith(("lora_A", "lora_B")))
        depth = 1 + max(int(k.split(".")[1]) for k in reader.keys() if k.startswith("blocks."))
        block_bytes = max(reader.nbytes(f"blocks.{i}.") for i in range(depth))
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

    def run_ours(name: str, cgroup: Path | None = None, limit_s: float = timeout) -> dict:
        out = work / f"answers-{name}.jsonl"
        out.unlink(missing_ok=True)
        r = _child(OURS, ["generate", "--run", str(run), "--stage", stage, "--prompts", str(work / "prompts.jsonl"),
                          "--out", str(out), "--batch", str(batch), "--max-new-tokens", str(new_tokens),
                          "--temperature", "0", "--max-memory", f"{budget}B"], limit_s, cgroup)
        return {**r, "answers": [json.loads(x)["answer"] for x in out.read_text().splitlines()]}

    def run_theirs(name: str, cgroup: Path | None = None, limit_s: float = timeout) -> dict:
        (work / "offload").mkdir(exist_ok=True)
        total = {"tokens": 0, "seconds": 0.0, "base": 0, "hwm": 0, "disk": 0, "answers": []}
        for b in range(0, prompts, batch):  # the same batches as ours
            (work / "ids_b.json").write_text(json.dumps({"ids": ids[b: b + batch], "stop_ids": list(tok.stop_ids)}))
            r = _child(THEIRS, [str(hf_dir), str(work / "offload"), str(budget), str(work / "ids_b.json"),
                                str(new_tokens)], limit_s, cgroup)
            total = {**r, **{k: total[k] + r[k] for k in ("tokens", "seconds", "disk", "answers")},
                     "hwm": max(total["hwm"], r["hwm"])}
        total["answers"] = [tok.decode([t for t in a if t not in tok.stop_ids]) for a in total["answers"]]
        return total

    nan = float("nan")
    sides = {"ours": run_ours} | ({} if why_not else {"accelerate": run_theirs})
    free, bound, limits = {}, {}, {}
    cgroup_why_not = "" if not binding else cgroup_missing()
    if binding and cgroup_why_not:
        print(f"the binding budget (a memory cgroup per side): {cgroup_why_not}: skipped")
    for side, go in sides.items():
        if not binding or cgroup_why_not:
            free[side] = go("free")
            continue
        # 1. no limit, the process in its group from its first instruction: its anonymous memory at its peak
        # (the interpreter and libraries, its weights within the budget, the KV cache, activations, the
        # allocator's slack) and the page cache its imports read (the libraries' code and data files)
        drop_page_cache()
        group = MemoryCgroup(f"offload-{side}")
        t = time.perf_counter()
        try:
            free[side] = go("free", group.path)
        finally:
            anon_peak = group.close()
        wall = time.perf_counter() - t
        # 2. the budget plus that fixed overhead: the anonymous peak, the libraries' files, and one block's weights
        # (the layer being computed) of room for the page cache. The streamed weights must come from the disk at
        # each step, not from memory. The sampled peak misses short-lived allocations and pages first touched
        # after the imports: a side the kernel kills at its limit, or one that thrashes (10x its free wall
        # time), tries again with 15% more
        limit = anon_peak + free[side]["base_charge"]["cache"] + block_bytes
        for _ in range(CGROUP_ATTEMPTS):
            drop_page_cache()
            group = MemoryCgroup(f"offload-{side}-bound", limit)
            try:
                bound[side], limits[side] = go("bound", group.path, max(120.0, 10 * wall)), limit
                break
            except (RuntimeError, subprocess.TimeoutExpired) as e:  # killed past its limit, or thrashing
                why = "thrashed" if isinstance(e, subprocess.TimeoutExpired) else "killed"
                print(f"{side} inside {limit / 1e6:.0f} MB: {why} ({str(e).splitlines()[0][:80]})")
                bound[side] = {"tokens": 0, "seconds": nan, "disk": nan, "answers": [], "killed": True}
                limit = int(limit * 1.15)
            finally:
                group.close()

    ours, theirs = free["ours"], free.get("accelerate", {"tokens": 0, "seconds": nan, "base": nan, "hwm": nan,
                                                         "disk": nan, "answers": []})
    agree = (sum(a == b for a, b in zip(ours["answers"], theirs["answers"])) / max(1, len(ours["answers"]))
             if theirs["answers"] else nan)
    tps = {side: r["tokens"] / r["seconds"] for side, r in free.items()}
    tps_bound = {side: (r["tokens"] / r["seconds"] if r["tokens"] else nan) for side, r in bound.items()}
    least = weights / min(batch, prompts)  # a step reads the model once and writes a token for each row
    per_token = {side: r["disk"] / r["tokens"] if r["tokens"] else nan for side, r in bound.items()}
    skipped = [name for name, why in (("accelerate", why_not), ("cgroup", cgroup_why_not or not binding)) if why]
    return {"offload_vs_accelerate": tps["ours"] / tps.get("accelerate", nan), "ours_tok_s": tps["ours"],
            "accelerate_tok_s": tps.get("accelerate", nan),
            "ours_peak_rss_mb": ours["hwm"] / 1e6, "accelerate_peak_rss_mb": theirs["hwm"] / 1e6,
            "ours_base_rss_mb": ours["base"] / 1e6, "accelerate_base_rss_mb": theirs["base"] / 1e6,
            "budget_mb": budget / 1e6, "model_mb": weights / 1e6, "ours_tokens": ours["tokens"],
            "accelerate_tokens": theirs["tokens"], "ours_seconds": ours["seconds"],
            "accelerate_seconds": theirs["seconds"], "ours_stalled_seconds": ours["stalled"],
            "accelerate_devices": theirs.get("device_map"), "agree": agree, "rows": len(ours["answers"]),
            "offload_vs_accelerate_cgroup": tps_bound.get("ours", nan) / tps_bound.get("accelerate", nan),
            "ours_cgroup_tok_s": tps_bound.get("ours", nan),
            "accelerate_cgroup_tok_s": tps_bound.get("accelerate", nan),
            "ours_cgroup_limit_mb": limits.get("ours", nan) / 1e6,
            "accelerate_cgroup_limit_mb": limits.get("accelerate", nan) / 1e6,
            "ours_disk_bytes_per_token": per_token.get("ours", nan),
            "accelerate_disk_bytes_per_token": per_token.get("accelerate", nan), "min_disk_bytes_per_token": least,
            "disk_bytes_per_token_vs_min": per_token.get("ours", nan) / least,
            "accelerate_disk_bytes_per_token_vs_min": per_token.get("accelerate", nan) / least,
            "cgroup_same_answers": (nan if "ours" not in bound else
                                    float(bound["ours"]["answers"] == ours["answers"])),
            "killed": ",".join(side for side, r in bound.items() if r.get("killed")) or "none",
            "skipped": ",".join(skipped) or "none"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/smol")
    ap.add_argument("--stage", default="pretrain")
    ap.add_argument("--budget-frac", type=float, default=0.25)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workdir", default=None, help="keeps the exported HF directory between runs")
    ap.add_argument("--cgroup", action="store_true", help="add the binding pass (each side in a memory cgroup)")
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
        r = compare(a.run, a.stage, a.budget_frac, a.prompts, a.new_tokens, a.batch, a.workdir, binding=a.cgroup)
    for k, v in r.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    keys = ["offload_vs_accelerate", "ours_tok_s", "accelerate_tok_s", "ours_peak_rss_mb", "accelerate_peak_rss_mb",
            "budget_mb", "agree", "offload_vs_accelerate_cgroup", "ours_cgroup_tok_s", "accelerate_cgroup_tok_s",
            "disk_bytes_per_token_vs_min", "accelerate_disk_bytes_per_token_vs_min", "cgroup_same_answers"]
    print("RESULT " + " ".join(f"{k}={r[k]:.2f}" for k in keys)
          + f" rows={r['rows']} killed={r['killed']} skipped={r['skipped']}")


if __name__ == "__main__":
    main()
