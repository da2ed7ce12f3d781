"""The arena and its leaderboard over HTTP (issue 25, item 6): an admin puts a candidate version in the arena
before it is promoted; each battle is one prompt answered by the served version and the candidate, in an
order drawn per battle, with no version named until the vote; a scripted voter that prefers version 2's
answer in most battles ranks version 2 above version 1 on GET /v1/leaderboard with an interval that
excludes a tie; a vote that names versions itself is refused, and a
/v1/feedback comparison that names two versions is stored but never counted; each battle takes one vote;
the admin route refuses without the key; a promoted candidate closes the arena. A browser test plays one
battle through the web UI's Arena tab."""
import json
import random
import shutil
import sqlite3
import urllib.request

import pytest
from test_hot_swap import add_version

from chatfactory.serve.limits import ServerLimits
from chatfactory.store.versions import Versions
from conftest import make_run, post

KEY = "test-key-arena"
AUTH = {"Authorization": f"Bearer {KEY}"}
FAST_VOTES = ServerLimits(feedback_per_minute=1e6, feedback_burst=10**6)  # every scripted voter is 127.0.0.1
PROMPTS = [f"question number {i}: how are you today?" for i in range(60)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("arena") / "ar")
    assert add_version(run, seed=1) == 2  # a candidate: not promoted
    return run


def ask(url, prompt, model):
    """A greedy answer of ``model`` (a scripted voter learns what version 2 sounds like, as a person would)."""
    status, out = post(url, "/v1/chat/completions", {"model": model, "max_tokens": 8, "temperature": 0,
                                                     "messages": [{"role": "user", "content": prompt}]}, AUTH)
    assert status == 200, out
    return out["choices"][0]["message"]["content"]


def battle(url, prompt):
    status, out = post(url, "/v1/arena/battle", {"messages": [{"role": "user", "content": prompt}],
                                                 "max_tokens": 8, "temperature": 0}, AUTH)
    assert status == 200, out
    return out


def vote(url, bid, choice, rater="scripted", **extra):
    return post(url, "/v1/arena/vote", {"battle_id": bid, "choice": choice, **extra}, {**AUTH, "X-Rater": rater})


def board(url):
    status, out = post(url, "/v1/leaderboard", None, AUTH)
    assert status == 200, out
    return out


def test_votes_rank_the_preferred_version_first(run, serve_run):
    url, svc, _ = serve_run(run, stage=None, api_key=KEY, watch=0, server_limits=FAST_VOTES)
    prompt0 = [{"role": "user", "content": PROMPTS[0]}]
    # no arena yet; the admin route needs the key
    status, err = post(url, "/v1/arena/battle", {"messages": prompt0}, AUTH)
    assert status == 409 and err["error"]["code"] == "arena_closed", err
    assert post(url, "/v1/admin/arena", {"candidate": 2})[0] == 401
    status, err = post(url, "/v1/admin/arena", {"candidate": 1}, AUTH)
    assert status == 400 and err["error"]["param"] == "candidate", err  # the served one cannot battle itself
    status, err = post(url, "/v1/admin/arena", {"candidate": 9}, AUTH)
    assert status == 400 and err["error"]["param"] == "candidate" and "version 9" in err["error"]["message"], err
    status, err = post(url, "/v1/admin/arena", {"versions": [2, 2]}, AUTH)
    assert status == 400 and err["error"]["param"] == "versions", err
    status, state = post(url, "/v1/admin/arena", {"candidate": 2}, AUTH)
    assert status == 200 and state["open"] and state["models"] == ["ar/v1", "ar/v2"], state
    status, models = post(url, "/v1/models", None, AUTH)
    assert [(m["id"], m["role"]) for m in models["data"]] == [("ar/v1", "serving"), ("ar/v2", "arena")]
    assert svc.version == 1  # put in the arena before promotion: not served

    assert board(url) == {"object": "leaderboard", "battles": 0, "level": 0.95, "rounds": 200, "data": [],
                          "gaps": []}
    rng = random.Random(0)
    v2_first = 0
    for i, prompt in enumerate(PROMPTS):
        liked = ask(url, prompt, "ar/v2")
        out = battle(url, prompt)
        assert set(out) == {"id", "object", "answers", "finish_reasons"} and "ar/v" not in json.dumps(out)
        a0, a1 = out["answers"]
        assert a0 != a1, "the two versions' greedy answers should differ"
        # the voter prefers version 2's answer, with 15% random votes
        pick = "a" if a0 == liked else "b" if a1 == liked else rng.choice("ab")
        if rng.random() < 0.15:
            pick = rng.choice(["a", "b", "tie", "both_bad"])
        status, voted = vote(url, out["id"], pick, rater=f"r{i % 3}", shown_left=rng.randrange(2))
        assert status == 200 and voted["object"] == "arena.vote", voted
        # the names, revealed by the vote, are the server's record of who wrote what
        assert sorted(voted["models"]) == ["ar/v1", "ar/v2"]
        assert (voted["models"][0] == "ar/v2") == (a0 == liked)
        v2_first += voted["models"][0] == "ar/v2"
    assert 10 < v2_first < len(PROMPTS) - 10  # which version is answer 0 is drawn per battle

    final = board(url)
    assert final["battles"] == len(PROMPTS)
    first, second = final["data"]
    assert (first["model"], second["model"]) == ("ar/v2", "ar/v1") and first["score"] > second["score"]
    assert first["lo"] > second["hi"] or final["gaps"][0]["separated"]
    assert final["gaps"] == [{**final["gaps"][0], "better": "ar/v2", "worse": "ar/v1", "separated": True}]
    assert first["battles"] == second["battles"] == len(PROMPTS)
    assert first["wins"] + first["ties"] + first["losses"] == len(PROMPTS) and first["wins"] > first["losses"]

    rows = svc.feedback.rows()
    arena_rows = [r for r in rows if r["stage"] == "arena"]
    assert len(arena_rows) == len(PROMPTS) and {(r["kind"], r["model"] != r["model_b"]) for r in arena_rows} == {
        ("comparison", True)}
    assert arena_rows[0]["messages"] == [{"role": "user", "content": PROMPTS[0]}]


