"""The versions of a run that people are served: ``RUN/versions/N/``, made by the flywheel (learn.py).

Version 1 is the run's own policy when the first round starts; every round makes a candidate N+1 from
the serving version and the votes people gave since the last round; the gate decides whether it is
promoted. Which version is served is one small file, ``RUN/versions/serving.json``, rewritten atomically
(``{"version": N, "history": [...]}``): a server watching it switches to the new version, and
``chatfactory rollback`` moves it back. Nothing else decides what is served.

    RUN/versions/
      serving.json          the version served now, and every promote / rollback before it
      1/version.json        {"version", "parent", "status", "policy", "reward", "created", ...}
      1/policy/             the weights served (a copy of the run's stage, without its resume state)
      2/votes.jsonl ...     a round's files (learn.py); its policy and reward model are stages inside it

A version's ``status`` is ``candidate`` (a round in progress), ``promoted`` (passed its gate; it may
have been rolled back since), ``rejected`` (failed its gate: its figures stay for the record), or
``serving-1`` for the first. Writes are atomic; a kill leaves the old serving.json in place.

    v = Versions("runs/demo")
    v.serving()                # 2
    v.policy_dir(2)            # runs/demo/versions/2/dpo
    v.rollback()               # serves version 1 again
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .checkpoint import has_checkpoint
from .files import CheckpointError, atomic_write_text

STATUSES = ("first", "candidate", "promoted", "rejected")


class Versions:
    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "versions"
        self.serving_file = self.root / "serving.json"

    # ---- reading
    def numbers(self) -> list[int]:
        """Every version with a version.json, ascending."""
        if not self.root.is_dir():
            return []
        return sorted(int(p.name) for p in self.root.iterdir() if p.name.isdigit() and (p / "version.json").exists())

    def info(self, n: int) -> dict:
        path = self.root / str(n) / "version.json"
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no version {n} in {self.root} (versions: {self.numbers() or 'none'})") \
                from None
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{path}: corrupt version record ({e})") from None
        if not isinstance(info, dict) or info.get("version") != n:
            raise CheckpointError(f"{path}: corrupt version record (expected an object with version {n})")
        return info

    def serving_record(self) -> dict:
        if not self.serving_file.exists():
            return {"version": None, "history": []}
        try:
            rec = json.loads(self.serving_file.read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{self.serving_file}: corrupt ({e}); it names the served version") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("version"), int):
            raise CheckpointError(f"{self.serving_file}: corrupt (expected {{\"version\": N, \"history\": [...]}})")
        return rec

    def serving(self) -> int | None:
        """The version served now (None before the first round)."""
        return self.serving_record()["version"]

    def dir(self, n: int) -> Path:
        return self.root / str(n)

    def policy_dir(self, n: int) -> Path:
        return self.dir(n) / self.info(n)["policy"]

    def reward_dir(self, n: int) -> Path | None:
        r = self.info(n).get("reward")
        return None if not r else (self.dir(n) / r if not Path(r).is_absolute() else Path(r))

    def name(self, n: int) -> str:
        """What /v1/models and the leaderboard call version n."""
        return f"{self.run_dir.name}/v{n}"

    # ---- writing
    def write_info(self, n: int, **fields) -> dict:
        path = self.dir(n) / "version.json"
        info = self.info(n) if path.exists() else {"version": n}
        info.update(fields)
        if info.get("status") not in STATUSES:
            raise ValueError(f"version {n}: status must be one of {', '.join(STATUSES)}, got {info.get('status')!r}")
        atomic_write_text(path, json.dumps(info, indent=1))
        return info

    def ensure_first(self, stage_dir, reward_dir=None) -> int:
        """Version 1 from a stage of the run (copied without its resume state, so retraining the run's
        stage later cannot change what was served), served if nothing is; -> 1."""
        stage_dir = Path(stage_dir)
        if 1 not in self.numbers():
            if not has_checkpoint(stage_dir):
                raise CheckpointError(f"{stage_dir}: no trained weights to make version 1 from")
            dest = self.dir(1) / "policy"
            tmp = self.dir(1) / "policy.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(stage_dir, tmp, ignore=shutil.ignore_patterns("state.pt", "*.tmp"))
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
            self.write_info(1, parent=None, status="first", policy="policy", source=str(stage_dir),
                            reward=str(Path(reward_dir).resolve()) if reward_dir else None, created=time.time())
        if self.serving() is None:
            self._serve(1, "first")
        return 1

    def candidate(self, parent: int) -> int:
        """The unfinished candidate made from ``parent`` (a round killed midway resumes it), else a new
        number -> the candidate's version number."""
        for n in self.numbers():
            info = self.info(n)
            if info["status"] == "candidate":
                if info.get("parent") != parent:
                    raise CheckpointError(f"{self.dir(n)}: an unfinished round from version {info.get('parent')}, "
                                          f"but version {parent} is served now; finish or delete it first")
                return n
        n = max(self.numbers(), default=0) + 1
        self.dir(n).mkdir(parents=True, exist_ok=True)
        self.write_info(n, parent=parent, status="candidate", policy=None, reward=None, created=time.time())
        return n

    def discard(self, n: int) -> None:
        """Remove an unfinished candidate (a round that stopped before training: too few votes)."""
        if self.info(n)["status"] != "candidate":
            raise ValueError(f"version {n} is {self.info(n)['status']}, not a candidate: it stays on record")
        shutil.rmtree(self.dir(n))

    def promote(self, n: int) -> None:
        self.write_info(n, status="promoted", promoted=time.time())
        self._serve(n, "promote")

    def reject(self, n: int) -> None:
        self.write_info(n, status="rejected", rejected=time.time())

    def rollback(self, to: int | None = None) -> int:
        """Serve ``to`` (a promoted or first version), default the one served before the current -> it."""
        rec = self.serving_record()
        if rec["version"] is None:
            raise ValueError(f"{self.root}: nothing is served yet, nothing to roll back")
        if to is None:
            earlier = [h["version"] for h in rec["history"] if h["version"] != rec["version"]]
            if not earlier:
                raise ValueError(f"{self.root}: version {rec['version']} is the only one ever served")
            to = earlier[-1]
        if self.info(to)["status"] not in ("first", "promoted"):
            raise ValueError(f"version {to} is {self.info(to)['status']}: only a version that passed its gate "
                             f"(or the first) can be served")
        self._serve(to, "rollback")
        return to

    def _serve(self, n: int, action: str) -> None:
        rec = self.serving_record()
        rec["history"] = rec["history"] + [{"version": n, "action": action, "at": time.time()}]
        rec["version"] = n
        atomic_write_text(self.serving_file, json.dumps(rec, indent=1))

    # ---- the arena's candidate: a version people battle against the served one before its gate decides
    @property
    def arena_file(self) -> Path:
        return self.root / "arena.json"

    def arena_candidate(self) -> int | None:
        """The version ``learn.gate=arena`` put in the arena (a server watching the file battles it), or None."""
        if not self.arena_file.exists():
            return None
        try:
            n = json.loads(self.arena_file.read_text(encoding="utf-8")).get("candidate")
        except (ValueError, OSError, AttributeError) as e:
            raise CheckpointError(f"{self.arena_file}: corrupt ({e}); it names the arena's candidate") from None
        if n is not None and not isinstance(n, int):
            raise CheckpointError(f"{self.arena_file}: corrupt (candidate must be a version number or null)")
        return n

    def set_arena_candidate(self, n: int | None) -> None:
        if n is not None:
            self.info(n)  # on record
        atomic_write_text(self.arena_file, json.dumps({"candidate": n}))

    def last_vote_id(self, exclude: int | None = None) -> int:
        """The highest feedback id an earlier round read (``exclude``: the round asking): a round reads after it."""
        return max((self.info(n).get("last_vote_id") or 0 for n in self.numbers() if n != exclude), default=0)
