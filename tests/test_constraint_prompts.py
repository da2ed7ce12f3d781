"""IF-RLVR training prompts (data/constraint_prompts.py, data/constraint_templates.py): the held-back split of
the 25 types, the templates' kwargs against the checkers, a hand-built reply that satisfies every sampled
row (so no row asks for the impossible) and one that breaks each type, determinism, disjoint splits, the
reward, the files; and the guard against IFEval contamination.

Parts that read the shared data (IFEval, Dolly, Alpaca: /work/shared/data, beside the repository, never in it)
skip without it."""

import json
import random
import re
from functools import lru_cache
from pathlib import Path

import pytest

from chatfactory.data import constraint_prompts as cp
from chatfactory.data import constraint_templates as ct
from chatfactory.data.constraints import INSTRUCTION_TYPES, check, follows
from chatfactory.data.constraints_text import count_sentences, count_words
from chatfactory.data.preferences import load_prompts
from chatfactory.data.tasks import task_rows
from chatfactory.data.verifiers import constraints, constraints_fraction, load_verifier

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
IFEVAL = SHARED / "eval" / "ifeval" / "input_data.jsonl"
TASK_BASES = cp.base_prompts(sources=("tasks",))
# Our own plain bases for the tests, one of them a yes-or-no question (constrained_response needs one).
BASES = ["Is the sea blue on a sunny day?", "What makes a good breakfast?", "How do plants grow from seeds?",
         "Describe your favourite season", "Why do people keep a diary?"] + TASK_BASES[:40]


@lru_cache(maxsize=1)
def ifeval_prompts() -> tuple[str, ...]:
    if not IFEVAL.is_file():
        pytest.skip(f"IFEval data not found at {IFEVAL} (the shared data sets live beside the repo, never in it)")
    with open(IFEVAL, encoding="utf-8") as f:
        return tuple(json.loads(line)["prompt"] for line in f if line.strip())


def sample_rows(types, n, seed=0, max_constraints=3):
    return cp.constrained_prompts(BASES, n, seed, types, max_constraints)


# ------------------------------------------------------------------------------------ a compliant reply
# Filler sentences: no comma, no capital word (nor "O" or "I", which count as one), none of the rare letters
# ("fewer than N" of z q x j k v), short so that a word limit leaves room. A sentence holding a word or letter
# the row rules out is skipped; for "at least N" of a letter the sentences richest in it come first.
FILLER = {"en": ["The sun rose over the calm sea.", "Small steps add up over time.", "Most people learn by doing.",
                 "This is a short and honest reply.", "The answer depends on the details.",
                 "Clear plans save time later.", "Try one idea at a time.", "Rest is as useful as effort.",
                 "Friends matter a lot.", "The result is worth the wait.", "Tiny insects hide in moist soil.",
                 "Good food brings people together.", "Stars shine bright across the sea.",
                 "Nations need strong and honest institutions."],
          "fr": ["Le soleil brille sur la mer calme.", "Les enfants jouent dans le jardin.",
                 "Nous allons partir demain matin."],
          "es": ["El sol brilla sobre el mar tranquilo.", "Los ninos juegan en el parque.",
                 "Mañana salimos muy temprano."],
          "de": ["Die Sonne scheint auf das ruhige Meer.", "Wir gehen morgen früh in die Stadt.",
                 "Das Wetter ist heute schön."],
          "it": ["Il sole splende sul mare calmo.", "Oggi i bambini giocano nel giardino.",
                 "Domani partiamo molto presto."],
          "pt": ["Hoje o sol brilha sobre o mar calmo.", "As crianças brincam no jardim.",
                 "Amanhã saímos muito cedo."]}