def test_a_vote_cannot_choose_the_versions_and_counts_once(run, serve_run):
    url, svc, _ = serve_run(run, stage=None, api_key=KEY, watch=0, server_limits=FAST_VOTES)
    assert post(url, "/v1/admin/arena", {"versions": [2, 1]}, AUTH)[0] == 200
    before = board(url)["battles"]
    out = battle(url, "a forged vote?")
    # a vote that names versions or answers itself is refused, naming the field
    for forged in ({"models": ["ar/v2", "ar/v1"]}, {"answers": ["x", "y"]}):
        status, err = vote(url, out["id"], "a", **forged)
        assert status == 400 and err["error"]["param"] == next(iter(forged)), err
    status, err = vote(url, out["id"], "left")
    assert status == 400 and err["error"]["param"] == "choice", err
    # the battle is still open after refused votes; it takes one vote, then no more
    assert vote(url, out["id"], "tie")[0] == 200
    status, err = vote(url, out["id"], "a")
    assert status == 404 and err["error"]["code"] == "battle_not_found" and err["error"]["param"] == "battle_id"
    assert vote(url, "battle-made-up", "a")[0] == 404
    # a comparison posted to /v1/feedback may say which versions wrote its answers (stored as said), but the
    # leaderboard counts only battles whose versions the server recorded
    forged = {"kind": "comparison", "messages": [{"role": "user", "content": "hi"}], "answers": ["x", "y"],
              "choice": "a", "models": ["ar/v1", "ar/v2"]}
    for _ in range(3):
        assert post(url, "/v1/feedback", forged, AUTH)[0] == 200
    assert board(url)["battles"] == before + 1  # the tie only
    # a streamed battle names no version either, and ends with the battle's id
    req = urllib.request.Request(url + "/v1/arena/battle", json.dumps(
        {"messages": [{"role": "user", "content": "stream it"}], "max_tokens": 6, "stream": True}).encode(),
        {"Content-Type": "application/json", **AUTH})
    events = [line[6:] for line in urllib.request.urlopen(req, timeout=60).read().decode().splitlines()
              if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "ar/v" not in "".join(events)
    done = json.loads(events[-2])
    assert done["object"] == "arena.battle" and done["id"].startswith("battle-") and len(done["finish_reasons"]) == 2
    assert {json.loads(e)["index"] for e in events[:-2]} <= {0, 1}
    status, voted = vote(url, done["id"], "b")
    assert status == 200 and sorted(voted["models"]) == ["ar/v1", "ar/v2"]


def test_a_promoted_candidate_closes_the_arena(run, tmp_path, serve_run):
    copy = tmp_path / "ar"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("feedback.sqlite*"))
    url, svc, _ = serve_run(copy, stage=None, api_key=KEY, watch=0)
    assert post(url, "/v1/admin/arena", {"candidate": 2}, AUTH)[0] == 200
    candidate = svc.arena[2]
    Versions(copy).promote(2)
    status, out = post(url, "/v1/admin/reload", {}, AUTH)
    assert status == 200 and out["changed"] and out["model"] == "ar/v2", out
    assert svc.current is candidate  # the arena's loaded, warm candidate is what is served now
    status, err = post(url, "/v1/arena/battle", {"messages": [{"role": "user", "content": "hi"}]}, AUTH)
    assert status == 409 and err["error"]["code"] == "arena_closed", err
    status, state = post(url, "/v1/admin/arena", None, AUTH)
    assert status == 200 and state == {"object": "arena", "open": False, "models": []}


