"""Training prompts with verifiable constraints, in the manner of Tülu 3's IF-RLVR, for IFEval-style instruction
following.

IF-RLVR (Lambert et al. 2024, "Tülu 3", reinforcement learning with verifiable rewards for precise
instruction following) trains on ordinary prompts to which one or more constraints a program can check are
appended ("... Do not use any commas."); a reply earns reward 1 when the checker says every constraint is
followed, else 0. The same rows serve rejection sampling (keep the replies that pass), DPO (a passing and
a failing reply to one prompt make a pair) and GRPO (the ``constraints`` verifier of data/verifiers.py as the
reward). IFEval (Zhou et al. 2023;
data/constraints.py holds its checkers) then measures the model: its 25 instruction types are the ones the
constraints here are drawn from, but nothing of IFEval's data is used: the base prompts are ours, the
wording is ours (data/constraint_templates.py), and IFEval's file is read only by the tests, to prove it.

    bases = base_prompts()                                     # ours: tasks (rl+dev), Dolly, Alpaca
    rows = constrained_prompts(bases, n=1000, seed=0)          # 1-3 constraints each, TRAIN_TYPES only
    train, dev = splits(rows)                                  # disjoint base prompts
    constraints(row, reply)     # data/verifiers.py: 1.0 if every constraint holds (loose), else 0.0
    write_prompt_files("data/if", n_train=5000, n_dev=300, seed=0)

A row is a prompt row (``load_prompts`` reads it) and an IFEval row (``constraints.follows`` reads it):
``{"messages": [user], "prompt": that user text, "instruction_id_list", "kwargs", "source", "base"}``;
``base`` is the prompt before its constraints (what ``splits`` keeps apart).

Held back. Seven of the 25 types never appear in training rows, one from each family of IFEval's types, each
with a sibling that is trained, so that IFEval's figures on them (and ``if_dev_heldback.jsonl``) say whether
the model learned to follow instructions in general rather than the 18 it was drilled on:
- change_case:english_capital (case) - all capitals, where all lower case and counted capital words are trained;
- detectable_format:title (format) - a markup never asked for, where bullets, highlights, sections, JSON are;
- length_constraints:number_sentences (length) - a new unit to count, where words and paragraphs are trained;
- keywords:forbidden_words (keywords) - leaving a word out, where putting words in (and counting them) is trained;
- detectable_content:postscript (content) - a fixed addition, where bracketed placeholders are trained;
- startend:quotation (start/end) - how a reply starts, where how it ends (end phrase) is trained;
- combination:two_responses (combination) - two answers, where repeating the prompt first is trained.

Base prompts (``base_prompts``), ours only: the embedded tasks' rl and dev splits (data/tasks.py; never its
held-out split), English, single-turn, no requests to decline; and the user turns of Dolly and Alpaca that
stand alone (no pasted context: a line break, or over 400 characters). A prompt that already asks about
form (words, sentences, lists, case, quotes, a language, ...) is left out: a constraint could contradict
it. Dolly and Alpaca live in ../shared/data, beside the repository; where they are absent only the tasks
are used (``write_prompt_files`` reports the count per source).

Contamination guard (tests/test_constraint_prompts.py): no sentence of any template, over several
parameter draws, shares a run of six words (lower-cased, punctuation stripped) with an IFEval prompt; no end
phrase of ours occurs in one, nor a keyword of ours as a quoted word; no base prompt equals one.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from functools import lru_cache
from pathlib import Path

from ..formats.jsonl import read_jsonl
from ..store.files import atomic_write_text
from .constraint_templates import Constraint, conflict, fits_base, sample_constraint
from .constraints import INSTRUCTION_TYPES
from .tasks import task_rows

HELD_BACK: tuple[str, ...] = (
    "change_case:english_capital",
    "detectable_format:title",
    "length_constraints:number_sentences",
    "keywords:forbidden_words",
    "detectable_content:postscript",
    "startend:quotation",
    "combination:two_responses",
)
TRAIN_TYPES: tuple[str, ...] = tuple(t for t in INSTRUCTION_TYPES if t not in HELD_BACK)

SOURCES = ("tasks", "dolly", "alpaca")
SOURCE_FILES = {"dolly": "sft/dolly/dolly_messages.jsonl.gz", "alpaca": "sft/alpaca/alpaca_messages.jsonl.gz"}
# Where the shared data sets live: beside the repository, reached from the working directory (the project's
# convention, as config.py's paths) or, failing that, from this file in a source checkout.
DATA_DIRS = (Path("../shared/data"), Path(__file__).resolve().parents[3].parent / "shared" / "data")
MAX_CHARS = 400
# A prompt about form would fight a constraint ("Write a haiku" against "at least 60 words", "in capitals"
# against "all lower case"): such prompts are not used as bases.
FORM_WORDS = re.compile(
    r"\b(words?|sentences?|paragraphs?|bullets?|lists?|json|capitals?|capitali[sz]e\w*|upper ?case|lower ?case"
    r"|titles?|quot\w*|commas?|letters?|characters?|haiku|poem|limerick|tweet|essay|translate|language|english"
    r"|french|spanish|german|italian|portuguese|format\w*|spell\w*|backwards|reversed?)\b", re.IGNORECASE)
# How many constraints a row gets: mostly one or two, as in IF-RLVR's data.
COUNT_WEIGHTS = (0.45, 0.4, 0.15)
DEV_FRACTION = 0.1


def _usable(text: str) -> bool:
    return bool(text.strip()) and "\n" not in text and len(text) <= MAX_CHARS and not FORM_WORDS.search(text)


def _task_bases() -> list[str]:
    rows = task_rows("rl") + task_rows("dev")  # never "heldout": it only reports
    return [r["messages"][0]["content"] for r in rows
            if r["lang"] == "en" and len(r["messages"]) == 1 and not r["decline"]]


@lru_cache(maxsize=4)
def _file_bases(path: str) -> tuple[str, ...]:
    """The first user turn of every row of a chat file (cached: Alpaca is 52k rows)."""
    out = []
    for _, row in read_jsonl(path):
        user = [m["content"] for m in row.get("messages", []) if m.get("role") == "user"]
        if user:
            out.append(user[0])
    return tuple(out)


def _data_dir(data_dir) -> Path | None:
    if data_dir is not None:
        return Path(data_dir)
    return next((d for d in DATA_DIRS if d.is_dir()), None)


def tagged_base_prompts(sources=SOURCES, seed: int = 0, data_dir=None) -> list[tuple[str, str]]:
    """(base prompt, source) pairs, usable and unique (the first source to have a prompt keeps it), in an
    order shuffled by ``seed``. A source whose file is absent gives nothing."""
    unknown = set(sources) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown base prompt source(s) {sorted(unknown)} (known: {', '.join(SOURCES)})")
    root = _data_dir(data_dir)
    seen, out = set(), []
    for source in sources:
        if source == "tasks":
            texts = _task_bases()
        elif root is not None and (root / SOURCE_FILES[source]).is_file():
            texts = _file_bases(str(root / SOURCE_FILES[source]))
        else:
            texts = ()
        for text in texts:
            text = text.strip()
            key = " ".join(text.lower().split())
            if _usable(text) and key not in seen:
                seen.add(key)
                out.append((text, source))
    random.Random(f"bases:{seed}").shuffle(out)
    return out


def base_prompts(sources=SOURCES, seed: int = 0, data_dir=None) -> list[str]:
    """Our base prompts (see the module docstring), shuffled by ``seed``."""
    return [text for text, _ in tagged_base_prompts(sources, seed, data_dir)]


def _draw(rng: random.Random, base: str, types, count: int) -> list[Constraint]:
    """Up to ``count`` constraints of distinct ``types`` that can all hold on ``base``."""
    chosen: list[Constraint] = []
    candidates = [t for t in types if fits_base(t, base)]
    rng.shuffle(candidates)
    for instruction_id in candidates:
        if len(chosen) == count:
            break
        for _ in range(3):  # another draw of the parameters may fit where the first did not
            candidate = sample_constraint(instruction_id, rng, base)
            if conflict([*chosen, candidate]) is None:
                chosen.append(candidate)
                break
    return chosen


def _join(base: str, sentences: list[str]) -> str:
    # A base without closing punctuation ("Tope or Rope") gets a full stop, so the first rule reads as its own
    # sentence; the base itself (what combination:repeat_prompt asks to repeat) is unchanged.
    stop = "" if re.search(r"""[.?!:;)"']$""", base) else "."
    return base + stop + " " + " ".join(sentences)


