"""A vote the server acknowledged survives the server being killed (SIGKILL) while votes are being written:
every id it answered with is in feedback.sqlite afterwards, and the file opens and exports (issue 25)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

from chatfactory.serve.feedback import FILENAME, FeedbackStore
from conftest import make_run, start_serve


def test_a_killed_server_loses_no_acknowledged_vote(tmp_path):
    run = make_run(tmp_path / "run")
    proc, url = start_serve(run, "--stage", "sft", "--feedback-rate", "1000000", start_new_session=True)
    acked: list[int] = []
    stop = threading.Event()

    def writer(k: int) -> None:
        i = 0
        while not stop.is_set():
            body = {"kind": "comparison", "messages": [{"role": "user", "content": f"writer {k} question {i}"}],
                    "answers": [f"answer a{i}", f"answer b{i}"], "choice": "a" if i % 2 else "b"}
            req = urllib.request.Request(url + "/v1/feedback", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    acked.append(json.loads(r.read())["id"])
            except (OSError, urllib.error.URLError, ValueError):
                return  # the server is gone
            i += 1

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    while len(acked) < 150 and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-write: eight clients are posting
    proc.wait(timeout=20)
    stop.set()
    for t in threads:
        t.join(timeout=20)
    assert len(acked) >= 150
    store = FeedbackStore(run / FILENAME)
    ids = {r["id"] for r in store.rows()}
    assert set(acked) <= ids, f"acknowledged but lost: {sorted(set(acked) - ids)[:10]}"
    assert store.export(tmp_path / "pairs.jsonl") == len(ids)  # every row readable, each a distinct pair
