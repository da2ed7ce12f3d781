"""`chatfactory learn`: one turn of the flywheel — people's votes become the next served version.

InstructGPT repeated its reward-model and RL steps on fresh comparisons; ChatGPT collects its users'
thumbs and "which response do you prefer?". Here a round reads the votes that people gave in the web UI
(or through ``POST /v1/feedback``) since the last round, and:

    1. export    the new votes -> pairs (serve/feedback.py's rules: ties and both-bad give no pair, a
                 rater's repeat vote counts once, at most ``learn.max_per_rater`` pairs a rater, equal
                 answers dropped); every ``heldout_every``-th pair is held out. Fewer than
                 ``learn.min_pairs`` new pairs: the round says so and stops, changing nothing
    2. reward    the served version's reward model continued on every round's pairs so far (old + new),
                 measured on this round's held-out pairs
    3. policy    from the served version: DPO on the new pairs (``learn.policy=dpo``), or PPO against the
                 round's reward model with the KL to SFT (``ppo``)
    4. gate      the candidate against the served version on the dev prompts (eval/gate.py): win rate,
                 checked accuracy, KL to SFT, reply length
    5. promote   passed: ``versions/serving.json`` names the candidate, and a server watching it switches;
                 failed: the candidate stays on record as rejected and the served version stays

With ``learn.gate=arena`` a candidate that passed the dev gate goes to the arena first
(``versions/arena.json``; the server battles it against the served version, anonymously, in the web UI),
and the round ends there; run ``learn`` again: once ``learn.arena_votes`` votes are in, it is promoted if
people ranked it above the served version with a bootstrap interval that excludes a tie, else rejected.

Everything lives in ``RUN/versions/N/`` (store/versions.py): ``votes.jsonl`` (the pairs it trained on),
``votes_heldout.jsonl``, ``reward/``, ``dpo/`` or ``ppo/``, ``gate.json``, ``version.json``. A round
killed at any point resumes where it stopped when the command is run again: the export is written once,
each stage resumes from its checkpoint, the gate samples with a fixed seed.

    chatfactory learn --run runs/demo                   # one round
    chatfactory learn --run runs/demo learn.policy=ppo learn.min_pairs=100
    chatfactory rollback --run runs/demo [--to 1]
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

from .config import Config
from .eval.gate import run_gate
from .serve.feedback import FILENAME as FEEDBACK_FILE
from .serve.feedback import FeedbackStore
from .store.checkpoint import latest_stage, stage_finished
from .store.files import atomic_write_text
from .store.versions import Versions


def split_pairs(path: Path, train: Path, heldout: Path, every: int) -> tuple[int, int]:
    """Every ``every``-th pair by vote id to ``heldout``, the rest to ``train`` -> (train, held out) counts."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    keep = [r for r in rows if not every or r.get("vote_id", 0) % every]
    held = [r for r in rows if every and r.get("vote_id", 0) % every == 0]
    for dest, part in ((train, keep), (heldout, held)):
        atomic_write_text(dest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    return len(keep), len(held)


def _export(cfg: Config, run_dir: Path, versions: Versions, n: int, log) -> dict:
    """Step 1, written once per round: the new votes as pairs in versions/N/."""
    vdir, s = versions.dir(n), cfg.learn
    info = versions.info(n)
    if "export" in info:
        return info["export"]
    db = run_dir / FEEDBACK_FILE
    if not db.exists():
        raise FileNotFoundError(f"{db}: no votes yet (serve the run and let people rate answers: "
                                f"chatfactory serve --run {run_dir})")
    after = versions.last_vote_id(exclude=n)
    raw = vdir / "votes_all.jsonl"
    stats = FeedbackStore(db).export_round(raw, after_id=after, max_per_rater=s.max_per_rater,
                                           negatives_path=vdir / "negatives.jsonl")
    stats["train"], stats["heldout"] = split_pairs(raw, vdir / "votes.jsonl", vdir / "votes_heldout.jsonl",
                                                   s.heldout_every)
    stats["after_id"] = after
    log(f"[learn] version {n}: {stats['pairs']} new pairs from {stats['votes']} votes by {stats['raters']} raters "
        f"(after vote {after}; dropped {stats['dropped']}); {stats['train']} train, {stats['heldout']} held out")
    versions.write_info(n, export=stats, last_vote_id=stats["last_id"])
    return stats


def _reward(cfg: Config, versions: Versions, n: int, parent: int, log) -> Path:
    """Step 2: the served version's reward model continued on every round's pairs so far."""
    vdir = versions.dir(n)
    out = vdir / "reward"
    if not stage_finished(out):
        c = copy.deepcopy(cfg)
        earlier = [versions.dir(k) / "votes.jsonl" for k in versions.numbers()
                   if k < n and (versions.dir(k) / "votes.jsonl").exists()]
        c.reward.data = ",".join(str(p) for p in earlier + [vdir / "votes.jsonl"])
        c.reward.val_data = str(vdir / "votes_heldout.jsonl") if versions.info(n)["export"]["heldout"] else ""
        c.reward.max_pairs = 0
        c.reward.init_from = str(versions.reward_dir(parent))
        log(f"[learn] version {n}: reward model from {c.reward.init_from} on {len(earlier) + 1} rounds of votes")
        from .train.reward import run_reward

        run_reward(c, vdir)
    versions.write_info(n, reward="reward")
    return out


def _policy(cfg: Config, run_dir: Path, versions: Versions, n: int, parent: int, log) -> Path:
    """Step 3: the candidate policy from the served one."""
    s, vdir = cfg.learn, versions.dir(n)
    start = str(versions.policy_dir(parent).resolve())
    c = copy.deepcopy(cfg)
    if s.policy == "dpo":
        c.dpo.data = str(vdir / "votes.jsonl")
        c.dpo.val_data = str(vdir / "votes_heldout.jsonl") if versions.info(n)["export"]["heldout"] else ""
        c.dpo.init_from, c.dpo.ref_from, c.dpo.max_pairs = start, start, 0
        c.dpo.lr, c.dpo.epochs = s.policy_lr or c.dpo.lr, s.policy_epochs or c.dpo.epochs
        if not stage_finished(vdir / "dpo"):
            log(f"[learn] version {n}: DPO from version {parent} on this round's pairs")
            from .train.dpo import run_dpo

            run_dpo(c, vdir)
    elif s.policy == "ppo":
        c.ppo.init_from, c.ppo.ref_from = start, str((run_dir / "sft").resolve())
        c.ppo.reward, c.ppo.lr = str((vdir / "reward").resolve()), s.policy_lr or c.ppo.lr
        c.ppo.prompts = c.ppo.prompts or str(run_dir / "tasks" / "prompts.jsonl")
        if c.ppo.keep_best and not c.ppo.eval_prompts:  # the iteration kept is chosen on the dev prompts
            c.ppo.eval_prompts = s.dev_prompts or str(run_dir / "tasks" / "dev.jsonl")
            c.ppo.gold = c.ppo.gold or s.judge or "chatfactory.data.rubric:rubric_score"
        if not stage_finished(vdir / "ppo"):
            log(f"[learn] version {n}: PPO from version {parent} against this round's reward model")
            from .train.ppo import run_ppo

            run_ppo(c, vdir)
    else:
        raise ValueError(f"learn.policy must be 'dpo' or 'ppo', got {s.policy!r}")
    versions.write_info(n, policy=s.policy)
    return vdir / s.policy


def arena_check(run_dir: Path, versions: Versions, n: int, parent: int, min_votes: int) -> dict:
    """People's arena votes between the candidate and the served version (``learn.gate=arena``): passed when
    there are ``min_votes`` of them and the candidate ranks above with a bootstrap interval of the gap
    that excludes a tie (eval/leaderboard.py)."""
    from .eval.leaderboard import difference_interval, leaderboard

    cand, serv = versions.name(n), versions.name(parent)
    db = run_dir / FEEDBACK_FILE
    battles = [b for b in (FeedbackStore(db).battles() if db.exists() else []) if {b["a"], b["b"]} == {cand, serv}]
    out = {"votes": len(battles), "need": f">= {min_votes} votes, ranked above {serv} with the gap's interval > 0",
           "passed": False}
    if len(battles) < min_votes:
        return out
    board = leaderboard(battles)
    lo, hi = difference_interval(board, cand, serv)
    score = {r["model"]: r["score"] for r in board}
    out.update(value=score[cand] - score[serv], lo=lo, hi=hi, passed=lo > 0)
    return out


def learn_round(cfg: Config, run_dir, log=print, device: str = "cpu") -> dict:
    """One round (see the module docstring) -> {"version", "status", "gate", "seconds", ...}."""
    run_dir, t0 = Path(run_dir), time.perf_counter()
    versions = Versions(run_dir)
    if not versions.numbers():
        stage = cfg.learn.serve_stage or latest_stage(run_dir)
        reward = run_dir / "reward"
        versions.ensure_first(run_dir / stage, reward if stage_finished(reward) else None)
        log(f"[learn] version 1 is the run's {stage}")
    parent = versions.serving()
    if versions.reward_dir(parent) is None:
        raise ValueError(f"version {parent} has no reward model to continue (train the run's reward stage first)")
    n = versions.candidate(parent)
    vdir = versions.dir(n)
    for d in (vdir, versions.dir(1)):  # the stages started from a version read the run's tokenizer beside it
        if not (d / "tokenizer.json").exists():
            shutil.copyfile(run_dir / "tokenizer.json", d / "tokenizer.json")
    times: dict[str, float] = dict(versions.info(n).get("seconds") or {})

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        times[name] = times.get(name, 0.0) + time.perf_counter() - t
        versions.write_info(n, seconds=times)
        return out

    stats = timed("export", lambda: _export(cfg, run_dir, versions, n, log))
    if stats["pairs"] < cfg.learn.min_pairs:
        versions.discard(n)
        msg = (f"{stats['pairs']} new pairs since the last round (vote {stats['after_id']}), fewer than "
               f"learn.min_pairs={cfg.learn.min_pairs}: no round; collect more votes")
        log(f"[learn] {msg}")
        return {"version": None, "status": "too_few_pairs", "export": stats, "message": msg,
                "serving": versions.serving()}
    timed("reward", lambda: _reward(cfg, versions, n, parent, log))
    cand = timed("policy", lambda: _policy(cfg, run_dir, versions, n, parent, log))
    gate_path = vdir / "gate.json"
    if gate_path.exists():
        gate = json.loads(gate_path.read_text(encoding="utf-8"))
    else:
        gate = timed("gate", lambda: run_gate(cfg, run_dir, cand, versions.policy_dir(parent), run_dir / "sft",
                                              vdir / "reward", device))
        gate["parent"] = parent
        atomic_write_text(gate_path, json.dumps(gate, indent=1))
    if cfg.learn.gate == "arena" and gate["passed"] and "arena" not in gate["checks"]:
        arena = arena_check(run_dir, versions, n, parent, cfg.learn.arena_votes)
        if arena["votes"] < cfg.learn.arena_votes:
            versions.set_arena_candidate(n)  # a server following RUN/versions puts it in the arena
            msg = (f"version {n} passed the dev gate and is in the arena: {arena['votes']} of "
                   f"learn.arena_votes={cfg.learn.arena_votes} votes so far; run learn again to decide")
            log(f"[learn] {msg}")
            return {"version": n, "status": "in_arena", "gate": gate, "export": stats, "message": msg,
                    "serving": versions.serving(), "seconds": times}
        gate["checks"]["arena"] = arena
        gate["passed"] = arena["passed"]
        atomic_write_text(gate_path, json.dumps(gate, indent=1))
    if cfg.learn.gate == "arena" and versions.arena_candidate() == n:
        versions.set_arena_candidate(None)
    if gate["passed"]:
        versions.promote(n)
    else:
        versions.reject(n)
    status = versions.info(n)["status"]
    log(f"[learn] version {n}: gate {'passed' if gate['passed'] else 'failed'} — " + "; ".join(
        f"{k} {v.get('value', '-') if not isinstance(v.get('value'), float) else round(v['value'], 3)}"
        f" ({'ok' if v['passed'] else 'FAIL'})" for k, v in gate["checks"].items())
        + f"; serving version {versions.serving()}")
    return {"version": n, "status": status, "gate": gate, "export": stats, "serving": versions.serving(),
            "seconds": times, "wall": time.perf_counter() - t0}
