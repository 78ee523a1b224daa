"""The phrase automaton finds exactly what the lexicon's regular expression finds."""

from __future__ import annotations

import pickle
import random
import re

import numpy as np
import pytest

from entropylens.analysis.automaton import LEAP, PhraseAutomaton
from entropylens.analysis.lexicon import Lexicon, default_lexicon, normalize_phrase
from entropylens.analysis.lexicon_matching import PlanningMatcher, fold_case
from entropylens.errors import EntropylensError

#: Phrases where the rules meet: one-letter words, phrases inside phrases, phrases that
#: begin or end with punctuation or an apostrophe, word characters at the edges.
TRICKY_PHRASES = ["'s", "a", "a b", "ab", "x-y", "## step", "wait,", "hmm,", "i", "i'm",
                  "a b c d e", "b c", "c", "?", "??", "-", "a'b", "e f", "_x", "x_"]
#: Characters where the rules meet: Unicode whitespace, the two curly apostrophes (one is a
#: word character), a letter and a digit outside the alphabet, the Kelvin sign, dotless i,
#: long s, NUL (the matcher's sequence separator) and an escaped undecodable byte.
TRICKY_CHARS = list("abcdefxy'?-#, _") + ["\u2019", "\u02bc", "\t", "\n", "  ", "\u00a0",
                                          "\u2003", "\x1c", "é", "1", "\u212a", "\u0131",
                                          "\u017f", "\x00", "\udc80"]


def lexicon_of(phrases) -> Lexicon:
    return Lexicon(tuple(dict.fromkeys(normalize_phrase(p) for p in phrases)))


def regex_matches(lexicon: Lexicon, text: str) -> list[tuple[int, int, int]]:
    pattern = re.compile(lexicon.pattern.pattern)   # case-sensitive, on folded text
    return [(m.start(), m.end(), lexicon.phrase_index(m.group()))
            for m in pattern.finditer(text)]


def automaton_matches(lexicon: Lexicon, text: str) -> list[tuple[int, int, int]]:
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
    start, end, phrase = lexicon.automaton.find(codes)
    return list(zip(start.tolist(), end.tolist(), phrase.tolist()))


def random_texts(lexicon: Lexicon, count: int, seed: int):
    rng = random.Random(seed)
    pieces = [w for p in lexicon.phrases for w in re.split(r"(\s)", p)] + TRICKY_CHARS
    glue = ["", " ", "", ",", "\u02bc", "\n", "x"]
    for _ in range(count):
        text = "".join(rng.choice(pieces) + rng.choice(glue)
                       for _ in range(rng.randint(1, 30)))
        folded = fold_case(text)
        if folded is not None:
            yield folded


@pytest.mark.parametrize("lexicon", [default_lexicon(), lexicon_of(TRICKY_PHRASES)],
                         ids=["default", "tricky"])
@pytest.mark.slow
def test_automaton_equals_the_regular_expression_on_generated_text(lexicon):
    found = 0
    for text in random_texts(lexicon, 6000, seed=len(lexicon)):
        expected = regex_matches(lexicon, text)
        assert automaton_matches(lexicon, text) == expected, text
        found += len(expected)
    assert found > 1000


@pytest.mark.parametrize("lexicon", [default_lexicon(), lexicon_of(TRICKY_PHRASES)],
                         ids=["default", "tricky"])
def test_ascii_bytes_match_as_code_points_with_upper_case_folded(lexicon):
    found = 0
    for text in random_texts(lexicon, 4000, seed=7):
        if not text.isascii():
            continue
        expected = automaton_matches(lexicon, text)
        for spelled in (text, text.upper(), text.title()):
            start, end, phrase = lexicon.automaton.find_ascii(spelled.encode())
            assert list(zip(start.tolist(), end.tolist(), phrase.tolist())) == expected, text
        found += len(expected)
    assert found > 50


def test_overlapping_candidates_keep_the_leftmost_longest_match():
    lexicon = lexicon_of(["we need to", "need to find", "to find", "find", "we"])
    text = "so we need to find x; we need  to\tfind it; we needed to find"
    assert automaton_matches(lexicon, text) == regex_matches(lexicon, text)
    spans = [text[a:b] for a, b, _ in automaton_matches(lexicon, text)]
    assert spans == ["we need to", "find", "we need  to", "find", "we", "to find"]


@pytest.mark.parametrize("phrases, text", [
    (default_lexicon().phrases, "but wait " * 20_000),
    (["a", "a a", "a a a"], "a " * 30_001),
    (["we need to", "need to find", "to find", "find the"], "we need to find the x. " * 5000)],
    ids=["repeated-phrase", "self-overlapping", "chained"])
def test_repetitive_text_keeps_the_leftmost_matches(phrases, text):
    # RL completions loop: long runs of overlapping candidates must still resolve exactly
    lexicon = lexicon_of(phrases)
    assert automaton_matches(lexicon, text) == regex_matches(lexicon, text)


@pytest.mark.parametrize("text", ["", "a", "ab", "a b", "'s", "x ", "i'm", "i\u2019m",
                                  "\u02bcs", "hmm,", "## step", "a" * LEAP, "b c" * 3])
def test_short_texts_and_phrases_at_the_ends(text):
    lexicon = lexicon_of(TRICKY_PHRASES)
    assert automaton_matches(lexicon, text) == regex_matches(lexicon, text)


def test_a_phrase_with_the_sequence_separator_is_refused():
    with pytest.raises(EntropylensError, match="NUL"):
        lexicon_of(["a\x00b"])


def test_matcher_uses_the_regex_where_the_automaton_cannot_go():
    # a non-ASCII phrase: no automaton; text whose lower case grows: the regex path
    assert lexicon_of(["café au lait"]).automaton is None
    matcher = PlanningMatcher(default_lexicon(), "text")
    for text in ["But WAİT: so", "the \u212aelvin so", "ſo we wait"]:
        expected = [(m.start(), m.end()) for m in default_lexicon().pattern.finditer(text)]
        result = matcher.match(list(text), np.array([0]))
        got = sorted(zip(result.first_token.tolist(), (result.last_token + 1).tolist()))
        assert got == expected, text


def test_automaton_tables_are_built_once_and_not_pickled():
    lexicon = default_lexicon()
    assert isinstance(lexicon.automaton, PhraseAutomaton)
    assert lexicon_of(lexicon.phrases).automaton is lexicon.automaton
    # engine workers get lexicons by pickle: the tables are not in it
    assert len(pickle.dumps(lexicon)) < 20_000
    assert pickle.loads(pickle.dumps(lexicon)).automaton is lexicon.automaton
    # every phrase ends at exactly one node of its trie
    assert sorted(lexicon.automaton.phrase[lexicon.automaton.phrase >= 0].tolist()) \
        == list(range(len(lexicon)))
