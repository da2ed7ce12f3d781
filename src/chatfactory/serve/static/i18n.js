// chatfactory web chat: the page's words in English and Chinese, chosen from the browser's languages.
//
// The first of navigator.languages that we have (zh-CN, zh-TW, zh -> Chinese; en-* -> English) wins;
// anything else gets English. index.html carries the English text (what shows without script) and
// names each label with data-i18n (text), data-i18n-placeholder or data-i18n-title; translatePage()
// fills them in. app.js takes every word it writes from t().
"use strict";

const MESSAGES = {
  en: {
    connecting: "connecting…",
    unreachable: "server unreachable",
    settings: "Settings",
    newChat: "New chat",
    systemPrompt: "System prompt",
    systemPlaceholder: "You are a helpful assistant.",
    temperature: "Temperature",
    compareMode: "Compare mode: two sampled answers side by side (in random order); pick the better one",
    apiKey: "API key (if the server needs one)",
    inputPlaceholder: "Send a message (Enter to send, Shift+Enter for a new line)",
    send: "Send",
    stop: "Stop",
    regenerate: "Regenerate",
    good: "👍 Good",
    goodTitle: "Good answer",
    bad: "👎 Bad",
    badTitle: "Bad answer",
    preferA: "Prefer A",
    preferB: "Prefer B",
    preferTitle: "This answer is better",
    tie: "Tie",
    tieTitle: "Both answers are about as good",
    bothBad: "Both bad",
    bothBadTitle: "Neither answer is good",
    voteSaved: "Vote saved.",
    ratingSaved: "Thanks: rating saved.",
    calculator: "the calculator: the expression the model wrote, and the result the server computed",
    preferenceSaved: "Preference saved.",
    pickBetter: "Pick the better answer to continue.",
    olderDropped: "Older turns are no longer sent: the conversation outgrew the model's context. ",
    error: "Error: ",
    modelInfo: "{precision} weights, {memory}",
    modelInfoTitle: "How the served model's weights are held: their precision and where they live",
    groups: "{bits} (groups of {group})",
    headToo: ", LM head too",
    "memory.resident": "resident in memory",
    "memory.streamed": "layers streamed from disk (a {budget} MB budget)",
    tabChat: "Chat",
    tabArena: "Arena",
    tabBoard: "Leaderboard",
    arenaIntro: "Two anonymous versions answer your prompt side by side. Vote for the better answer; then their names are shown.",
    arenaPlaceholder: "A prompt for both versions",
    arenaSend: "Battle",
    arenaUnfinished: "the battle did not finish; try again",
    arenaRevealed: "Vote saved. A was {a}, B was {b}.",
    boardRefresh: "Refresh",
    boardBattles: "Arena votes: {n}",
    boardEmpty: "No arena votes yet.",
    colRank: "Rank",
    colModel: "Model",
    colScore: "Score",
    colInterval: "95% interval",
    colElo: "Elo",
    colBattles: "Battles",
    colRecord: "Won / tied / lost",
    boardSeparated: "{a} is ahead of {b}: the interval of their difference excludes a tie.",
    boardNotSeparated: "{a} and {b} are not told apart yet: more votes are needed.",
  },
  zh: {
    connecting: "连接中…",
    unreachable: "无法连接服务器",
    settings: "设置",
    newChat: "新对话",
    systemPrompt: "系统提示词",
    systemPlaceholder: "你是一个乐于助人的助手。",
    temperature: "温度",
    compareMode: "对比模式：并排生成两个回答（左右顺序随机），选出更好的一个",
    apiKey: "API 密钥（服务器需要时填写）",
    inputPlaceholder: "输入消息（Enter 发送，Shift+Enter 换行）",
    send: "发送",
    stop: "停止",
    regenerate: "重新生成",
    good: "👍 好",
    goodTitle: "好回答",
    bad: "👎 差",
    badTitle: "差回答",
    preferA: "选 A",
    preferB: "选 B",
    preferTitle: "这个回答更好",
    tie: "差不多",
    tieTitle: "两个回答一样好",
    bothBad: "都不好",
    bothBadTitle: "两个回答都不好",
    voteSaved: "投票已保存。",
    ratingSaved: "谢谢：评分已保存。",
    calculator: "计算器：模型写出的算式，以及服务器算出的结果",
    preferenceSaved: "偏好已保存。",
    pickBetter: "请选出更好的回答再继续。",
    olderDropped: "较早的对话不再发送：对话已超出模型的上下文长度。",
    error: "错误：",
    modelInfo: "{precision} 权重，{memory}",
    modelInfoTitle: "所服务模型的权重：精度与存放方式",
    groups: "{bits}（每组 {group} 列）",
    headToo: "，含输出层",
    "memory.resident": "常驻内存",
    "memory.streamed": "逐层从磁盘载入（内存预算 {budget} MB）",
    tabChat: "对话",
    tabArena: "竞技场",
    tabBoard: "排行榜",
    arenaIntro: "两个匿名版本并排回答你的问题。投票选出更好的回答，之后会显示它们的名字。",
    arenaPlaceholder: "给两个版本的问题",
    arenaSend: "开始对战",
    arenaUnfinished: "对战没有完成，请重试",
    arenaRevealed: "投票已保存。A 是 {a}，B 是 {b}。",
    boardRefresh: "刷新",
    boardBattles: "{n} 次竞技场投票",
    boardEmpty: "还没有竞技场投票。",
    colRank: "名次",
    colModel: "模型",
    colScore: "得分",
    colInterval: "95% 区间",
    colElo: "等级分",
    colBattles: "对战数",
    colRecord: "胜 / 平 / 负",
    boardSeparated: "{a} 领先 {b}：两者差值的区间不含平局。",
    boardNotSeparated: "{a} 与 {b} 尚未分出高下：需要更多投票。",
  },
};

function pickLanguage(languages) {
  for (const tag of languages) {
    const base = String(tag).toLowerCase().split("-")[0];
    if (base in MESSAGES) return base;
  }
  return "en";
}

const LANG = pickLanguage(navigator.languages && navigator.languages.length ? navigator.languages : [navigator.language || "en"]);

// the text for key, with {name} filled from args; a key we lack shows as itself (never blank)
function t(key, args) {
  const s = MESSAGES[LANG][key] ?? MESSAGES.en[key] ?? key;
  return s.replace(/\{(\w+)\}/g, (m, name) => (args && name in args ? String(args[name]) : m));
}

// what /v1/models says ("int4 (groups of 64), LM head too"; "resident" or "streamed" with a budget) in the
// page's words; a value we do not know is shown as the server said it
function describeModel(card) {
  let precision = String(card.precision || "?");
  const m = precision.match(/^(\w+) \(groups of (\d+)\)(, LM head too)?$/);
  if (m) precision = t("groups", { bits: m[1], group: m[2] }) + (m[3] ? t("headToo") : "");
  else if (precision.endsWith(", LM head too")) precision = precision.slice(0, -", LM head too".length) + t("headToo");
  const memoryKey = "memory." + card.memory;
  const memory = memoryKey in MESSAGES.en ? t(memoryKey, { budget: card.memory_budget_mb ?? "?" }) : String(card.memory || "?");
  return t("modelInfo", { precision, memory });
}

function translatePage() {
  document.documentElement.lang = LANG === "zh" ? "zh-CN" : "en";
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of document.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
  for (const el of document.querySelectorAll("[data-i18n-title]")) el.title = t(el.dataset.i18nTitle);
}
