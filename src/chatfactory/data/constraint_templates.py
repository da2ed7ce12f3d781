"""Our own wording of the 25 IFEval instruction types, with sampled parameters, and the rules that keep two
constraints that cannot both hold off one prompt.

``sample_constraint(instruction_id, rng, base)`` draws the parameters of one type and one of its phrasings:
-> ``Constraint(id, kwargs, sentence)``, where ``kwargs`` is exactly what the checker of that type takes
(data/constraints.py: the keyword-only arguments of its checker, the names IFEval rows use) and
``sentence`` is what is appended to the base prompt. ``conflict(constraints)`` says why a set of
constraints cannot go on one prompt (None when it can). constraint_prompts.py puts both together.

Wording. Every phrasing here was written for this project, none taken or paraphrased from IFEval (the
guard in tests/test_constraint_prompts.py checks that no sentence shares six words in a row with an IFEval
prompt, and that no end phrase or keyword list of ours appears in one). Parameters are sized for a small
model answering in at most ~300 tokens: 20-80 words at least or fewer than 40-150, 1-3 highlights, 2-5
bullets, 2-3 paragraphs or sections, letters that are common ("at least") or rare ("fewer than").

Conflicts come in two kinds:
- ``CONFLICTS``: pairs of types that never share a prompt, whatever their parameters (all lower case and
  all capitals; JSON and any other layout; two length limits; ...).
- Clashes of parameters, checked over the whole set (``_clash``): a text one constraint makes the reply
  contain (an end phrase, a keyword, the repeated prompt, "My answer is no.", "Part 1") must not break
  another (no commas, a forbidden word, fewer than N of a letter or of a keyword or of capital words, all
  lower case or all capitals); and a "fewer than N words/sentences" limit must leave room for what the
  other constraints need (three paragraphs need more than 30 words).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .constraints_text import capital_words, count_sentences, count_words


@dataclass(frozen=True)
class Constraint:
    id: str
    kwargs: dict
    sentence: str


# ---------------------------------------------------------------------------------------- vocabularies
# Our own small lists. Keywords and forbidden words are also drawn from the base prompt's own words
# (``content_words``), as a request would naturally mention them.
KEYWORDS = ["lantern", "harbor", "meadow", "compass", "pebble", "orchard", "candle", "ribbon", "thunder", "maple",
            "cactus", "island", "violin", "blanket", "journey", "mirror", "puzzle", "rocket", "saddle", "tunnel"]
COMMON_WORDS = ["very", "really", "important", "example", "simple", "good", "also", "thing", "just", "answer",
                "great", "basically", "many", "because"]
FIRST_WORDS = ["first", "overall", "today", "next", "however", "finally", "still", "honestly", "briefly"]
END_PHRASES = ["That wraps up my reply.", "Thanks for the interesting question.", "Hope that clears it up.",
               "Those are my thoughts on it.", "Have a lovely day!", "End of answer.",
               "Feel free to follow up with more questions."]
COMMON_LETTERS = "aeiotnsr"  # "at least N" of these
RARE_LETTERS = "zqxjkv"  # "fewer than N" of these
LANGUAGES = {"fr": "French", "es": "Spanish", "de": "German", "it": "Italian", "pt": "Portuguese"}
SECTION_WORDS = ["Section", "SECTION", "Part", "PART"]
MARKERS = ["P.S.", "P.P.S"]
# The checker's three fixed sentences, each followed by when to use it (listed back to back they would repeat
# IFEval's own wording).
RESPONSE_OPTIONS = '"My answer is yes." if yes, "My answer is no." if not, or "My answer is maybe." if unsure'
STOPWORDS = frozenset("""about above after again also among another because been before being below between both
could does doing down during each from further have having here into itself just more most much other over same
should some such than that their them then there these they this those through under until very what when where
which while will with would your yours write give tell explain describe name list make find which whom whose""".split())


def content_words(text: str) -> list[str]:
    """The base prompt's own plain words (letters only, 4-12 long, no stopwords), lower-cased, in order."""
    seen, out = set(), []
    for word in re.findall(r"[A-Za-z]+", text):
        low = word.lower()
        if 4 <= len(low) <= 12 and low not in STOPWORDS and low not in seen:
            seen.add(low)
            out.append(low)
    return out


