"""Faults in training (issue 14, "Then measure" 3): SIGKILL at random moments, a full disk during a
checkpoint save, damaged checkpoint and tokenizer files. CPU only, tiny configs, about 5-10 minutes on
two cores.

    .venv/bin/python bench/faults.py                    # seed 0, 20 kills, 2 workers
    .venv/bin/python bench/faults.py --seed 3 --kills 20 --workers 2 --workdir /tmp/faults --keep
    .venv/bin/python bench/faults.py --quick           # smoke test (tests/test_benches.py): one kill in
                                                       # pretrain, each damaged file once, docs text

1. Kills. One uninterrupted ``chatfactory run`` (pipeline-tiny, every stage, short) is both the
   reference of the whole-pipeline trials and the upstream every stage trial copies (tokenizer, data,
   pretrain, sft, comparisons, reward). For each of pretrain, sft, reward, dpo (with LoRA adapters,
   dropout on), ppo, grpo and ``chatfactory run`` itself, an uninterrupted reference run of the stage's
   CLI, then trials: the same command SIGKILLed one or more times at seeded random moments and run again
   until it finishes. A moment is one of
     step  the parent watches the stage's metrics.jsonl and kills after a random number of new rows;
     time  a random delay after the launch (start-up, data loading, a step, an evaluation, a save, ...);
     save  the process SIGKILLs itself at a random point of its n-th checkpoint save: a temp cut to
           half its size (weights, config or resume state), after the weights' temp only, after every
           temp is written, between two of the renames, after the last rename. (A wrapper around the
           CLI patches the checkpoint module's write helpers to stop there; the kill is a real SIGKILL
           of the real process.)
   Every tensor of the stage's final model.safetensors (a LoRA stage's adapters included; for the whole
   pipeline every stage's, plus tokenizer.json and the comparisons files) must be bitwise equal to the
   reference. Every training process runs with OMP_NUM_THREADS=MKL_NUM_THREADS=1: two-thread CPU
   kernels are not always bit-repeatable on a busy machine, which is not what this measures.
2. Full disk. A tmpfs (``mount -t tmpfs -o size=…``; skipped with a message where mount is not
   permitted) sized so the first pretraining checkpoint fits and the second does not: the process must
   exit non-zero with an error that says the disk is full and names the file, no traceback; the previous
   checkpoint must load (project loaders) at its step with no temp left behind; after the tmpfs is made
   larger the same command resumes and ends bitwise equal to the reference.
3. Damaged files. ``tokenizer.json`` and ppo's ``config.json``, ``model.safetensors``, ``state.pt`` of a
   finished run, each cut to half and overwritten with random bytes; ``sample``, ``chat``, ``eval`` and
   ``run`` read them, ``chatfactory ppo`` (resume) reads all four: every command must exit non-zero with
   an error naming the file, no traceback, and leave the file as it was.

Last line: ``RESULT kills=… stages=… bitwise_equal=…/… disk_full_clear_error=… previous_checkpoint_loadable=…
corrupt_files_named=…/… wall_s=…``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
for k in ("FAULTS_KILL_IN_SAVE", "FAULTS_SAVE_LOG"):
    ENV.pop(k, None)

# the whole pipeline, short: the reference `run`, the upstream of every stage trial, the `run` trials
RUN_ARGS = ["--config", "pipeline-tiny", "pipeline.stages=pretrain,sft,comparisons,reward,ppo,dpo,grpo",
            "pretrain.steps=12", "pretrain.ckpt_every=4", "sft.steps=8", "sft.ckpt_every=3", "reward.steps=6",
            "reward.ckpt_every=3", "ppo.steps=3", "ppo.ckpt_every=1", "dpo.steps=6", "dpo.ckpt_every=3",
            "grpo.steps=3", "grpo.ckpt_every=1", "grpo.max_new_tokens=12", "grpo.progress=false",
            "pipeline.heldout=8", "pipeline.fewshot=8", "pipeline.samples=1"]
# each stage alone, from the upstream run's config.yaml: more steps, frequent checkpoints
STAGE_ARGS = {
    "pretrain": ["pretrain.steps=40", "pretrain.ckpt_every=6", "pretrain.eval_every=10", "pretrain.progress=false"],
    "sft": ["sft.steps=30", "sft.ckpt_every=5", "sft.eval_every=10", "sft.progress=false"],
    "reward": ["reward.steps=24", "reward.ckpt_every=4", "reward.eval_every=8", "reward.progress=false"],
    "dpo": ["dpo.steps=24", "dpo.ckpt_every=4", "dpo.eval_every=8", "dpo.progress=false",
            "lora.rank=4", "lora.dropout=0.1", "lora.stages=dpo"],
    "ppo": ["ppo.steps=6", "ppo.ckpt_every=1", "ppo.progress=false"],
    "grpo": ["grpo.steps=8", "grpo.ckpt_every=2", "grpo.max_new_tokens=12", "grpo.progress=false"],
}
ORDER = ["run", "pretrain", "sft", "reward", "dpo", "ppo", "grpo"]
RUN_STAGES = ["pretrain", "sft", "reward", "ppo", "dpo", "grpo"]
# --quick: one kill in pretraining, each damaged file read by one command; the upstream pipeline without dpo and
# grpo, on pretraining text that needs no building (parts 1-3 all run)
QUICK = dict(kills=1, stages="pretrain", damaged="few", docs_text=True, pipeline="pretrain,sft,comparisons,reward,ppo")
SAVE_POINTS = ["model.safetensors-half", "weights-temp-only", "config.json-half", "state.pt-half", "before-renames",
               "after-rename-1", "after-rename-2", "after-renames"]

# The child: the real CLI, with the checkpoint module's write helpers wrapped so that (only when asked)
# the process SIGKILLs itself at a chosen point of its n-th save, and (when asked) logs every save.
HOOK = r'''
import os, signal, sys
plan, log = os.environ.get("FAULTS_KILL_IN_SAVE", ""), os.environ.get("FAULTS_SAVE_LOG", "")
if plan or log:
    import chatfactory.store.checkpoint as ck
    nth, _, point = plan.partition(":")
    nth = int(nth or 0)
    st = {"saves": 0, "in": False, "renames": None}
    real_temps, real_file, real_os = ck._write_temps, ck.write_file, ck.os
    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    def write_temps(stage_dir, *a, **k):
        st["saves"] += 1
        st["renames"] = None
        if log:
            with open(log, "a") as f:
                f.write(f"{stage_dir.name} {a[-1]}\n")
        st["in"] = True
        try:
            temps = real_temps(stage_dir, *a, **k)
        finally:
            st["in"] = False
        if st["saves"] == nth:
            if point == "before-renames":
                die()
            st["renames"] = [0, len(temps)]
        return temps
    def write_file(path, tmp, write, what):
        mine = st["in"] and st["saves"] == nth
        if mine and point == "weights-temp-only" and path.name == ck.CONFIG:
            die()
        real_file(path, tmp, write, what)
        if mine and point == path.name + "-half":
            with open(tmp, "r+b") as f:
                f.truncate(os.path.getsize(tmp) // 2)
            die()
    class Os:
        def __getattr__(self, k):
            return getattr(real_os, k)
        def replace(self, a, b):
            real_os.replace(a, b)
            r = st["renames"]
            if r is not None:
                r[0] += 1
                if point == f"after-rename-{r[0]}" or (point == "after-renames" and r[0] == r[1]):
                    die()
                if r[0] >= r[1]:
                    st["renames"] = None
    ck._write_temps, ck.write_file, ck.os = write_temps, write_file, Os()
from chatfactory.cli import main
sys.argv[0] = "chatfactory"
sys.exit(main(sys.argv[1:]))
'''

LOAD_CHECK = """
import json, sys
from chatfactory.store.checkpoint import load_checkpoint
from chatfactory.store.load import load_model
_, info, state = load_checkpoint(sys.argv[1], with_state=True)
load_model(sys.argv[1])
print(json.dumps({"state_step": state["step"], "config_step": info["step"]}))
"""
PRINT = threading.Lock()


def say(*a) -> None:
    with PRINT:
        print(*a, flush=True)


def child(args) -> list[str]:
    """The CLI command line ``chatfactory ARGS`` through the hook above."""
    return [sys.executable, "-c", HOOK, *map(str, args)]


def child_env(save_kill: str = "", save_log: str = "") -> dict:
    env = dict(ENV)
    if save_kill:
        env["FAULTS_KILL_IN_SAVE"] = save_kill
    if save_log:
        env["FAULTS_SAVE_LOG"] = save_log
    return env


def stage_cmd(stage: str, run_dir: Path, upstream: Path) -> list:
    if stage == "run":
        return ["run", "--out", run_dir, *RUN_ARGS]
    return [stage, "--config", upstream / "config.yaml", "--out", run_dir, *STAGE_ARGS[stage]]


def inode(path: Path):
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def mark(stage_dir: Path):
    """The step of the renamed weights (None: no checkpoint) and the temps present, for the log."""
    step = None
    try:
        with safe_open(str(stage_dir / "model.safetensors"), "pt") as f:
            step = int((f.metadata() or {}).get("step", -1))
    except Exception:
        pass
    temps = sorted(p.name for p in stage_dir.glob("*.tmp")) if stage_dir.is_dir() else []
    return step, temps


def weights_files(stage: str, run_dir: Path) -> list[Path]:
    if stage == "run":
        return [run_dir / s / "model.safetensors" for s in RUN_STAGES]
    return [run_dir / stage / "model.safetensors"]


def compare(stage: str, ref: Path, got: Path) -> str:
    """'' when every tensor (and, for the pipeline, the tokenizer and comparisons) is bitwise equal;
    else the first difference."""
    for a_path, b_path in zip(weights_files(stage, ref), weights_files(stage, got)):
        if not b_path.exists():
            return f"{b_path} missing"
        a, b = load_file(str(a_path)), load_file(str(b_path))
        if a.keys() != b.keys():
            return f"{b_path}: tensor names differ ({sorted(set(a) ^ set(b))[:4]})"
        for k in a:
            if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k]):
                diff = (a[k].double() - b[k].double()).abs().max().item() if a[k].shape == b[k].shape else "shape"
                return f"{b_path.parent.name}/{b_path.name}: first differing tensor {k} (max |diff| {diff})"
    if stage == "run":
        for name in ("tokenizer.json", "comparisons.jsonl", "comparisons_heldout.jsonl"):
            if (ref / name).read_bytes() != (got / name).read_bytes():
                return f"{name} differs"
    return ""


def finished(stage: str, run_dir: Path) -> bool:
    try:
        stages = RUN_STAGES if stage == "run" else [stage]
        return all(json.loads((run_dir / s / "config.json").read_text()).get("finished") for s in stages)
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------- 1. kills
class StageBench:
    def __init__(self, stage: str, work: Path, upstream: Path, seed: int, kills: list[int]):
        self.stage, self.work, self.upstream, self.seed, self.kills = stage, work, upstream, seed, kills
        self.results: list[dict] = []  # one per trial
        self.kill_log: list[str] = []

    def prepare(self, d: Path) -> None:
        shutil.rmtree(d, ignore_errors=True)
        if self.stage == "run":
            d.mkdir(parents=True)
            return
        shutil.copytree(self.upstream, d, ignore=lambda src, names: [self.stage] if Path(src) == self.upstream else [])

    def reference(self) -> None:
        if self.stage == "run":  # the upstream is the uninterrupted pipeline
            self.ref, self.ref_s, self.ref_rows = self.upstream, self.upstream_s, 0
            self.ref_saves = self.upstream_saves
            return
        self.ref = self.work / f"{self.stage}-ref"
        self.prepare(self.ref)
        log = self.work / f"{self.stage}-ref.saves"
        t = time.perf_counter()
        out = subprocess.run(child(stage_cmd(self.stage, self.ref, self.upstream)), env=child_env(save_log=log),
                             capture_output=True, text=True, timeout=600)
        self.ref_s = time.perf_counter() - t
        if out.returncode != 0:
            raise RuntimeError(f"{self.stage} reference failed:\n{out.stderr[-3000:]}")
        self.ref_rows = lines(self.ref / self.stage / "metrics.jsonl")
        self.ref_saves = [(s, int(n)) for s, n in (x.split() for x in log.read_text().splitlines())]

    def remaining_saves(self, d: Path) -> int:
        """Saves the next launch will make, about (from the reference's saves and the checkpoints on disk)."""
        n = 0
        for s, step in self.ref_saves:
            have = mark(d / s)[0]
            n += have is None or step > have
        return max(1, n)

    def plan(self, rng: random.Random, d: Path, first: bool) -> dict:
        modes = ["save", "time"] if self.stage == "run" else ["step", "step", "save", "save", "time"]
        mode = rng.choice(modes)
        if mode == "time":
            return {"mode": "time", "delay": round(rng.uniform(0.05, 0.9 if first else 0.6) * self.ref_s, 3)}
        if mode == "save":
            return {"mode": "save", "nth": rng.randint(1, self.remaining_saves(d)), "point": rng.choice(SAVE_POINTS)}
        return {"mode": "step", "u": rng.random()}

    def launch_and_kill(self, d: Path, plan: dict, log) -> tuple[int, str]:
        """-> (return code, what happened)."""
        metrics = d / self.stage / "metrics.jsonl"
        save_kill = f"{plan['nth']}:{plan['point']}" if plan["mode"] == "save" else ""
        ino = inode(metrics)
        proc = subprocess.Popen(child(stage_cmd(self.stage, d, self.upstream)), env=child_env(save_kill=save_kill),
                                stdout=log, stderr=subprocess.STDOUT)
        t0 = time.perf_counter()
        how = ""
        try:
            if plan["mode"] == "time":
                try:
                    proc.wait(timeout=plan["delay"])
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    how = f"after {plan['delay']:.2f} s"
            elif plan["mode"] == "step":
                # a launch that finds metrics.jsonl rewrites it first (a resume keeps the rows its checkpoint
                # holds, a fresh start none): count new rows from then on
                start, target = None, 0
                while proc.poll() is None:
                    if start is None and (ino is None or inode(metrics) not in (None, ino)):
                        start = lines(metrics)
                        room = self.ref_rows - 1 - start  # rows this launch can add before the last one
                        target = start + 1 + (int(plan["u"] * room) if room > 1 else 0)
                    if start is not None and lines(metrics) >= target:
                        proc.send_signal(signal.SIGKILL)
                        how = f"at metrics row {lines(metrics)} (target {target}; the whole run writes {self.ref_rows})"
                        break
                    time.sleep(0.002)
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if plan["mode"] == "save":
            how = f"in save #{plan['nth']} of this launch at {plan['point']}"
        return proc.returncode, f"{how} ({time.perf_counter() - t0:.2f} s after launch)"

    def trial(self, i: int, n_kills: int) -> dict:
        rng = random.Random(f"{self.seed}-{self.stage}-{i}")
        d = self.work / f"{self.stage}-trial{i}"
        self.prepare(d)
        log = open(self.work / f"{self.stage}-trial{i}.log", "w")
        kills, launches, misses = 0, 0, 0
        try:
            while kills < n_kills and launches < n_kills + 4:
                plan = self.plan(rng, d, first=launches == 0)
                launches += 1
                rc, how = self.launch_and_kill(d, plan, log)
                if rc == -signal.SIGKILL:
                    kills += 1
                    where = [f"{s}: step {mark(d / s)[0]}" + (f" +{','.join(mark(d / s)[1])}" if mark(d / s)[1] else "")
                             for s in (RUN_STAGES if self.stage == "run" else [self.stage]) if (d / s).exists()]
                    line = (f"  kill {self.stage} trial {i} #{kills}: {plan['mode']} {how}; on disk "
                            f"[{'; '.join(where) or 'no checkpoint'}]")
                    self.kill_log.append(line)
                    say(line)
                elif rc == 0:
                    misses += 1
                    say(f"  {self.stage} trial {i}: the planned kill ({plan['mode']}) missed: the run finished first")
                    break
                else:
                    raise RuntimeError(f"{self.stage} trial {i}: exit code {rc}; see {log.name}")
            if not finished(self.stage, d) or (self.stage == "run" and not (d / "report.md").exists()):  # to completion
                log.write("\n==== resume to completion ====\n")
                log.flush()
                out = subprocess.run(child(stage_cmd(self.stage, d, self.upstream)), env=child_env(),
                                     stdout=log, stderr=subprocess.STDOUT, timeout=600)
                if out.returncode != 0:
                    raise RuntimeError(f"{self.stage} trial {i}: the resume failed (exit {out.returncode}); "
                                       f"see {log.name}")
        finally:
            log.close()
        diff = compare(self.stage, self.ref, d)
        res = {"stage": self.stage, "trial": i, "kills": kills, "misses": misses, "equal": not diff, "diff": diff}
        resumed = sorted({int(x) for x in re.findall(r"resuming from step (\d+)",
                                                     (self.work / f"{self.stage}-trial{i}.log").read_text())})
        say(f"  {self.stage} trial {i}: {kills} kill(s), resumed from steps {resumed or '-'}: "
            + ("bitwise EQUAL to the uninterrupted run" if not diff else f"MISMATCH: {diff}"))
        return res

    def __call__(self) -> StageBench:
        if not self.kills:  # no trial to compare with it
            return self
        self.reference()
        for i, n in enumerate(self.kills):
            self.results.append(self.trial(i, n))
        return self


def split_kills(total: int, stages=ORDER) -> dict[str, list[int]]:
    """Kills per stage (as even as can be) and per trial (1, then the rest in a second trial)."""
    per = {s: total // len(stages) + (i < total % len(stages)) for i, s in enumerate(stages)}
    return {s: ([1, n - 1] if n > 1 else [n]) if n else [] for s, n in per.items()}


# ---------------------------------------------------------------- 2. full disk
def disk_full(work: Path, upstream: Path, ref: Path) -> dict:
    mnt = work / "tmpfs"
    mnt.mkdir(exist_ok=True)
    files = ["tokenizer.json", "config.yaml"]
    base = sum(-(-(upstream / f).stat().st_size // 4096) * 4096 for f in files)
    base += sum(-(-p.stat().st_size // 4096) * 4096 for p in (upstream / "data").iterdir())
    ck = sum(-(-(ref / "pretrain" / f).stat().st_size // 4096) * 4096
             for f in ("model.safetensors", "config.json", "state.pt"))
    size_kb = (base + ck + ck // 2 + 64 * 1024) // 1024
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        say(f"  full disk: SKIPPED (mount -t tmpfs not permitted here: {r.stderr.strip()})")
        return {"clear": "skipped", "loadable": "skipped"}
    try:
        run = mnt / "run"
        run.mkdir()
        for f in files:
            shutil.copy(upstream / f, run / f)
        shutil.copytree(upstream / "data", run / "data")
        args = stage_cmd("pretrain", run, upstream)
        say(f"  full disk: tmpfs of {size_kb} KiB (data+tokenizer {base // 1024} KiB, one checkpoint {ck // 1024} KiB: "
            f"the first save fits, the second does not)")
        out = subprocess.run(child(args), env=child_env(), capture_output=True, text=True, timeout=600)
        err = out.stderr.strip()
        last = err.splitlines()[-1] if err else ""
        say(f"  full disk: exit code {out.returncode}; stderr's last line:\n    {last}")
        named = [n for n in ("model.safetensors", "config.json", "state.pt", "metrics.jsonl") if n in last]
        clear = (out.returncode not in (0, -signal.SIGKILL) and "Traceback" not in err and "disk full" in last
                 and bool(named) and str(run / "pretrain") in last)
        # the project's loaders, in a fresh process (this one keeps nothing of the tmpfs mapped: umount)
        stage_dir = run / "pretrain"
        temps = sorted(p.name for p in stage_dir.glob("*.tmp"))
        check = subprocess.run([sys.executable, "-c", LOAD_CHECK, str(stage_dir)], env=child_env(), capture_output=True,
                               text=True, timeout=300)
        if check.returncode == 0:
            got = json.loads(check.stdout.strip().splitlines()[-1])
            loadable = got["state_step"] == got["config_step"] == 6 and not temps
            say(f"  full disk: previous checkpoint loads with load_checkpoint(with_state=True) and load_model: "
                f"step {got['state_step']} (expected 6), temps left: {temps or 'none'}")
        else:
            loadable = False
            say(f"  full disk: previous checkpoint does NOT load: {check.stderr.strip().splitlines()[-1:]}")
        # space freed: the same command resumes and ends where an uninterrupted run ends
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        again = subprocess.run(child(args), env=child_env(), capture_output=True, text=True, timeout=600)
        if again.returncode == 0:
            shutil.copytree(stage_dir, work / "diskfull-copy" / "pretrain", dirs_exist_ok=True)
            diff = compare("pretrain", ref, work / "diskfull-copy")
        else:
            diff = f"exit {again.returncode}: {again.stderr[-500:]}"
        from_6 = "resuming from step 6" in again.stdout
        say(f"  full disk: tmpfs made larger; the same command again: "
            f"{'resumed from step 6' if from_6 else 'did NOT resume from step 6'}, "
            + ("bitwise EQUAL to the uninterrupted run" if not diff else f"MISMATCH: {diff}"))
        return {"clear": clear, "loadable": loadable, "resumed_equal": not diff}
    finally:
        r = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
        if r.returncode != 0:
            say(f"  full disk: umount {mnt} failed: {r.stderr.strip()}; fuser: "
                f"{subprocess.run(['fuser', '-vm', str(mnt)], capture_output=True, text=True).stderr.strip()}")


# ---------------------------------------------------------------- 3. damaged files
def damaged_files(work: Path, upstream: Path, workers: int, few: bool = False) -> tuple[int, int]:
    """-> (cases whose error named the file, cases). ``few``: each file damaged one way (half, garbage in
    turn) and read by one command (sample, chat, eval, the resume in turn: four cases)."""
    text = work / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    read_cmds = {
        "sample": lambda r: ["sample", "--run", r, "--prompt", "def ", "--max-tokens", "4", "--seed", "1"],
        "chat": lambda r: ["chat", "--run", r, "--prompt", "hi", "--max-tokens", "4", "--seed", "1"],
        "eval": lambda r: ["eval", "--run", r, "--text", text, "--max-tokens", "64"],
        "run": lambda r: ["run", "--out", r, *RUN_ARGS],
    }
    resume = lambda r: ["ppo", "--config", r / "config.yaml", "--out", r, "ppo.progress=false"]  # noqa: E731
    targets = {"tokenizer.json": "tokenizer.json", "config.json": "ppo/config.json",
               "model.safetensors": "ppo/model.safetensors", "state.pt": "ppo/state.pt"}
    cases = []
    for name, rel in targets.items():
        for how in ("half", "garbage"):
            cmds = {"resume (chatfactory ppo)": resume}
            if name != "state.pt":  # a finished stage's resume state is read by nothing but a resume
                cmds = {**read_cmds, **cmds}
            for cname, cmd in cmds.items():
                cases.append((name, rel, how, cname, cmd))
    if few:
        few_cases = [("tokenizer.json", "half", "sample"), ("config.json", "garbage", "chat"),
                     ("model.safetensors", "half", "eval"), ("state.pt", "garbage", "resume (chatfactory ppo)")]
        cases = [c for c in cases if (c[0], c[2], c[3]) in few_cases]

    def one(i_case):
        i, (name, rel, how, cname, cmd) = i_case
        r = work / f"damaged{i}"
        shutil.copytree(upstream, r)
        p = r / rel
        data = p.read_bytes()
        bad = data[: len(data) // 2] if how == "half" else random.Random(f"{name}-{how}").randbytes(len(data))
        p.write_bytes(bad)
        before = (p.read_bytes(), p.stat().st_mtime_ns)
        out = subprocess.run(child(cmd(r)), env=child_env(), capture_output=True, text=True, timeout=600)
        err = out.stderr
        unchanged = (p.read_bytes(), p.stat().st_mtime_ns) == before and not (p.parent / (p.name + ".tmp")).exists()
        ok = out.returncode not in (0, -signal.SIGKILL) and "Traceback" not in err and str(p) in err and unchanged
        last = err.strip().splitlines()[-1] if err.strip() else "(no stderr)"
        shutil.rmtree(r)
        why = []
        if out.returncode == 0:
            why.append("exit 0")
        if "Traceback" in err:
            why.append("traceback")
        if str(p) not in err:
            why.append("file not named")
        if not unchanged:
            why.append("file modified")
        return ok, f"  {'ok  ' if ok else 'FAIL'} {rel} {how:7s} {cname:25s} exit {out.returncode}: {last[:240]}" + \
            (f"  [{', '.join(why)}]" if why else "")

    with ThreadPoolExecutor(workers) as ex:
        results = list(ex.map(one, enumerate(cases)))
    for _, line in results:
        say(line)
    return sum(ok for ok, _ in results), len(results)


# ---------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs in all, spread over the 7 stages (default 20)")
    ap.add_argument("--workers", type=int, default=2, help="trials run side by side (each process on one thread)")
    ap.add_argument("--workdir", default=None, help="where the runs go (default: a temp dir, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--reuse", action="store_true", help="reuse --workdir's finished upstream run (when debugging)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: kills, disk, damaged")
    ap.add_argument("--stages", default=",".join(ORDER), help="the stages whose trials the kills are spread over")
    ap.add_argument("--damaged", choices=("all", "few"), default="all",
                    help="all: each file cut to half and overwritten, read by every command; few: see damaged_files")
    ap.add_argument("--pipeline", default=RUN_ARGS[2].split("=")[1],
                    help="the stages of the upstream pipeline (their trials need theirs; the damaged files are ppo's)")
    ap.add_argument("--docs-text", action="store_true",
                    help="pretrain on the repo's README and docs/ instead of pipeline-tiny's embedded+tasks text")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 kill, few damaged files (the same code)")
    a = ap.parse_args()
    if a.quick:  # the quick sizes are defaults: an option on the command line still wins
        ap.set_defaults(**QUICK)
        a = ap.parse_args()
    stages = [s for s in ORDER if s in a.stages.split(",")]
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    t_start = time.perf_counter()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="faults-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    say(f"faults bench: seed {a.seed}, {a.kills} kills, {a.workers} workers, work dir {work}")
    # every command line built from RUN_ARGS (the upstream, `run` trials, damaged files) takes these
    RUN_ARGS[2] = f"pipeline.stages={a.pipeline}"
    RUN_STAGES[:] = [s for s in RUN_STAGES if s in a.pipeline.split(",")]
    if a.docs_text:
        root = Path(__file__).resolve().parents[1]
        docs = work / "docs.txt"
        docs.write_text("".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))]))
        RUN_ARGS.append(f"data.source={docs}")
    try:
        upstream = work / "upstream"
        log = work / "upstream.saves"
        if a.reuse and (work / "upstream.seconds").exists():
            up_s = float((work / "upstream.seconds").read_text())
        else:
            if upstream.exists():
                shutil.rmtree(upstream)
            log.unlink(missing_ok=True)
            t = time.perf_counter()
            out = subprocess.run(child(["run", "--out", upstream, *RUN_ARGS]), env=child_env(save_log=log),
                                 capture_output=True, text=True, timeout=900)
            if out.returncode != 0:
                raise SystemExit(f"the upstream run failed:\n{out.stderr[-3000:]}")
            up_s = time.perf_counter() - t
            (work / "upstream.seconds").write_text(str(up_s))
        up_saves = [(s, int(n)) for s, n in (x.split() for x in log.read_text().splitlines())]
        say(f"upstream / reference pipeline: `chatfactory run` {' '.join(RUN_ARGS[:2])} … in {up_s:.1f} s "
            f"({len(up_saves)} checkpoint saves)")

        results, kill_total, stages_hit = [], 0, set()
        ref_pretrain = None
        if "kills" not in skip:
            say(f"\n1. SIGKILL and resume ({a.kills} kills over {', '.join(stages)})")
            plan = split_kills(a.kills, stages)
            benches = []
            for s in stages:
                b = StageBench(s, work, upstream, a.seed, plan[s])
                b.upstream_s, b.upstream_saves = up_s, up_saves
                benches.append(b)
            with ThreadPoolExecutor(a.workers) as ex:
                done = list(ex.map(lambda b: b(), benches))
            for b in done:
                results += b.results
                if b.stage == "pretrain":
                    ref_pretrain = b.ref
            kill_total = sum(r["kills"] for r in results)
            stages_hit = {r["stage"] for r in results if r["kills"]}
            for r in results:
                if not r["equal"]:
                    say(f"  MISMATCH {r['stage']} trial {r['trial']}: {r['diff']}")
        disk = {"clear": "skipped", "loadable": "skipped"}
        if "disk" not in skip:
            say("\n2. Full disk during a checkpoint save")
            if ref_pretrain is None:
                b = StageBench("pretrain", work, upstream, a.seed, [])
                b.reference()
                ref_pretrain = b.ref
            disk = disk_full(work, upstream, ref_pretrain)
        named, cases = 0, 0
        if "damaged" not in skip:
            say("\n3. Damaged files (each cut to half, or random bytes) read through the CLI")
            named, cases = damaged_files(work, upstream, a.workers, few=a.damaged == "few")
    finally:
        for d in work.glob("*-trial*"):  # trial and reference runs (the logs stay with --keep)
            if d.is_dir() and not a.keep:
                shutil.rmtree(d, ignore_errors=True)
        if not a.keep and not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    equal = sum(r["equal"] for r in results)
    say(f"RESULT kills={kill_total} stages={len(stages_hit)} bitwise_equal={equal}/{len(results)} "
        f"disk_full_clear_error={disk['clear']} previous_checkpoint_loadable={disk['loadable']} "
        f"corrupt_files_named={named}/{cases} wall_s={time.perf_counter() - t_start:.0f}")


if __name__ == "__main__":
    main()
