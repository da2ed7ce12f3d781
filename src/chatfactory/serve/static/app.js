// chatfactory web chat. Plain JavaScript, no build step, no dependencies.
//
// Safety rule: text from the model (or the user) never reaches innerHTML as it came. renderMarkdown()
// escapes every character that means something to HTML first, and only then adds a fixed set of
// attribute-less tags (pre, code, strong, em, h3-h5, ul/ol/li, p, br) for a small Markdown subset.
// There are no links and no images, so no URL from the model is ever followed or loaded.
//
// Every word the page writes comes from t() (i18n.js: English or Chinese, as the browser asks).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  history: [],        // the conversation sent to the model: [{role, content}]
  model: null,        // the served model's id (GET /v1/models), then the version that wrote the last answer
  controller: null,   // AbortController of the reply being streamed
  pendingCompare: null, // a comparison waiting for the person's choice
  dropped: 0,         // oldest history messages no longer sent: the chat outgrew the model's context
};

// ---------------------------------------------------------------- safe Markdown

function escapeHtml(s) {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
          .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

// inline: `code`, **bold**, *italic* on already-escaped text; code spans are left untouched
// a calculator call and the result the server wrote after it (inference/calculator.py), in escaped text
const CALC = /(&lt;calc&gt;[^&\n]*?&lt;\/calc&gt;(?: &lt;result&gt;[^&\n]*?&lt;\/result&gt;)?)/g;

function calcHtml(escaped) {
  const m = escaped.match(/^&lt;calc&gt;([^&\n]*?)&lt;\/calc&gt;(?: &lt;result&gt;([^&\n]*?)&lt;\/result&gt;)?$/);
  return '<span class="calc" title="' + t("calculator") + '">🧮 <code>' + m[1] + "</code> = " +
    (m[2] === undefined ? "…" : "<strong>" + m[2] + "</strong>") + "</span>";
}

function inline(escaped) {
  return escaped.split(CALC).map((seg, j) => (j % 2 === 1 ? calcHtml(seg) : seg.split(/(`[^`\n]+`)/g).map((part, i) => {
    if (i % 2 === 1) return "<code>" + part.slice(1, -1) + "</code>";
    return part.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
               .replace(/(^|[^*])\*([^*\n]+)\*(?!\*)/g, "$1<em>$2</em>");
  }).join(""))).join("");
}

function blocks(escaped) {
  const out = [];
  let list = null;  // "ul" | "ol" while inside a list
  let para = [];
  const flushPara = () => { if (para.length) { out.push("<p>" + para.map(inline).join("<br>") + "</p>"); para = []; } };
  const closeList = () => { if (list) { out.push("</" + list + ">"); list = null; } };
  for (const line of escaped.split("\n")) {
    let m;
    if ((m = line.match(/^(#{1,3})\s+(.*)$/))) {
      flushPara(); closeList();
      const level = m[1].length + 2;  // # -> h3: the page keeps h1 for itself
      out.push("<h" + level + ">" + inline(m[2]) + "</h" + level + ">");
    } else if ((m = line.match(/^\s*([-*]|\d+\.)\s+(.*)$/))) {
      flushPara();
      const kind = /\d/.test(m[1]) ? "ol" : "ul";
      if (list !== kind) { closeList(); out.push("<" + kind + ">"); list = kind; }
      out.push("<li>" + inline(m[2]) + "</li>");
    } else if (line.trim() === "") {
      flushPara(); closeList();
    } else {
      closeList(); para.push(line);
    }
  }
  flushPara(); closeList();
  return out.join("");
}

function renderMarkdown(text) {
  const escaped = escapeHtml(text);
  // fenced code blocks first (an unclosed fence, mid-stream, runs to the end)
  const parts = escaped.split(/```[^\n`]*\n?([\s\S]*?)(?:```|$)/g);
  return parts.map((p, i) => (i % 2 === 1 ? "<pre><code>" + p + "</code></pre>" : blocks(p))).join("");
}

function setMarkdown(el, text) {
  el.innerHTML = renderMarkdown(text);  // escaped first: see the note at the top
}

// ---------------------------------------------------------------- API

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("apikey").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// an Error from the server's OpenAI-style error JSON, with its code (e.g. "context_length_exceeded")
async function apiError(res) {
  const err = new Error(res.status + " " + res.statusText);
  try {
    const j = await res.json();
    if (j.error) { err.message = j.error.message || err.message; err.code = j.error.code; }
  } catch (e) { /* not JSON: keep the status line */ }
  return err;
}

async function errorText(res) { return (await apiError(res)).message; }

async function loadModel() {
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    if (!res.ok) { $("model").textContent = await errorText(res); return; }
    const j = await res.json();
    state.model = j.data[0].id;
    $("model").textContent = state.model;
    $("model-info").textContent = describeModel(j.data[0]);  // e.g. "int8 weights, resident in memory"
  } catch (e) {
    $("model").textContent = t("unreachable");
  }
}

// Server-sent events of a fetch response: onEvent(JSON) for each, until "data: [DONE]" or the end of the
// body; an error event throws its message.
async function readEvents(res, onEvent) {
  const reader = res.body.getReader();
  // stream: true holds the bytes of a character split between two network reads until the second one
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut); buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const j = JSON.parse(data);
        if (j.error) throw new Error(j.error.message);
        onEvent(j);
      }
    }
  }
  decoder.decode();  // the end of the body: bytes of a character cut short are dropped with it
}