def _word(rng: random.Random, base: str, own: list[str]) -> str:
    """Half the time one of the base prompt's words (when it has any), else one of ours."""
    words = content_words(base)
    return rng.choice(words if words and rng.random() < 0.5 else own)


def _relation(rng: random.Random) -> tuple[str, str]:
    """(the checker's relation, how our phrasings say it)."""
    return ("at least", "at least") if rng.random() < 0.6 else ("less than", "fewer than")


# ---------------------------------------------------------------------------------------- parameter samplers
# Each: (rng, base prompt) -> (the checker's kwargs, the fields the phrasings are formatted with).
def _nothing(rng, base):
    return {}, {}


def _capital_frequency(rng, base):
    relation, rel = _relation(rng)
    n = rng.randint(2, 5) if relation == "at least" else rng.randint(3, 6)
    return {"capital_frequency": n, "capital_relation": relation}, {"n": n, "rel": rel}


def _language(rng, base):
    code = rng.choice(sorted(LANGUAGES))
    return {"language": code}, {"lang": LANGUAGES[code]}


def _repeat(rng, base):
    return {"prompt_to_repeat": base}, {}


def _placeholders(rng, base):
    n = rng.randint(1, 3)
    return {"num_placeholders": n}, {"n": n, "s": "" if n == 1 else "s"}


def _postscript(rng, base):
    marker = rng.choice(MARKERS)
    return {"postscript_marker": marker}, {"marker": marker}


def _sections(rng, base):
    word, n = rng.choice(SECTION_WORDS), rng.randint(2, 3)
    return {"section_spliter": word, "num_sections": n}, {"word": word, "n": n}


def _bullets(rng, base):
    n = rng.randint(2, 5)
    return {"num_bullets": n}, {"n": n}


def _highlights(rng, base):
    n = rng.randint(1, 3)
    return {"num_highlights": n}, {"n": n, "s": "" if n == 1 else "s", "them": "it" if n == 1 else "them"}


def _keywords(rng, base):
    words = list(dict.fromkeys(_word(rng, base, KEYWORDS) for _ in range(rng.randint(1, 2))))
    return {"keywords": words}, {"words": " and ".join(f'"{w}"' for w in words)}


def _forbidden(rng, base):
    words = list(dict.fromkeys(_word(rng, base, COMMON_WORDS) for _ in range(rng.randint(1, 2))))
    return {"forbidden_words": words}, {"words": " or ".join(f'"{w}"' for w in words)}


def _frequency(rng, base):
    word = _word(rng, base, KEYWORDS)
    relation, rel = _relation(rng)
    n = rng.randint(2, 4) if relation == "at least" else rng.randint(2, 3)
    return {"keyword": word, "frequency": n, "relation": relation}, {"word": word, "n": n, "rel": rel}


def _letter(rng, base):
    relation, rel = _relation(rng)
    if relation == "at least":
        letter, n = rng.choice(COMMON_LETTERS), rng.randint(5, 15)
    else:
        letter, n = rng.choice(RARE_LETTERS), rng.randint(2, 5)
    return {"letter": letter, "let_frequency": n, "let_relation": relation}, {"letter": letter, "n": n, "rel": rel}


def _nth_paragraph(rng, base):
    n = rng.randint(2, 3)
    nth, word = rng.randint(1, n), rng.choice(FIRST_WORDS)
    ordinal = ["first", "second", "third"][nth - 1]
    return ({"num_paragraphs": n, "nth_paragraph": nth, "first_word": word},
            {"n": n, "nth": ordinal, "word": word})


