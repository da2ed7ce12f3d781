"""Human feedback in SQLite: thumbs up/down on answers and side-by-side comparisons.

The web UI and ``POST /v1/feedback`` write here; ``export`` turns the rows into comparisons JSONL
(``{"prompt": [messages], "chosen": str, "rejected": str}``), the format the reward model and DPO
read, so people's preferences flow back into training (InstructGPT's labelers, ChatGPT's thumbs).

The file is ``runs/NAME/feedback.sqlite`` in WAL mode: the server keeps writing while an export
reads. Every row keeps the conversation, the answer(s), the model and stage, and the time.

    chatfactory feedback export --run runs/NAME [--out runs/NAME/feedback_comparisons.jsonl]

What becomes a pair: every comparison (the preferred answer is chosen), and, for the same
conversation, every thumbs-up answer against every thumbs-down answer.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..store.files import atomic_write_text
from ..text.tokenizer import check_messages

FILENAME = "feedback.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    created   REAL NOT NULL,              -- unix time
    kind      TEXT NOT NULL CHECK (kind IN ('rating', 'comparison')),
    messages  TEXT NOT NULL,              -- JSON: the conversation up to the answer(s)
    answer    TEXT NOT NULL,              -- the rated answer, or answer A of a comparison
    answer_b  TEXT,                       -- answer B of a comparison
    rating    INTEGER CHECK (rating IN (-1, 1)),   -- rating: +1 thumbs up, -1 thumbs down
    preferred INTEGER CHECK (preferred IN (0, 1)), -- comparison: 0 = A, 1 = B
    model     TEXT,
    stage     TEXT
);
"""


class FeedbackStore:
    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # persistent: readers never block the writer
            db.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # one short-lived connection per call: safe from any thread of the server. ``with db`` only
        # commits (or rolls back); the connection is closed here, not left to the garbage collector
        db = sqlite3.connect(self.path, timeout=10)
        try:
            db.execute("PRAGMA busy_timeout=10000")
            with db:
                yield db
        finally:
            db.close()

    def add(self, item: dict, model: str | None = None, stage: str | None = None) -> int:
        """Validate one feedback item (the body of ``POST /v1/feedback``) and store it -> its id.

        rating:     {"kind": "rating", "messages": [...], "answer": str, "rating": 1 | -1}
        comparison: {"kind": "comparison", "messages": [...], "answers": [str, str], "preferred": 0 | 1}
        ``messages`` is the conversation the answer(s) reply to (it ends before them)."""
        row = validate(item)
        with self._connect() as db:
            cur = db.execute(
                "INSERT INTO feedback (created, kind, messages, answer, answer_b, rating, preferred, model, stage)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), row["kind"], json.dumps(row["messages"], ensure_ascii=False), row["answer"],
                 row.get("answer_b"), row.get("rating"), row.get("preferred"), model, stage))
            return int(cur.lastrowid)

    def rows(self) -> list[dict]:
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            out = [dict(r) for r in db.execute("SELECT * FROM feedback ORDER BY id")]
        for r in out:
            r["messages"] = json.loads(r["messages"])
        return out

    def comparisons(self) -> list[dict]:
        """Rows as preference pairs ``{"prompt", "chosen", "rejected"}`` (see the module docstring)."""
        pairs, ups, downs = [], {}, {}
        for r in self.rows():
            if r["kind"] == "comparison":
                a, b = r["answer"], r["answer_b"]
                chosen, rejected = (a, b) if r["preferred"] == 0 else (b, a)
                if chosen != rejected:
                    pairs.append({"prompt": r["messages"], "chosen": chosen, "rejected": rejected})
            else:
                key = json.dumps(r["messages"], sort_keys=True, ensure_ascii=False)
                (ups if r["rating"] > 0 else downs).setdefault(key, []).append(r)
        for key, good in ups.items():
            for g in good:
                for b in downs.get(key, []):
                    if g["answer"] != b["answer"]:
                        pairs.append({"prompt": g["messages"], "chosen": g["answer"], "rejected": b["answer"]})
        return pairs

    def export(self, out_path) -> int:
        """Write the comparisons JSONL atomically -> number of pairs."""
        pairs = self.comparisons()
        atomic_write_text(out_path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
        return len(pairs)


def validate(item) -> dict:
    """-> a normalised row, or ValueError naming the bad field."""
    if not isinstance(item, dict):
        raise ValueError("feedback: expected a JSON object")
    kind = item.get("kind")
    if kind not in ("rating", "comparison"):
        raise ValueError(f"feedback.kind: expected 'rating' or 'comparison', got {kind!r}")
    check_messages(item.get("messages"), "feedback.messages")
    row = {"kind": kind, "messages": [{"role": m["role"], "content": m["content"]} for m in item["messages"]]}
    if kind == "rating":
        answer, rating = item.get("answer"), item.get("rating")
        if not isinstance(answer, str):
            raise ValueError("feedback.answer: expected a string")
        if isinstance(rating, bool) or rating not in (1, -1):
            raise ValueError(f"feedback.rating: expected 1 (thumbs up) or -1 (thumbs down), got {rating!r}")
        row.update(answer=answer, rating=rating)
    else:
        answers, preferred = item.get("answers"), item.get("preferred")
        if not (isinstance(answers, list) and len(answers) == 2 and all(isinstance(a, str) for a in answers)):
            raise ValueError("feedback.answers: expected a list of two strings")
        if isinstance(preferred, bool) or preferred not in (0, 1):
            raise ValueError(f"feedback.preferred: expected 0 or 1 (the index of the better answer), got {preferred!r}")
        row.update(answer=answers[0], answer_b=answers[1], preferred=preferred)
    return row


def export_run(run_dir, out_path=None) -> tuple[Path, int]:
    """``chatfactory feedback export``: the run's feedback -> comparisons JSONL (path, pairs)."""
    db = Path(run_dir) / FILENAME
    if not db.exists():
        raise FileNotFoundError(f"{db}: no feedback collected yet (serve the run and rate some answers)")
    out = Path(out_path) if out_path else Path(run_dir) / "feedback_comparisons.jsonl"
    return out, FeedbackStore(db).export(out)
