// chatfactory web UI: the tabs, the Arena and the Leaderboard. Loaded after app.js, whose helpers it uses
// ($, headers, apiError, readEvents, setMarkdown, addAnswerBox, addVoteButtons, markVote, showError,
// enterSends; t from i18n.js).
//
// A battle: one prompt, two answers streamed side by side from two versions the server picks (the served
// one and a candidate an admin put in the arena). The server draws which version writes answer 0, this page
// draws which answer is shown on the left, and no version is named until the vote: the vote names the
// battle only (the server keeps who wrote what), and its answer reveals the two names.
"use strict";

const arena = { pending: null, busy: false };

// ---------------------------------------------------------------- tabs

function showTab(tab) {
  for (const b of document.querySelectorAll("#tabs [role=tab]")) {
    const on = b === tab;
    b.setAttribute("aria-selected", String(on));
    $(b.dataset.panel).hidden = !on;
  }
  $("status").textContent = "";
  if (tab.id === "tab-board") loadBoard();
}

for (const b of document.querySelectorAll("#tabs [role=tab]")) b.addEventListener("click", () => showTab(b));

// ---------------------------------------------------------------- the arena

function arenaMessages(prompt) {
  const sys = $("system").value.trim();  // the chat's system prompt, if the person set one
  return (sys ? [{ role: "system", content: sys }] : []).concat([{ role: "user", content: prompt }]);
}

// Ask for a battle on prompt and stream both answers into a new row -> the pending battle
async function battle(prompt) {
  const res = await fetch("/v1/arena/battle", {
    method: "POST", headers: headers(),
    body: JSON.stringify({ messages: arenaMessages(prompt), stream: true, temperature: parseFloat($("temperature").value) }),
  });
  if (!res.ok) throw await apiError(res);
  const question = document.createElement("div");
  question.className = "msg user";
  question.textContent = prompt;  // the person's text: plain text, never HTML
  const row = document.createElement("div");
  row.className = "compare arena";
  $("arena-battles").append(question, row);
  const boxes = [addAnswerBox(row), addAnswerBox(row)];
  const texts = ["", ""];
  let id = null;
  try {
    await readEvents(res, (j) => {
      if (j.object === "arena.battle.chunk") {
        texts[j.index] += j.delta;
        setMarkdown(boxes[j.index].querySelector(".content"), texts[j.index]);
      } else if (j.object === "arena.battle") {
        id = j.id;
      }
    });
  } catch (e) { question.remove(); row.remove(); throw e; }
  if (!id) { question.remove(); row.remove(); throw new Error(t("arenaUnfinished")); }
  const shownLeft = addVoteButtons(row, boxes, arenaVote);
  return { id, row, boxes, shownLeft };
}

async function arenaVote(choice) {
  const p = arena.pending;
  if (!p) return;
  let r;
  try {
    const res = await fetch("/v1/arena/vote", {
      method: "POST", headers: headers(), body: JSON.stringify({ battle_id: p.id, choice, shown_left: p.shownLeft }),
    });
    if (!res.ok) throw await apiError(res);
    r = await res.json();
  } catch (e) { showError(e.message); return; }
  arena.pending = null;
  markVote(p.row, p.boxes, choice, choice === "a" ? 0 : choice === "b" ? 1 : p.shownLeft);
  // the reveal: each answer's version, above its text
  p.boxes.forEach((box, i) => {
    const name = document.createElement("div");
    name.className = "model-name";
    name.textContent = r.models[i];
    box.prepend(name);
  });
  const left = p.shownLeft, right = 1 - p.shownLeft;
  $("status").textContent = t("arenaRevealed", { a: r.models[left], b: r.models[right] });
  $("arena-send").disabled = false;
}

$("arena-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const prompt = $("arena-input").value;
  if (!prompt.trim() || arena.busy || arena.pending) return;
  arena.busy = true;
  $("arena-send").disabled = true;
  $("status").textContent = "…";
  try {
    arena.pending = await battle(prompt);
    $("arena-input").value = "";
    $("status").textContent = t("pickBetter");
  } catch (e) {
    showError(e.message);
    $("status").textContent = "";
    $("arena-send").disabled = false;
  } finally {
    arena.busy = false;
  }
});

enterSends($("arena-input"), $("arena-form"));  // as in the chat: Enter sends, an input method's Enter does not

// ---------------------------------------------------------------- the leaderboard

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;  // names come from the server's records; text only, never HTML
  return td;
}

async function loadBoard() {
  try {
    const res = await fetch("/v1/leaderboard", { headers: headers() });
    if (!res.ok) throw await apiError(res);
    const b = await res.json();
    $("board-summary").textContent = b.battles ? t("boardBattles", { n: b.battles }) : t("boardEmpty");
    const body = $("board").querySelector("tbody");
    body.replaceChildren(...b.data.map((r) => {
      const tr = document.createElement("tr");
      tr.append(cell(r.rank), cell(r.model), cell(r.score.toFixed(0)),
                cell(r.lo.toFixed(0) + " – " + r.hi.toFixed(0)), cell(r.elo.toFixed(0)), cell(r.battles),
                cell(r.wins + " / " + r.ties + " / " + r.losses));
      return tr;
    }));
    $("board-gaps").replaceChildren(...b.gaps.map((g) => {
      const li = document.createElement("li");
      li.textContent = t(g.separated ? "boardSeparated" : "boardNotSeparated", { a: g.better, b: g.worse });
      return li;
    }));
  } catch (e) {
    $("board-summary").textContent = t("error") + e.message;
  }
}

$("board-refresh").addEventListener("click", loadBoard);