def _paragraphs(rng, base):
    n = rng.randint(2, 3)
    return {"num_paragraphs": n}, {"n": n}


def _sentences(rng, base):
    relation, rel = _relation(rng)
    n = rng.randint(2, 5) if relation == "at least" else rng.randint(4, 8)
    return {"num_sentences": n, "relation": relation}, {"n": n, "rel": rel}


def _words(rng, base):
    relation, rel = _relation(rng)
    n = rng.randrange(20, 81, 5) if relation == "at least" else rng.randrange(40, 151, 10)
    return {"num_words": n, "relation": relation}, {"n": n, "rel": rel}


def _end_phrase(rng, base):
    phrase = rng.choice(END_PHRASES)
    return {"end_phrase": phrase}, {"phrase": phrase}


# ---------------------------------------------------------------------------------------- the phrasings
# type -> (sampler, phrasings). A phrasing is formatted with the sampler's fields.
TEMPLATES: dict[str, tuple] = {
    "punctuation:no_comma": (_nothing, [
        "Do not put a single comma anywhere in your reply.",
        "Avoid the comma character completely; your answer should contain none.",
        "Leave out commas altogether: not even one may appear."]),
    "change_case:english_lowercase": (_nothing, [
        "Reply in English without a single capital letter, not even at the start of a sentence.",
        "Type your whole answer in English using only small (lowercase) letters.",
        "Keep every letter of your English reply lowercase."]),
    "change_case:english_capital": (_nothing, [
        "Reply in English and type every letter as a capital.",
        "Use only uppercase letters in your English answer, from start to finish.",
        "Shout the whole reply: English, all caps, no small letters."]),
    "change_case:capital_word_frequency": (_capital_frequency, [
        "Type {rel} {n} of your words fully in capitals (for example NOTE).",
        "Include {rel} {n} all-caps words in your answer.",
        "Your reply must contain {rel} {n} words spelled entirely in uppercase."]),
    "language:response_language": (_language, [
        "Reply only in {lang}; do not use English.",
        "Your whole answer must be written in {lang}.",
        "Answer in {lang} rather than English."]),
    "combination:repeat_prompt": (_repeat, [
        "Before answering, copy my request above exactly as I typed it (just the request, not these "
        "extra rules), then give your answer.",
        "Open your reply by restating my question word for word, leaving out these added instructions, "
        "and only then answer it."]),
    "combination:two_responses": (_nothing, [
        "Offer two different replies, and put a line of six asterisks (******) between them.",
        "Give me two alternative answers separated by ****** and nothing else.",
        "Write two distinct versions of your answer with the divider ****** in between."]),
    "detectable_content:number_placeholders": (_placeholders, [
        "Leave at least {n} fill-in-the-blank slot{s} in square brackets, such as [city], for me to complete.",
        "Use at least {n} placeholder{s} written inside square brackets, like [date].",
        "Somewhere in the reply put at least {n} bracketed blank{s}, for example [your name]."]),
    "detectable_content:postscript": (_postscript, [
        'After the main answer, add a short note that begins with "{marker}".',
        'Close with an afterthought introduced by "{marker}".',
        'Finish by adding a postscript line that starts with "{marker}".']),
    "detectable_format:constrained_response": (_nothing, [
        "Somewhere in your reply include one of these exact sentences: " + RESPONSE_OPTIONS + ".",
        "State your verdict using one of the following sentences word for word: " + RESPONSE_OPTIONS + "."]),
    "detectable_format:json_format": (_nothing, [
        "Format the whole reply as a JSON object and write nothing outside it.",
        "Return your answer as valid JSON only; a markdown code block around it is fine.",
        "Produce the reply as one well-formed JSON value, with no prose before or after."]),
    "detectable_format:multiple_sections": (_sections, [
        "Organise the reply into {n} sections, each opening with the label {word} followed by its number "
        "({word} 1, {word} 2 and so on).",
        "Break your answer into {n} parts headed {word} 1, {word} 2 and so on.",
        "Use {n} numbered sections, starting each one with the word {word} and its number."]),
    "detectable_format:number_bullet_lists": (_bullets, [
        "Include exactly {n} bullet points, each on its own line starting with an asterisk (* ).",
        "Present your points as a list of precisely {n} lines that each begin with a dash (- ).",
        "Your reply should have {n} markdown bullet items, no more and no fewer."]),
    "detectable_format:number_highlighted_sections": (_highlights, [
        "Emphasise at least {n} phrase{s} with markdown asterisks, as in *this bit*.",
        "Highlight at least {n} key part{s} of your reply by putting stars around {them}, like *key idea*.",
        "Mark {n} or more important phrase{s} in italics using single asterisks, for instance *note*."]),
    "detectable_format:title": (_nothing, [
        "Give the reply a heading enclosed in double angle brackets, for instance <<A Short Heading>>.",
        "Start with a name for your answer written between << and >>.",
        "Add a title and wrap it like this: <<My Title>>."]),
    "keywords:existence": (_keywords, [
        "Make sure the word {words} shows up in your reply.",
        "Your answer has to mention {words}.",
        "Work the word {words} into what you write."]),
    "keywords:forbidden_words": (_forbidden, [
        "Never use the word {words} in your answer.",
        "The word {words} is off limits in your reply.",
        "Write your reply without the word {words}."]),
    "keywords:frequency": (_frequency, [
        'Use the word "{word}" {rel} {n} times.',
        'Let "{word}" turn up {rel} {n} times in your reply.',
        'Mention "{word}" {rel} {n} times in what you write.']),
    "keywords:letter_frequency": (_letter, [
        'The letter "{letter}" must appear {rel} {n} times in your reply.',
        'Use the letter {letter} {rel} {n} times in total.',
        'Count your uses of the letter "{letter}": it should be {rel} {n}.']),
    "length_constraints:nth_paragraph_first_word": (_nth_paragraph, [
        'Write {n} paragraphs separated by blank lines, and make "{word}" the very first word of the {nth} one.',
        'Your reply should have {n} paragraphs (a blank line between each); open the {nth} paragraph using '
        '"{word}" as its first word.']),
    "length_constraints:number_paragraphs": (_paragraphs, [
        "Write exactly {n} paragraphs and place a line holding only *** between neighbouring paragraphs.",
        "Split your answer into {n} paragraphs, using the divider *** to separate them.",
        "Give {n} paragraphs in total, with *** on its own line between one paragraph and the next."]),
    "length_constraints:number_sentences": (_sentences, [
        "Use {rel} {n} sentences in your reply.",
        "Your answer should be {rel} {n} sentences long.",
        "Keep the sentence count of your reply {rel} {n}."]),
    "length_constraints:number_words": (_words, [
        "Your reply should be {rel} {n} words long.",
        "Use {rel} {n} words in your answer.",
        "Keep the word count {rel} {n}."]),
    "startend:end_checker": (_end_phrase, [
        'End your reply with the exact words "{phrase}" and add nothing after them.',
        'Your final sentence must be "{phrase}"',
        'Sign off with "{phrase}" as the very last thing you write.']),
    "startend:quotation": (_nothing, [
        "Put the whole reply inside one pair of double quotation marks.",
        'Begin and end your answer with a double quote character (").',
        "Present your entire answer as a quotation, enclosed in double quotes."]),
}


