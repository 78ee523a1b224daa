"""Forking tokens counted by their text: the keys tokens are counted under, their
categories (whitespace, punctuation, digits, other), and the aggregators that flag and count
a unit's tokens in the same scan as its thresholds (:class:`ForkingScan`) or after a global
threshold is known (:class:`ForkingCounts`).
"""

from __future__ import annotations

import functools
import unicodedata
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..base.encoding import plain_values
from ..base.pieces import normalise_token
from ..engine import Aggregator
from ..errors import EntropylensError
from ..estimators import columns_for, token_entropy
from .forking_thresholds import ScopeThresholds, compute_thresholds, key_arrays, key_columns

CATEGORIES = ("whitespace", "punctuation", "digits", "other")
#: Columns a token's text is read from.
TEXT_COLUMNS = ("token", "token_id")


def token_keys(batch) -> pa.Array:
    """Text a token is counted under: its ``token``, else ``<id N>``, else ``<unknown>``.

    A token column read dictionary-encoded stays so when no text is missing.
    """
    names = batch.schema.names
    text = batch.column("token") if "token" in names else pa.nulls(batch.num_rows, pa.string())
    if text.null_count == 0:
        return text.combine_chunks() if isinstance(text, pa.ChunkedArray) else text
    text = plain_values(text)
    if "token_id" in names:
        ids = pc.cast(batch.column("token_id"), pa.string())
        text = pc.coalesce(text, pc.binary_join_element_wise("<id ", ids, ">", ""))
    text = pc.coalesce(text, pa.scalar("<unknown>"))
    return text.combine_chunks() if isinstance(text, pa.ChunkedArray) else text


@functools.lru_cache(maxsize=1 << 17)   # a vocabulary's pieces, asked again per analysis
def token_category(text: str) -> str:
    """``whitespace``, ``punctuation``, ``digits`` or ``other`` for a token's text.

    Markers are normalised first (:func:`normalise_token`). Whitespace: only whitespace.
    Digits: decimal digits, possibly with surrounding whitespace (`` 7``). Punctuation: only
    punctuation and symbol characters (Unicode categories P* and S*), possibly with
    whitespace. Anything else (words, mixed pieces like ``1.``, special tokens) is ``other``.
    """
    decoded = normalise_token(text)
    if decoded and decoded.isspace():
        return "whitespace"
    core = decoded.strip()
    if not core:
        return "other"
    if all(unicodedata.category(c) == "Nd" for c in core):
        return "digits"
    if all(unicodedata.category(c)[0] in "PS" for c in core):
        return "punctuation"
    return "other"


#: Python's whitespace (``str.isspace``) among ASCII characters, as a regex class.
_ASCII_SPACE = r"[\t\n\x0b\x0c\r\x1c-\x1f ]"
#: Pieces judged by Arrow: printable ASCII, ASCII whitespace and the byte-level marks of a
#: space, newline and tab (they decode to those), not a SentencePiece byte piece.
_SIMPLE_PIECE = r"^[\x20-\x7e\t\n\x0b\x0c\r\x1c-\x1f\x{0120}\x{010a}\x{0109}]*$"


def token_categories(texts) -> np.ndarray:
    """:func:`token_category` of every text (an object array), for a whole vocabulary.

    Pieces of printable ASCII, with or without the byte-level marks of a space, newline or
    tab, are judged at once by Arrow's regular expressions under the same rule (ASCII
    whitespace is ``str.isspace``'s, ASCII punctuation and symbols are all Unicode P* or
    S*); the others (other Unicode, byte pieces) one by one, as before.
    """
    array = pa.array(texts, pa.string()) if not isinstance(texts, pa.Array) else texts
    out = np.full(len(array), "other", dtype=object)
    if not len(array):
        return out
    simple = pc.and_(pc.match_substring_regex(array, _SIMPLE_PIECE),
                     pc.invert(pc.starts_with(array, "<0x")))
    simple = pc.fill_null(simple, False).to_numpy(zero_copy_only=False)
    decoded = array
    for mark, char in (("\u0120", " "), ("\u010a", "\n"), ("\u0109", "\t")):
        decoded = pc.replace_substring(decoded, mark, char)
    for name, pattern in (
            ("whitespace", f"^{_ASCII_SPACE}+$"),
            ("digits", f"^{_ASCII_SPACE}*[0-9]+{_ASCII_SPACE}*$"),
            ("punctuation", f"^{_ASCII_SPACE}*[!-/:-@\\[-`{{-~]+{_ASCII_SPACE}*$")):
        hit = pc.fill_null(pc.match_substring_regex(decoded, pattern), False) \
            .to_numpy(zero_copy_only=False)
        out[simple & hit & (out == "other")] = name
    rest = np.flatnonzero(~simple)
    if len(rest):
        values = array.take(pa.array(rest)).to_pylist()
        out[rest] = [token_category(v) if v is not None else "other" for v in values]
    return out


