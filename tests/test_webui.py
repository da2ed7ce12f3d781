"""The web UI in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright's Python package;
no browser is downloaded): streaming, multi-turn history, settings, thumbs, compare mode, stop and
regenerate, rows in the SQLite file, and model output that tries HTML/script injection shown as text;
Enter while an input method composes (CDP's real composition events) does not send; every label follows
the browser's language (zh-CN, en-US); the weights' precision and memory mode of a `chatfactory serve
--quantize int8` subprocess are shown. (Streaming Chinese and emoji: tests/test_streaming_utf8.py.)

Most checks use a scripted stand-in for the scheduler (defined here, test-only) so the answer text is
known, including ``<img onerror>`` and ``<script>``; everything else (server, detokenizer, SSE, the
page) is the real code. One test drives the real tiny model end to end."""
import json
import re
import sqlite3
import threading
import time
import urllib.request

import pytest

from chatfactory.inference.batching import Step
from conftest import make_run, serve_subprocess

pytest.importorskip("playwright.sync_api",
                    reason="the playwright Python package is not installed")  # the module needs it
pytestmark = pytest.mark.browser


XSS = ('Here is **bold** and `code`.\n\n<img src=x onerror="window.__xss=1"> <script>window.__xss=2</script>\n'
       '- item one\n- item two')
OTHER = 'Another answer: <b onmouseover="window.__xss=3">hover</b> & "quotes"'
LONG = "word " * 300


class ScriptedScheduler:
    """Test-only stand-in for batching.Scheduler: answers each request with the next scripted text,
    one token every ``delay`` seconds, and honours cancellation like the real one."""

    def __init__(self, tok, answers, delay=0.03):
        self.tok, self.answers, self.delay = tok, list(answers), delay
        self.requests, self.waiting = [], []

    def submit(self, req):
        text = self.answers[len(self.requests) % len(self.answers)]
        self.requests.append(req)
        threading.Thread(target=self._run, args=(req, text), daemon=True).start()
        return req

    def _run(self, req, text):
        ids = self.tok.encode(text) + [self.tok.end_id]
        for k, t in enumerate(ids):
            time.sleep(self.delay)
            if req.cancelled:
                req.finished = True
                req.emit(Step(None, finish="cancelled"))
                return
            req.generated.append(t)
            req.finished = k == len(ids) - 1
            req.emit(Step(t, finish="stop" if req.finished else None))

    def active(self):
        return sum(not r.finished for r in self.requests)

    def close(self):
        pass


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("webui") / "ui")


@pytest.fixture(scope="module")
def long_run_dir(tmp_path_factory):  # room for the scripted multi-turn conversation
    return make_run(tmp_path_factory.mktemp("webui") / "ui", block=1024)


def rows(db_path):
    db = sqlite3.connect(db_path)
    db.row_factory = sqlite3.Row
    out = [dict(r) for r in db.execute("SELECT * FROM feedback ORDER BY id")]
    db.close()
    return out


