"""The lexicon's phrase matcher as a trie automaton run over a whole text at once in numpy.

:attr:`Lexicon.pattern <entropylens.analysis.lexicon.Lexicon.pattern>` is a regular
expression; Python's ``re`` tries it at every character, one at a time, which made it most
of the cost of the roles analysis. For lexicons of ASCII phrases matched on case-folded text
(:func:`~entropylens.analysis.lexicon.fold_case`), :class:`PhraseAutomaton` finds the same
matches with array operations:

1. every character becomes a symbol of a small alphabet (each phrase character, whitespace,
   apostrophes, other characters; each symbol says whether its characters are regex word
   characters);
2. a walk starts wherever a match may begin: a character that leaves a root of the trie,
   for a phrase that begins with a word character only where no word character precedes it;
3. all walks advance together through the trie of the phrases, the first :data:`LEAP`
   characters in one table lookup, then one character a round (a space of a phrase takes a
   whole run of whitespace, an apostrophe any of ``'``, ``’``, ``ʼ``); a walk keeps the
   deepest phrase end it passes whose end condition holds (a phrase ending with a word
   character must not be followed by one). That is the match the regular expression
   returns there: it tries the longer continuation first and falls back to the last phrase
   end it passed;
4. ``re`` scans left to right and goes on after the end of each match, so a walk that
   begins inside a kept match is dropped. Only walks that begin before the end of an
   earlier match need a decision in order; they are few and settled in a short loop.

The result is the regular expression's, match for match (tested against ``re.finditer`` on
real completions and on generated text rich in the characters where the rules meet).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

#: Symbols that stand for classes of characters; phrase characters follow from 6.
OTHER, OTHER_WORD, SPACE, APOSTROPHE, APOSTROPHE_WORD, _FIRST_CHAR = 0, 1, 2, 3, 4, 5
#: Characters an apostrophe of a phrase matches (the lexicon's apostrophe class).
APOSTROPHES = "'\u2019\u02bc"
#: Phrase-end conditions: no phrase ends here, any next character, a non-word next character.
NO_END, END_ANY, END_NOT_WORD = 0, 1, 2
#: Nodes: 0 is the dead end (every symbol leads back to it), 1 the root of the phrases that
#: begin with a word character, 2 the root of the others.
DEAD, WORD_ROOT, OTHER_ROOT = 0, 1, 2
#: Characters every walk takes in one lookup of a table built for the purpose: most walks
#: end within the first few, so the rounds that follow have little left to do.
LEAP = 3

_WORD = re.compile(r"\w")


def _is_word(ch: str) -> bool:
    return _WORD.match(ch) is not None


@dataclass(frozen=True, eq=False)
class PhraseAutomaton:
    """Transition tables of the trie of a set of lower-case ASCII phrases.

    Build with :meth:`build`. A walk moves from node to node, one symbol a step, through
    ``transitions``; a node reached by a space of a phrase loops on whitespace, which is
    how a space takes a whole run of it. ``leap_*`` are indexed by the root (0 word, 1
    other) and the first :data:`LEAP` symbols of a walk.
    """

    ascii_symbols: np.ndarray   # symbol of each ASCII character (uint8, 128)
    symbol_is_word: np.ndarray  # whether a symbol's characters are regex word characters
    transitions: np.ndarray     # (node, symbol) -> node
    ends: np.ndarray            # end condition of each node (NO_END, END_ANY, END_NOT_WORD)
    phrase: np.ndarray          # index of the phrase ending at each node, -1 for none
    leap_node: np.ndarray       # node after LEAP symbols
    leap_end: np.ndarray        # deepest valid phrase end before that: its depth (0: none)
    leap_phrase: np.ndarray     # ... and its phrase
    ascii_table: bytes          # symbol of each byte of ASCII text, upper case folded
    # bytes.translate tables over symbols: 1 where a symbol leaves the word root, the
    # other root, or stands for word characters
    _word_root_flags: bytes
    _other_root_flags: bytes
    _word_flags: bytes

    @classmethod
    def build(cls, phrases) -> "PhraseAutomaton":
        """Automaton for ``phrases`` (normalised: lower case, single spaces, straight
        apostrophes, ASCII)."""
        alphabet = sorted({ch for p in phrases for ch in p} - {" ", "'"})
        symbol_of = {" ": SPACE, "'": APOSTROPHE}
        symbol_of.update({ch: _FIRST_CHAR + i for i, ch in enumerate(alphabet)})
        n_symbols = _FIRST_CHAR + len(alphabet)
        symbol_is_word = np.zeros(n_symbols, bool)
        symbol_is_word[[OTHER_WORD, APOSTROPHE_WORD]] = True
        for ch in alphabet:
            symbol_is_word[symbol_of[ch]] = _is_word(ch)
        ascii_symbols = np.array([
            symbol_of.get(chr(c), SPACE if chr(c).isspace() else
                          OTHER_WORD if _is_word(chr(c)) else OTHER) for c in range(128)],
            np.uint8)

        children: list[dict[int, int]] = [{}, {}, {}]
        ends, phrase = [NO_END] * 3, [-1] * 3
        root = np.full(n_symbols, DEAD, np.uint8)
        for index, text in enumerate(phrases):
            node = WORD_ROOT if _is_word(text[0]) else OTHER_ROOT
            root[symbol_of[text[0]]] = node
            for ch in text:
                sym = symbol_of[ch]
                if sym not in children[node]:
                    child = len(children)
                    children[node][sym] = child
                    children.append({SPACE: child} if sym == SPACE else {})
                    ends.append(NO_END)
                    phrase.append(-1)
                node = children[node][sym]
            ends[node] = END_NOT_WORD if _is_word(text[-1]) else END_ANY
            phrase[node] = index
        transitions = np.zeros((len(children), n_symbols), np.int32)
        for node, edges in enumerate(children):
            for sym, child in edges.items():
                transitions[node, sym] = child
        # the two kinds of apostrophe (word character or not) move alike
        transitions[:, APOSTROPHE_WORD] = transitions[:, APOSTROPHE]
        root[APOSTROPHE_WORD] = root[APOSTROPHE]
        ends, phrase = np.array(ends, np.int8), np.array(phrase, np.int32)

        # every (root, s1, ..., s_LEAP): the node reached, and the deepest phrase end on the
        # way whose condition the next symbol (also in the key) satisfies
        shape = (2,) + (n_symbols,) * LEAP
        node = np.broadcast_to(np.array([WORD_ROOT, OTHER_ROOT]).reshape(
            (2,) + (1,) * LEAP), shape)
        leap_end = np.zeros(shape, np.int8)
        leap_phrase = np.full(shape, -1, np.int32)
        for depth in range(1, LEAP + 1):
            sym = np.arange(n_symbols).reshape((1,) * depth + (n_symbols,)
                                               + (1,) * (LEAP - depth))
            node = transitions[node, sym]
            if depth < LEAP:
                following = np.arange(n_symbols).reshape(
                    (1,) * (depth + 1) + (n_symbols,) + (1,) * (LEAP - depth - 1))
                ok = (ends[node] == END_ANY) | ((ends[node] == END_NOT_WORD)
                                                & ~symbol_is_word[following])
                leap_end = np.where(ok, np.int8(depth), leap_end)
                leap_phrase = np.where(ok, phrase[node], leap_phrase)
        ascii_table = bytes(int(ascii_symbols[ord(chr(c).lower())]) if c < 128 else OTHER
                            for c in range(256))

        def flags(of_symbol: np.ndarray) -> bytes:   # a translate table over symbols
            table = np.zeros(256, np.uint8)
            table[:n_symbols] = of_symbol
            return table.tobytes()

        return cls(ascii_symbols, symbol_is_word, transitions, ends, phrase,
                   np.ascontiguousarray(node, np.int32).reshape(-1),
                   np.ascontiguousarray(leap_end).reshape(-1),
                   np.ascontiguousarray(leap_phrase).reshape(-1), ascii_table,
                   flags(root == WORD_ROOT), flags(root == OTHER_ROOT), flags(symbol_is_word))

    def classify(self, codes: np.ndarray) -> np.ndarray:
        """The symbol of every character (code points, any unsigned width).

        Non-ASCII characters are looked up once per distinct character: whitespace and the
        two curly apostrophes have symbols of their own, the rest are other characters,
        word characters (Python's ``\\w``) or not.
        """
        ascii_codes = codes < 128
        if ascii_codes.all():
            return self.ascii_symbols[codes]
        symbols = np.zeros(len(codes), np.uint8)
        symbols[ascii_codes] = self.ascii_symbols[codes[ascii_codes]]
        wide = np.flatnonzero(~ascii_codes)
        distinct, inverse = np.unique(codes[wide], return_inverse=True)
        symbols[wide] = np.array([
            (APOSTROPHE_WORD if _is_word(ch) else APOSTROPHE) if ch in APOSTROPHES else
            SPACE if ch.isspace() else OTHER_WORD if _is_word(ch) else OTHER
            for ch in map(chr, distinct.tolist())], np.uint8)[inverse]
        return symbols

    def find(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Matches in a text given as code points: (start, end, phrase index), in order.

        ``start`` and ``end`` are character offsets (end exclusive). Equal to
        ``pattern.finditer(text)`` on the same (case-folded) text with the lexicon's
        regular expression without IGNORECASE.
        """
        n = len(codes)
        # sentinels past the end (and, read as symbols[-1], before the start): no
        # transition, not word characters
        symbols = np.full(n + LEAP + 1, OTHER, np.uint8)
        symbols[:n] = self.classify(codes)
        return self._walk(symbols, n)

    def find_ascii(self, text: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`find` for ASCII text given as bytes, upper case folded on the way: one
        ``bytes.translate`` in C gives every character's symbol (a third of the time of
        lower-casing, then looking symbols up in numpy)."""
        symbols = np.frombuffer(text.translate(self.ascii_table) + bytes(LEAP + 1), np.uint8)
        return self._walk(symbols, len(text))

    def _walk(self, symbols: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Matches in ``symbols[:n]``; ``symbols`` ends with :data:`LEAP` + 1 sentinels."""
        none = np.zeros(0, np.int64)
        if not n:
            return none, none, none
        # positions as int32 where they fit: half the memory traffic of every round
        index = np.int32 if n < 2**31 - LEAP - 1 else np.int64
        # where a walk starts: a symbol leaving the root of the non-word phrases, or that of
        # the word phrases where no word character precedes ((?<!\w)); flags of every
        # symbol by bytes.translate (a C loop) and whole-array boolean operations, several
        # times cheaper than gathering from numpy tables
        data = symbols[:n].tobytes()
        word_root = np.frombuffer(data.translate(self._word_root_flags), np.bool_)
        starts = np.frombuffer(data.translate(self._other_root_flags), np.bool_).copy()
        starts[0] |= word_root[0]
        starts[1:] |= word_root[1:] & ~np.frombuffer(data.translate(self._word_flags),
                                                       np.bool_)[:-1]
        start = np.flatnonzero(starts).astype(index)
        if not len(start):
            return none, none, none
        n_symbols = self.transitions.shape[1]
        # leap keys begin with the root: 0 for the word root, 1 for the other
        key = (~word_root[start]).astype(np.int32)
        for k in range(LEAP):
            key = key * n_symbols + symbols[start + k]
        leap_end = self.leap_end[key]
        best_end = np.where(leap_end > 0, start + leap_end, -1).astype(index)
        best_phrase = self.leap_phrase[key]

        # the walks still alive after LEAP characters go on one character a round
        walk = np.flatnonzero(self.leap_node[key] != DEAD).astype(index)
        node = self.leap_node[key[walk]]
        pos = start[walk] + LEAP
        while len(walk):
            end = self.ends[node]
            ok = (end == END_ANY) | ((end == END_NOT_WORD)
                                     & ~self.symbol_is_word[symbols[pos]])
            if ok.any():
                ok = np.flatnonzero(ok)
                best_end[walk.take(ok)] = pos.take(ok)
                best_phrase[walk.take(ok)] = self.phrase[node.take(ok)]
            node = self.transitions[node, symbols[pos]]
            alive = np.flatnonzero(node)   # DEAD is 0
            walk, node, pos = walk.take(alive), node.take(alive), pos.take(alive) + 1
        found = best_end >= 0
        return _leftmost(start[found].astype(np.int64), best_end[found].astype(np.int64),
                         best_phrase[found].astype(np.int64))


def _leftmost(start: np.ndarray, end: np.ndarray, phrase: np.ndarray):
    """Keep the matches a left-to-right scan keeps: each one after the last kept end.

    A match that starts at or after every earlier end is kept for sure; one that starts
    inside the last such match before it is dropped for sure (every match in between
    overlaps that one too). Only the rest, chains of phrases that overlap each other, are
    settled one by one.
    """
    n = len(start)
    if n < 2:
        return start, end, phrase
    reach = np.maximum.accumulate(end)
    sure = np.ones(n, bool)
    sure[1:] = start[1:] >= reach[:-1]
    if sure.all():
        return start, end, phrase
    index = np.arange(n)
    last_sure = np.maximum.accumulate(np.where(sure, index, 0))
    before = np.zeros(n, np.int64)
    before[1:] = last_sure[:-1]         # the last sure match before each one
    inside = ~sure & (start < end[before])
    kept = sure
    open_ = np.flatnonzero(~sure & ~inside)
    if len(open_):
        starts, ends = start.tolist(), end.tolist()
        previous = before[open_].tolist()
        last_kept = -1                  # the last of the open matches kept so far
        for i, j in zip(open_.tolist(), previous):
            k = max(j, last_kept)       # the last kept match before i
            if starts[i] >= ends[k]:
                kept[i] = True
                last_kept = i
    return start[kept], end[kept], phrase[kept]
