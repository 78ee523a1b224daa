"""Matching a lexicon on decoded tokens: planning tokens of a completion, as byte spans of
its text (see :mod:`entropylens.analysis.lexicon` for the rules)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..base.pieces import CONVENTIONS, detect_convention, token_bytes
from ..errors import EntropylensError
from .lexicon import _SEPARATOR, Lexicon, load_lexicon

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
            return automaton.find_ascii(raw)
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
        tokens : pyarrow string array (plain or dictionary-encoded) or sequence of str
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
        encoded = tokens if pa.types.is_dictionary(tokens.type) \
            else pc.dictionary_encode(tokens.cast(pa.string()))
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
