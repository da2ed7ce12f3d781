"""People's votes in SQLite: thumbs up/down on answers and side-by-side comparisons.

The web UI and ``POST /v1/feedback`` write here; the exports turn the votes into comparisons JSONL
(``{"prompt": [messages], "chosen": str, "rejected": str}``), the format the reward model and DPO
read, so people's preferences flow back into training (InstructGPT's labelers, ChatGPT's thumbs).

The file is ``runs/NAME/feedback.sqlite`` in WAL mode: the server keeps writing while an export reads.
Every vote keeps the conversation it answers (``messages``), the time, the served model and stage, the
rater, and:

* a comparison: both answers (A = ``answers[0]``, B = ``answers[1]``), the choice ``a | b | tie | both_bad``
  (the old bodies' ``preferred`` 0 | 1 is ``a | b``), which answer the page showed on the left
  (``shown_left``; the UI draws it at random, so a bias for the left can be measured), the model version
  that wrote each answer (``models``, default the served model), an optional ``reason``;
* a rating: thumbs up (+1) or down (-1) on one answer, an optional ``reason``.

An arena vote (serve/arena.py) is a comparison whose two versions the server chose and recorded; table
``battles`` names those rows, and ``battles()`` reads them for the leaderboard (a body's own ``models`` never
counts there).

The rater is a short salted hash (``rater_id``; the salt stays in the file), so an export names no key
and no address. serve/api.py derives it: from the API key plus ``X-Rater`` when the request carries the
key, else from the ``cf_rater`` cookie, else from the client's address.

The schema grows by numbered migrations (``MIGRATIONS``; ``PRAGMA user_version`` counts those applied).
Opening a file brings it up to date, its rows kept: a store written before versions (0) is read as it was.
A file that is not a SQLite database is a ``FeedbackStoreError`` naming it, as is one from a newer schema.

    chatfactory feedback export --run runs/NAME [--out runs/NAME/feedback_comparisons.jsonl]

``export`` reads every vote. A comparison with a winner gives a pair (ties and both-bad give none), and,
for one conversation, every distinct thumbs-up answer pairs with every distinct thumbs-down answer, at
most ``max_pairs_per_conversation`` pairs of each kind per conversation (the first ones given). A store
keeps at most ``max_rows_per_conversation`` rows per conversation (``FeedbackFull`` past that): N votes
each way on one conversation would otherwise export N² pairs, and one client could outweigh everyone
else's preferences. The exports stream: rows are read with a cursor, a conversation at a time, and
written as they are paired, so they need memory for one conversation's answers, never for every pair.

``export_round(out, after_id)`` is one round of learning from votes: it reads only the votes with an id
above ``after_id`` (those new since the last round, up to the newest when it starts) and counts each
vote it does not turn into a pair under one of the rules, in this order:

1. duplicate: one rater's votes on one pair (the same conversation and the same two answers, in either
   order) count once, the last in the round; a vote on a pair the rater voted on in an earlier round is
   a duplicate too (that vote was read then). One rater's ratings of one answer: the last counts.
2. tie: no pair. both_bad: no pair; each of the two answers is a negative,
   ``{"prompt", "answer", "rating": -1}``, written to ``negatives_path`` when asked (a rating-based loss
   can use them).
3. equal: a pair whose two answers are the same text teaches nothing.
4. rater_cap: a rater's first ``max_per_rater`` pairs and both-bad votes of the round count, the rest do
   not, so one person (or a script) cannot swamp a round. Comparisons come first in the order voted,
   then thumbs pairs.

Thumbs pairs are ``export``'s, over the ratings up to the round's end, after rule 1; a pair belongs to
the round of the later of its two ratings, and carries that rating's id and rater. Votes stored before
raters were recorded (schema version 1) have no rater: each counts alone, never a duplicate nor capped.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..store.files import remove_quietly, write_file
from ..text.tokenizer import check_messages

FILENAME = "feedback.sqlite"
CHOICES = ("a", "b", "tie", "both_bad")
DROPS = ("tie", "both_bad", "duplicate", "rater_cap", "equal")  # export_round's reasons, in the docstring's order
MAX_REASON = 500  # characters of a vote's reason
MAX_NAME = 200  # characters of a model version's name or a rater's name
_ALL = 2 ** 63 - 1  # the highest id SQLite gives

# version 1: the table as issue 24 left it, word for word (its files say user_version 0). Since version 2
# ``preferred`` is null for a tie or both bad, and ``model`` is the version of the answer (of A in a comparison)
SCHEMA_V1 = """
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

