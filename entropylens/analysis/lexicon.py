"""Strategic-gram lexicons: loading, matching on decoded tokens, and mining.

arXiv 2509.03646 (HICRA) calls a generated token a *planning* token when it is part of a
"strategic gram" ("wait", "but wait", "let me", "the key insight is", ...) and an *execution*
token otherwise. This module finds lexicon phrases in the text that a completion's tokens
decode to and maps every match back to the tokens it overlaps:

- Tokens are decoded to bytes under one tokenizer convention (:data:`CONVENTIONS`):
  ``bytelevel`` (GPT-2 style byte-level BPE: ``Ġ`` is a space, ``Ċ`` a newline, a multi-byte
  character may be split across tokens), ``sentencepiece`` (``▁`` is a space, byte-fallback
  tokens such as ``<0x0A>``) or ``text`` (tokens are plain text, as OpenAI and vLLM return
  them; OpenAI's ``bytes:\\xe2\\x80`` pieces are decoded as bytes). :func:`detect_convention`
  picks one from the tokens themselves.
- Each sequence's bytes are decoded as UTF-8; every token keeps its byte span, so a character
  split across two tokens belongs to both.
- Phrases are defined by one regular expression (:attr:`Lexicon.pattern`: the phrases
  factored as a character trie; where one phrase extends another the longer wins, so "but
  wait" beats "but"), case-insensitive, on word boundaries (a phrase that starts or ends with
  a letter or digit must not touch another one), with any run of whitespace between its words
  and any apostrophe (``'``, ``’`` or ``ʼ``). Matches do not overlap: the text is scanned left
  to right. Lexicons of ASCII phrases (the default) are matched by the same rules compiled to
  a numpy automaton (:mod:`entropylens.analysis.automaton`), which finds the regular
  expression's matches two to three times faster.
- A token is a planning token when its bytes overlap a match.

:func:`mine_lexicon` ranks n-grams of successful completions so that users can build a
lexicon for their own domain, offline.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..base.jsonable import records as _records
from ..base.pieces import CONVENTIONS, detect_convention, token_bytes
from ..errors import EntropylensError
from ..store import Store, open_store
from .automaton import PhraseAutomaton

#: The default lexicon shipped as package data: the 249 grams of arXiv 2509.03646, App. A.
DEFAULT_LEXICON_FILE = "strategic_grams_hicra.txt"
LEXICON_MODES = ("replace", "extend")

_APOSTROPHES = "'\u2019\u02bc"
_APOSTROPHE_CLASS = "['\u2019\u02bc]"
_WORD_CHAR = re.compile(r"\w")
_COMMENT = re.compile(r"^#(\s|$)")
#: Separator placed between sequences in one decoded batch: no phrase can contain it.
_SEPARATOR = b"\x00"


# --------------------------------------------------------------------------------------
# Lexicons
# --------------------------------------------------------------------------------------

def normalize_phrase(phrase: str) -> str:
    """Lower-case a phrase, collapse its whitespace and straighten its apostrophes."""
    phrase = " ".join(phrase.split()).lower()
    for apostrophe in _APOSTROPHES[1:]:
        phrase = phrase.replace(apostrophe, "'")
    return phrase


def _phrase_pattern(phrase: str) -> str:
    words = [re.escape(word).replace("'", _APOSTROPHE_CLASS) for word in phrase.split(" ")]
    body = r"\s+".join(words)
    before = r"(?<!\w)" if _WORD_CHAR.match(phrase[0]) else ""
    after = r"(?!\w)" if _WORD_CHAR.match(phrase[-1]) else ""
    return before + body + after


def _trie_pattern(phrases: Sequence[str]) -> str:
    """A regular expression matching any of ``phrases``, factored as a character trie.

    A space matches any run of whitespace and an apostrophe either apostrophe; a phrase that
    ends with a letter or digit must not be followed by one.
    """
    end = ""
    trie: dict = {}
    for phrase in phrases:
        node = trie
        for ch in phrase:
            node = node.setdefault(ch, {})
        node[end] = True

    def unit(ch: str) -> str:
        if ch == " ":
            return r"\s+"
        if ch == "'":
            return _APOSTROPHE_CLASS
        return re.escape(ch)

    def emit(node: dict, last: str) -> str:
        # Continuations first, so the longest phrase wins; ending here is the fallback.
        alternatives = [unit(ch) + emit(node[ch], ch) for ch in sorted(k for k in node if k)]
        if end in node:
            alternatives.append(r"(?!\w)" if _WORD_CHAR.match(last) else "")
        if len(alternatives) == 1:
            return alternatives[0]
        return "(?:" + "|".join(alternatives) + ")"

    return emit(trie, "")


@lru_cache(maxsize=8)
def _automaton(phrases: tuple[str, ...]) -> PhraseAutomaton:
    return PhraseAutomaton.build(phrases)


@dataclass(frozen=True)
class Lexicon:
    """A set of strategic-gram phrases and the compiled matcher for them.

    Attributes
    ----------
    phrases : tuple of str
        Normalised phrases (lower case, single spaces, straight apostrophes), unique, in the
        order first given.
    source : str
        Where the phrases came from (file names, ``"default"``, ``"list"``).
    """

    phrases: tuple[str, ...]
    source: str = "list"

    def __post_init__(self):
        if not self.phrases:
            raise EntropylensError(f"the lexicon ({self.source}) holds no phrases")
        bad = next((p for p in self.phrases if _SEPARATOR.decode() in p), None)
        if bad is not None:   # the matcher separates sequences with it
            raise EntropylensError(f"the lexicon ({self.source}) holds a phrase with a NUL "
                                   f"character: {bad!r}")

    def __len__(self) -> int:
        return len(self.phrases)

    def __iter__(self):
        return iter(self.phrases)

    @cached_property
    def pattern(self) -> re.Pattern:
        """One regular expression for every phrase, built as a trie of the phrases.

        At each text position the trie tries one branch per character, so the cost does not
        grow with the number of phrases (a flat alternation of the 249 default phrases is
        about 500 times slower). Where one phrase extends another ("but", "but wait"), the
        longer one is tried first. Map a match back to its phrase with :meth:`phrase_index`.
        """
        word = [p for p in self.phrases if _WORD_CHAR.match(p[0])]
        other = [p for p in self.phrases if not _WORD_CHAR.match(p[0])]
        parts = []
        if word:
            parts.append(r"(?<!\w)" + _trie_pattern(word))
        if other:
            parts.append(_trie_pattern(other))
        return re.compile("|".join(parts), re.IGNORECASE)

    @cached_property
    def splitter(self) -> re.Pattern:
        """:attr:`pattern` in one capturing group, for ``split``: text and matches alternate."""
        return re.compile(f"({self.pattern.pattern})", re.IGNORECASE)

    @property
    def automaton(self) -> PhraseAutomaton | None:
        """The phrases as a :class:`PhraseAutomaton`: the matches of :attr:`pattern` on
        text case-folded by :func:`fold_case`, found without a character-by-character
        scan; None when a phrase is not ASCII, where lower-casing and the regex engine's
        case rules may part. Built once per process for the same phrases (and not pickled
        with the lexicon: engine workers build their own)."""
        if not all(p.isascii() for p in self.phrases):
            return None
        return _automaton(self.phrases)

    @cached_property
    def _index(self) -> dict[str, int]:
        return {p.casefold(): i for i, p in enumerate(self.phrases)}

    def phrase_index(self, matched: str) -> int:
        """Index in :attr:`phrases` of the phrase that matched the text ``matched``."""
        # the same few spellings match again and again: remember them
        cached = self._matched.get(matched)
        if cached is not None:
            return cached
        self._matched[matched] = index = self._phrase_index(matched)
        return index

    @cached_property
    def _matched(self) -> dict[str, int]:
        return {}

    def _phrase_index(self, matched: str) -> int:
        key = normalize_phrase(matched).casefold()
        index = self._index.get(key)
        if index is None:  # a case equivalence that casefold does not share with re
            index = next(i for i, p in enumerate(self.phrases)
                         if re.fullmatch(_phrase_pattern(p), matched, re.IGNORECASE))
        return index

    def extend(self, phrases: Iterable[str], source: str = "list") -> "Lexicon":
        """A new lexicon with ``phrases`` added after these."""
        return Lexicon(_unique(list(self.phrases) + [normalize_phrase(p) for p in phrases]),
                       f"{self.source}+{source}")


def _unique(phrases: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(p for p in phrases if p))


def _parse_lexicon(text: str, path: str) -> list[str]:
    """Phrases of a lexicon file: one a line; ``#`` followed by a space starts a comment line.

    A line such as ``## step`` is a phrase (the published list has it), not a comment.
    """
    phrases = []
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or _COMMENT.match(stripped):
            continue
        phrase = normalize_phrase(stripped)
        if "\x00" in phrase:
            raise EntropylensError("a phrase may not contain a NUL character", path=path,
                                   line=lineno)
        phrases.append(phrase)
    return phrases


def read_lexicon_file(path: str | Path) -> list[str]:
    """Read the phrases of one lexicon file (UTF-8, one phrase a line, ``# `` comments).

    Raises
    ------
    EntropylensError
        When the file is missing, not UTF-8 (naming the line) or holds no phrase.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise EntropylensError(f"cannot read the lexicon: {exc.strerror or exc}",
                               path=path) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise EntropylensError("the lexicon is not UTF-8 text", path=path, line=line) from None
    phrases = _parse_lexicon(text, str(path))
    if not phrases:
        raise EntropylensError("the lexicon holds no phrases (one phrase a line)", path=path)
    return phrases


def default_lexicon() -> Lexicon:
    """The 249 strategic grams published with HICRA (arXiv 2509.03646, Appendix A)."""
    text = resources.files("entropylens").joinpath("data", DEFAULT_LEXICON_FILE) \
        .read_text(encoding="utf-8")
    return Lexicon(_unique(_parse_lexicon(text, DEFAULT_LEXICON_FILE)), "default")


def load_lexicon(lexicon: "str | Path | Sequence[str] | Lexicon | None" = None, *,
                 mode: str = "replace") -> Lexicon:
    """Build the lexicon an analysis uses.

    Parameters
    ----------
    lexicon : path, sequence of str, Lexicon or None
        A lexicon file (one phrase a line, ``# `` comment lines), several files, a list of
        phrases, or a :class:`Lexicon`. None gives the default lexicon.
    mode : {"replace", "extend"}
        ``replace`` uses ``lexicon`` alone; ``extend`` adds it to the default lexicon.

    Returns
    -------
    Lexicon
    """
    if mode not in LEXICON_MODES:
        raise EntropylensError(f"unknown lexicon mode {mode!r} (one of "
                               f"{', '.join(LEXICON_MODES)})")
    if lexicon is None:
        return default_lexicon()
    if isinstance(lexicon, Lexicon):
        given = lexicon
    elif isinstance(lexicon, (str, Path)):
        given = Lexicon(_unique(read_lexicon_file(lexicon)), Path(lexicon).name)
    else:
        items = list(lexicon)
        if items and all(isinstance(i, Path) for i in items):
            given = Lexicon(_unique(p for f in items for p in read_lexicon_file(f)),
                            "+".join(Path(f).name for f in items))
        else:
            given = Lexicon(_unique(normalize_phrase(str(p)) for p in items), "list")
    if mode == "extend":
        return default_lexicon().extend(given.phrases, given.source)
    return given


# --------------------------------------------------------------------------------------
# Decoding tokens
# --------------------------------------------------------------------------------------

#: Characters that the regex engine's IGNORECASE equates with an ASCII letter although
#: ``str.lower`` leaves them alone (the others, such as the Kelvin sign, lower to ASCII).
_ASCII_EQUIVALENTS = str.maketrans({"\u0131": "i", "\u017f": "s"})


def fold_case(text: str) -> str | None:
    """``text`` lower-cased so that an ASCII phrase matches it case-sensitively exactly where
    it matches ``text`` under IGNORECASE; None when lower-casing changes the length (as for
    U+0130), which would shift every offset after it."""
    lowered = text.lower()
    if len(lowered) != len(text):
        return None
    return lowered if lowered.isascii() else lowered.translate(_ASCII_EQUIVALENTS)


def _char_byte_offsets(text: str) -> np.ndarray | None:
    """Byte offset of every character of ``text`` (plus the end), None when text is ASCII.

    ``text`` was decoded with ``surrogateescape``: each escaped byte (U+DC80..U+DCFF) is one
    character of one byte.
    """
    if text.isascii():
        return None
    points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    lengths = np.where(points < 0x80, 1, np.where(points < 0x800, 2, np.where(
        (points >= 0xDC80) & (points <= 0xDCFF), 1, np.where(points < 0x10000, 3, 4))))
    return np.concatenate([[0], np.cumsum(lengths)])


@dataclass
class MatchResult:
    """Phrases found in a set of sequences and the tokens they cover.

    Attributes
    ----------
    planning : numpy.ndarray of bool
        One flag per input token: the token overlaps a lexicon match.
    sequence : numpy.ndarray of int64
        For each match, the index of its sequence (0-based, in input order).
    gram : numpy.ndarray of int64
        For each match, the index of its phrase in ``lexicon.phrases``.
    first_token, last_token : numpy.ndarray of int64
        For each match, the first and last input token (row) it overlaps.
    text : list of str
        The decoded text of every sequence (undecodable bytes shown as U+FFFD).
    """

    planning: np.ndarray
    sequence: np.ndarray
    gram: np.ndarray
    first_token: np.ndarray
    last_token: np.ndarray
    text: list[str] = field(default_factory=list)


#: Token strings decoded in this process, per convention: (strings, their bytes).
_DECODED: dict[str, tuple[pa.Array, pa.Array]] = {}
#: Strings remembered at most (vocabularies hold up to a few hundred thousand).
_DECODED_MAX = 1_000_000


class PlanningMatcher:
    """Finds lexicon phrases in token sequences under one tokenizer convention.

    Token strings are decoded once per distinct string (the cache is bounded by the
    vocabulary), every sequence of a batch is decoded in one pass and the lexicon's regular
    expression runs once over the whole batch; only matches are touched in Python.

    Parameters
    ----------
    lexicon : Lexicon
    convention : {"bytelevel", "sentencepiece", "text"}
    """

    def __init__(self, lexicon: Lexicon, convention: str):
        if convention not in CONVENTIONS:
            raise EntropylensError(f"unknown tokenizer convention {convention!r} "
                                   f"(one of {', '.join(CONVENTIONS)})")
        self.lexicon = lexicon
        self.convention = convention

    def _encode_dictionary(self, values: pa.Array) -> pa.Array:
        """Bytes of every (distinct) token string of ``values``, as a large_binary array.

        Decoded strings are remembered per process and convention as Arrow arrays, so a
        batch's dictionary is looked up in C and only strings never seen are decoded in
        Python (once per process: engine workers get matchers by pickle, cache-less).
        """
        known, known_bytes = _DECODED.get(self.convention, (pa.array([], pa.string()),
                                                            pa.array([], pa.large_binary())))
        if len(known) > _DECODED_MAX:   # not a tokenizer's vocabulary: start afresh
            known, known_bytes = known[:0], known_bytes[:0]
        where = pc.index_in(values, value_set=known)
        if where.null_count:
            new = pc.unique(values.filter(pc.is_null(where)))
            raw = [token_bytes(value, self.convention) for value in new.to_pylist()]
            known = pa.concat_arrays([known, new.cast(pa.string())])
            known_bytes = pa.concat_arrays([known_bytes, pa.array(raw, pa.large_binary())])
            _DECODED[self.convention] = (known, known_bytes)
            where = pc.index_in(values, value_set=known)
        return known_bytes.take(where)

    def _find(self, raw: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Matches in UTF-8 text: (start byte, end byte, phrase index) of each, in order.

        Lexicons of ASCII phrases run as a :class:`PhraseAutomaton` over the case-folded
        text; others (and text whose lower case changes length) use the regular
        expression's ``split``, which hands back text and matches alternately, all in C.
        """
        automaton = self.lexicon.automaton
        if automaton is not None and raw.isascii():
            return automaton.find(np.frombuffer(raw.lower(), np.uint8))
        text = raw.decode("utf-8", "surrogateescape")
        char_offsets = _char_byte_offsets(text)
        folded = fold_case(text) if automaton is not None else None
        if folded is not None:
            lo, hi, gram = automaton.find(np.frombuffer(
                folded.encode("utf-32-le", "surrogatepass"), np.uint32))
        else:
            parts = self.lexicon.splitter.split(text)
            ends = np.cumsum(np.fromiter(map(len, parts), np.int64, len(parts)))
            hi = ends[1::2]
            matched = parts[1::2]
            lo = hi - np.fromiter(map(len, matched), np.int64, len(matched))
            # only the distinct matched spellings go through phrase_index
            spellings = pc.dictionary_encode(pa.array(matched, pa.string()))
            index = self.lexicon.phrase_index
            gram = np.array([index(m) for m in spellings.dictionary.to_pylist()],
                            np.int64)[spellings.indices.to_numpy()]
        if char_offsets is not None:
            lo, hi = char_offsets[lo], char_offsets[hi]
        return lo, hi, gram

    def match(self, tokens: pa.Array | pa.ChunkedArray | Sequence[str | None],
              starts: np.ndarray, *, keep_text: bool = False) -> MatchResult:
        """Match phrases in sequences laid end to end.

        Parameters
        ----------
        tokens : pyarrow string array or sequence of str
            Token strings of all sequences, each sequence's tokens in order.
        starts : numpy.ndarray of int
            Index of the first token of every sequence (increasing, the first one 0).
        keep_text : bool
            Also return each sequence's decoded text.
        """
        if not isinstance(tokens, (pa.Array, pa.ChunkedArray)):
            tokens = pa.array(list(tokens), pa.string())
        if isinstance(tokens, pa.ChunkedArray):
            tokens = tokens.combine_chunks()
        n = len(tokens)
        starts = np.asarray(starts, dtype=np.int64)
        empty = np.zeros(0, np.int64)
        if n == 0:
            return MatchResult(np.zeros(0, bool), empty, empty, empty, empty,
                               [""] * len(starts) if keep_text else [])
        encoded = pc.dictionary_encode(tokens.cast(pa.string()))
        # pieces: the bytes of each distinct token, then b"" for null tokens (id-only rows,
        # they decode to nothing), then the separator that ends every sequence
        pieces = pa.concat_arrays([self._encode_dictionary(encoded.dictionary),
                                   pa.array([b"", _SEPARATOR], pa.large_binary())])
        empty_piece, separator = len(pieces) - 2, len(pieces) - 1
        indices = encoded.indices
        if indices.null_count:
            indices = pc.fill_null(indices, empty_piece)
        indices = indices.to_numpy(zero_copy_only=False).astype(np.int64)
        # One separator after every sequence: sequence k's tokens shift right by k slots.
        layout = np.insert(indices, np.append(starts[1:], n), separator)
        lengths = pc.binary_length(pieces).to_numpy(zero_copy_only=False) \
            .astype(np.int64)[layout]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        blob = pieces.take(pa.array(layout))
        data = blob.buffers()[2]
        first = int(np.frombuffer(blob.buffers()[1], np.int64)[blob.offset])
        raw = data.to_pybytes()[first:first + int(offsets[-1])] if data is not None else b""

        lo, hi, gram = self._find(raw)
        planning = np.zeros(n, bool)
        if len(lo):
            seq_start_byte = offsets[starts + np.arange(len(starts))]
            sequence = np.searchsorted(seq_start_byte, lo, side="right") - 1
            # In slots (tokens and separators), then less the k separators before sequence
            # k: the first token is the first whose end lies past the match's start, the
            # last the last that starts before the match's end.
            first_token = np.searchsorted(offsets[1:], lo, side="right") - sequence
            last_token = np.searchsorted(offsets[:-1], hi, side="left") - 1 - sequence
            cover = np.zeros(n + 1, np.int64)
            np.add.at(cover, first_token, 1)
            np.add.at(cover, last_token + 1, -1)
            planning = np.cumsum(cover[:-1]) > 0
        else:
            gram = sequence = first_token = last_token = empty
        texts = []
        if keep_text:
            ends = np.append(starts[1:], n)
            for k, (a, b) in enumerate(zip(starts, ends)):
                lo_b, hi_b = offsets[a + k], offsets[b + k]
                texts.append(raw[lo_b:hi_b].decode("utf-8", "replace"))
        return MatchResult(planning, sequence.astype(np.int64), gram.astype(np.int64),
                           first_token.astype(np.int64), last_token.astype(np.int64), texts)


@dataclass
class PlanningMatch:
    """Result of :func:`match_planning_tokens`.

    Attributes
    ----------
    planning : numpy.ndarray of bool
        One flag per input token (in input order): True for planning tokens.
    grams : pandas.DataFrame
        One row per match: ``sequence`` (0-based, in order of first appearance), ``gram``
        (the phrase), ``first_token`` and ``last_token`` (input row indices).
    texts : list of str
        Each sequence's decoded text.
    convention : str
        The tokenizer convention used.
    """

    planning: np.ndarray
    grams: pd.DataFrame
    texts: list[str]
    convention: str


def _sequence_starts(table: pa.Table) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """Order rows by sequence and position; return (table, order, sequence starts)."""
    n = table.num_rows
    keys = [k for k in ("step", "sample_id") if k in table.column_names]
    if "position" in table.column_names:
        order = pc.sort_indices(table, sort_keys=[(k, "ascending") for k in
                                                  keys + ["position"]]).to_numpy()
    else:
        order = np.arange(n)
    table = table.take(pa.array(order))
    change = np.zeros(max(n - 1, 0), bool)
    for key in keys:
        column = table.column(key)
        if column.null_count:
            column = pc.fill_null(column.cast(pa.string()) if key == "step" else column,
                                  "\x00null")
        change |= pc.not_equal(column.slice(1), column.slice(0, n - 1)).to_numpy(
            zero_copy_only=False)
    starts = np.concatenate([[0], np.flatnonzero(change) + 1]) if n else np.zeros(0, np.int64)
    return table, order, starts


def match_planning_tokens(tokens, lexicon=None, *, convention: str = "auto",
                          lexicon_mode: str = "replace") -> PlanningMatch:
    """Mark the planning tokens of decoded token sequences.

    Parameters
    ----------
    tokens : sequence of str, pyarrow.Table or pandas.DataFrame
        Either the token strings of one completion in order, or a table with a ``token``
        column and optionally ``step``, ``sample_id`` (a sequence is one ``(step,
        sample_id)``) and ``position`` (order within a sequence).
    lexicon : path, sequence of str, Lexicon or None
        See :func:`load_lexicon`; None is the default HICRA lexicon.
    convention : {"auto", "bytelevel", "sentencepiece", "text"}
        Tokenizer convention; ``auto`` detects it from the tokens.
    lexicon_mode : {"replace", "extend"}

    Returns
    -------
    PlanningMatch
        Flags in the input's row order.
    """
    lex = load_lexicon(lexicon, mode=lexicon_mode)
    if isinstance(tokens, pd.DataFrame):
        tokens = pa.Table.from_pandas(tokens, preserve_index=False)
    if isinstance(tokens, pa.Table):
        if "token" not in tokens.column_names:
            raise EntropylensError("the token table has no 'token' column", field="token")
        table, order, starts = _sequence_starts(tokens)
        column = table.column("token").cast(pa.string())
    else:
        column = pa.array([None if t is None else str(t) for t in tokens], pa.string())
        order = np.arange(len(column))
        starts = np.zeros(1 if len(column) else 0, np.int64)
    if convention == "auto":
        convention = detect_convention(column.to_pylist()[:200_000])
    result = PlanningMatcher(lex, convention).match(column, starts, keep_text=True)
    planning = np.zeros(len(order), bool)
    planning[order] = result.planning
    grams = pd.DataFrame({"sequence": result.sequence,
                          "gram": [lex.phrases[g] for g in result.gram],
                          "first_token": order[result.first_token] if len(order) else
                          result.first_token,
                          "last_token": order[result.last_token] if len(order) else
                          result.last_token})
    return PlanningMatch(planning, grams, result.text, convention)


# --------------------------------------------------------------------------------------
# Mining a lexicon
# --------------------------------------------------------------------------------------

MINED_COLUMNS = ["gram", "n", "solutions", "df", "occurrences", "mean_per_solution",
                 "sparsity", "score", "df_other"]
#: English function words that are never strategic on their own: an n-gram made only of these
#: (or of one-letter words such as the "x" of "4 x 7") is not mined. Discourse markers ("so",
#: "but", "now", "wait", "since") are deliberately absent.
FUNCTION_WORDS = frozenset("""
a an the of to in on at by for with from as into onto is are was were be been being am it
its it's he she they them his her their i you we our my your this that these those and or
has have had will would there which who whom
""".split())
_BREAK = re.compile(r"[^\w\s,']|[\d_]+")
_WORD = re.compile(r"\w+(?:'\w+)*|,")


def _ngrams(text: str, min_n: int, max_n: int) -> Counter:
    """Word n-grams of a text, lower case, not crossing sentence punctuation or numbers.

    Commas are kept inside n-grams ("wait, but") but an n-gram never starts or ends with one.
    """
    text = text.lower()
    for apostrophe in _APOSTROPHES[1:]:
        text = text.replace(apostrophe, "'")
    counts: Counter = Counter()
    for segment in _BREAK.split(text):
        words = _WORD.findall(segment)
        for i, word in enumerate(words):
            if word == ",":
                continue
            words_n = 0
            for j in range(i, len(words)):
                if words[j] != ",":
                    words_n += 1
                if words_n > max_n:
                    break
                if words[j] == "," or words_n < min_n:
                    continue
                counts[" ".join(words[i:j + 1]).replace(" ,", ",")] += 1
    return counts


@dataclass
class MinedLexicon:
    """Result of :func:`mine_lexicon`.

    Attributes
    ----------
    table : pandas.DataFrame
        Ranked n-grams: ``gram, n, solutions`` (successful completions containing it),
        ``df`` (that share of successful completions), ``occurrences``,
        ``mean_per_solution`` (occurrences per containing completion), ``sparsity``
        (its inverse), ``score = df * sparsity`` and ``df_other`` (share of the other
        completions containing it, for contrast).
    documents : int
        Successful completions read.
    others : int
        Completions at or below the threshold.
    reward_threshold : float
    """

    table: pd.DataFrame
    documents: int
    others: int
    reward_threshold: float
    runs: list[str] = field(default_factory=list)

    @property
    def phrases(self) -> list[str]:
        """The mined phrases, best first."""
        return self.table["gram"].tolist()

    def write(self, path: str | Path) -> Path:
        """Write the phrases as a lexicon file for ``--lexicon``."""
        path = Path(path)
        header = (f"# Strategic grams mined by entropylens from {self.documents} completions "
                  f"with reward > {self.reward_threshold:g} (runs: {', '.join(self.runs)}).\n"
                  "# Ranked by document frequency times within-solution sparsity; "
                  "review before use.\n")
        try:
            path.write_text(header + "".join(p + "\n" for p in self.phrases), encoding="utf-8")
        except OSError as exc:
            raise EntropylensError(f"cannot write the lexicon: {exc.strerror or exc}",
                                   path=path) from None
        return path

    def to_dict(self) -> dict:
        return {"runs": list(self.runs), "documents": self.documents, "others": self.others,
                "reward_threshold": self.reward_threshold, "grams": _records(self.table)}


def mine_lexicon(store: Store | str, runs: str | Sequence[str] | None = None, *,
                 reward_threshold: float = 0.5, min_n: int = 1, max_n: int = 5,
                 min_df: float = 0.05, top_n: int = 100, exclude_prompt: bool = True,
                 drop_function_words: bool = True, split: str | None = None) -> MinedLexicon:
    """Rank n-grams of successful completions as candidate strategic grams.

    A strategic gram is a phrase that many solutions use, a few times each ("so", "let's
    check"), unlike content that recurs inside one solution ("the apples"). For every word
    n-gram (``min_n`` to ``max_n`` words, not crossing sentence punctuation or numbers) of the
    completions whose reward is above ``reward_threshold``:

    - ``df``: share of those completions containing it (document frequency);
    - ``sparsity``: completions containing it over its occurrences (1 when it appears once in
      each, lower when it repeats inside solutions);
    - ``score = df * sparsity``, the ranking key (ties: higher df, shorter, alphabetical).

    N-grams below ``min_df`` (or in fewer than two completions) are dropped, and so is an
    n-gram that only ever occurs inside one longer kept n-gram (same completions, same
    occurrences) and, by default, one made only of function words. Nothing is downloaded:
    the n-grams come from the stored completions.

    Parameters
    ----------
    store : Store or path
    runs : str or sequence of str, optional
        Default: every run.
    reward_threshold : float
        A completion is a solution when its reward is strictly above this.
    min_n, max_n : int
        N-gram lengths in words (1..5 by default).
    min_df : float
        Minimum document frequency kept.
    top_n : int
        Rows returned.
    exclude_prompt : bool
        Do not count, for a completion, n-grams that occur in its own prompt (copied problem
        text is content, not strategy).
    drop_function_words : bool
        Drop n-grams made only of :data:`FUNCTION_WORDS` and one-letter words ("is", "of
        the", "x"): they are frequent everywhere and never a strategy by themselves.
    split : str, optional
        Only completions of this split.

    Returns
    -------
    MinedLexicon
    """
    if not 1 <= min_n <= max_n:
        raise EntropylensError(f"need 1 <= min_n <= max_n, got {min_n} and {max_n}")
    store = open_store(store)
    names = store.resolve_runs(runs)
    df_counts: Counter = Counter()
    occurrences: Counter = Counter()
    other_df: Counter = Counter()
    documents = others = 0
    for run in names:
        table = store.read_sequences(run, columns=["split", "prompt", "completion", "reward"])
        if split is not None:
            table = table.filter(pc.equal(table.column("split"), split))
        for prompt, completion, reward in zip(table.column("prompt").to_pylist(),
                                              table.column("completion").to_pylist(),
                                              table.column("reward").to_pylist()):
            if not completion or reward is None:
                continue
            grams = _ngrams(completion, min_n, max_n)
            if exclude_prompt and prompt:
                prompt_grams = _ngrams(prompt, min_n, max_n)
                grams = Counter({g: c for g, c in grams.items() if g not in prompt_grams})
            if reward > reward_threshold:
                documents += 1
                df_counts.update(grams.keys())
                occurrences.update(grams)
            else:
                others += 1
                other_df.update(grams.keys())
    if documents == 0:
        raise EntropylensError(f"no completion with a reward above {reward_threshold:g} in "
                               f"run(s) {', '.join(names)}; lower --reward-threshold or check "
                               "that the runs have sequences with rewards", path=store.path)
    floor = max(2, int(np.ceil(min_df * documents)))
    kept = {g: d for g, d in df_counts.items() if d >= floor}
    redundant = set()
    for gram in kept:
        words = gram.replace(",", " ,").split(" ")
        real = [w for w in words if w != ","]
        if len(real) < 2:
            continue
        for sub_words in (words[1:], words[:-1]):
            while sub_words and sub_words[0] == ",":
                sub_words = sub_words[1:]
            while sub_words and sub_words[-1] == ",":
                sub_words = sub_words[:-1]
            sub = " ".join(sub_words).replace(" ,", ",")
            if sub in kept and kept[sub] == kept[gram] and occurrences[sub] == occurrences[gram]:
                redundant.add(sub)
    rows = []
    for gram, d in kept.items():
        words = gram.replace(",", " ").split()
        if gram in redundant or (drop_function_words and all(
                w in FUNCTION_WORDS or len(w) == 1 for w in words)):
            continue
        n = len(words)
        occ = occurrences[gram]
        rows.append({"gram": gram, "n": n, "solutions": d, "df": d / documents,
                     "occurrences": occ, "mean_per_solution": occ / d, "sparsity": d / occ,
                     "score": (d / documents) * (d / occ),
                     "df_other": other_df[gram] / others if others else float("nan")})
    table = pd.DataFrame(rows, columns=MINED_COLUMNS)
    if len(table):
        table = table.sort_values(["score", "df", "n", "gram"],
                                  ascending=[False, False, True, True], kind="mergesort")
    table = table.head(top_n).reset_index(drop=True)
    return MinedLexicon(table=table, documents=documents, others=others,
                        reward_threshold=float(reward_threshold), runs=list(names))