# detectable_format:constrained_response ("My answer is yes/no/maybe.") only makes sense for a yes-or-no question.
YES_NO = re.compile(r"^(is|are|am|can|could|do|does|did|should|would|will|was|were|has|have|had|may|might|must)\b"
                    r"[^?]*\?$", re.IGNORECASE)


def fits_base(instruction_id: str, base: str) -> bool:
    """Whether a constraint of this type makes sense on ``base`` at all."""
    return instruction_id != "detectable_format:constrained_response" or bool(YES_NO.match(base.strip()))


def sample_constraint(instruction_id: str, rng: random.Random, base: str) -> Constraint:
    """One constraint of type ``instruction_id`` on ``base``: parameters drawn, one phrasing chosen."""
    sampler, phrasings = TEMPLATES[instruction_id]
    kwargs, fields = sampler(rng, base)
    return Constraint(instruction_id, kwargs, rng.choice(phrasings).format(**fields))


# ---------------------------------------------------------------------------------------- conflicts
LOWER, CAPITAL, CAP_WORDS = ("change_case:english_lowercase", "change_case:english_capital",
                             "change_case:capital_word_frequency")
JSON, REPEAT, TWO = "detectable_format:json_format", "combination:repeat_prompt", "combination:two_responses"
WORDS, SENTENCES = "length_constraints:number_words", "length_constraints:number_sentences"
PARAGRAPHS, NTH = "length_constraints:number_paragraphs", "length_constraints:nth_paragraph_first_word"
LANGUAGE, CONSTRAINED = "language:response_language", "detectable_format:constrained_response"
SECTIONS, QUOTE = "detectable_format:multiple_sections", "startend:quotation"

