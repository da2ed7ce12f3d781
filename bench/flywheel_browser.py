"""The flywheel end to end in a real browser: raters use the web UI, `learn` makes version 2, the running
server switches to it under load, and the arena ranks the versions.

On a copy of a finished demo run (``--run``), served by ``chatfactory serve`` (a subprocess, with an API
key, following RUN/versions/serving.json), scripted raters drive the page in Chromium (Playwright,
Debian's chromium): each is a browser context of its own (its own ``cf_rater`` cookie), types prompts of
the run's RL split (never dev or held-out prompts), votes in compare mode by the rubric (data/raters.py,
``--noise`` of votes random), and now and then chats, regenerates and rates with a thumb. Then:

    1. ``chatfactory learn`` (a subprocess) while ``--clients`` threads keep chatting over the API: the
       gate's figures, and every request of the load through the switch (failures counted)
    2. the arena between versions 1 and 2 (set by the admin route), ``--arena-votes`` votes in the page;
       ``GET /v1/leaderboard``: the order and whether the bootstrap interval of the gap excludes a tie
    3. version 2 against version 1 on the held-out prompts (the rubric judges, as the report does)
    4. a second round: ``--votes`` more compare votes on version 2's answers, ``learn`` again: version 3
    5. screenshots of compare mode, an arena battle and the leaderboard (``--shots DIR``)

    .venv/bin/python bench/flywheel_browser.py --run runs/demo --out /tmp/flyb --shots docs/img
    .venv/bin/python bench/flywheel_browser.py --quick    # smoke test (tests/test_benches.py): a pipeline-tiny run
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from chatfactory.config import load_config
from chatfactory.data.raters import rater_choice
from chatfactory.data.rubric import rubric_score
from chatfactory.eval.heldout import read_rows, replies_of, score_replies, win_vs
from chatfactory.store.load import load_model
from chatfactory.store.versions import Versions
from chatfactory.text.tokenizer import Tokenizer

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "flywheel-bench-key"
BIN = Path(sys.executable).parent / "chatfactory"


def api(url: str, path: str, body: dict | None = None, timeout: float = 120) -> dict:
    req = urllib.request.Request(url + path, json.dumps(body).encode() if body is not None else None,
                                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def start_server(run: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(BIN), "serve", "--run", str(run), "--port", str(port), "--api-key", KEY,
                             "--feedback-rate", "1000000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            api(url, "/health", timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("chatfactory serve did not start")


# --quick: a pipeline-tiny run made here (bench/flywheel.py's tiny_run), a few votes of each kind
QUICK = dict(votes=40, arena_votes=10, raters=2, clients=2, stage="sft")


class Rater:
    """One person at the web UI: a browser context (cookies of its own), the API key typed into Settings."""

    def __init__(self, browser, url: str, seed: int, noise: float, temperature: float):
        self.ctx = browser.new_context(locale="en-US", bypass_csp=True, viewport={"width": 1100, "height": 800})
        self.page, self.rng, self.noise = self.ctx.new_page(), random.Random(seed), noise
        self.page.goto(url + "/")
        self.page.click("#settings-toggle")
        self.page.fill("#apikey", KEY)
        self.page.press("#apikey", "Tab")  # its change event stores it (sessionStorage) and asks for the model
        self.page.wait_for_function("document.getElementById('model').textContent.includes('/v')")
        self.page.check("#compare")
        self.page.fill("#temperature", str(temperature))  # a range input: fill sets its value
        self.page.dispatch_event("#temperature", "input")
        self.page.click("#settings-toggle")

    def _answers(self, where):
        boxes = where.locator(".msg.assistant")
        texts = [boxes.nth(i).locator(".content").inner_text() for i in range(2)]
        xs = [boxes.nth(i).bounding_box()["x"] for i in range(2)]
        return boxes, texts, (0 if xs[0] < xs[1] else 1)

    def compare_vote(self, row: dict) -> str:
        p = self.page
        p.click("#tab-chat")
        p.click("#new-chat")
        p.fill("#input", row["messages"][-1]["content"])
        p.press("#input", "Enter")
        cmp = p.locator("#chat .compare").last  # (arena battles are .compare rows too, in their own panel)
        cmp.locator(".tie").wait_for()
        p.wait_for_function("!document.getElementById('stop') || document.getElementById('stop').disabled")
        boxes, texts, left = self._answers(cmp)
        choice = rater_choice("gold", row, texts[0], texts[1], self.rng, self.noise)  # "a" = answers[0]
        if choice in ("a", "b"):
            boxes.nth(0 if choice == "a" else 1).locator("button.prefer").click()
        else:
            cmp.locator(".tie" if choice == "tie" else ".both-bad").click()
        cmp.locator("button:disabled").first.wait_for()
        return choice

    def chat_regenerate_rate(self, row: dict) -> None:
        """A plain chat turn, regenerated once, the second answer rated with a thumb by the rubric."""
        p = self.page
        p.click("#tab-chat")
        p.click("#new-chat")
        p.click("#settings-toggle")
        p.uncheck("#compare")
        p.click("#settings-toggle")
        p.fill("#input", row["messages"][-1]["content"])
        p.press("#input", "Enter")
        p.wait_for_function("!document.getElementById('regenerate').disabled")
        p.click("#regenerate")
        p.wait_for_function("!document.getElementById('regenerate').disabled")
        last = p.locator("#chat .msg.assistant").last
        good = rubric_score(row, last.locator(".content").inner_text()) >= 0.65  # right, on topic, concise
        if self.rng.random() < self.noise:
            good = not good
        last.locator(".thumb-up" if good else ".thumb-down").click()
        p.click("#settings-toggle")
        p.check("#compare")
        p.click("#settings-toggle")

    def arena_vote(self, row: dict) -> str:
        p = self.page
        p.click("#tab-arena")
        n = p.locator("#arena-battles .arena").count()
        p.fill("#arena-input", row["messages"][-1]["content"])
        p.press("#arena-input", "Enter")
        battle = p.locator("#arena-battles .arena").nth(n)
        battle.locator("button.prefer >> nth=1").wait_for()
        boxes, texts, left = self._answers(battle)
        choice = rater_choice("gold", row, texts[0], texts[1], self.rng, self.noise)
        if choice in ("a", "b"):
            boxes.nth(0 if choice == "a" else 1).locator("button.prefer").click()
        else:
            battle.locator(".tie" if choice == "tie" else ".both-bad").click()
        battle.locator(".model-name >> nth=1").wait_for()
        return choice


def vote_round(raters, rows, kind: str, every_chat: int = 25) -> dict:
    counts: dict[str, int] = {}
    t0 = time.perf_counter()
    for i, row in enumerate(rows):
        r = raters[i % len(raters)]
        if kind == "compare" and every_chat and i % every_chat == every_chat - 1:
            r.chat_regenerate_rate(row)
        c = r.compare_vote(row) if kind == "compare" else r.arena_vote(row)
        counts[c] = counts.get(c, 0) + 1
        if (i + 1) % 50 == 0:
            print(f"  {kind}: {i + 1}/{len(rows)} votes, {time.perf_counter() - t0:.0f} s", flush=True)
    return {"votes": len(rows), "choices": counts, "seconds": round(time.perf_counter() - t0, 1)}


def learn_under_load(run: Path, url: str, clients: int, rows: list[dict], overrides=()) -> dict:
    """``chatfactory learn`` while ``clients`` threads chat; -> the round's summary and the load's counts."""
    stop, ok, failed, models = threading.Event(), [0], [], set()

    def client(k: int) -> None:
        rng = random.Random(k)
        while not stop.is_set():
            row = rng.choice(rows)
            try:
                out = api(url, "/v1/chat/completions", {"messages": row["messages"], "max_tokens": 24,
                                                        "temperature": 1.0}, timeout=60)
                models.add(out["model"])
                ok[0] += 1
            except Exception as e:  # noqa: BLE001 — every failure is what this counts
                failed.append(repr(e))

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    out = subprocess.run([str(BIN), "learn", "--run", str(run), *overrides], capture_output=True, text=True)
    learn_s = time.perf_counter() - t0
    if out.returncode:
        stop.set()
        raise RuntimeError("learn failed:\n" + out.stderr[-3000:])
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    want = f"{run.name}/v{summary['serving']}"
    deadline = time.time() + 60
    while time.time() < deadline and api(url, "/v1/models")["data"][0]["id"] != want:
        time.sleep(0.2)
    swapped = time.perf_counter() - t0
    time.sleep(5)  # the load goes on across the switch
    stop.set()
    for t in threads:
        t.join(timeout=90)
    return {**summary, "learn_s": round(learn_s, 1), "served_after_s": round(swapped, 1), "load_ok": ok[0],
            "load_failed": len(failed), "failures": failed[:5], "load_models": sorted(models)}


def heldout_win(run: Path, a: int, b: int) -> dict:
    cfg = load_config(str(run / "config.yaml"))
    rows, tok, v = read_rows(run / "tasks" / "heldout.jsonl"), Tokenizer.load(run / "tokenizer.json"), Versions(run)
    ra = replies_of(load_model(v.policy_dir(a))[0], tok, rows, cfg.pipeline)[0]
    rb = replies_of(load_model(v.policy_dir(b))[0], tok, rows, cfg.pipeline)[0]
    w = win_vs(rows, ra, rb)
    return {"n": len(rows), "win_rate": w["win_rate"], "wins_ties_losses": [w["wins"], w["ties"], w["losses"]],
            "accuracy": [score_replies(rows, r)["accuracy"] for r in (ra, rb)],
            "mean_chars": [sum(map(len, r)) / len(r) for r in (ra, rb)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--out", default="/tmp/flywheel-browser")
    ap.add_argument("--stage", default="ppo", help="the run's stage that becomes version 1")
    ap.add_argument("--votes", type=int, default=300, help="compare-mode votes per round")
    ap.add_argument("--arena-votes", type=int, default=600)
    ap.add_argument("--raters", type=int, default=3)
    ap.add_argument("--noise", type=float, default=0.15)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="the raters set this in Settings (the page's default is 0.8; the demo samples at 1.0)")
    ap.add_argument("--shots", default="", help="folder for the screenshots ('' = none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke test: a pipeline-tiny run made here, few votes")
    ap.add_argument("overrides", nargs="*", help="config overrides for the learn rounds, e.g. learn.min_pairs=20")
    a = ap.parse_args()
    if a.quick:
        ap.set_defaults(**QUICK)
        a = ap.parse_args()
        import tempfile

        sys.path.insert(0, str(Path(__file__).parent))
        from flywheel import QUICK_ROUND, tiny_run

        a.run = str(tiny_run(Path(tempfile.mkdtemp(prefix="flywheel-browser-quick-")) / "run"))
        a.out, a.overrides = a.run + "-copy", QUICK_ROUND + a.overrides
    from playwright.sync_api import sync_playwright

    src, run = Path(a.run), Path(a.out)
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("versions", "feedback.sqlite*", "state.pt"))
    cfg = load_config(str(src / "config.yaml"))
    if cfg.learn.policy_lr == 0:  # a demo run made before the learn section: the preset's round settings
        preset = load_config("demo")
        (run / "config.yaml").write_text((run / "config.yaml").read_text() + "\nlearn:\n"
                                         f"  policy_lr: {preset.learn.policy_lr}\n"
                                         f"  policy_epochs: {preset.learn.policy_epochs}\n")
    Versions(run).ensure_first(run / a.stage, run / "reward")
    rows = [json.loads(line) for line in (run / "tasks" / "prompts.jsonl").read_text(encoding="utf-8").splitlines()]
    random.Random(a.seed).shuffle(rows)
    res: dict = {}
    proc, url = start_server(run)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            raters = [Rater(browser, url, a.seed * 100 + i, a.noise, a.temperature) for i in range(a.raters)]
            res["round1_votes"] = vote_round(raters, rows[:a.votes], "compare")
            if a.shots:
                Path(a.shots).mkdir(parents=True, exist_ok=True)
                raters[0].page.screenshot(path=str(Path(a.shots) / "flywheel-compare.png"))
            res["round1"] = learn_under_load(run, url, a.clients, rows[:a.votes], a.overrides)
            print(json.dumps(res["round1"]), flush=True)
            if res["round1"]["status"] == "promoted":
                res["arena_setup"] = api(url, "/v1/admin/arena", {"versions": [1, res["round1"]["version"]]})
                arena_rows = rows[a.votes:a.votes + a.arena_votes]
                res["arena_votes"] = vote_round(raters, arena_rows, "arena")
                if a.shots:
                    raters[1].page.screenshot(path=str(Path(a.shots) / "flywheel-arena.png"))
                board = api(url, "/v1/leaderboard")
                res["leaderboard"] = {k: board[k] for k in ("battles", "data", "gaps")}
                if a.shots:
                    pg = raters[2].page
                    pg.click("#tab-board")
                    pg.wait_for_selector("#board tbody tr >> nth=1")
                    pg.screenshot(path=str(Path(a.shots) / "flywheel-leaderboard.png"))
                res["heldout_v2_vs_v1"] = heldout_win(run, res["round1"]["version"], 1)
                start = a.votes + a.arena_votes
                res["round2_votes"] = vote_round(raters, rows[start:start + a.votes], "compare")
                res["round2"] = learn_under_load(run, url, a.clients, rows[:a.votes], a.overrides)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    (run / "flywheel_browser.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    r1, board = res["round1"], res.get("leaderboard", {})
    top = board.get("data", [{}])[0].get("model") if board else None
    gap = (board.get("gaps") or [{}])[0]
    h = res.get("heldout_v2_vs_v1", {})
    print(f"RESULT votes={a.votes} round1={r1['status']} learn_s={r1['learn_s']} load_failed={r1['load_failed']} "
          f"load_ok={r1['load_ok']} arena_votes={board.get('battles', 0)} arena_top={top} "
          f"arena_separated={gap.get('separated')} heldout_win_v2_v1={h.get('win_rate', float('nan')):.3f} "
          f"round2={res.get('round2', {}).get('status')} round2_version={res.get('round2', {}).get('version')}")


if __name__ == "__main__":
    main()