def test_one_battle_through_the_web_ui(browser, run, tmp_path, serve_run):
    copy = tmp_path / "ar"  # a store of its own: this battle is the board's only one
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("feedback.sqlite*"))
    url, svc, _ = serve_run(copy, stage=None, watch=0)
    svc.hotswap.set_arena(candidate=2)  # (the admin route needs a key; this server has none)
    page = browser.new_page(bypass_csp=True)  # (wait_for_function evaluates a string; the page's CSP forbids it)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'ar/v1'")
    page.click("#tab-arena")
    assert page.is_visible("#arena-panel") and not page.is_visible("#chat-panel")
    page.fill("#arena-input", "Which version are you?")
    page.press("#arena-input", "Enter")
    page.wait_for_selector(".arena button.prefer >> nth=1")
    boxes = page.locator(".arena .msg.assistant")
    assert boxes.count() == 2 and page.locator(".arena .model-name").count() == 0
    assert "ar/v" not in page.locator("#arena-panel").inner_text()  # anonymous until the vote
    left = page.locator(".arena button.prefer", has_text="Prefer A")
    left.click()
    page.wait_for_function("document.getElementById('status').textContent.includes('A was')")
    names = [boxes.nth(i).locator(".model-name").text_content() for i in range(2)]
    assert sorted(names) == ["ar/v1", "ar/v2"]
    db = sqlite3.connect(svc.feedback.path)
    row = db.execute("SELECT answer, answer_b, model, model_b, choice, shown_left, stage FROM feedback"
                     " ORDER BY id DESC LIMIT 1").fetchone()
    db.close()
    def letters(text):  # what the page's Markdown keeps of the random model's text, whatever its markup
        return [c for c in text if c.isalnum()]
    texts = [letters(boxes.nth(i).locator(".content").text_content()) for i in range(2)]
    assert row[6] == "arena" and [row[2], row[3]] == names and [letters(row[0]), letters(row[1])] == texts
    # the person chose the answer shown on the left
    assert row[4] == "ab"[row[5]] and "preferred" in boxes.nth(row[5]).get_attribute("class")
    shown = page.locator("#status").text_content()
    assert f"A was {names[row[5]]}, B was {names[1 - row[5]]}" in shown

    page.click("#tab-board")
    page.wait_for_selector("#board tbody tr >> nth=1")
    cells = page.locator("#board tbody tr").nth(0).locator("td")
    assert cells.nth(1).text_content() == names[row[5]] and cells.nth(5).text_content() == "1"  # the winner first
    assert page.locator("#board-summary").text_content() == "Arena votes: 1"
    assert not errors
    page.close()


def test_open_battles_are_bounded_in_number_size_and_time():
    from chatfactory.serve.arena import BattleBook

    book = BattleBook(cap=3, ttl=60, max_chars=100)
    msgs = [{"role": "user", "content": "x" * 10}]
    ids = [book.add(msgs, ["a" * 5, "b" * 5], ["v1", "v2"]) for _ in range(4)]  # 20 characters each
    assert book.take(ids[0]) is None and book.take(ids[1])["models"] == ["v1", "v2"]  # past the cap: the oldest
    assert book.take(ids[1]) is None  # one vote per battle
    big = book.add([{"role": "user", "content": "y" * 90}], ["", ""], ["v1", "v2"])  # 90 + 40 > 100 characters
    assert book.take(ids[2]) is None and book.take(ids[3]) is None and book.take(big) is not None
    book.ttl = -1  # every open battle is past its time
    assert book.take(book.add(msgs, ["a", "b"], ["v1", "v2"])) is None