def compose(row: dict) -> str:
    """A reply that follows every constraint of ``row``, built by hand from its kwargs."""
    c = dict(zip(row["instruction_id_list"], row["kwargs"]))
    param = lambda instruction_id, name, default=None: c.get(instruction_id, {}).get(name, default)  # noqa: E731
    avoid = [w.lower() for w in param("keywords:forbidden_words", "forbidden_words", [])]
    freq = c.get("keywords:frequency")
    if freq and freq["relation"] == "less than":
        avoid.append(freq["keyword"].lower())
    letter = c.get("keywords:letter_frequency")
    if letter and letter["let_relation"] == "less than":
        avoid.append(letter["letter"])
    pool = [s for s in FILLER[param("language:response_language", "language", "en")]
            if not any(w in s.lower() for w in avoid)]
    assert pool, f"no filler sentence fits {row['instruction_id_list']}"
    if letter and letter["let_relation"] == "at least":  # the sentences richest in the letter first
        pool.sort(key=lambda s: -s.lower().count(letter["letter"]) / len(s.split()))
    fill = iter(pool * 40)

    # the blocks: paragraphs, sections or one; extras go inside the first sentence, to add no sentences
    joiner, blocks = "\n\n", [[next(fill)]]
    if "length_constraints:number_paragraphs" in c:
        joiner = "\n***\n"
        blocks = [[next(fill)] for _ in range(c["length_constraints:number_paragraphs"]["num_paragraphs"])]
    if (nth := c.get("length_constraints:nth_paragraph_first_word")):
        blocks = [[next(fill)] for _ in range(nth["num_paragraphs"])]
        blocks[nth["nth_paragraph"] - 1].insert(0, nth["first_word"].capitalize() + " this.")
    if (sec := c.get("detectable_format:multiple_sections")):
        blocks = [[f"{sec['section_spliter']} {i}\n" + next(fill)] for i in range(1, sec["num_sections"] + 1)]
    extras = []
    if (kw := c.get("keywords:existence")):
        extras += kw["keywords"]
    if freq and freq["relation"] == "at least":
        extras += [freq["keyword"]] * freq["frequency"]
    if (cap := c.get("change_case:capital_word_frequency")) and cap["capital_relation"] == "at least":
        extras += ["NOTE"] * cap["capital_frequency"]
    extras += [f"[{i}]" for i in range(param("detectable_content:number_placeholders", "num_placeholders", 0))]
    extras += [f"*{i}*" for i in range(param("detectable_format:number_highlighted_sections", "num_highlights", 0))]
    first = blocks[0][-1]
    blocks[0][-1] = first[:-1] + "".join(" " + e for e in extras) + first[-1]
    if "detectable_format:constrained_response" in c:
        blocks[0].append("My answer is no.")
    if (bullets := c.get("detectable_format:number_bullet_lists")):
        blocks[0].append("".join(f"\n- {i}" for i in range(bullets["num_bullets"])) + "\n")
    if "detectable_format:title" in c:
        blocks[0].insert(0, "<<The Title>>\n")
    if {"change_case:english_lowercase", "change_case:english_capital", "language:response_language"} & set(c) \
            and param("length_constraints:number_sentences", "relation") != "less than":
        blocks[-1] += [next(fill), next(fill)]  # more text for langdetect to go by

    def text() -> str:
        body = joiner.join(" ".join(b) for b in blocks)
        if "combination:two_responses" in c:
            body += "\n******\n" + next(s for s in pool if s not in body)
        if (ps := c.get("detectable_content:postscript")):
            body += f"\n{ps['postscript_marker']} {pool[0]}"
        if (end := c.get("startend:end_checker")):
            body += " " + end["end_phrase"]
        if (rep := c.get("combination:repeat_prompt")):
            body = rep["prompt_to_repeat"] + "\n" + body
        if "change_case:english_lowercase" in c:
            body = body.lower()
        if "change_case:english_capital" in c:
            body = body.upper()
        if "detectable_format:json_format" in c:
            body = json.dumps({"ANSWER" if "change_case:english_capital" in c else "answer": body.replace("\n", " ")},
                              ensure_ascii=False)
        if "startend:quotation" in c:
            body = f'"{body}"'
        return body

    def short_of_minimum(reply: str) -> bool:  # an "at least" count not reached yet
        counts = {"length_constraints:number_words": ("num_words", count_words(reply)),
                  "length_constraints:number_sentences": ("num_sentences", count_sentences(reply)),
                  "keywords:letter_frequency": ("let_frequency", reply.lower().count(param(
                      "keywords:letter_frequency", "letter", "")))}
        return any(k.get("relation", k.get("let_relation")) == "at least" and count < k[name]
                   for instruction_id, (name, count) in counts.items() if (k := c.get(instruction_id)))

    for _ in range(60):
        reply = text()
        if not short_of_minimum(reply):
            return reply
        blocks[-1].append(next(fill))
    raise AssertionError(f"could not reach the minimum counts of {row}")