_PAIRS = [
    (LOWER, CAPITAL), (LOWER, CAP_WORDS), (CAPITAL, CAP_WORDS),  # whole-reply case against case
    (LOWER, LANGUAGE), (CAPITAL, LANGUAGE),  # both checkers want English
    (LOWER, REPEAT), (CAPITAL, REPEAT),  # "copy it exactly" against changing its case
    (WORDS, SENTENCES),  # two length limits of the same kind pull against each other
    (PARAGRAPHS, NTH), (PARAGRAPHS, SECTIONS), (NTH, SECTIONS),  # three ways to cut a reply: one at a time
    (TWO, PARAGRAPHS), (TWO, NTH), (TWO, SECTIONS),  # "******" is also two "***" dividers
    (TWO, REPEAT), (TWO, CONSTRAINED),  # one opening or one verdict, against two answers
    (NTH, "detectable_format:title"),  # a title on top would be the first paragraph's first word
    (REPEAT, QUOTE), (REPEAT, NTH), (REPEAT, LANGUAGE),  # the reply must open with the prompt itself
    (LANGUAGE, CONSTRAINED), (LANGUAGE, NTH), (LANGUAGE, "startend:end_checker"),  # English words to include
    (LANGUAGE, "keywords:existence"), (LANGUAGE, "keywords:frequency"),
    *((JSON, other) for other in (  # a JSON reply has no room for any other layout or fixed text
        TWO, REPEAT, CONSTRAINED, SECTIONS, PARAGRAPHS, NTH, QUOTE, "startend:end_checker", "detectable_format:title",
        "detectable_format:number_bullet_lists", "detectable_format:number_highlighted_sections",
        "detectable_content:postscript", "punctuation:no_comma")),
]
CONFLICTS: frozenset[frozenset[str]] = frozenset(frozenset(pair) for pair in _PAIRS)


def _required(c: Constraint) -> list[tuple[str, bool]]:
    """Texts the reply must contain to satisfy ``c``, each with whether its case must be kept."""
    k = c.kwargs
    texts = {
        REPEAT: lambda: [(k["prompt_to_repeat"], False)],
        CONSTRAINED: lambda: [("My answer is no.", True)],
        "startend:end_checker": lambda: [(k["end_phrase"], False)],
        "keywords:existence": lambda: [(w, False) for w in k["keywords"]],
        "keywords:frequency": lambda: [(k["keyword"], False)] * k["frequency"] if k["relation"] == "at least" else [],
        SECTIONS: lambda: [(f"{k['section_spliter']} {i}", True) for i in range(1, k["num_sections"] + 1)],
        NTH: lambda: [(k["first_word"], False)],
        "detectable_content:postscript": lambda: [(k["postscript_marker"], False)],
    }
    return texts.get(c.id, list)()