// Stream a chat completion with n answers; onText(index, fullText) after every delta.
// Resolves to {texts, finish, model} (finish[i] is null for an answer cut by Stop; model: the version that
// wrote them, which a vote on them names: a newer version may be served by the time the person votes).
async function streamChat(messages, n, onText) {
  state.controller = new AbortController();
  const body = { messages, stream: true, n, temperature: parseFloat($("temperature").value) };
  if (state.model) body.model = state.model;
  const texts = Array(n).fill(""), finish = Array(n).fill(null);
  let model = null;
  const res = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.controller.signal,
  });
  if (!res.ok) throw await apiError(res);
  try {
    await readEvents(res, (j) => {
      model = j.model || model;
      for (const c of j.choices || []) {
        if (c.delta && c.delta.content) { texts[c.index] += c.delta.content; onText(c.index, texts[c.index]); }
        if (c.finish_reason) finish[c.index] = c.finish_reason;
      }
    });
  } catch (e) {
    if (e.name !== "AbortError") throw e;  // Stop: keep what arrived
  } finally {
    state.controller = null;
  }
  if (model && model !== state.model) { state.model = model; $("model").textContent = model; }
  return { texts, finish, model };
}

async function sendFeedback(item, model) {
  const body = Object.assign({}, item);
  if (model || state.model) body.model = model || state.model;
  const res = await fetch("/v1/feedback", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!res.ok) throw new Error(await errorText(res));
  return res.json();
}

// ---------------------------------------------------------------- the page

function conversation() {
  const sys = $("system").value.trim();
  return (sys ? [{ role: "system", content: sys }] : []).concat(state.history.slice(state.dropped));
}

// The conversation no longer fits the model's context: stop sending its oldest exchange (it stays on
// screen). False when only the newest message is left to send.
function dropOldestTurn() {
  for (let i = state.dropped + 1; i < state.history.length; i++) {
    if (state.history[i].role === "user") { state.dropped = i; return true; }
  }
  return false;
}

function addUser(text) {
  const el = document.createElement("div");
  el.className = "msg user";
  el.textContent = text;  // the person's text: plain text, never HTML
  $("chat").appendChild(el);
  return el;
}

function addAnswerBox(parent) {
  const el = document.createElement("div");
  el.className = "msg assistant";
  const content = document.createElement("div");
  content.className = "content";
  el.appendChild(content);
  parent.appendChild(el);
  return el;
}

function button(label, title, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.title = title;
  b.addEventListener("click", onClick);
  return b;
}

function showError(msg) {
  const el = document.createElement("div");
  el.className = "msg error";
  el.textContent = t("error") + msg;
  $("chat").appendChild(el);
}

