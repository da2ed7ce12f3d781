"""The flywheel on a run, through a real server: simulated raters vote, `learn` makes the next version.

Copies ``--run`` (a finished demo run) to ``--out``, serves its policy with ``chatfactory serve``'s app on
a free port, and lets raters (data/raters.py) vote over HTTP as the web UI's compare mode does: each asks
``POST /v1/chat/completions`` for two sampled answers (n=2) to a prompt of the run's RL split — never a dev
or held-out prompt — and posts its choice to ``POST /v1/feedback`` with its own ``cf_rater`` cookie. Then
one ``learn`` round (learn.py) runs in this process and the gate decides. ``--raters gold`` is the real
round (the rubric with ``--noise`` random votes); ``shuffled`` is the control (votes without a
preference) and ``longer`` the negative case (a rater that always prefers the longer answer); both must
fail the gate.

    .venv/bin/python bench/flywheel.py --run runs/demo --out /tmp/fly --votes 300 --raters gold
    .venv/bin/python bench/flywheel.py --quick      # smoke test (tests/test_benches.py): a pipeline-tiny run
"""

from __future__ import annotations

import argparse
import http.cookiejar
import json
import random
import shutil
import sys
import time
import urllib.request
from pathlib import Path

from chatfactory.config import load_config
from chatfactory.data.raters import rater_choice, vote_body
from chatfactory.learn import learn_round
from chatfactory.serve.api import create_app
from chatfactory.serve.limits import ServerLimits
from chatfactory.serve.server import ServerThread
from chatfactory.serve.service import load_service

# --quick: a pipeline-tiny run made here (tokenizer, pretrain, SFT, comparisons, reward; version 1 = its SFT)
QUICK = dict(votes=60, n_raters=3, stage="sft")
QUICK_ROUND = ["learn.min_pairs=5", "learn.dev_rows=24", "learn.policy_epochs=1"]


def tiny_run(where: Path) -> Path:
    """A pipeline-tiny run up to its reward model, through the CLI (seconds)."""
    import subprocess

    subprocess.run([str(Path(sys.executable).parent / "chatfactory"), "run", "--config", "pipeline-tiny", "--out",
                    str(where), "pipeline.stages=pretrain,sft,comparisons,reward"], check=True, capture_output=True)
    return where


class Rater:
    """One simulated person: a cookie jar (the server's ``cf_rater``) and a kind of judgement."""

    def __init__(self, url: str, kind: str, seed: int, noise: float):
        self.url, self.kind, self.noise, self.rng = url, kind, noise, random.Random(seed)
        self.http = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def call(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with self.http.open(req, timeout=120) as r:
            return json.loads(r.read())

    def vote(self, row: dict, max_tokens: int, temperature: float) -> str:
        out = self.call("/v1/chat/completions", {"messages": row["messages"], "n": 2, "max_tokens": max_tokens,
                                                 "temperature": temperature, "seed": self.rng.randrange(2**31)})
        a, b = (c["message"]["content"] for c in out["choices"])
        choice = rater_choice(self.kind, row, a, b, self.rng, self.noise)
        self.call("/v1/feedback", vote_body(row, a, b, choice, shown_left=self.rng.randrange(2),
                                            models=[out["model"], out["model"]]))
        return choice


def collect(run: Path, stage: str, votes: int, kind: str, n_raters: int, noise: float, seed: int,
            max_tokens: int, temperature: float) -> dict:
    rows = [json.loads(line) for line in (run / "tasks" / "prompts.jsonl").read_text(encoding="utf-8").splitlines()]
    random.Random(seed).shuffle(rows)
    limits = ServerLimits(feedback_per_minute=1e6, feedback_burst=10**6)  # every simulated rater is 127.0.0.1
    svc = load_service(run, stage, server_limits=limits)
    counts: dict[str, int] = {}
    t0 = time.perf_counter()
    with ServerThread(create_app(svc), limits=limits) as url:
        raters = [Rater(url, kind, seed * 1000 + i, noise) for i in range(n_raters)]
        for i in range(votes):
            c = raters[i % n_raters].vote(rows[i % len(rows)], max_tokens, temperature)
            counts[c] = counts.get(c, 0) + 1
            if (i + 1) % 50 == 0:
                print(f"  {i + 1}/{votes} votes ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    svc.close()
    return {"votes": votes, "choices": counts, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo", help="a finished run (tasks/, sft, reward and a policy stage)")
    ap.add_argument("--out", default="/tmp/flywheel", help="where the copy lives (replaced)")
    ap.add_argument("--quick", action="store_true", help="smoke test: a pipeline-tiny run made here, few votes")
    ap.add_argument("--stage", default="ppo", help="the stage version 1 serves")
    ap.add_argument("--votes", type=int, default=300)
    ap.add_argument("--raters", default="gold", choices=("gold", "shuffled", "longer"))
    ap.add_argument("--n-raters", type=int, default=3)
    ap.add_argument("--noise", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="config overrides for the round, e.g. learn.policy=ppo")
    a = ap.parse_args()
    if a.quick:  # the quick sizes are defaults: an option on the command line still wins
        ap.set_defaults(**QUICK)
        a = ap.parse_args()
        import tempfile

        a.run = str(tiny_run(Path(tempfile.mkdtemp(prefix="flywheel-quick-")) / "run"))
        a.out, a.overrides = a.run + "-copy", QUICK_ROUND + a.overrides
    src, out = Path(a.run), Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("versions", "feedback.sqlite*", "state.pt"))
    cfg = load_config(str(out / "config.yaml"), [f"learn.serve_stage={a.stage}", *a.overrides])
    got = collect(out, a.stage, a.votes, a.raters, a.n_raters, a.noise, a.seed, cfg.pipeline.eval_max_tokens,
                  cfg.pipeline.eval_temperature)
    print(f"votes: {got}", flush=True)
    res = learn_round(cfg, out)
    g = res.get("gate", {}).get("checks", {})
    print(json.dumps({k: res.get(k) for k in ("version", "status", "serving", "seconds")}, indent=1))
    print(f"RESULT raters={a.raters} votes={a.votes} vote_s={got['seconds']:.0f} status={res['status']} "
          f"win={g.get('win_rate', {}).get('value', float('nan')):.3f} "
          f"win_lo={g.get('win_rate', {}).get('lo', float('nan')):.3f} "
          f"length_ratio={g.get('length', {}).get('ratio', float('nan')):.3f} "
          f"learn_s={sum((res.get('seconds') or {}).values()):.0f}")


if __name__ == "__main__":
    main()
