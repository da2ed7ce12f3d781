"""Server hardening (issue 24), the feedback store: lengths, rows per conversation, a rate per client, and an
export that streams in bounded memory however adversarial the votes."""
import json
import sqlite3
import subprocess
import sys
import textwrap
import time

from test_serve_hardening import post_from

from chatfactory.serve.feedback import FeedbackStore
from conftest import make_run

CONV = [{"role": "user", "content": "Which is better?"}]

# the store's table as it was before conv_key (an existing runs/NAME/feedback.sqlite)
OLD_SCHEMA = """CREATE TABLE feedback (id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL,
kind TEXT NOT NULL, messages TEXT NOT NULL, answer TEXT NOT NULL, answer_b TEXT, rating INTEGER, preferred INTEGER,
model TEXT, stage TEXT)"""


def test_the_export_of_20k_adversarial_votes_is_bounded(tmp_path):
    """10,000 thumbs-up and 10,000 thumbs-down answers (all distinct) to one conversation, in a store written
    before the limits. Before: every up x every down, 10^8 pairs built in a list: killed at a 2 GB address
    space limit after ~10 s. After: at most 64 pairs for the conversation, read with cursors, written as
    they come, in well under 2 GB and a few seconds."""
    db = tmp_path / "feedback.sqlite"
    con = sqlite3.connect(db)
    con.execute(OLD_SCHEMA)
    msgs = json.dumps(CONV)
    con.executemany("INSERT INTO feedback (created, kind, messages, answer, rating) VALUES (?, 'rating', ?, ?, ?)",
                    [(time.time(), msgs, f"answer {i}", 1 if i % 2 else -1) for i in range(20_000)])
    con.commit()
    con.close()
    child = textwrap.dedent(f"""
        import resource, sys, time
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from chatfactory.serve.feedback import FeedbackStore
        t = time.perf_counter()
        n = FeedbackStore({str(db)!r}).export({str(tmp_path / 'out.jsonl')!r})
        # the peak resident memory of this process since exec (VmHWM: ru_maxrss would carry the parent's over
        # the fork, and the parent is a whole test session)
        hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM"))
        print(n, round(time.perf_counter() - t, 2), hwm // 1024)
    """)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - t
    print(f"\nexport: rc {p.returncode} in {wall:.1f} s: {p.stdout.strip()} {p.stderr.strip()[-200:]}")
    assert p.returncode == 0, p.stderr[-2000:]
    pairs, seconds, peak_mb = p.stdout.split()
    assert int(pairs) == 64 and float(seconds) < 10 and int(peak_mb) < 500, p.stdout
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(lines) == 64 and all(json.loads(x)["prompt"] == CONV for x in lines)
    assert len({json.loads(x)["chosen"] for x in lines}) > 1  # distinct answers, not one repeated


def test_feedback_rows_per_conversation_rate_and_lengths_are_limited(tmp_path, serve_run):
    """Before: any number of posts, from anyone, of any length under the 1 MB body. After (the defaults):
    20 at once then 60 a minute per client (429 with Retry-After), 64 rows per conversation (400), each
    message and answer at most 32,000 characters (400)."""
    url, svc, _ = serve_run(make_run(tmp_path / "fb"), slots=1)
    rating = {"kind": "rating", "messages": CONV, "answer": "A", "rating": 1}
    statuses = [post_from(url, "/v1/feedback", {**rating, "answer": f"a{i}"}, "127.0.0.2")[0] for i in range(25)]
    assert statuses[:20] == [200] * 20 and set(statuses[20:]) == {429}, statuses
    status, err = post_from(url, "/v1/feedback", rating, "127.0.0.2")
    assert status == 429 and err["error"]["code"] == "rate_limited"
    # from other addresses (as other people would), up to the conversation's 64 rows
    for i in range(44):
        status, _ = post_from(url, "/v1/feedback", {**rating, "answer": f"b{i}"}, f"127.0.1.{1 + i % 10}")
        assert status == 200, i
    status, err = post_from(url, "/v1/feedback", rating, "127.0.2.1")
    assert status == 400 and err["error"]["code"] == "feedback_limit" and err["error"]["param"] == "messages", err
    assert len(svc.feedback.rows()) == 64
    long = {"kind": "rating", "messages": [{"role": "user", "content": "x" * 32_001}], "answer": "a", "rating": 1}
    status, err = post_from(url, "/v1/feedback", long, "127.0.2.2")
    assert status == 400 and err["error"]["param"] == "messages[0].content", err
    status, err = post_from(url, "/v1/feedback", {**rating, "messages": [{"role": "user", "content": "new"}],
                                                  "answer": "y" * 32_001}, "127.0.2.3")
    assert status == 400 and err["error"]["param"] == "answer", err


def test_a_store_from_before_the_limits_opens_and_pairs_as_before(tmp_path):
    """An old feedback.sqlite gains its conversation keys when opened; pairs stay the same for ordinary data."""
    db = tmp_path / "feedback.sqlite"
    con = sqlite3.connect(db)
    con.execute(OLD_SCHEMA)
    rows = [("rating", CONV, "good", None, 1, None), ("rating", CONV, "bad", None, -1, None),
            ("comparison", CONV, "x", "y", None, 1), ("rating", CONV, "good", None, -1, None)]
    con.executemany("INSERT INTO feedback (created, kind, messages, answer, answer_b, rating, preferred)"
                    " VALUES (0, ?, ?, ?, ?, ?, ?)", [(k, json.dumps(m), a, b, r, p) for k, m, a, b, r, p in rows])
    con.commit()
    con.close()
    store = FeedbackStore(db)
    assert store.comparisons() == [{"prompt": CONV, "chosen": "y", "rejected": "x"},
                                   {"prompt": CONV, "chosen": "good", "rejected": "bad"}]
    assert len(store.rows()) == 4 and all(r["conv_key"] for r in store.rows())