def _min_words(c: Constraint) -> int:
    """About the fewest words a reply needs to satisfy ``c`` (on top of a short answer)."""
    k = c.kwargs
    per_unit = {PARAGRAPHS: 8, NTH: 8, SECTIONS: 9, "detectable_format:number_bullet_lists": 3,
                "detectable_format:number_highlighted_sections": 2, "detectable_content:number_placeholders": 1}
    if c.id in per_unit:
        count = next(v for name, v in k.items() if name.startswith("num_"))
        return per_unit[c.id] * count
    if c.id == CAP_WORDS and k["capital_relation"] == "at least":
        return k["capital_frequency"]
    if c.id == "keywords:letter_frequency" and k["let_relation"] == "at least":
        return 3 * k["let_frequency"]  # a common letter comes about once in three words (e: twice as often)
    if c.id == SENTENCES and k["relation"] == "at least":
        return 5 * k["num_sentences"]
    fixed = {TWO: 8, "detectable_content:postscript": 4, "detectable_format:title": 2}
    return fixed.get(c.id, 0) + sum(count_words(text) for text, _ in _required(c))


def _min_sentences(c: Constraint) -> int:
    """About the fewest sentences a reply needs to satisfy ``c``."""
    if c.id in (PARAGRAPHS, NTH, SECTIONS):
        return next(v for name, v in c.kwargs.items() if name.startswith("num_"))
    if c.id == REPEAT:
        return count_sentences(c.kwargs["prompt_to_repeat"])
    # Punkt may end a sentence at the marker's full stop: "P.S." counts as a sentence of its own
    return {TWO: 2, "detectable_content:postscript": 2, "startend:end_checker": 1, CONSTRAINED: 1}.get(c.id, 0)


def _clash(limit: Constraint, others: list[Constraint]) -> str | None:
    """Why ``limit`` cannot hold alongside ``others`` (the texts they force in, the room they need), or None."""
    k = limit.kwargs
    texts = [pair for c in others for pair in _required(c)]
    joined = " ".join(text for text, _ in texts)
    kept_case = " ".join(text for text, keep in texts if keep)
    breaks = {
        "punctuation:no_comma": lambda: "," in joined,
        "keywords:forbidden_words": lambda: any(re.search(rf"\b{re.escape(w)}\b", joined, re.IGNORECASE)
                                                for w in k["forbidden_words"]),
        "keywords:letter_frequency": lambda: k["let_relation"] == "less than"
        and joined.lower().count(k["letter"]) >= k["let_frequency"],
        "keywords:frequency": lambda: k["relation"] == "less than"
        and joined.lower().count(k["keyword"].lower()) >= k["frequency"],
        CAP_WORDS: lambda: k["capital_relation"] == "less than" and capital_words(joined) >= k["capital_frequency"],
        LOWER: lambda: any(ch.isupper() for ch in kept_case),
        CAPITAL: lambda: any(ch.islower() for ch in kept_case),
        WORDS: lambda: k["relation"] == "less than" and 10 + sum(map(_min_words, others)) >= k["num_words"],
        SENTENCES: lambda: k["relation"] == "less than" and 1 + sum(map(_min_sentences, others)) >= k["num_sentences"],
    }
    rule = breaks.get(limit.id)
    return f"{limit.id} cannot hold with {', '.join(c.id for c in others)}" if rule and rule() else None


def conflict(constraints: list[Constraint]) -> str | None:
    """Why these constraints cannot go on one prompt (a repeated type, a pair of ``CONFLICTS``, a clash of
    parameters), or None when a reply can satisfy them all."""
    ids = [c.id for c in constraints]
    if len(set(ids)) < len(ids):
        return "a type twice"
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            if frozenset((a, b)) in CONFLICTS:
                return f"{a} conflicts with {b}"
    for i, c in enumerate(constraints):
        reason = _clash(c, constraints[:i] + constraints[i + 1:])
        if reason:
            return reason
    return None