def count_forking(keys: pa.Array, flags: np.ndarray, judged: np.ndarray) -> pa.Table:
    """``token, count, forking_count`` per token text, over the judged tokens.

    Dictionary-encoded keys (without nulls) are counted by their indices; a text the
    dictionary holds twice gets two rows, which :func:`add_counts` sums like any other.
    """
    if pa.types.is_dictionary(keys.type) and not keys.null_count:
        codes = keys.indices.to_numpy(zero_copy_only=False)
        if not judged.all():
            codes, flags = codes[judged], flags[judged]
        size = len(keys.dictionary)
        count = np.bincount(codes, minlength=size)
        forks = np.bincount(codes, weights=flags, minlength=size)
        present = np.flatnonzero(count)
        return pa.table({"token": keys.dictionary.take(pa.array(present)).cast(pa.string()),
                         "count": pa.array(count[present].astype(np.int64)),
                         "forking_count": pa.array(forks[present].astype(np.int64))})
    table = pa.table({"token": keys, "fork": pa.array(flags.astype(np.int64))})
    if not judged.all():
        table = table.filter(pa.array(judged))
    grouped = table.group_by("token").aggregate([("fork", "count"), ("fork", "sum")])
    return pa.table({"token": grouped.column("token"),
                     "count": grouped.column("fork_count").cast(pa.int64()),
                     "forking_count": grouped.column("fork_sum").cast(pa.int64())})


#: Count tables held before they are summed into one (each has at most one row per text).
_COUNT_TABLES = 16


def add_counts(tables: list[pa.Table]) -> list[pa.Table]:
    """Sum count tables by token text once there are many, so memory stays bounded by the
    number of distinct texts."""
    if len(tables) < _COUNT_TABLES:
        return tables
    return [_sum_counts(tables)]


def _sum_counts(tables: list[pa.Table]) -> pa.Table:
    grouped = pa.concat_tables(tables).group_by("token").aggregate(
        [("count", "sum"), ("forking_count", "sum")])
    return pa.table({"token": grouped.column("token"), "count": grouped.column("count_sum"),
                     "forking_count": grouped.column("forking_count_sum")})


def counts_frame(tables: list[pa.Table]) -> pd.DataFrame:
    """``token, count, forking_count`` (int64), one row per distinct token text."""
    if not tables:
        return pd.DataFrame({"token": pd.Series(dtype=object),
                             "count": pd.Series(dtype="int64"),
                             "forking_count": pd.Series(dtype="int64")})
    summed = _sum_counts(tables)
    return pd.DataFrame({"token": summed.column("token").to_numpy(zero_copy_only=False)
                         .astype(object),
                         "count": summed.column("count").to_numpy().astype(np.int64),
                         "forking_count": summed.column("forking_count").to_numpy()
                         .astype(np.int64)})