def constrained_prompts(base: list[str], n: int, seed: int, types=TRAIN_TYPES, max_constraints: int = 3,
                        sources: list[str] | None = None) -> list[dict]:
    """``n`` prompt rows, each a base prompt with 1..``max_constraints`` constraints of ``types`` appended
    (mostly 1-2), deterministic for ``seed``. Every base prompt is used once before any is used again; one that
    no type of ``types`` fits is passed over.
    ``sources``: the source of each base prompt (parallel to ``base``), recorded in the row's ``source``."""
    if not base:
        raise ValueError("no base prompts to attach constraints to")
    unknown = [t for t in types if t not in INSTRUCTION_TYPES]
    if unknown or not types:
        raise ValueError(f"unknown or no instruction types: {unknown}")
    if max_constraints < 1:
        raise ValueError(f"max_constraints must be at least 1, got {max_constraints}")
    weights = (COUNT_WEIGHTS + (0.05,) * max_constraints)[:max_constraints]
    rng = random.Random(f"constraints:{seed}")
    rows, order, misses = [], [], 0
    while len(rows) < n:
        if not order:
            order = list(range(len(base)))
            rng.shuffle(order)
        index = order.pop()
        text = base[index]
        count = rng.choices(range(1, max_constraints + 1), weights=weights)[0]
        chosen = _draw(rng, text, types, count)
        if not chosen:  # no type of ``types`` fits this base (constrained_response needs a yes-or-no question)
            misses += 1
            if misses > 2 * len(base):
                raise ValueError(f"none of the base prompts takes a constraint of {list(types)}")
            continue
        misses = 0
        prompt = _join(text, [c.sentence for c in chosen])
        rows.append({"messages": [{"role": "user", "content": prompt}], "prompt": prompt,
                     "instruction_id_list": [c.id for c in chosen],
                     "kwargs": [json.loads(json.dumps(c.kwargs)) for c in chosen],  # a fresh copy per row
                     "source": "if:" + (sources[index] if sources else "custom"), "base": text})
    return rows