# version 2 (issue 25): votes worth training on
V2_COLUMNS = (
    ("choice", "TEXT CHECK (choice IN ('a', 'b', 'tie', 'both_bad'))"),  # comparisons only
    ("shown_left", "INTEGER CHECK (shown_left IN (0, 1))"),  # which answer the page showed left (null: unknown)
    ("model_b", "TEXT"),  # the model version of answer B
    ("rater", "TEXT"),  # rater_id(...); null in rows from before version 2
    ("reason", "TEXT"),
    ("vote_key", "TEXT"),  # vote_key(conv_key, answer, answer_b): what one rater votes on once
)


class FeedbackFull(ValueError):
    """The conversation already has as many feedback rows as the store keeps for one."""


class FeedbackStoreError(ValueError):
    """The file cannot be read as a feedback store (not a SQLite database, or a newer schema); the message
    names it. A ValueError, so the CLI prints it without a traceback."""


def conversation_key(messages) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def vote_key(conv_key: str, answer: str, answer_b: str | None = None) -> str:
    """What one rater votes on once: one answer to a conversation, or a pair of answers in either order."""
    what = [answer] if answer_b is None else sorted([answer, answer_b])
    return hashlib.sha256(json.dumps([conv_key, what], ensure_ascii=False).encode()).hexdigest()


def _to_v1(db: sqlite3.Connection) -> None:
    """A new file, or one from before versions, as issue 24 left it: the table, ``conv_key`` (added to a
    store from before it and filled in), its index."""
    db.execute(SCHEMA_V1)
    if "conv_key" not in {r[1] for r in db.execute("PRAGMA table_info(feedback)")}:
        db.execute("ALTER TABLE feedback ADD COLUMN conv_key TEXT")
    db.execute("UPDATE feedback SET conv_key = conversation_key(messages) WHERE conv_key IS NULL")
    db.execute("CREATE INDEX IF NOT EXISTS feedback_conv ON feedback (conv_key, kind, rating, id)")


def _to_v2(db: sqlite3.Connection) -> None:
    """The vote's choice, position, versions, rater and reason; the rater hash's salt."""
    for name, decl in V2_COLUMNS:
        db.execute(f"ALTER TABLE feedback ADD COLUMN {name} {decl}")
    # an old comparison always had a winner; both its answers came from the one served model
    db.execute("UPDATE feedback SET choice = CASE preferred WHEN 0 THEN 'a' WHEN 1 THEN 'b' END, model_b = model"
               " WHERE kind = 'comparison'")
    db.execute("UPDATE feedback SET vote_key = vote_key(conv_key, answer, answer_b)")
    db.execute("CREATE INDEX feedback_vote ON feedback (rater, vote_key, id)")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('rater_salt', ?)", (secrets.token_hex(16),))


# the arena's votes (serve/arena.py): which feedback rows decided a battle. Made by the first such vote, in
# its transaction, not by a migration: a store without battles reads as before, and opening one writes nothing
BATTLES = "CREATE TABLE IF NOT EXISTS battles (id TEXT PRIMARY KEY, feedback_id INTEGER NOT NULL UNIQUE)"

MIGRATIONS = (_to_v1, _to_v2)  # MIGRATIONS[n] takes a file from version n to n + 1; append, never edit

# a vote that does not count (rule 1): a later vote of its rater on the same thing in the round, or, for a
# comparison, one of an earlier round. Rows without a rater are never duplicates
_DUPLICATE = """f.rater IS NOT NULL AND EXISTS (SELECT 1 FROM feedback g WHERE g.rater = f.rater
    AND g.vote_key = f.vote_key AND g.id <= :upto AND (g.id > f.id OR (g.id <= :after AND f.kind = 'comparison')))"""