class ForkingCounts(Aggregator):
    """Pass 2: flag each token with known thresholds and count tokens and forks by text.

    State: count tables summed by text as they accumulate, so memory is bounded by the
    vocabulary.
    """

    dictionary_columns = ("token",)   # counted by dictionary index

    def __init__(self, source: str, thresholds: ScopeThresholds, *,
                 vocab_size: int | None = None, top_k: int | None = None):
        self.source, self.thresholds = source, thresholds
        self.vocab_size, self.top_k = vocab_size, top_k
        self.columns = key_columns(thresholds.scope) + TEXT_COLUMNS + columns_for(source)

    def start(self) -> list:
        return []

    def update(self, state: list, batch: pa.RecordBatch) -> list:
        entropy = token_entropy(batch, self.source, vocab_size=self.vocab_size,
                                top_k=self.top_k)
        flags = self.thresholds.flags(*key_arrays(batch, self.thresholds.scope), entropy)
        return add_counts(state + [count_forking(token_keys(batch), flags,
                                                 np.isfinite(entropy))])

    def merge(self, left: list, right: list) -> list:
        return add_counts(left + right)

    def finish(self, state: list) -> pd.DataFrame:
        return counts_frame(state)


@dataclass
class _UnitForks:
    """State of :class:`ForkingScan`: tokens of unsealed steps, then sealed results."""

    pending: list = field(default_factory=list)
    thresholds: list = field(default_factory=list)
    counts: list = field(default_factory=list)


class ForkingScan(Aggregator):
    """Thresholds and counts by text in one pass, for the step-wise scopes.

    A unit holds whole steps, so when it is sealed its thresholds are final: its tokens are
    flagged and counted there and their values freed. Memory: one unit's keys, entropies
    and texts, plus count tables bounded by the vocabulary. (``global`` needs the run's
    threshold before any token can be flagged: :class:`ForkingThresholds`, then
    :class:`ForkingCounts`.)
    """

    dictionary_columns = ("token",)   # counted by dictionary index

    def __init__(self, source: str, *, scope: str, ratio: float,
                 batch_size: int | None = None, vocab_size: int | None = None,
                 top_k: int | None = None):
        if scope == "global":
            raise EntropylensError("ForkingScan serves the step-wise scopes, not 'global'")
        self.source, self.scope, self.ratio, self.batch_size = source, scope, ratio, batch_size
        self.vocab_size, self.top_k = vocab_size, top_k
        self.columns = key_columns(scope) + TEXT_COLUMNS + columns_for(source)

    def share_key(self) -> tuple | None:
        """The same source, scope and ratio give the same thresholds and counts: the forking
        analysis and the diagnosis that reads them scan once."""
        if type(self) is not ForkingScan:
            return None
        return (ForkingScan, self.source, self.scope, self.ratio, self.batch_size,
                self.vocab_size, self.top_k)

    def start(self) -> _UnitForks:
        return _UnitForks()

    def update(self, state: _UnitForks, batch: pa.RecordBatch) -> _UnitForks:
        entropy = token_entropy(batch, self.source, vocab_size=self.vocab_size,
                                top_k=self.top_k)
        state.pending.append((*key_arrays(batch, self.scope), entropy, token_keys(batch)))
        return state

    def seal(self, state: _UnitForks) -> _UnitForks:
        if not state.pending:
            return state
        steps, samples, positions, entropy = (np.concatenate(parts) for parts in
                                              zip(*(p[:4] for p in state.pending)))
        keys = [p[4] for p in state.pending]   # one batch's each (dictionaries differ)
        state.pending = []
        scoped = compute_thresholds(steps, samples, positions, entropy, scope=self.scope,
                                    ratio=self.ratio, batch_size=self.batch_size)
        state.thresholds.append(scoped)
        flags = scoped.flags(steps, samples, positions, entropy)
        judged = np.isfinite(entropy)
        ends = np.cumsum([len(k) for k in keys])
        state.counts = add_counts(state.counts + [
            count_forking(k, flags[end - len(k):end], judged[end - len(k):end])
            for k, end in zip(keys, ends)])
        return state

    def merge(self, left: _UnitForks, right: _UnitForks) -> _UnitForks:
        # tokens not sealed yet may share steps: they wait together for the next seal
        return _UnitForks(left.pending + right.pending, left.thresholds + right.thresholds,
                          add_counts(left.counts + right.counts))

    def finish(self, state: _UnitForks) -> tuple[ScopeThresholds, pd.DataFrame]:
        state = self.seal(state)
        return (ScopeThresholds.concat(state.thresholds, self.scope, self.ratio,
                                       self.batch_size), counts_frame(state.counts))