def is_dev(base: str, dev_fraction: float = DEV_FRACTION, seed: int = 0) -> bool:
    """Whether a base prompt belongs to the dev side: a fixed function of its text and ``seed``."""
    h = int(hashlib.sha256(f"{seed}:{base}".encode()).hexdigest()[:8], 16)
    return h < dev_fraction * 16**8


def splits(rows: list[dict], dev_fraction: float = DEV_FRACTION, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, dev): every row of one base prompt lands on the same side, so no dev prompt is trained on
    with other constraints."""
    train, dev = [], []
    for row in rows:
        (dev if is_dev(row.get("base", row["prompt"]), dev_fraction, seed) else train).append(row)
    return train, dev


def write_prompt_files(out_dir, n_train: int, n_dev: int, seed: int = 0, sources=SOURCES, data_dir=None) -> dict:
    """``if_train.jsonl`` and ``if_dev.jsonl`` (TRAIN_TYPES, disjoint base prompts) and ``if_dev_heldback.jsonl``
    (HELD_BACK types only, on the dev base prompts) in ``out_dir``. -> the row counts and base prompts per
    source."""
    tagged = tagged_base_prompts(sources, seed, data_dir)
    sides: dict[bool, list[tuple[str, str]]] = {False: [], True: []}
    for text, source in tagged:
        sides[is_dev(text, DEV_FRACTION, seed)].append((text, source))
    out_dir = Path(out_dir)
    counts: dict = {"base": {s: sum(1 for _, src in tagged if src == s) for s in sources}}
    for name, dev, types, n, offset in (("if_train", False, TRAIN_TYPES, n_train, 0),
                                        ("if_dev", True, TRAIN_TYPES, n_dev, 0),
                                        ("if_dev_heldback", True, HELD_BACK, n_dev, 1)):
        pairs = sides[dev]
        rows = constrained_prompts([t for t, _ in pairs], n, seed + offset, types,
                                   sources=[s for _, s in pairs]) if n else []
        atomic_write_text(out_dir / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        counts[name] = len(rows)
    return counts


if __name__ == "__main__":
    import sys

    print(write_prompt_files(sys.argv[1] if len(sys.argv) > 1 else "if_prompts", n_train=5000, n_dev=300))