def wait_until(fn, timeout=15.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_chat_streams_rates_compares_and_never_runs_model_html(browser, long_run_dir, tmp_path, serve_run):
    url, svc, _ = serve_run(long_run_dir, slots=2, feedback_path=tmp_path / "feedback.sqlite",
                            scheduler=lambda svc: ScriptedScheduler(svc.tok, [XSS, OTHER]))
    sched = svc.scheduler
    # the page's CSP forbids inline script anyway; bypass it so this checks the escaping itself
    page = browser.new_page(bypass_csp=True)
    dialogs, errors = [], []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'ui/sft'")

    # settings: a system prompt and a temperature reach the request
    page.click("#settings-toggle")
    page.fill("#system", "Be kind.")
    page.eval_on_selector("#temperature", "el => { el.value = '0.3'; el.dispatchEvent(new Event('input')); }")

    # send a message and watch the reply arrive piece by piece
    page.fill("#input", "Hello there")
    page.press("#input", "Enter")
    content = page.locator(".msg.assistant .content").first
    seen = set()

    def grown():
        seen.add(len(content.text_content() or ""))
        return page.locator(".msg.assistant .thumb-up").count() > 0
    wait_until(grown, what="the streamed reply to finish")
    final = len(content.text_content())
    assert len({n for n in seen if 0 < n < final}) >= 3, f"no partial renders seen: {sorted(seen)}"

    req = sched.requests[0]
    assert req.params.temperature == pytest.approx(0.3)
    assert req.prompt == svc.tok.chat_prompt([{"role": "system", "content": "Be kind."},
                                               {"role": "user", "content": "Hello there"}])

    # the model's HTML is text: visible literally, no element made from it, nothing ran
    text = content.text_content()
    assert '<img src=x onerror="window.__xss=1">' in text and "<script>window.__xss=2</script>" in text
    assert page.locator("#chat img, #chat script, #chat [onerror], #chat [onmouseover]").count() == 0
    # ... while the Markdown subset still renders
    assert content.locator("strong").text_content() == "bold" and content.locator("code").text_content() == "code"
    assert content.locator("li").count() == 2

    # thumbs up -> a row in SQLite
    page.click(".msg.assistant .thumb-up")
    page.wait_for_function("document.getElementById('status').textContent.includes('rating saved')")
    r = rows(svc.feedback.path)
    assert len(r) == 1 and r[0]["kind"] == "rating" and r[0]["rating"] == 1 and r[0]["answer"] == XSS
    assert json.loads(r[0]["messages"]) == [{"role": "system", "content": "Be kind."},
                                            {"role": "user", "content": "Hello there"}]
    assert r[0]["model"] == "ui/sft" and r[0]["stage"] == "sft"

    # compare mode: two answers side by side; choose B -> a comparison row; B joins the history
    page.check("#compare")
    page.fill("#input", "Which is better?")
    page.press("#input", "Enter")
    page.wait_for_selector(".compare button.prefer >> nth=1")
    boxes = page.locator(".compare .msg.assistant")
    assert boxes.count() == 2
    shown = [boxes.nth(i).locator(".content").text_content() for i in range(2)]
    assert shown[0] == OTHER and shown[1].startswith("Here is bold and code.<img src=x onerror=")
    assert page.is_disabled("#send")  # a choice is needed before the chat goes on
    page.click(".compare button.prefer >> nth=1")
    page.wait_for_function("document.getElementById('status').textContent.includes('Preference saved')")
    r = rows(svc.feedback.path)
    assert len(r) == 2 and r[1]["kind"] == "comparison" and r[1]["preferred"] == 1
    assert (r[1]["answer"], r[1]["answer_b"]) == (OTHER, XSS)
    assert json.loads(r[1]["messages"])[-1] == {"role": "user", "content": "Which is better?"}
    assert "preferred" in boxes.nth(1).get_attribute("class")

    # multi-turn: the next request carries the whole history, with the preferred answer
    page.uncheck("#compare")
    sched.answers, sched.delay = [LONG], 0.02
    n0 = len(sched.requests)
    page.fill("#input", "Go on")
    page.press("#input", "Enter")
    wait_until(lambda: len(sched.requests) > n0 and len(sched.requests[n0].generated) > 5,
               what="a long reply to start")
    assert sched.requests[n0].prompt == svc.tok.chat_prompt([
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": XSS}, {"role": "user", "content": "Which is better?"},
        {"role": "assistant", "content": XSS}, {"role": "user", "content": "Go on"}])

    # stop: the browser aborts, the server cancels the request (its slot is free), partial text stays
    page.click("#stop")
    wait_until(lambda: sched.requests[n0].finished, what="the stopped request to be cancelled")
    assert sched.requests[n0].cancelled and len(sched.requests[n0].generated) < len(svc.tok.encode(LONG))
    page.wait_for_function("!document.getElementById('regenerate').disabled")
    last = page.locator(".msg.assistant .content").last
    partial = last.text_content()
    assert 0 < len(partial) < len(LONG.strip())

    # regenerate: the same conversation is sampled again and the new answer replaces the old one
    sched.answers, sched.delay = ["A fresh answer."], 0.01
    n_boxes = page.locator("#chat > .msg.assistant").count()
    page.click("#regenerate")
    page.wait_for_function("[...document.querySelectorAll('.msg.assistant .content')]"
                           ".some(e => e.textContent === 'A fresh answer.')")
    assert sched.requests[-1].prompt == sched.requests[n0].prompt
    assert page.locator("#chat > .msg.assistant").count() == n_boxes

    assert page.evaluate("window.__xss") is None and not dialogs and not errors
    page.close()


def test_a_calculator_call_shows_as_a_badge(browser, long_run_dir, serve_run):
    """The calculator's call and the result the server wrote after it show as one element; anything inside a
    call tag that is not plain text stays escaped text."""
    calc = "Let me work it out. <calc>347*29</calc> <result>10063</result> So 347 * 29 = 10063."
    evil = '<calc><img src=x onerror="window.__xss=4"></calc> <result>1</result>'
    url, svc, _ = serve_run(long_run_dir, scheduler=lambda svc: ScriptedScheduler(svc.tok, [calc, evil], delay=0.005))
    page = browser.new_page(bypass_csp=True)
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').textContent.length > 0")
    for turn, text in enumerate(("What is 347 * 29?", "again"), 1):
        page.fill("#input", text)
        page.press("#input", "Enter")
        wait_until(lambda n=turn: page.locator(".msg.assistant .thumb-up").count() >= n, what="the reply")
    badge = page.locator(".msg.assistant .content .calc").first
    assert badge.locator("code").text_content() == "347*29" and badge.locator("strong").text_content() == "10063"
    assert "So 347 * 29 = 10063." in page.locator(".msg.assistant .content").first.text_content()
    second = page.locator(".msg.assistant .content").nth(1)
    assert second.locator(".calc, img").count() == 0 and "<img src=x" in second.text_content()
    assert page.evaluate("window.__xss") is None


def test_real_model_reply_and_thumbs_down(browser, run_dir, serve_run):
    url, svc, _ = serve_run(run_dir, slots=2)
    page = browser.new_page(bypass_csp=True)  # Playwright's waits evaluate strings
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'ui/sft'")
    page.fill("#input", "hello world")
    page.click("#send")
    page.wait_for_selector(".msg.assistant .thumb-down", timeout=30_000)
    page.click(".msg.assistant .thumb-down")
    page.wait_for_function("document.getElementById('status').textContent.includes('rating saved')")
    r = rows(svc.feedback.path)
    assert r[-1]["rating"] == -1 and json.loads(r[-1]["messages"]) == [{"role": "user", "content": "hello world"}]
    shown = page.locator(".msg.assistant .content").text_content()
    def bare(t):
        return re.sub(r"[\s*`#\-.]|\d+\.", "", t)  # Markdown marks and whitespace aside,
    assert bare(shown) == bare(r[-1]["answer"])  # what was shown is what was rated

    # a conversation that outgrows the 128-token context: the page stops sending the oldest
    # exchange and answers the newest message instead of failing
    long_msg = next(m for k in range(1, 60) for end in ("", ".", " ok", " ok.")
                    if 60 <= len(svc.tok.encode(m := " ".join(["fox"] * k) + end)) <= 61)
    # two of these (+ the template's 8 tokens) overflow 128, one fits
    sent, real_submit = [], svc.scheduler.submit
    svc.scheduler.submit = lambda req: (sent.append(req.prompt), real_submit(req))[1]
    for _ in range(2):
        n = page.locator("#chat > .msg.assistant .thumb-up").count()
        page.fill("#input", long_msg)
        page.click("#send")
        page.wait_for_function(f"document.querySelectorAll('#chat > .msg.assistant .thumb-up').length > {n}",
                               timeout=30_000)
    assert "no longer sent" in page.text_content("#status")
    assert sent[-1] == svc.tok.chat_prompt([{"role": "user", "content": long_msg}])
    assert page.locator(".msg.error").count() == 0
    page.close()


# ---------------------------------------------------------------- input methods, language, precision

@pytest.fixture(scope="module")
def int8_url(run_dir):
    with serve_subprocess(run_dir, "--quantize", "int8", "--slots", 2) as url:
        yield url


def open_page(browser, url, locale="en-US"):
    ctx = browser.new_context(locale=locale, bypass_csp=True)  # Playwright's waits evaluate strings
    page = ctx.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model-info').textContent !== ''")
    return ctx, page, errors


def test_enter_while_an_input_method_composes_does_not_send(browser, int8_url):
    """Typing 你好 with pinyin: Enter picks the candidate while composing (isComposing; keyCode 229 in
    browsers that report it so), and only the Enter after compositionend sends."""
    ctx, page, errors = open_page(browser, int8_url)
    cdp = ctx.new_cdp_session(page)
    page.focus("#input")
    cdp.send("Input.imeSetComposition", {"text": "ni", "selectionStart": 2, "selectionEnd": 2})  # compositionstart
    assert page.evaluate("document.getElementById('input').value") == "ni"
    page.keyboard.press("Enter")  # Chromium marks this keydown isComposing: the composition is open
    # the keyCode-229 Enter (Safari's, just after compositionend) and one that says isComposing
    page.evaluate("""() => {
        const input = document.getElementById('input');
        for (const init of [{keyCode: 229}, {isComposing: true}])
          input.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', bubbles: true, cancelable: true, ...init}));
    }""")
    page.wait_for_timeout(300)
    assert page.locator(".msg.user").count() == 0, "Enter sent a message while the input method was composing"
    cdp.send("Input.insertText", {"text": "你好"})  # the candidate is chosen: compositionend
    page.keyboard.press("Enter")
    page.wait_for_selector(".msg.user")
    assert page.locator(".msg.user").count() == 1 and page.locator(".msg.user").text_content().strip() == "你好"
    page.wait_for_selector(".msg.assistant .thumb-up", timeout=30_000)
    assert not errors
    ctx.close()


VISIBLE_WORDS = """() => {
    const out = [document.title];
    const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
    for (let n; (n = walker.nextNode());) {
      // the conversation's own text, the model's id and numbers are not the page's words
      if (n.parentElement.closest('.msg .content, .msg.user, #model, #temperature-value, script')) continue;
      if (n.textContent.trim()) out.push(n.textContent.trim());
    }
    for (const el of document.querySelectorAll('[placeholder]')) out.push(el.placeholder);
    for (const el of document.querySelectorAll('[title]')) out.push(el.title);
    for (const el of document.querySelectorAll('[aria-label]')) out.push(el.getAttribute('aria-label'));
    return out;
}"""
CJK = re.compile(r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]")
NAMES = re.compile(r"chatfactory|API|Shift\+Enter|Enter|int8|float32|\b[AB]\b")  # the same in either language


@pytest.mark.parametrize("locale", ["zh-CN", "en-US"])
def test_labels_follow_the_browser_language(browser, int8_url, locale):
    """Every label, placeholder, button and title, including those the page writes later (thumbs, the
    comparison's buttons, status lines), is Chinese for a zh browser and English for an en one."""
    ctx, page, errors = open_page(browser, int8_url, locale)
    zh = locale.startswith("zh")
    page.click("#settings-toggle")
    page.check("#compare")  # two answers: the comparison's buttons
    page.fill("#input", "hello")
    page.press("#input", "Enter")
    page.wait_for_selector(".compare button.prefer >> nth=1", timeout=30_000)
    page.click(".compare button.prefer >> nth=0")
    page.wait_for_function("document.querySelectorAll('.compare .preferred').length === 1")
    page.uncheck("#compare")  # one answer: the thumbs
    page.fill("#input", "hello")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant .thumb-up", timeout=30_000)
    page.click(".msg.assistant .thumb-up")
    page.wait_for_selector(".msg.assistant .thumb-up.chosen")
    words = page.evaluate(VISIBLE_WORDS)
    assert page.evaluate("document.documentElement.lang") == ("zh-CN" if zh else "en")
    want = {"发送", "停止", "重新生成", "设置", "新对话", "系统提示词", "温度", "选 A", "选 B", "👍 好", "👎 差",
            "谢谢：评分已保存。", "int8 权重，常驻内存", "输入消息（Enter 发送，Shift+Enter 换行）"} if zh else \
           {"Send", "Stop", "Regenerate", "Settings", "New chat", "System prompt", "Temperature", "Prefer A",
            "Prefer B", "👍 Good", "👎 Bad", "Thanks: rating saved.", "int8 weights, resident in memory",
            "Send a message (Enter to send, Shift+Enter for a new line)"}
    assert want <= set(words), (want - set(words), words)
    if zh:  # no English left, names aside
        left = [w for w in words if re.search(r"[A-Za-z]", NAMES.sub("", w))]
    else:
        left = [w for w in words if CJK.search(w)]
    assert not left, f"{locale}: words in the other language: {left}"
    assert not errors
    ctx.close()


def test_precision_and_memory_mode_are_shown(browser, int8_url):
    """`serve --quantize int8` -> /v1/models says int8, resident; the page says so beside the model's name,
    and words the other schemes the server reports (int4 groups, the LM head, streamed layers)."""
    card = json.loads(urllib.request.urlopen(int8_url + "/v1/models", timeout=10).read())["data"][0]
    assert (card["precision"], card["memory"]) == ("int8", "resident")
    other = {"precision": "int4 (groups of 32), LM head too", "memory": "streamed", "memory_budget_mb": 300.5}
    for locale, shown, described in (
            ("en-US", "int8 weights, resident in memory",
             "int4 (groups of 32), LM head too weights, layers streamed from disk (a 300.5 MB budget)"),
            ("zh-CN", "int8 权重，常驻内存", "int4（每组 32 列），含输出层 权重，逐层从磁盘载入（内存预算 300.5 MB）")):
        ctx, page, errors = open_page(browser, int8_url, locale)
        assert page.text_content("#model") == card["id"] and page.text_content("#model-info") == shown
        assert page.evaluate("(card) => describeModel(card)", other) == described
        assert page.evaluate("(card) => describeModel(card)", {"precision": "bfloat16", "memory": "offloaded"}) == \
            ("bfloat16 weights, offloaded" if locale == "en-US" else "bfloat16 权重，offloaded")  # unknown: as said
        assert not errors
        ctx.close()
