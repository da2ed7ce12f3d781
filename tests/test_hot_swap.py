"""Hot swap (issue 25, item 5): `chatfactory serve --run R` serves the version RUN/versions/serving.json names
and switches to a newly promoted one without a restart: 16 clients streaming and not streaming while the
file flips to version 2 see 0 failed requests, every request started before the flip answered by version 1
and every one started after it by version 2, requests in flight across it finished on version 1, whose
scheduler is closed only once they are done; rollback (through the file, and the admin route) flips back.
Admin routes need the API key (401), this server's origin (403), and a server without a key refuses them
(403). Real servers (conftest's ``serve_run``) on a tiny random-weight run."""
import http.client
import json
import shutil
import threading
import time

import pytest
import torch

from chatfactory.model.gpt import GPT, GPTConfig
from chatfactory.store.checkpoint import save_checkpoint, unique_state_dict
from chatfactory.store.versions import Versions
from conftest import make_run, post

KEY = "test-key-hot-swap"
AUTH = {"Authorization": f"Bearer {KEY}"}


def add_version(run, seed: int) -> int:
    """A version made as `learn` makes one (store/versions.py's API), with its own weights; not promoted."""
    v = Versions(run)
    v.ensure_first(run / "sft")
    n = v.candidate(v.serving())
    cfg = GPTConfig(**json.loads((run / "sft" / "config.json").read_text())["model"])
    torch.manual_seed(seed)
    save_checkpoint(v.dir(n) / "policy", unique_state_dict(GPT(cfg)), {"model": cfg.to_dict()})
    v.write_info(n, policy="policy")
    return n


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("swap") / "hs")
    assert add_version(run, seed=1) == 2
    return run


