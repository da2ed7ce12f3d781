"""Votes worth training on (issue 25, items 1 and 2): what a vote keeps, the schema's migrations (a store
written by issue 24's code opens and exports as it did), a corrupt file named in a clear error, old and new
POST /v1/feedback bodies, the rater id the server derives (cookie, address, API key + X-Rater; never the
body's word from an anonymous client, never the raw key), and export_round's rules, one test each."""
import http.client
import json
import sqlite3
import time

import pytest

from chatfactory.serve.feedback import MIGRATIONS, FeedbackStore, FeedbackStoreError, export_run, validate
from conftest import make_run

C1 = [{"role": "user", "content": "Name a colour."}]
C2 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]

# issue 24's table and index, word for word (feedback.py at commit 52eda28): what every existing
# runs/NAME/feedback.sqlite holds, at user_version 0
TODAY_SCHEMA = """
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
TODAY_INDEX = "CREATE INDEX IF NOT EXISTS feedback_conv ON feedback (conv_key, kind, rating, id)"
# (kind, messages, answer, answer_b, rating, preferred); conv_key as issue 24's conversation_key wrote it
TODAY_ROWS = [("rating", C1, "Blue.", None, 1, None), ("rating", C1, "I refuse.", None, -1, None),
              ("comparison", C1, "Red.", "Green, like grass.", None, 1), ("comparison", C2, "4", "5", None, 0),
              ("rating", C2, "4", None, 1, None), ("rating", C1, "Blue.", None, -1, None),
              ("comparison", C2, "4", "4", None, 0), ("rating", C2, "Five", None, -1, None)]
CONV_KEYS = {json.dumps(C1): "21bd2aafb125382a9a93054d8101cd0248ef7c63875813222f6ea98363467348"}
# what issue 24's export wrote for TODAY_ROWS (run with that code): comparisons, then thumbs up x down
TODAY_EXPORT = [{"prompt": C1, "chosen": "Green, like grass.", "rejected": "Red."},
                {"prompt": C2, "chosen": "4", "rejected": "5"},
                {"prompt": C1, "chosen": "Blue.", "rejected": "I refuse."},
                {"prompt": C2, "chosen": "4", "rejected": "Five"}]


def todays_store(path):
    """A feedback.sqlite as issue 24's FeedbackStore left it: WAL, its table and index, its rows."""
    from hashlib import sha256
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(TODAY_SCHEMA)
    con.execute(TODAY_INDEX)
    key = {json.dumps(m): sha256(json.dumps(m, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
           for m in (C1, C2)}
    con.executemany("INSERT INTO feedback (created, kind, messages, answer, answer_b, rating, preferred, model, stage,"
                    " conv_key) VALUES (?, ?, ?, ?, ?, ?, ?, 'demo/sft', 'sft', ?)",
                    [(time.time(), k, json.dumps(m), a, b, r, p, key[json.dumps(m)])
                     for k, m, a, b, r, p in TODAY_ROWS])
    con.commit()
    con.close()
    assert key[json.dumps(C1)] == CONV_KEYS[json.dumps(C1)]  # the key is the one issue 24's code computes


def user_version(path) -> int:
    con = sqlite3.connect(path)
    try:
        return con.execute("PRAGMA user_version").fetchone()[0]
    finally:
        con.close()


def read_jsonl(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# ---------------------------------------------------------------- the schema and its migrations

def test_a_store_written_by_todays_code_opens_and_exports_as_before(tmp_path):
    db = tmp_path / "feedback.sqlite"
    todays_store(db)
    assert user_version(db) == 0
    store = FeedbackStore(db)
    assert user_version(db) == len(MIGRATIONS) == 2
    rows = store.rows()
    assert [(r["kind"], r["messages"], r["answer"], r["answer_b"], r["rating"], r["preferred"]) for r in rows] == \
        [tuple(x) for x in TODAY_ROWS]
    # the old comparisons read as votes: their winner as a choice, both answers by the served model
    assert [(r["choice"], r["model"], r["model_b"]) for r in rows if r["kind"] == "comparison"] == \
        [("b", "demo/sft", "demo/sft"), ("a", "demo/sft", "demo/sft"), ("a", "demo/sft", "demo/sft")]
    assert all(r["rater"] is None and r["shown_left"] is None and r["vote_key"] for r in rows)
    assert store.comparisons() == TODAY_EXPORT
    assert store.export(tmp_path / "out.jsonl") == 4 and read_jsonl(tmp_path / "out.jsonl") == TODAY_EXPORT
    # opened again: nothing to migrate, and the rater ids stay what they were (the salt is kept)
    rid = store.rater_id("cookie", "x" * 24)
    again = FeedbackStore(db)
    assert again.rater_id("cookie", "x" * 24) == rid and len(again.rows()) == len(TODAY_ROWS)
    assert FeedbackStore(tmp_path / "other.sqlite").rater_id("cookie", "x" * 24) != rid  # each store its own salt


def test_a_store_from_before_conv_key_migrates_through_both_versions(tmp_path):
    db = tmp_path / "feedback.sqlite"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE feedback (id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, kind TEXT NOT "
                "NULL, messages TEXT NOT NULL, answer TEXT NOT NULL, answer_b TEXT, rating INTEGER, preferred INTEGER,"
                " model TEXT, stage TEXT)")
    con.execute("INSERT INTO feedback (created, kind, messages, answer, answer_b, preferred) VALUES "
                "(0, 'comparison', ?, 'x', 'y', 1)", (json.dumps(C1),))
    con.commit()
    con.close()
    store = FeedbackStore(db)
    (row,) = store.rows()
    assert row["conv_key"] == CONV_KEYS[json.dumps(C1)] and row["choice"] == "b"
    assert store.comparisons() == [{"prompt": C1, "chosen": "y", "rejected": "x"}]


def test_a_migration_that_fails_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    """Each opening migrates in one transaction, the version number with it: a crash halfway (here, the
    second migration failing after its first column) leaves version 0 and its rows, and the next opening
    migrates from there."""
    import chatfactory.serve.feedback as fb

    db = tmp_path / "feedback.sqlite"
    todays_store(db)

    def half(con):
        con.execute("ALTER TABLE feedback ADD COLUMN choice TEXT")
        raise OSError("killed")

    monkeypatch.setattr(fb, "MIGRATIONS", (fb.MIGRATIONS[0], half))
    with pytest.raises(OSError, match="killed"):
        FeedbackStore(db)
    con = sqlite3.connect(db)
    assert user_version(db) == 0 and "choice" not in {r[1] for r in con.execute("PRAGMA table_info(feedback)")}
    con.close()
    monkeypatch.undo()
    assert FeedbackStore(db).comparisons() == TODAY_EXPORT and user_version(db) == 2


def test_a_corrupt_or_newer_file_is_a_clear_error_naming_it(tmp_path, capsys):
    from chatfactory.cli import main

    run = tmp_path / "run"
    run.mkdir()
    db = run / "feedback.sqlite"
    db.write_bytes(b"\x00garbage, not a database\xff" * 200)
    with pytest.raises(FeedbackStoreError, match="not a readable feedback store") as e:
        FeedbackStore(db)
    assert str(db) in str(e.value) and isinstance(e.value, ValueError)
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no sqlite3 traceback under it
    with pytest.raises(FeedbackStoreError, match=str(db)):
        export_run(run)
    assert main(["feedback", "export", "--run", str(run)]) == 2  # the CLI prints it, no traceback
    err = capsys.readouterr().err
    assert str(db) in err and "Traceback" not in err

    newer = tmp_path / "newer.sqlite"
    FeedbackStore(newer)
    con = sqlite3.connect(newer)
    con.execute("PRAGMA user_version = 99")
    con.close()
    with pytest.raises(FeedbackStoreError, match=f"{newer}: a feedback store of schema version 99, written by a newer"):
        FeedbackStore(newer)


# ---------------------------------------------------------------- what a vote keeps

def test_a_vote_keeps_its_choice_side_versions_rater_reason_and_time(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite")
    t0 = time.time()
    store.add({"kind": "comparison", "messages": C1, "answers": ["Red.", "Blue."], "choice": "both_bad",
               "shown_left": 1, "models": ["demo/v1", "demo/v2"], "reason": "neither is a colour I like"},
              "demo/sft", "sft", rater="r1")
    store.add({"kind": "comparison", "messages": C1, "answers": ["Red.", "Blue."], "preferred": 1}, "demo/sft", "sft")
    store.add({"kind": "rating", "messages": C1, "answer": "Red.", "rating": -1, "reason": "too short"},
              "demo/sft", "sft", rater="r2")
    a, b, c = store.rows()
    assert (a["choice"], a["preferred"], a["shown_left"], a["model"], a["model_b"], a["rater"], a["reason"]) == \
        ("both_bad", None, 1, "demo/v1", "demo/v2", "r1", "neither is a colour I like")
    assert t0 <= a["created"] <= time.time()
    assert (b["choice"], b["preferred"], b["shown_left"], b["model"], b["model_b"], b["rater"]) == \
        ("b", 1, None, "demo/sft", "demo/sft", None)
    assert (c["rating"], c["reason"], c["model"], c["model_b"], c["rater"]) == (-1, "too short", "demo/sft", None, "r2")


@pytest.mark.parametrize("change, field", [
    ({"choice": "a"}, "choice"),  # and preferred: two answers to one question
    ({"preferred": None}, "choice"),  # neither
    ({"preferred": None, "choice": "A"}, "choice"),
    ({"preferred": True}, "preferred"),
    ({"shown_left": 2}, "shown_left"),
    ({"models": ["v1"]}, "models"),
    ({"models": ["v1", ""]}, "models"),
    ({"reason": "x" * 501}, "reason"),
    ({"answers": ["only one"]}, "answers"),
])
def test_a_bad_comparison_is_refused_naming_the_field(change, field):
    body = {"kind": "comparison", "messages": C1, "answers": ["x", "y"], "preferred": 0, **change}
    with pytest.raises(ValueError, match=rf"^feedback\.{field}: "):
        validate(body)


def test_old_and_new_bodies_are_the_same_vote():
    old = validate({"kind": "comparison", "messages": C1, "answers": ["x", "y"], "preferred": 1})
    new = validate({"kind": "comparison", "messages": C1, "answers": ["x", "y"], "choice": "b"})
    assert old == new and old["choice"] == "b" and old["preferred"] == 1
    assert validate({"kind": "comparison", "messages": C1, "answers": ["x", "y"], "choice": "tie"})["preferred"] is None
    with pytest.raises(ValueError, match=r"^feedback\.rating: "):
        validate({"kind": "rating", "messages": C1, "answer": "x", "rating": 0})


# ---------------------------------------------------------------- export_round's rules, one at a time

def vote(store, rater, a, b, choice, messages=C1, models=None):
    return store.add({"kind": "comparison", "messages": messages, "answers": [a, b], "choice": choice,
                      **({"models": models} if models else {})}, "demo/v1", "sft", rater=rater)


def rate(store, rater, answer, rating, messages=C1):
    return store.add({"kind": "rating", "messages": messages, "answer": answer, "rating": rating}, "demo/v1", "sft",
                     rater=rater)


def round_of(store, tmp_path, **kw):
    out = tmp_path / "round.jsonl"
    stats = store.export_round(out, **kw)
    pairs = read_jsonl(out)
    assert len(pairs) == stats["pairs"]
    return stats, pairs


def test_round_ties_and_both_bad_give_no_pair_and_both_bad_gives_negatives(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite")
    vote(store, "r1", "Red.", "Blue.", "tie")
    bad = vote(store, "r1", "Mauve?", "Dunno.", "both_bad", models=["demo/v1", "demo/v2"])
    vote(store, "r2", "Red.", "Blue.", "a")
    neg = tmp_path / "neg.jsonl"
    stats, pairs = round_of(store, tmp_path, negatives_path=neg)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("Red.", "Blue.")]
    assert stats["dropped"] == {"tie": 1, "both_bad": 1, "duplicate": 0, "rater_cap": 0, "equal": 0}
    assert read_jsonl(neg) == [
        {"prompt": C1, "answer": "Mauve?", "rating": -1, "vote_id": bad, "rater": "r1", "model": "demo/v1"},
        {"prompt": C1, "answer": "Dunno.", "rating": -1, "vote_id": bad, "rater": "r1", "model": "demo/v2"}]
    assert store.comparisons() == [{"prompt": C1, "chosen": "Red.", "rejected": "Blue."}]  # export: the same rule


def test_round_duplicates_of_one_rater_on_one_pair_count_once_the_last_wins(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite")
    vote(store, "r1", "Red.", "Blue.", "a")
    last = vote(store, "r1", "Blue.", "Red.", "a")  # the same pair, the other way round: Blue. wins now
    vote(store, "r1", "Red.", "Blue.", "b", messages=C2)  # another conversation: another pair
    other = vote(store, "r2", "Red.", "Blue.", "a")  # another rater: counts
    stats, pairs = round_of(store, tmp_path)
    assert [(p["vote_id"], p["chosen"], p["prompt"]) for p in pairs] == \
        [(last, "Blue.", C1), (last + 1, "Blue.", C2), (other, "Red.", C1)]
    assert stats["dropped"]["duplicate"] == 1 and stats["votes"] == 4 and stats["raters"] == 2
    # a rater's thumbs on one answer: the last one counts (r1 took back its thumbs down on Blue.)
    store2 = FeedbackStore(tmp_path / "g.sqlite")
    rate(store2, "r1", "Red.", 1)
    rate(store2, "r1", "Blue.", -1)
    rate(store2, "r1", "Blue.", 1)
    rate(store2, "r1", "Green.", -1)
    stats, pairs = round_of(store2, tmp_path)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("Red.", "Green."), ("Blue.", "Green.")]
    assert stats["dropped"]["duplicate"] == 1


def test_round_a_pair_the_rater_voted_on_in_an_earlier_round_is_a_duplicate(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite")
    vote(store, "r1", "Red.", "Blue.", "a")
    first, _ = round_of(store, tmp_path)
    assert first["pairs"] == 1 and first["last_id"] == 1
    vote(store, "r1", "Blue.", "Red.", "b")  # again, next round
    vote(store, "r2", "Blue.", "Red.", "b")  # someone else's first vote on it
    stats, pairs = round_of(store, tmp_path, after_id=first["last_id"])
    assert [p["rater"] for p in pairs] == ["r2"] and stats["dropped"]["duplicate"] == 1


def test_round_caps_each_rater_at_their_first_pairs(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite")
    for i in range(5):
        vote(store, "script", f"good {i}", f"bad {i}", "a")
        if i < 2:
            vote(store, "person", f"nice {i}", f"meh {i}", "b")
    vote(store, "script", "awful", "worse", "both_bad")  # a both-bad vote counts against the cap too
    vote(store, "script", "same", "same?", "tie")  # a tie does not: it gives nothing
    stats, pairs = round_of(store, tmp_path, max_per_rater=3)
    assert [p["chosen"] for p in pairs] == ["good 0", "meh 0", "good 1", "meh 1", "good 2"]
    assert stats["dropped"] == {"tie": 1, "both_bad": 0, "duplicate": 0, "rater_cap": 3, "equal": 0}
    assert stats["votes"] == stats["pairs"] + sum(stats["dropped"].values())  # every vote accounted for once
    assert round_of(store, tmp_path)[0]["pairs"] == 7  # the default cap (200) takes them all
    with pytest.raises(ValueError, match="max_per_rater"):
        store.export_round(tmp_path / "x.jsonl", max_per_rater=0)


def test_round_drops_pairs_whose_answers_are_equal(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite")
    vote(store, "r1", "Blue.", "Blue.", "a")
    vote(store, "r1", "Blue.", "Blue!", "a")
    rate(store, "r2", "Red.", 1)
    rate(store, "r3", "Red.", -1)  # up and down on one answer: not a pair with itself
    stats, pairs = round_of(store, tmp_path)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("Blue.", "Blue!")]
    assert stats["dropped"]["equal"] == 2


def test_round_pairs_thumbs_as_export_does_in_the_round_of_the_later_rating(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite")
    rate(store, "r1", "Blue.", 1)
    rate(store, "r1", "Red.", 1, messages=C2)  # C2 has no thumbs down yet: no pair
    first, pairs = round_of(store, tmp_path)
    assert first["pairs"] == 0 and first["votes"] == 2
    down = rate(store, "r2", "I refuse.", -1)
    down2 = rate(store, "r2", "5", -1, messages=C2)
    stats, pairs = round_of(store, tmp_path, after_id=first["last_id"])
    # each pair is the later rating's: its id and rater; the versions are each answer's
    assert pairs == [
        {"prompt": C1, "chosen": "Blue.", "rejected": "I refuse.", "vote_id": down, "rater": "r2",
         "models": ["demo/v1", "demo/v1"]},
        {"prompt": C2, "chosen": "Red.", "rejected": "5", "vote_id": down2, "rater": "r2",
         "models": ["demo/v1", "demo/v1"]}]
    assert [(p["chosen"], p["rejected"]) for p in store.comparisons()] == [("Blue.", "I refuse."), ("Red.", "5")]
    rate(store, "r3", "Green.", 1)  # a new answer pairs with the old thumbs down; the old pair is not read again
    third, pairs = round_of(store, tmp_path, after_id=stats["last_id"])
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("Green.", "I refuse.")] and pairs[0]["rater"] == "r3"


def test_round_reads_only_the_votes_after_after_id(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite")
    empty = store.export_round(tmp_path / "r0.jsonl", after_id=0)
    assert empty == {"pairs": 0, "votes": 0, "last_id": 0, "raters": 0,
                     "dropped": {"tie": 0, "both_bad": 0, "duplicate": 0, "rater_cap": 0, "equal": 0}}
    assert (tmp_path / "r0.jsonl").read_text() == ""
    ids = [vote(store, f"r{i % 2}", f"x{i}", f"y{i}", "ab"[i % 2]) for i in range(4)]
    first = store.export_round(tmp_path / "r1.jsonl", after_id=0)
    assert (first["pairs"], first["votes"], first["last_id"], first["raters"]) == (4, 4, ids[-1], 2)
    ids2 = [vote(store, "r9", f"x{i}", f"z{i}", "a") for i in range(3)]
    second = store.export_round(tmp_path / "r2.jsonl", after_id=first["last_id"])
    assert (second["pairs"], second["votes"], second["last_id"], second["raters"]) == (3, 3, ids2[-1], 1)
    assert [p["vote_id"] for p in read_jsonl(tmp_path / "r2.jsonl")] == ids2
    same = store.export_round(tmp_path / "r3.jsonl", after_id=second["last_id"])
    assert (same["pairs"], same["votes"], same["last_id"]) == (0, 0, second["last_id"])
    with pytest.raises(ValueError, match="after_id"):
        store.export_round(tmp_path / "x.jsonl", after_id=-1)


def test_round_votes_from_before_raters_each_count_alone(tmp_path):
    db = tmp_path / "feedback.sqlite"
    todays_store(db)
    store = FeedbackStore(db)
    stats, pairs = round_of(store, tmp_path, max_per_rater=1)  # no rater: not capped
    assert [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs] == TODAY_EXPORT
    assert {p["rater"] for p in pairs} == {""} and stats["raters"] == 0
    assert stats["dropped"] == {"tie": 0, "both_bad": 0, "duplicate": 0, "rater_cap": 0, "equal": 2}


def test_round_pairs_load_as_comparisons_with_their_extra_keys(tmp_path):
    from chatfactory.data.preferences import load_comparisons

    store = FeedbackStore(tmp_path / "f.sqlite")
    vote(store, "r1", "Red.", "Blue.", "b", messages=C2, models=["demo/v1", "demo/v2"])
    rate(store, "r1", "Green.", 1)
    rate(store, "r2", "No.", -1)
    _, pairs = round_of(store, tmp_path)
    assert pairs[0]["models"] == ["demo/v2", "demo/v1"]  # the chosen answer's version first
    loaded = load_comparisons(str(tmp_path / "round.jsonl"))
    assert [(p.prompt, p.chosen, p.rejected) for p in loaded] == [(C2, "Blue.", "Red."), (C1, "Green.", "No.")]


def test_round_export_is_atomic(tmp_path, monkeypatch):
    store = FeedbackStore(tmp_path / "f.sqlite")
    vote(store, "r1", "Red.", "Blue.", "a")
    out = tmp_path / "round.jsonl"
    out.write_text("the last round\n")

    def broken(*a, **kw):
        yield "pair", {"prompt": C1, "chosen": "x", "rejected": "y"}
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FeedbackStore, "_round", broken)
    with pytest.raises(Exception, match="disk full"):
        store.export_round(out)
    assert out.read_text() == "the last round\n" and not (tmp_path / "round.jsonl.tmp").exists()


# ---------------------------------------------------------------- over HTTP: bodies and raters

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("votes") / "v")


def call(url, method, path, body=None, headers=None, source="127.0.0.1"):
    """-> (status, response headers as a list, parsed JSON or None)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60, source_address=(source, 0))
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        payload = r.read()
        is_json = r.getheader("content-type", "").startswith("application/json")
        return r.status, r.getheaders(), (json.loads(payload) if payload and is_json else None)
    finally:
        conn.close()


def set_cookies(headers) -> list[str]:
    return [v for k, v in headers if k.lower() == "set-cookie"]


def test_old_and_new_bodies_over_http_and_errors_naming_the_field(run_dir, serve_run):
    url, svc, _ = serve_run(run_dir)
    old = {"kind": "comparison", "messages": C1, "answers": ["Red.", "Blue."], "preferred": 1}
    new = {"kind": "comparison", "messages": C2, "answers": ["4", "5"], "choice": "tie", "shown_left": 1,
           "models": ["v/1", "v/2"], "reason": "both fine"}
    rating = {"kind": "rating", "messages": C2, "answer": "4", "rating": 1, "reason": "right"}
    for body in (old, new, rating):
        status, _, r = call(url, "POST", "/v1/feedback", body)
        assert status == 200 and r["object"] == "feedback", r
    rows = svc.feedback.rows()[-3:]
    assert [(r["choice"], r["preferred"], r["shown_left"], r["model"], r["model_b"], r["reason"]) for r in rows] == [
        ("b", 1, None, svc.name, svc.name, None), ("tie", None, 1, "v/1", "v/2", "both fine"),
        (None, None, None, svc.name, None, "right")]
    for change, param, code in (({"choice": "a"}, "choice", "invalid_value"),
                                ({"preferred": None}, "choice", "missing"),
                                ({"preferred": None, "choice": "left"}, "choice", "invalid_value"),
                                ({"shown_left": 3}, "shown_left", "invalid_value"),
                                ({"models": ["a", "b", "c"]}, "models", "invalid_value"),
                                ({"reason": "x" * 501}, "reason", "message_too_long")):
        status, _, err = call(url, "POST", "/v1/feedback", {**old, **change}, source="127.0.3.1")
        assert status == 400 and err["error"]["param"] == param and err["error"]["code"] == code, (change, err)


def test_an_anonymous_rater_is_its_cookie_or_its_address_never_its_word(run_dir, serve_run):
    url, svc, _ = serve_run(run_dir)
    status, headers, _ = call(url, "GET", "/")
    (cookie,) = set_cookies(headers)
    assert status == 200 and cookie.startswith("cf_rater=")
    attrs = {a.strip().lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= attrs and "secure" not in attrs  # (plain http here)
    token = cookie.split(";")[0].split("=", 1)[1]
    assert len(token) >= 16 and set_cookies(call(url, "GET", "/")[1]) != [cookie]  # random: one per browser
    assert set_cookies(call(url, "GET", "/", headers={"Cookie": f"cf_rater={token}"})[1]) == []  # kept, not replaced

    body = {"kind": "rating", "messages": C1, "answer": "Blue.", "rating": 1}
    with_cookie = {"Cookie": f"cf_rater={token}"}
    status, headers, _ = call(url, "POST", "/v1/feedback", {**body, "rater": "someone else"}, with_cookie)
    assert status == 200 and set_cookies(headers) == []
    call(url, "POST", "/v1/feedback", body, with_cookie, source="127.0.4.2")  # the same browser, another address
    # no cookie: the address, and a cookie to keep from now on
    status, headers, _ = call(url, "POST", "/v1/feedback", {**body, "rater": "r1"}, source="127.0.4.3")
    assert status == 200 and set_cookies(headers)[0].startswith("cf_rater=")
    call(url, "POST", "/v1/feedback", {**body, "rater": "r2"}, {"Cookie": "cf_rater=<script>"}, source="127.0.4.3")
    call(url, "POST", "/v1/feedback", body, source="127.0.4.4")
    raters = [r["rater"] for r in svc.feedback.rows()[-5:]]
    by_cookie, by_address = svc.feedback.rater_id("cookie", token), svc.feedback.rater_id("address", "127.0.4.3")
    assert raters == [by_cookie, by_cookie, by_address, by_address, svc.feedback.rater_id("address", "127.0.4.4")]
    assert len(set(raters)) == 3 and all(len(r) == 16 for r in raters)
    assert token.encode() not in svc.feedback.path.read_bytes() and b"127.0.4.3" not in svc.feedback.path.read_bytes()


def test_a_caller_with_the_api_key_names_its_raters_and_the_key_is_never_stored(tmp_path, serve_run):
    key = "sekrit-key-" + "k" * 20
    url, svc, _ = serve_run(make_run(tmp_path / "keyed"), api_key=key)
    body = {"kind": "comparison", "messages": C1, "answers": ["Red.", "Blue."], "choice": "a"}
    auth = {"Authorization": f"Bearer {key}"}
    assert call(url, "POST", "/v1/feedback", body)[0] == 401
    for headers in ({"X-Rater": "alice"}, {"X-Rater": "bob"}, {"X-Rater": "alice"}, {}):
        assert call(url, "POST", "/v1/feedback", body, {**auth, **headers})[0] == 200
    assert call(url, "POST", "/v1/feedback", {**body, "rater": "carol"}, auth)[0] == 200  # the body's, with the key
    status, _, err = call(url, "POST", "/v1/feedback", body, {**auth, "X-Rater": "x" * 201})
    assert status == 400 and err["error"]["param"] == "X-Rater"
    raters = [r["rater"] for r in svc.feedback.rows()]
    f = svc.feedback.rater_id
    assert raters == [f("key", key, "alice"), f("key", key, "bob"), f("key", key, "alice"), f("key", key, ""),
                      f("key", key, "carol")]
    assert len(set(raters)) == 4
    stats = svc.feedback.export_round(tmp_path / "round.jsonl")
    assert stats["raters"] == 4 and stats["dropped"]["duplicate"] == 1  # alice voted twice on one pair
    for where in (svc.feedback.path, tmp_path / "round.jsonl"):
        assert key.encode() not in where.read_bytes()


# ---------------------------------------------------------------- the web UI's compare mode (real Chromium)

def test_compare_mode_draws_the_sides_and_posts_every_choice(browser, tmp_path, serve_run):
    """Math.random is pinned so each side is drawn once: the boxes stay in the order the answers came, the
    left one on screen is ``shown_left``, "Prefer A" is under it, and A/B, tie and both-bad votes are stored
    with the side shown; the cf_rater cookie the page got is the votes' rater."""
    from test_webui import ScriptedScheduler

    url, svc, _ = serve_run(make_run(tmp_path / "ui"), slots=2, feedback_path=tmp_path / "feedback.sqlite",
                            scheduler=lambda svc: ScriptedScheduler(svc.tok, ["first answer", "second answer"], 0))
    ctx = browser.new_context(locale="en-US", bypass_csp=True)  # Playwright's waits evaluate strings
    ctx.add_init_script("window.__draws = [0.9, 0.9, 0.1, 0.1]; Math.random = () => window.__draws.shift() ?? 0.1;")
    page = ctx.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'ui/sft'")
    (cookie,) = [c["value"] for c in ctx.cookies() if c["name"] == "cf_rater"]
    page.click("#settings-toggle")
    page.check("#compare")

    def ask(text: str, click: str, n_rows: int) -> dict:
        page.fill("#input", text)
        page.press("#input", "Enter")
        row = page.locator(".compare").nth(n_rows)
        row.locator(".tie").wait_for()
        boxes = row.locator(".msg.assistant")
        xs = [boxes.nth(i).bounding_box()["x"] for i in range(2)]
        left = 0 if xs[0] < xs[1] else 1
        assert boxes.nth(left).locator("button.prefer").text_content() == "Prefer A"
        assert boxes.nth(1 - left).locator("button.prefer").text_content() == "Prefer B"
        texts = [boxes.nth(i).locator(".content").text_content() for i in range(2)]
        target = {"left": boxes.nth(left).locator("button.prefer"), "right": boxes.nth(1 - left).locator(
            "button.prefer")}.get(click) or row.locator(click)
        n = len(svc.feedback.rows())
        target.click()
        page.wait_for_function(f"document.querySelectorAll('.compare')[{n_rows}].querySelector('button:disabled')")
        rows = svc.feedback.rows()
        assert len(rows) == n + 1
        assert page.is_enabled("#send")  # the chat goes on
        return {"left": left, "texts": texts, **rows[-1]}

    r = ask("one", "left", 0)  # drawn 0.9: answer 1 on the left; the left one wins: B (answers[1])
    assert (r["left"], r["shown_left"], r["choice"], r["preferred"]) == (1, 1, "b", 1)
    assert [r["answer"], r["answer_b"]] == r["texts"] and r["rater"] == svc.feedback.rater_id("cookie", cookie)
    r = ask("two", ".tie", 1)
    assert (r["left"], r["shown_left"], r["choice"], r["preferred"]) == (1, 1, "tie", None)
    r = ask("three", ".both-bad", 2)  # drawn 0.1: answer 0 on the left
    assert (r["left"], r["shown_left"], r["choice"]) == (0, 0, "both_bad")
    r = ask("four", "right", 3)
    assert (r["left"], r["shown_left"], r["choice"]) == (0, 0, "b")
    assert page.text_content("#status") == "Preference saved."
    # with neither better the chat goes on with the left answer; with a winner, with it
    history = page.evaluate("state.history.filter(m => m.role === 'assistant').map(m => m.content)")
    assert history == ["second answer", "second answer", "first answer", "second answer"]
    assert not errors
    ctx.close()