class FeedbackStore:
    def __init__(self, path, max_rows_per_conversation: int = 64, max_pairs_per_conversation: int = 64):
        self.path = Path(path)
        self.max_rows, self.max_pairs = max_rows_per_conversation, max_pairs_per_conversation
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # persistent: readers never block the writer
            db.create_function("conversation_key", 1, lambda m: conversation_key(json.loads(m)), deterministic=True)
            db.create_function("vote_key", 3, vote_key, deterministic=True)
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version < len(MIGRATIONS):  # (an up-to-date store is only read: an export works on a read-only copy)
                db.execute("BEGIN IMMEDIATE")  # one process migrates; another one waits, then finds it done
                version = db.execute("PRAGMA user_version").fetchone()[0]
                for migrate in MIGRATIONS[version:]:
                    migrate(db)
                db.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")  # in the transaction: all or nothing
            elif version > len(MIGRATIONS):
                raise FeedbackStoreError(f"{self.path}: a feedback store of schema version {version}, written by a "
                                         f"newer chatfactory (this one reads up to version {len(MIGRATIONS)})")
            self._salt = db.execute("SELECT value FROM meta WHERE key = 'rater_salt'").fetchone()[0]

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # one short-lived connection per call: safe from any thread of the server. ``with db`` only
        # commits (or rolls back); the connection is closed here, not left to the garbage collector
        db = sqlite3.connect(self.path, timeout=10)
        try:
            db.execute("PRAGMA busy_timeout=10000")
            with db:
                yield db
        except sqlite3.DatabaseError as e:
            # exactly DatabaseError: "file is not a database", "database disk image is malformed" (its
            # subclasses, a locked file or a broken statement, say what they are already)
            if type(e) is not sqlite3.DatabaseError:
                raise
            raise FeedbackStoreError(f"{self.path}: not a readable feedback store (SQLite: {e}); move it aside and "
                                     "the server starts a new one") from None
        finally:
            db.close()

    def rater_id(self, *parts: str) -> str:
        """A short id for the rater that ``parts`` name (``"cookie", value``; ``"key", api_key, name``;
        ``"address", ip``): salted with the store's secret, so no key or address can be read back from it."""
        return hashlib.sha256(json.dumps([self._salt, *parts]).encode()).hexdigest()[:16]

    def add(self, item: dict, model: str | None = None, stage: str | None = None, rater: str | None = None,
            battle: str | None = None) -> int:
        """Validate one vote (the body of ``POST /v1/feedback``) and store it -> its id.

        rating:     {"kind": "rating", "messages": [...], "answer": str, "rating": 1 | -1, "reason"?: str}
        comparison: {"kind": "comparison", "messages": [...], "answers": [str, str],
                     "choice": "a" | "b" | "tie" | "both_bad" (or "preferred": 0 | 1), "shown_left"?: 0 | 1,
                     "models"?: [str, str], "reason"?: str}
        ``messages`` is the conversation the answer(s) reply to (it ends before them). ``model`` is the served
        version (each answer's, unless ``models`` names them); ``rater`` is ``rater_id``'s, never from ``item``;
        ``battle``: the arena battle the vote decides (its ``models`` are the server's record, see ``battles``)."""
        row = validate(item)
        key = conversation_key(row["messages"])
        model_a, model_b = row.get("models") or (model, model if row["kind"] == "comparison" else None)
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")  # the count and the insert together: concurrent posts cannot both pass
            have = db.execute("SELECT COUNT(*) FROM feedback WHERE conv_key = ?", (key,)).fetchone()[0]
            if have >= self.max_rows:
                raise FeedbackFull(f"feedback.messages: this conversation already has {have} feedback rows, the most "
                                   "the store keeps for one conversation")
            cur = db.execute(
                "INSERT INTO feedback (created, kind, messages, answer, answer_b, rating, preferred, choice,"
                " shown_left, model, model_b, stage, rater, reason, conv_key, vote_key)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), row["kind"], json.dumps(row["messages"], ensure_ascii=False), row["answer"],
                 row.get("answer_b"), row.get("rating"), row.get("preferred"), row.get("choice"),
                 row.get("shown_left"), model_a, model_b, stage, rater, row.get("reason"), key,
                 vote_key(key, row["answer"], row.get("answer_b"))))
            if battle is not None:  # in the vote's transaction: a vote is a battle's whole or not at all
                db.execute(BATTLES)
                db.execute("INSERT INTO battles (id, feedback_id) VALUES (?, ?)", (battle, cur.lastrowid))
            return int(cur.lastrowid)

    def battles(self) -> list[dict]:
        """The arena's decided battles, in the order voted: ``{"a", "b", "winner", "id"}`` (the versions of
        answers A and B, the choice, the vote's id): votes whose versions the server recorded itself, never
        a body's ``models``."""
        with self._connect() as db:
            if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'battles'").fetchone() is None:
                return []
            return [{"a": a, "b": b, "winner": c, "id": i} for i, a, b, c in db.execute(
                "SELECT f.id, f.model, f.model_b, f.choice FROM battles t JOIN feedback f ON f.id = t.feedback_id"
                " WHERE f.model IS NOT NULL AND f.model_b IS NOT NULL AND f.model != f.model_b ORDER BY f.id")]

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
        """The pairs, one at a time: comparisons with a winner in the order given (at most ``max_pairs`` per
        conversation), then each conversation's thumbs-up x thumbs-down answers (``_thumbs``). Reads with
        cursors, a conversation at a time."""
        with self._connect() as db:
            for messages, a, b, preferred in db.execute(
                    "SELECT messages, answer, answer_b, preferred FROM ("
                    " SELECT id, messages, answer, answer_b, preferred,"
                    " ROW_NUMBER() OVER (PARTITION BY conv_key ORDER BY id) AS k"
                    " FROM feedback WHERE kind = 'comparison' AND preferred IS NOT NULL)"
                    " WHERE k <= ? ORDER BY id", (self.max_pairs,)):
                chosen, rejected = (a, b) if preferred == 0 else (b, a)
                if chosen != rejected:
                    yield {"prompt": json.loads(messages), "chosen": chosen, "rejected": rejected}
            for prompt, good, bad in self._thumbs(db, 0, _ALL, latest_only=False):
                if good[0] != bad[0]:
                    yield {"prompt": prompt, "chosen": good[0], "rejected": bad[0]}

    def _thumbs(self, db, after: int, upto: int, latest_only: bool) -> Iterator[tuple[list, tuple, tuple]]:
        """(prompt, good, bad) for each conversation with a rating in (after, upto], in the order first rated:
        its distinct thumbs-up answers against its distinct thumbs-down answers, each side ``(answer, id,
        rater, model)`` of its first rating; ``latest_only``: only each rater's last rating of an answer.
        A pair of equal answers comes too (the caller drops it), but only ``max_pairs`` unequal ones."""
        live = (" AND (rater IS NULL OR NOT EXISTS (SELECT 1 FROM feedback g WHERE g.rater = f.rater"
                " AND g.vote_key = f.vote_key AND g.id > f.id AND g.id <= :upto))") if latest_only else ""
        args = {"after": after, "upto": upto, "n": self.max_pairs}
        for key, messages in db.execute(
                "SELECT conv_key, messages FROM feedback WHERE id IN (SELECT MIN(id) FROM feedback WHERE kind ="
                " 'rating' AND id <= :upto AND conv_key IN (SELECT conv_key FROM feedback WHERE kind = 'rating'"
                " AND id > :after AND id <= :upto) GROUP BY conv_key) ORDER BY id", args).fetchall():
            # distinct answers each way, the first given first, as many as can pair (SQLite takes the bare
            # columns of a MIN() group from the row with the minimum: the first rating's rater and model)
            good, bad = (db.execute(
                "SELECT answer, MIN(id), rater, model FROM feedback f WHERE conv_key = :key AND kind = 'rating'"
                " AND rating = :rating AND id <= :upto" + live + " GROUP BY answer ORDER BY MIN(id) LIMIT :n",
                {**args, "key": key, "rating": rating}).fetchall() for rating in (1, -1))
            if not good or not bad:
                continue
            prompt, n = json.loads(messages), 0
            for g, b in _diagonals(good, bad):
                if n >= self.max_pairs:
                    break
                n += g[0] != b[0]
                yield prompt, g, b

    def export(self, out_path) -> int:
        """Write the comparisons JSONL of every vote atomically, pair by pair as they are read -> pairs."""
        return write_jsonl(out_path, self.iter_comparisons(), "the feedback export")

    def export_round(self, out_path, after_id: int = 0, max_per_rater: int = 200, negatives_path=None) -> dict:
        """One round's comparisons JSONL from the votes with id > ``after_id`` (the rules: module docstring),
        written atomically; both-bad answers to ``negatives_path`` as well, when given.

        Each pair is ``{"prompt", "chosen", "rejected", "vote_id", "rater", "models": [chosen's version,
        rejected's version]}`` (``rater`` "" for a vote from before raters) -> ``{"pairs", "votes" (read),
        "last_id" (the highest id read; ``after_id`` if none: the next round's ``after_id``), "raters"
        (distinct), "dropped": {"tie", "both_bad", "duplicate", "rater_cap", "equal"}}``."""
        if isinstance(after_id, bool) or not isinstance(after_id, int) or after_id < 0:
            raise ValueError(f"export_round: after_id must be a vote id (an integer >= 0), got {after_id!r}")
        if isinstance(max_per_rater, bool) or not isinstance(max_per_rater, int) or max_per_rater < 1:
            raise ValueError(f"export_round: max_per_rater must be an integer >= 1, got {max_per_rater!r}")
        with self._connect() as db:
            # the round ends at the newest vote now: votes that arrive while it is written wait for the next
            upto, votes, raters = db.execute("SELECT MAX(id), COUNT(*), COUNT(DISTINCT rater) FROM feedback"
                                             " WHERE id > ?", (after_id,)).fetchone()
        upto = upto or after_id
        stats = {"pairs": 0, "votes": votes, "last_id": upto, "raters": raters, "dropped": dict.fromkeys(DROPS, 0)}
        stats["pairs"] = write_jsonl(out_path, (row for kind, row in self._round(after_id, upto, max_per_rater, stats)
                                                if kind == "pair"), "the round's comparisons")
        if negatives_path is not None:  # a second pass over the same votes (ids up to ``upto`` never change)
            write_jsonl(negatives_path, (row for kind, row in self._round(after_id, upto, max_per_rater, None)
                                         if kind == "negative"), "the round's negatives")
        return stats

    def _round(self, after: int, upto: int, cap: int, stats: dict | None) -> Iterator[tuple[str, dict]]:
        """("pair", row) and ("negative", row) of the votes in (after, upto], each vote not used counted in
        ``stats["dropped"]`` (when given)."""
        dropped = stats["dropped"] if stats is not None else dict.fromkeys(DROPS, 0)
        taken: Counter = Counter()

        def capped(rater) -> bool:  # rule 4, in the order asked
            taken[rater] += rater is not None
            if taken[rater] > cap:
                dropped["rater_cap"] += 1
                return True
            return False

        args = {"after": after, "upto": upto}
        with self._connect() as db:
            dropped["duplicate"] = db.execute("SELECT COUNT(*) FROM feedback f WHERE id > :after AND id <= :upto"
                                              " AND " + _DUPLICATE, args).fetchone()[0]
            for vid, messages, a, b, choice, rater, ma, mb in db.execute(
                    "SELECT id, messages, answer, answer_b, choice, rater, model, model_b FROM feedback f WHERE"
                    " kind = 'comparison' AND id > :after AND id <= :upto AND NOT (" + _DUPLICATE + ") ORDER BY id",
                    args):
                if choice == "tie":
                    dropped["tie"] += 1
                elif choice == "both_bad":
                    if not capped(rater):
                        dropped["both_bad"] += 1
                        for answer, model in [(a, ma)] + ([(b, mb)] if b != a else []):
                            yield "negative", {"prompt": json.loads(messages), "answer": answer, "rating": -1,
                                               "vote_id": vid, "rater": rater or "", "model": model}
                elif a == b:
                    dropped["equal"] += 1
                elif not capped(rater):
                    (chosen, mc), (rejected, mr) = ((a, ma), (b, mb)) if choice == "a" else ((b, mb), (a, ma))
                    yield "pair", {"prompt": json.loads(messages), "chosen": chosen, "rejected": rejected,
                                   "vote_id": vid, "rater": rater or "", "models": [mc, mr]}
            for prompt, good, bad in self._thumbs(db, after, upto, latest_only=True):
                _, vid, rater, _ = max(good, bad, key=lambda side: side[1])  # the rating that made the pair
                if vid <= after:
                    continue  # both ratings were there last round: the pair was read then
                if good[0] == bad[0]:
                    dropped["equal"] += 1
                elif not capped(rater):
                    yield "pair", {"prompt": prompt, "chosen": good[0], "rejected": bad[0], "vote_id": vid,
                                   "rater": rater or "", "models": [good[3], bad[3]]}