def test_held_back_and_train_types_partition_the_25():
    assert len(cp.TRAIN_TYPES) == 18 and len(cp.HELD_BACK) == 7
    assert set(cp.TRAIN_TYPES).isdisjoint(cp.HELD_BACK)
    assert set(cp.TRAIN_TYPES) | set(cp.HELD_BACK) == set(INSTRUCTION_TYPES)
    assert set(ct.TEMPLATES) == set(INSTRUCTION_TYPES)  # held-back types have templates too
    # one held back from each family, each family keeping a trained sibling
    family = lambda t: t.split(":")[0]  # noqa: E731
    assert len({family(t) for t in cp.HELD_BACK}) == 7
    assert {family(t) for t in cp.HELD_BACK} <= {family(t) for t in cp.TRAIN_TYPES}
    for t in cp.HELD_BACK:
        assert t in cp.__doc__


def stated(kwargs: dict) -> list[str]:
    """What a sentence must say for ``kwargs``: every number, word and relation in our wording."""
    out = []
    for name, value in kwargs.items():
        if name == "prompt_to_repeat":
            continue  # the request itself, which the sentence points to
        if name.endswith("relation"):
            out.append("at least" if value == "at least" else "fewer than")
        elif name == "language":
            out.append(ct.LANGUAGES[value])
        elif name == "nth_paragraph":
            out.append(["first", "second", "third"][value - 1])
        else:
            out += [str(v) for v in (value if isinstance(value, list) else [value])]
    return out


def test_every_template_gives_kwargs_the_checker_accepts_and_says_them():
    rng = random.Random(0)
    for instruction_id, (sampler, phrasings) in ct.TEMPLATES.items():
        assert 2 <= len(phrasings) <= 4, instruction_id
        for base in BASES[:12]:
            kwargs, fields = sampler(rng, base)
            check(instruction_id, "some text", kwargs, base)  # raises on a wrong name, type or relation
            for phrasing in phrasings:  # every phrasing, formatted with every draw
                sentence = phrasing.format(**fields)
                assert "{" not in sentence and sentence.strip() == sentence and sentence[-1] in '.!")', sentence
                assert all(part in sentence for part in stated(kwargs)), (sentence, kwargs)
        if instruction_id == "combination:repeat_prompt":
            assert kwargs == {"prompt_to_repeat": base}


@pytest.mark.parametrize("instruction_id", INSTRUCTION_TYPES)
def test_compliant_reply_passes_and_broken_reply_fails(instruction_id):
    """One-constraint rows: a reply built to follow passes, one built to break fails - so the sentence and the
    kwargs say the same thing."""
    rows = sample_rows([instruction_id], 6, seed=1, max_constraints=1)
    assert all(r["instruction_id_list"] == [instruction_id] for r in rows)
    for row in rows:
        good = compose(row)
        assert constraints(row, good) == 1.0, (row["kwargs"], good)
        bad = break_reply(instruction_id, row["kwargs"][0], good)
        assert constraints(row, bad) == 0.0, (row["kwargs"], bad)
        assert constraints_fraction(row, bad) == 0.0


def break_reply(instruction_id: str, k: dict, good: str) -> str:
    """A reply that breaks the one constraint (the good reply, changed where the constraint looks)."""
    kind = instruction_id.split(":")[1]
    over = lambda n: " ".join(["word"] * (n + 5)) + "."  # noqa: E731
    below = "Five."
    at_least = any(v == "at least" for v in k.values())
    if kind in ("number_words", "number_sentences"):
        return below if at_least else " ".join(["Yes."] * (k.get("num_sentences", 0) + 2)) + over(k.get("num_words", 0))
    breaks = {
        "no_comma": good + " Yes, no.", "english_lowercase": good + " Hello There", "english_capital": good + " ok",
        "capital_word_frequency": "plain words." if at_least else good + " NOTE" * (k.get("capital_frequency", 0) + 1),
        "response_language": "This reply is written in plain English from start to end.",
        "repeat_prompt": "The answer comes first here.", "two_responses": "Only one answer.",
        "number_placeholders": "No blanks.", "postscript": "No note at all.", "constrained_response": "Perhaps.",
        "json_format": "not json", "multiple_sections": "One block.", "number_highlighted_sections": "Plain.",
        "number_bullet_lists": "\n".join(f"- {i}" for i in range(k.get("num_bullets", 0) + 3)), "title": "No title.",
        "existence": "Nothing relevant.", "forbidden_words": good + " " + " ".join(k.get("forbidden_words", [])),
        "frequency": "Nothing." if at_least else good + (" " + k.get("keyword", "")) * (k.get("frequency", 0) + 1),
        "letter_frequency": "123." if at_least else good + " " + k.get("letter", "") * (k.get("let_frequency", 0) + 1),
        "nth_paragraph_first_word": "Wrong start.\n\nWrong again.\n\nAnd again.",
        "number_paragraphs": "One paragraph only.", "end_checker": good + " And more.", "quotation": "Not quoted.",
    }
    return breaks[kind]