function busy(on) {
  $("send").disabled = on || !!state.pendingCompare;
  $("stop").disabled = !on;
  $("regenerate").disabled = on || !!state.pendingCompare || !state.history.some((m) => m.role === "assistant");
}

function addRating(box, context, answer, model) {
  const actions = document.createElement("div");
  actions.className = "actions";
  const rate = (value, btn) => async () => {
    try {
      const r = await sendFeedback({ kind: "rating", messages: context, answer, rating: value }, model);
      actions.querySelectorAll("button").forEach((b) => b.classList.remove("chosen"));
      btn.classList.add("chosen");
      btn.dataset.feedbackId = r.id;
      $("status").textContent = t("ratingSaved");
    } catch (e) { showError(e.message); }
  };
  const up = button(t("good"), t("goodTitle"), null), down = button(t("bad"), t("badTitle"), null);
  up.className = "thumb-up"; down.className = "thumb-down";
  up.addEventListener("click", rate(1, up));
  down.addEventListener("click", rate(-1, down));
  actions.append(up, down);
  box.appendChild(actions);
}

// One answer (or two, in compare mode) to the conversation as it stands.
async function answer(context, compare) {
  if (!compare) {
    const box = addAnswerBox($("chat"));
    const content = box.querySelector(".content");
    try {
      const { texts, model } = await streamChat(context, 1, (i, t) => setMarkdown(content, t));
      state.history.push({ role: "assistant", content: texts[0] });
      box.dataset.turn = String(state.history.length - 1);
      addRating(box, context, texts[0], model);
    } catch (e) { box.remove(); throw e; }
    return;
  }
  const row = document.createElement("div");
  row.className = "compare";
  $("chat").appendChild(row);
  const boxes = [addAnswerBox(row), addAnswerBox(row)];
  let texts, model;
  try {
    ({ texts, model } = await streamChat(context, 2, (i, t) => setMarkdown(boxes[i].querySelector(".content"), t)));
  } catch (e) { row.remove(); throw e; }
  const shownLeft = addVoteButtons(row, boxes, vote);
  state.pendingCompare = { row, boxes, texts, context, shownLeft, model };
}

// The buttons of a side-by-side vote (compare mode, the arena) under answers boxes[0] and boxes[1]:
// onVote("a" | "b" | "tie" | "both_bad"). The side each answer is shown on is drawn at random and posted
// with the vote (shown_left), so a leaning towards the left can be measured and does not favour the first
// answer. The boxes stay in the order the answers came (box i holds answer i); the CSS order puts answer
// shown_left on the left -> shown_left
function addVoteButtons(row, boxes, onVote) {
  const shownLeft = Math.random() < 0.5 ? 0 : 1;
  row.classList.toggle("swapped", shownLeft === 1);
  boxes.forEach((box, i) => {
    const actions = document.createElement("div");
    actions.className = "actions";
    const left = i === shownLeft;  // "A" is the left one, as the person sees it
    const b = button(t(left ? "preferA" : "preferB"), t("preferTitle"), () => onVote(i === 0 ? "a" : "b"));
    b.className = "prefer";
    actions.appendChild(b);
    box.appendChild(actions);
  });
  const both = document.createElement("div");
  both.className = "actions compare-both";
  const tie = button(t("tie"), t("tieTitle"), () => onVote("tie"));
  const bad = button(t("bothBad"), t("bothBadTitle"), () => onVote("both_bad"));
  tie.className = "tie"; bad.className = "both-bad";
  both.append(tie, bad);
  row.appendChild(both);
  return shownLeft;
}

// After a side-by-side vote: mark the boxes ("kept": the better answer, or the left one with neither
// better) and disable the row's buttons
function markVote(row, boxes, choice, kept) {
  boxes.forEach((box, j) => {
    const mark = choice === "tie" ? "tied" : choice === "both_bad" ? "both-bad" : j === kept ? "preferred" : "not-preferred";
    box.classList.add(mark);
  });
  row.querySelectorAll("button").forEach((b) => (b.disabled = true));
}