def _diagonals(good: list, bad: list) -> Iterator[tuple]:
    """Every item of ``good`` with every item of ``bad``, by diagonals (the first with the first, then the
    next of each, ...): a capped list of pairs still spreads over many answers."""
    for d in range(len(good) + len(bad) - 1):
        for i in range(max(0, d - len(bad) + 1), min(d, len(good) - 1) + 1):
            yield good[i], bad[d - i]


def write_jsonl(out_path, rows, what: str) -> int:
    """Write ``rows`` as JSONL through ``out_path.tmp``, renamed over ``out_path`` at the end (a reader sees the
    old file or the whole new one; a failed write, a full disk, leaves the old) -> rows written."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    count = 0

    def write(path):
        nonlocal count
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1

    try:
        write_file(out_path, tmp, write, what)
        os.replace(tmp, out_path)
    finally:
        remove_quietly(tmp)
    return count


def _one_of(item: dict, field: str, values: tuple, what: str):
    """``item[field]``, None when absent or null, or ValueError naming it when not one of ``values``."""
    v = item.get(field)
    if v is not None and (isinstance(v, bool) or v not in values):
        raise ValueError(f"feedback.{field}: expected {what}, got {v!r}")
    return v


def validate(item) -> dict:
    """-> a normalised row, or ValueError naming the bad field."""
    if not isinstance(item, dict):
        raise ValueError("feedback: expected a JSON object")
    kind = item.get("kind")
    if kind not in ("rating", "comparison"):
        raise ValueError(f"feedback.kind: expected 'rating' or 'comparison', got {kind!r}")
    check_messages(item.get("messages"), "feedback.messages")
    row = {"kind": kind, "messages": [{"role": m["role"], "content": m["content"]} for m in item["messages"]]}
    reason = item.get("reason")
    if reason is not None and not (isinstance(reason, str) and len(reason) <= MAX_REASON):
        raise ValueError(f"feedback.reason: expected a string of at most {MAX_REASON} characters")
    row["reason"] = reason
    if kind == "rating":
        answer, rating = item.get("answer"), item.get("rating")
        if not isinstance(answer, str):
            raise ValueError("feedback.answer: expected a string")
        if isinstance(rating, bool) or rating not in (1, -1):
            raise ValueError(f"feedback.rating: expected 1 (thumbs up) or -1 (thumbs down), got {rating!r}")
        row.update(answer=answer, rating=rating)
        return row
    answers, models = item.get("answers"), item.get("models")
    if not (isinstance(answers, list) and len(answers) == 2 and all(isinstance(a, str) for a in answers)):
        raise ValueError("feedback.answers: expected a list of two strings")
    preferred = _one_of(item, "preferred", (0, 1), "0 or 1 (the index of the better answer)")
    choice = _one_of(item, "choice", CHOICES, "'a', 'b', 'tie' or 'both_bad'")
    if (choice is None) == (preferred is None):
        raise ValueError("feedback.choice: give exactly one of 'choice' ('a', 'b', 'tie' or 'both_bad') and "
                         "'preferred' (0 or 1)")
    choice = choice or "ab"[preferred]
    if models is not None and not (isinstance(models, list) and len(models) == 2 and all(
            isinstance(m, str) and 0 < len(m) <= MAX_NAME for m in models)):
        raise ValueError(f"feedback.models: expected the model versions of the two answers, two names of 1 to "
                         f"{MAX_NAME} characters")
    row.update(answer=answers[0], answer_b=answers[1], choice=choice, preferred={"a": 0, "b": 1}.get(choice),
               shown_left=_one_of(item, "shown_left", (0, 1), "0 or 1 (which answer was shown on the left)"),
               models=models)
    return row


def export_run(run_dir, out_path=None, max_pairs_per_conversation: int = 64) -> tuple[Path, int]:
    """``chatfactory feedback export``: the run's feedback -> comparisons JSONL (path, pairs)."""
    db = Path(run_dir) / FILENAME
    if not db.exists():
        raise FileNotFoundError(f"{db}: no feedback collected yet (serve the run and rate some answers)")
    out = Path(out_path) if out_path else Path(run_dir) / "feedback_comparisons.jsonl"
    return out, FeedbackStore(db, max_pairs_per_conversation=max_pairs_per_conversation).export(out)
