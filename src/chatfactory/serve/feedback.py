"""Human feedback in SQLite: thumbs up/down on answers and side-by-side comparisons.

The web UI and ``POST /v1/feedback`` write here; ``export`` turns the rows into comparisons JSONL
(``{"prompt": [messages], "chosen": str, "rejected": str}``), the format the reward model and DPO
read, so people's preferences flow back into training (InstructGPT's labelers, ChatGPT's thumbs).

The file is ``runs/NAME/feedback.sqlite`` in WAL mode: the server keeps writing while an export
reads. Every row keeps the conversation, the answer(s), the model and stage, and the time.

    chatfactory feedback export --run runs/NAME [--out runs/NAME/feedback_comparisons.jsonl]

What becomes a pair: every comparison (the preferred answer is chosen), and, for the same
conversation, every distinct thumbs-up answer against every distinct thumbs-down answer, at most
``max_pairs_per_conversation`` pairs of each kind per conversation (the first ones given). A store keeps
at most ``max_rows_per_conversation`` rows per conversation (``FeedbackFull`` past that): N votes each way
on one conversation would otherwise export N² pairs, and one client could outweigh everyone else's
preferences. The export streams: rows are read with a cursor, a conversation at a time, and written as
they are paired, so it needs memory for one conversation's answers, never for every pair.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..store.files import remove_quietly, write_file
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
    stage     TEXT,
    conv_key  TEXT                        -- conversation_key(messages): its rows are counted and paired together
);
"""


class FeedbackFull(ValueError):
    """The conversation already has as many feedback rows as the store keeps for one."""


def conversation_key(messages) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class FeedbackStore:
    def __init__(self, path, max_rows_per_conversation: int = 64, max_pairs_per_conversation: int = 64):
        self.path = Path(path)
        self.max_rows, self.max_pairs = max_rows_per_conversation, max_pairs_per_conversation
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # persistent: readers never block the writer
            db.executescript(SCHEMA)
            # a store from before conv_key: add the column and fill it in
            if "conv_key" not in {r[1] for r in db.execute("PRAGMA table_info(feedback)")}:
                db.execute("ALTER TABLE feedback ADD COLUMN conv_key TEXT")
            todo = db.execute("SELECT id, messages FROM feedback WHERE conv_key IS NULL").fetchall()
            db.executemany("UPDATE feedback SET conv_key = ? WHERE id = ?",
                           [(conversation_key(json.loads(m)), i) for i, m in todo])
            db.execute("CREATE INDEX IF NOT EXISTS feedback_conv ON feedback (conv_key, kind, rating, id)")

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
        key = conversation_key(row["messages"])
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")  # the count and the insert together: concurrent posts cannot both pass
            have = db.execute("SELECT COUNT(*) FROM feedback WHERE conv_key = ?", (key,)).fetchone()[0]
            if have >= self.max_rows:
                raise FeedbackFull(f"feedback.messages: this conversation already has {have} feedback rows, the most "
                                   "the store keeps for one conversation")
            cur = db.execute(
                "INSERT INTO feedback (created, kind, messages, answer, answer_b, rating, preferred, model, stage,"
                " conv_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), row["kind"], json.dumps(row["messages"], ensure_ascii=False), row["answer"],
                 row.get("answer_b"), row.get("rating"), row.get("preferred"), model, stage, key))
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
        return list(self.iter_comparisons())

    def iter_comparisons(self) -> Iterator[dict]:
        """The pairs, one at a time: comparisons in the order given (at most ``max_pairs`` per conversation),
        then each conversation's thumbs-up x thumbs-down answers (distinct answers, the first ``max_pairs``
        pairs), conversations in the order they were first rated. Reads with cursors, a conversation at a time."""
        with self._connect() as db, self._connect() as inner:
            for messages, a, b, preferred in db.execute(
                    "SELECT messages, answer, answer_b, preferred FROM ("
                    " SELECT id, messages, answer, answer_b, preferred,"
                    " ROW_NUMBER() OVER (PARTITION BY conv_key ORDER BY id) AS k"
                    " FROM feedback WHERE kind = 'comparison') WHERE k <= ? ORDER BY id", (self.max_pairs,)):
                chosen, rejected = (a, b) if preferred == 0 else (b, a)
                if chosen != rejected:
                    yield {"prompt": json.loads(messages), "chosen": chosen, "rejected": rejected}
            for key, messages in db.execute(
                    "SELECT conv_key, messages FROM feedback WHERE id IN (SELECT MIN(id) FROM feedback"
                    " WHERE kind = 'rating' GROUP BY conv_key) ORDER BY id"):
                # distinct answers each way, the first given first, as many as can pair
                good, bad = ([r[0] for r in inner.execute(
                    "SELECT answer FROM feedback WHERE conv_key = ? AND kind = 'rating' AND rating = ?"
                    " GROUP BY answer ORDER BY MIN(id) LIMIT ?", (key, rating, self.max_pairs))] for rating in (1, -1))
                if not good or not bad:
                    continue
                prompt, n = json.loads(messages), 0
                # by diagonals (the first up with the first down, then the next of each, ...): capped, the
                # pairs still spread over many answers; uncapped, every up x every down as before
                for d in range(len(good) + len(bad) - 1):
                    for i in range(max(0, d - len(bad) + 1), min(d, len(good) - 1) + 1):
                        if n < self.max_pairs and good[i] != bad[d - i]:
                            n += 1
                            yield {"prompt": prompt, "chosen": good[i], "rejected": bad[d - i]}

    def export(self, out_path) -> int:
        """Write the comparisons JSONL atomically, pair by pair as they are read -> number of pairs."""
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + ".tmp")
        count = 0

        def write(path):
            nonlocal count
            with open(path, "w", encoding="utf-8") as f:
                for pair in self.iter_comparisons():
                    f.write(json.dumps(pair, ensure_ascii=False) + "\n")
                    count += 1

        try:
            write_file(out_path, tmp, write, "the feedback export")
            os.replace(tmp, out_path)
        finally:
            remove_quietly(tmp)
        return count


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


def export_run(run_dir, out_path=None, max_pairs_per_conversation: int = 64) -> tuple[Path, int]:
    """``chatfactory feedback export``: the run's feedback -> comparisons JSONL (path, pairs)."""
    db = Path(run_dir) / FILENAME
    if not db.exists():
        raise FileNotFoundError(f"{db}: no feedback collected yet (serve the run and rate some answers)")
    out = Path(out_path) if out_path else Path(run_dir) / "feedback_comparisons.jsonl"
    return out, FeedbackStore(db, max_pairs_per_conversation=max_pairs_per_conversation).export(out)