def chat(url, stream: bool, max_tokens: int = 12, headers=None, model=None) -> dict:
    """One chat completion over HTTP -> {"model", "finish", "status"}; a streamed one read to its [DONE]."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": max_tokens, "stream": stream,
            "temperature": 1.0, **({"model": model} if model else {})}
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json",
                                                                          **(headers or {})})
        r = conn.getresponse()
        if r.status != 200:
            return {"status": r.status, "model": None, "finish": None, "error": r.read().decode()}
        if not stream:
            out = json.loads(r.read())
            return {"status": 200, "model": out["model"], "finish": out["choices"][0]["finish_reason"]}
        models, finish, done = set(), None, False
        for line in r.read().decode().splitlines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"status": 500, "model": None, "finish": None, "error": chunk}
            models.add(chunk["model"])
            for c in chunk["choices"]:
                finish = c.get("finish_reason") or finish
        assert done and len(models) == 1, (done, models)  # one version from the first chunk to the last
        return {"status": 200, "model": models.pop(), "finish": finish}
    finally:
        conn.close()


def test_a_promoted_version_is_served_without_failing_a_request(run, serve_run):
    url, svc, _ = serve_run(run, stage=None, api_key=KEY, watch=0.1)
    versions = Versions(run)
    assert svc.name == "hs/v1" and svc.version == 1 and versions.serving() == 1
    v1 = svc.current
    real_step = v1.scheduler.step

    def paced_step():  # version 1 answers slowly, so that requests are in flight when the file flips
        time.sleep(0.01)
        real_step()
    v1.scheduler.step = paced_step

    results, stop = [], threading.Event()
    lock = threading.Lock()

    def client(i):
        k = 0
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                out = chat(url, stream=(i + k) % 2 == 0, headers=AUTH)
            except Exception as e:  # a dropped connection is a failed request too
                out = {"status": None, "model": None, "finish": None, "error": repr(e)}
            with lock:
                results.append({**out, "start": t0, "end": time.monotonic()})
            k += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    flip = time.monotonic()
    versions.promote(2)  # what `learn` does when the gate passes: serving.json names version 2
    deadline = time.time() + 60
    while svc.version != 2:
        assert time.time() < deadline, "the server did not switch to version 2"
        time.sleep(0.01)
    swapped = time.monotonic()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(timeout=60)

    failed = [r for r in results if r["status"] != 200 or r["finish"] not in ("stop", "length")]
    assert not failed, failed[:3]  # "abort" would mean a request was cut by its scheduler closing
    before = [r for r in results if r["start"] < flip]
    after = [r for r in results if r["start"] > swapped]
    assert before and after and len(results) >= 40, (len(before), len(after), len(results))
    assert {r["model"] for r in before} == {"hs/v1"}
    assert {r["model"] for r in after} == {"hs/v2"}
    # requests started on version 1 kept going after version 2 took traffic, and finished there
    assert any(r["model"] == "hs/v1" and r["end"] > swapped for r in results)
    assert v1.closed.wait(30) and v1.scheduler._closed and v1.users == 0
    assert not svc.current.closed.is_set() and svc.current.scheduler is not v1.scheduler

    status, models = post(url, "/v1/models", None, AUTH)
    assert status == 200 and [m["id"] for m in models["data"]] == ["hs/v2"] and models["data"][0]["version"] == 2
    # a client that read the model list before the swap still gets an answer, from the version served now
    assert chat(url, False, headers=AUTH, model="hs/v1")["model"] == "hs/v2"
    assert post(url, "/v1/chat/completions", {"model": "hs/v9", "messages": [{"role": "user", "content": "x"}]},
                AUTH)[0] == 404

    # rollback flips back: through the file (`chatfactory rollback`), then through the admin route
    v2 = svc.current
    versions.rollback()
    deadline = time.time() + 60
    while svc.version != 1:
        assert time.time() < deadline, "the server did not roll back to version 1"
        time.sleep(0.01)
    assert chat(url, True, headers=AUTH)["model"] == "hs/v1" and v2.closed.wait(30)
    status, out = post(url, "/v1/admin/rollback", {"to": 2}, AUTH)
    assert status == 200 and out == {"object": "reload", "changed": True, "version": 2, "model": "hs/v2",
                                     "previous": "hs/v1"}, out
    assert chat(url, False, headers=AUTH)["model"] == "hs/v2"
    status, out = post(url, "/v1/admin/reload", {}, AUTH)  # nothing new: nothing changes
    assert status == 200 and out["changed"] is False and out["model"] == "hs/v2"
    status, err = post(url, "/v1/admin/rollback", {"to": 7}, AUTH)
    assert status == 400 and err["error"]["param"] == "to" and "version 7" in err["error"]["message"], err
    assert svc.version == 2


def test_admin_routes_need_the_key_and_this_servers_origin(run, serve_run):
    url, svc, _ = serve_run(run, stage=None, api_key=KEY, watch=0)
    for path in ("/v1/admin/reload", "/v1/admin/rollback", "/v1/admin/arena"):
        status, err = post(url, path, {})
        assert status == 401 and err["error"]["code"] == "invalid_api_key", (path, err)
        status, err = post(url, path, {}, {"Authorization": "Bearer wrong"})
        assert status == 401, (path, err)
        status, err = post(url, path, {}, {**AUTH, "Origin": "http://evil.example"})
        assert status == 403 and err["error"]["code"] == "forbidden_origin", (path, err)
    # a server without a key refuses them all, from loopback too
    url2, svc2, _ = serve_run(run, stage=None, watch=0)
    for path in ("/v1/admin/reload", "/v1/admin/rollback", "/v1/admin/arena"):
        status, err = post(url2, path, {})
        assert status == 403 and err["error"]["code"] == "admin_disabled", (path, err)
    # a pinned --stage does not follow the versions: the admin routes say so
    url3, svc3, _ = serve_run(run, stage="sft", api_key=KEY)
    assert svc3.hotswap is None and svc3.name == "hs/sft"
    status, err = post(url3, "/v1/admin/reload", {}, AUTH)
    assert status == 409 and err["error"]["code"] == "versions_off", err


def test_a_version_that_cannot_load_leaves_the_served_one(run, tmp_path, serve_run):
    broken = tmp_path / "broken"
    shutil.copytree(run, broken, ignore=shutil.ignore_patterns("feedback.sqlite*"))
    url, svc, _ = serve_run(broken, stage=None, api_key=KEY, watch=0.1)
    versions = Versions(broken)
    assert svc.version == versions.serving()
    before = svc.name
    n = add_version(broken, seed=3)
    (versions.dir(n) / "policy" / "model.safetensors").write_bytes(b"not weights")
    versions.promote(n)
    deadline = time.time() + 30
    while svc.hotswap.last_error is None:
        assert time.time() < deadline, "the watcher did not look"
        time.sleep(0.02)
    assert svc.name == before and chat(url, False, headers=AUTH)["model"] == before
    status, err = post(url, "/v1/admin/reload", {}, AUTH)
    assert status == 400 and "model.safetensors" in err["error"]["message"], err