async function reply() {
  const compare = $("compare").checked;
  busy(true);
  $("status").textContent = "…";
  let note = "";
  try {
    for (;;) {
      try {
        await answer(conversation(), compare);
        break;
      } catch (e) {
        if (e.code !== "context_length_exceeded" || !dropOldestTurn()) throw e;
        note = t("olderDropped");
      }
    }
    $("status").textContent = note + (compare ? t("pickBetter") : "");
  } catch (e) {
    showError(e.message);
    $("status").textContent = "";
  } finally {
    busy(false);
  }
}

// The person's vote on the pending comparison: "a" or "b" (answer 0 or 1 is better), "tie" or "both_bad".
// The chat goes on with the better answer, or, with neither better, the one shown on the left
// (Regenerate replaces it).
async function vote(choice) {
  const p = state.pendingCompare;
  if (!p) return;
  try {
    const r = await sendFeedback({ kind: "comparison", messages: p.context, answers: p.texts, choice,
                                   shown_left: p.shownLeft }, p.model);
    p.row.dataset.feedbackId = r.id;
  } catch (e) { showError(e.message); return; }
  const kept = choice === "a" ? 0 : choice === "b" ? 1 : p.shownLeft;
  markVote(p.row, p.boxes, choice, kept);
  state.history.push({ role: "assistant", content: p.texts[kept] });
  p.boxes[kept].dataset.turn = String(state.history.length - 1);
  state.pendingCompare = null;
  $("status").textContent = t(choice === "a" || choice === "b" ? "preferenceSaved" : "voteSaved");
  busy(false);
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value;
  if (!text.trim() || state.controller || state.pendingCompare) return;
  $("input").value = "";
  state.history.push({ role: "user", content: text });
  addUser(text);
  reply();
});

// Enter sends, Shift+Enter is a new line. While an input method composes (Chinese pinyin, Japanese
// kana...) Enter belongs to it: it picks the candidate, and must not send the half-typed message.
// isComposing says so during composition; keyCode 229 covers the Enter that some browsers (Safari)
// deliver just after compositionend, and older ones that never set isComposing.
function enterSends(input, form) {
  input.addEventListener("keydown", (ev) => {
    if (ev.key !== "Enter" || ev.shiftKey || ev.isComposing || ev.keyCode === 229) return;
    ev.preventDefault();
    form.requestSubmit();
  });
}
enterSends($("input"), $("composer"));

$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });

$("regenerate").addEventListener("click", () => {
  // drop the last answer (its box too) and sample a new one for the same conversation
  const last = state.history.length - 1;
  if (last < 0 || state.history[last].role !== "assistant" || state.controller) return;
  state.history.pop();
  const box = document.querySelector('[data-turn="' + last + '"]');
  if (box) (box.parentElement.classList.contains("compare") ? box.parentElement : box).remove();
  reply();
});

$("new-chat").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.history = [];
  state.dropped = 0;
  state.pendingCompare = null;
  $("chat").replaceChildren();
  $("status").textContent = "";
  busy(false);
});

$("settings-toggle").addEventListener("click", () => {
  const s = $("settings");
  s.hidden = !s.hidden;
  $("settings-toggle").setAttribute("aria-expanded", String(!s.hidden));
});

$("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });

// settings survive a reload (this browser only); the API key only in this tab, until it closes
// (sessionStorage), never on disk for good; a key an older page left in localStorage is removed
localStorage.removeItem("chatfactory.apikey");
for (const id of ["system", "temperature"]) {
  const saved = localStorage.getItem("chatfactory." + id);
  if (saved !== null) $(id).value = saved;
  $(id).addEventListener("change", () => localStorage.setItem("chatfactory." + id, $(id).value));
}
{
  const saved = sessionStorage.getItem("chatfactory.apikey");
  if (saved !== null) $("apikey").value = saved;
  $("apikey").addEventListener("change", () => { sessionStorage.setItem("chatfactory.apikey", $("apikey").value); loadModel(); });
}
$("compare").checked = localStorage.getItem("chatfactory.compare") === "1";
$("compare").addEventListener("change", () => localStorage.setItem("chatfactory.compare", $("compare").checked ? "1" : "0"));
$("temperature-value").textContent = $("temperature").value;

translatePage();
busy(false);
loadModel();