@pytest.mark.parametrize("types", [cp.TRAIN_TYPES, cp.HELD_BACK], ids=["train", "held_back"])
def test_every_sampled_row_can_be_satisfied(types):
    """No two constraints of a row contradict: a reply built by hand follows them all (strictly), and no pair
    of the conflict table ever shares a row. Over our test bases and (where the shared data is here) 400 more
    from every source, longer ones from Dolly and Alpaca among them."""
    rows = sample_rows(types, 400, seed=3)
    sizes = [len(r["instruction_id_list"]) for r in rows]
    assert set(sizes) == {1, 2, 3} and sizes.count(3) < sizes.count(1)
    assert {t for r in rows for t in r["instruction_id_list"]} == set(types)
    rows += cp.constrained_prompts(cp.base_prompts(seed=1, data_dir=SHARED)[:400], 400, 4, types)
    for row in rows:
        ids = row["instruction_id_list"]
        assert set(ids) <= set(types) and len(set(ids)) == len(ids)
        assert not any(frozenset((a, b)) in ct.CONFLICTS for a in ids for b in ids if a != b), ids
        reply = compose(row)
        assert all(follows(row, reply)), (ids, row["kwargs"], reply, follows(row, reply))


def test_conflict_table_is_enforced():
    base = "What makes a good breakfast?"
    lower = ct.Constraint("change_case:english_lowercase", {}, "x")
    assert ct.conflict([lower, ct.Constraint("change_case:english_capital", {}, "x")])
    assert ct.conflict([ct.Constraint("punctuation:no_comma", {}, "x"),
                        ct.Constraint("startend:end_checker", {"end_phrase": "Bye, then."}, "x")])
    short = ct.Constraint("length_constraints:number_words", {"num_words": 30, "relation": "less than"}, "")
    assert ct.conflict([short, ct.Constraint("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "")])
    assert ct.conflict([lower, ct.Constraint("detectable_format:constrained_response", {}, "")])
    assert ct.conflict([lower, lower])
    assert ct.conflict([lower, ct.Constraint("keywords:existence", {"keywords": [base]}, "")]) is None


def test_rows_are_deterministic_and_well_formed(tmp_path):
    a, b = sample_rows(cp.TRAIN_TYPES, 50, seed=7), sample_rows(cp.TRAIN_TYPES, 50, seed=7)
    assert a == b and a != sample_rows(cp.TRAIN_TYPES, 50, seed=8)
    assert cp.base_prompts(("tasks",), seed=2) == cp.base_prompts(("tasks",), seed=2)
    for row in a:
        assert row["messages"] == [{"role": "user", "content": row["prompt"]}]
        assert row["prompt"].startswith(row["base"]) and len(row["kwargs"]) == len(row["instruction_id_list"])
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in a))
    loaded = load_prompts(str(path))
    assert loaded == a  # extra keys kept
    follows(loaded[0], "text", loose=True)


def test_splits_are_disjoint_on_base_prompts():
    rows = sample_rows(cp.TRAIN_TYPES, 300, seed=0)  # 300 rows over 45 bases: every base several times
    train, dev = cp.splits(rows, dev_fraction=0.3, seed=0)
    assert train and dev and len(train) + len(dev) == len(rows)
    assert not {r["base"] for r in train} & {r["base"] for r in dev}
    assert cp.splits(rows, 0.3, 0) == (train, dev)


def test_verify_is_all_or_nothing():
    row = {"prompt": "p", "instruction_id_list": ["punctuation:no_comma", "keywords:existence"],
           "kwargs": [{}, {"keywords": ["harbor"]}]}
    assert constraints(row, "The harbor is calm.") == 1.0
    assert constraints(row, "Sure!\nThe *harbor* is calm.\nBye, then") == 1.0  # loose: first/last line dropped
    assert constraints(row, "The harbor, calm.") == 0.0 and constraints_fraction(row, "The harbor, calm.") == 0.5
    assert constraints(row, "") == 0.0 and constraints_fraction(row, "   ") == 0.0
    assert load_verifier("constraints") is constraints  # the verifier RL stages name


def test_write_prompt_files(tmp_path):
    counts = cp.write_prompt_files(tmp_path, n_train=40, n_dev=10, seed=0, sources=("tasks",))
    assert counts["if_train"] == 40 and counts["if_dev"] == counts["if_dev_heldback"] == 10
    assert counts["base"]["tasks"] == len(TASK_BASES)
    files = {name: load_prompts(str(tmp_path / f"{name}.jsonl")) for name in ("if_train", "if_dev", "if_dev_heldback")}
    assert not {r["base"] for r in files["if_train"]} & {r["base"] for r in files["if_dev"] + files["if_dev_heldback"]}
    assert all(set(r["instruction_id_list"]) <= set(cp.TRAIN_TYPES) for r in files["if_train"] + files["if_dev"])
    assert all(set(r["instruction_id_list"]) <= set(cp.HELD_BACK) for r in files["if_dev_heldback"])


def test_task_bases_come_from_the_rl_and_dev_splits_only():
    held_out = {r["messages"][0]["content"] for r in task_rows("heldout") + task_rows("sft")}
    assert TASK_BASES and not held_out & set(TASK_BASES)
    assert all(r["lang"] == "en" for r in task_rows("rl") if r["messages"][0]["content"] in set(TASK_BASES))


def test_dolly_and_alpaca_bases():
    if not (SHARED / cp.SOURCE_FILES["dolly"]).is_file() or not (SHARED / cp.SOURCE_FILES["alpaca"]).is_file():
        pytest.skip(f"Dolly or Alpaca not found under {SHARED} (the shared data sets live beside the repo)")
    tagged = cp.tagged_base_prompts(seed=0, data_dir=SHARED)
    per_source = {s: sum(1 for _, src in tagged if src == s) for s in cp.SOURCES}
    assert all(n > 500 for n in per_source.values()), per_source
    assert all(len(t) <= cp.MAX_CHARS and "\n" not in t for t, _ in tagged)


# ------------------------------------------------------------------------------------ contamination guard
def six_grams(text: str) -> set[tuple[str, ...]]:
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return {tuple(words[i:i + 6]) for i in range(len(words) - 5)}


def test_no_template_sentence_shares_six_words_with_ifeval():
    ifeval = set().union(*(six_grams(p) for p in ifeval_prompts()))
    rng = random.Random(0)
    sentences = {phrasing for _, phrasings in ct.TEMPLATES.values() for phrasing in phrasings}
    for instruction_id in ct.TEMPLATES:
        for draw in range(30):
            sentences.add(ct.sample_constraint(instruction_id, rng, BASES[draw % len(BASES)]).sentence)
    shared = {sentence: six_grams(sentence) & ifeval for sentence in sentences}
    assert not {sentence: grams for sentence, grams in shared.items() if grams}


def test_own_phrases_and_bases_are_not_ifevals():
    prompts = [p.lower() for p in ifeval_prompts()]
    for phrase in ct.END_PHRASES:
        assert not any(phrase.lower().rstrip(".!") in p for p in prompts), phrase
    for word in ct.KEYWORDS:  # our keywords are never ones IFEval asks for in quotes
        assert not any(f'"{word}"' in p for p in prompts), word
    normal = {" ".join(p.split()) for p in prompts}
    sources = cp.SOURCES if (SHARED / cp.SOURCE_FILES["dolly"]).is_file() else ("tasks",)
    bases = cp.base_prompts(sources, data_dir=SHARED)
    assert not [b for b in bases if " ".join(b.lower().split()) in normal]
