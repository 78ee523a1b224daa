"""Forking tokens: the top-ρ highest-entropy tokens within a scope (arXiv 2506.01939).

A token *forks* when its entropy is strictly above its scope's threshold, the
``(1 - ratio)`` quantile of the scope's token entropies (``numpy.quantile``'s default linear
rule). Strictly: a scope of equal entropies (or of one token) has no forking token, and ties
at the threshold do not fork, so a scope can hold slightly fewer than ``ratio`` of its tokens.

Scopes (DESIGN.md section 5):

- ``step`` (default): one threshold per training step;
- ``global``: one threshold per run;
- ``sequence``: one threshold per completion (step, sample_id);
- ``batch``: fixed-size batches of ``batch_size`` tokens of one step, in stored order
  (sample_id, position), as trainers select within a micro-batch. Batches restart at each
  step; the last batch of a step may be smaller.

Memory: ``step``, ``sequence`` and ``batch`` thresholds are exact. The engine hands over
step-closed units, so :class:`ForkingScan` computes a unit's thresholds when it is sealed,
flags and counts its tokens by text there and frees them: one scan, memory bounded by one
unit plus count tables bounded by the number of distinct texts. ``global`` is exact for runs
of at most ``EXACT_GLOBAL_MAX_TOKENS`` tokens (their entropies held in memory); larger runs
take the threshold from a :class:`~entropylens.analysis.sketch.QuantileSketch` (fixed
memory, within relative error 0.5 % plus 1e-9 nats of the exact quantile). Its tokens are
counted in a second pass (:class:`ForkingCounts`), once the run's threshold is known.

Tokens without an entropy from the run's source (NaN) are neither counted nor forking.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from ..base.jsonable import records as _records
from ..base.pieces import normalise_token
from ..base.steps import NO_STEP, step_array
from ..engine import Aggregator, Plan, run_plan, scan_selection
from ..errors import EntropylensError
from ..estimators import columns_for, token_entropy
from ..schema import is_special_token
from ..store import Store, open_store
from .distribution import EXACT_GLOBAL_MAX_TOKENS, token_runs, token_source
from .registry import Analysis, FigureSpec, Finding, register, run_analysis
from .sequences import step_rows
from .sketch import QuantileSketch

SCOPES = ("step", "global", "sequence", "batch")
CATEGORIES = ("whitespace", "punctuation", "digits", "other")
_KEY_COLUMNS = ("step", "sample_id", "position")
_TOKEN_COLUMNS = ("token", "token_id")



# -- quantiles -------------------------------------------------------------------------------

def grouped_quantile(codes: np.ndarray, values: np.ndarray, q: float,
                     groups: int | None = None) -> np.ndarray:
    """The ``q`` quantile of ``values`` within each group, exactly as ``numpy.quantile``.

    Parameters
    ----------
    codes : numpy.ndarray of int
        Group of each value, ``0 .. groups - 1``.
    values : numpy.ndarray of float
        No NaN.
    q : float
    groups : int, optional
        Number of groups (default ``codes.max() + 1``).

    Returns
    -------
    numpy.ndarray
        float64 per group, NaN for an empty group. Bit-identical to
        ``numpy.quantile(values[codes == g], q)`` (default ``linear`` rule).
    """
    groups = int(codes.max()) + 1 if groups is None and len(codes) else (groups or 0)
    out = np.full(groups, np.nan)
    if not len(values):
        return out
    order = np.lexsort((values, codes))
    ordered = values[order]
    counts = np.bincount(codes, minlength=groups)
    starts = np.cumsum(counts) - counts
    present = counts > 0
    n = counts[present]
    # numpy's linear rule: virtual index (n - 1) * q, floor/next neighbours, then _lerp
    virtual = (n - 1) * q
    previous = np.floor(virtual)
    above = virtual >= n - 1
    prev_index = np.where(above, n - 1, previous).astype(np.int64)
    next_index = np.where(above, n - 1, previous + 1).astype(np.int64)
    a = ordered[starts[present] + prev_index]
    b = ordered[starts[present] + next_index]
    gamma = np.where(above, virtual + 1, virtual - previous)
    diff = b - a
    result = a + diff * gamma
    late = gamma >= 0.5
    result[late] = (b - diff * (1 - gamma))[late]
    out[present] = result
    return out


def global_threshold(arrays: list[np.ndarray], ratio: float) -> float:
    """Run-wide threshold: the exact ``1 - ratio`` quantile of all ``arrays``.

    The one function a mergeable quantile sketch replaces for runs too large to hold.
    """
    values = np.concatenate(arrays) if arrays else np.empty(0)
    return float(np.quantile(values, 1 - ratio)) if len(values) else float("nan")


# -- thresholds --------------------------------------------------------------------------

@dataclass
class ScopeThresholds:
    """Thresholds of one run in one scope, and the rule that flags a token.

    Attributes
    ----------
    scope : str
    ratio : float
    batch_size : int or None
    frame : pandas.DataFrame
        ``step`` (NO_STEP for tokens without a step), ``sample_id`` (scope ``sequence``) or
        ``batch`` (scope ``batch``), ``threshold``, ``tokens``.
    batches : dict
        Scope ``batch``: per step, ``(sorted sample ids, position span, batch start keys)``
        locating a token's batch from its (sample_id, position). A duplicated position that
        straddles a batch start goes to the later batch.
    source : str or None
        The entropy source the thresholds were computed from.
    options : dict
        ``vocab_size`` and ``top_k`` for the top-k estimate.
    keep_after_eos : bool
        Whether the thresholds were taken with the tokens after end-of-sequence; when not,
        :func:`forking_mask` never flags such a token.
    """

    scope: str
    ratio: float
    batch_size: int | None
    frame: pd.DataFrame
    batches: dict = field(default_factory=dict)
    source: str | None = None
    options: dict = field(default_factory=dict)
    keep_after_eos: bool = False

    @classmethod
    def concat(cls, parts: Sequence["ScopeThresholds"], scope: str, ratio: float,
               batch_size: int | None) -> "ScopeThresholds":
        """Join the thresholds of disjoint steps."""
        frames = [p.frame for p in parts if len(p.frame)]
        frame = pd.concat(frames, ignore_index=True) if frames else _empty_frame(scope)
        batches = {}
        for part in parts:
            batches.update(part.batches)
        return cls(scope, ratio, batch_size, frame, batches)

    def entropy(self, tokens) -> np.ndarray:
        """Per-token entropy of a batch from the thresholds' source."""
        return token_entropy(tokens, self.source, **self.options)

    def token_thresholds(self, steps: np.ndarray, sample_ids: np.ndarray,
                         positions: np.ndarray) -> np.ndarray:
        """The threshold that applies to each token (NaN where its scope is unknown)."""
        frame = self.frame
        if not len(frame):
            return np.full(len(steps), np.nan)
        if self.scope == "global":
            return np.full(len(steps), float(frame["threshold"].iloc[0]))
        if self.scope == "step":
            index = pd.Index(frame["step"].to_numpy(np.int64))
            where = index.get_indexer(steps)
        elif self.scope == "sequence":
            index = pd.MultiIndex.from_arrays([frame["step"].to_numpy(np.int64),
                                               frame["sample_id"].to_numpy(object)])
            where = index.get_indexer(pd.MultiIndex.from_arrays([steps, sample_ids]))
        else:
            batch = self._locate_batches(steps, sample_ids, positions)
            index = pd.MultiIndex.from_arrays([frame["step"].to_numpy(np.int64),
                                               frame["batch"].to_numpy(np.int64)])
            where = index.get_indexer(pd.MultiIndex.from_arrays([steps, batch]))
        values = frame["threshold"].to_numpy(np.float64)
        return np.where(where >= 0, values[np.maximum(where, 0)], np.nan)

    def _locate_batches(self, steps, sample_ids, positions) -> np.ndarray:
        out = np.full(len(steps), -1, dtype=np.int64)
        for step in np.unique(steps):
            if int(step) not in self.batches:
                continue
            ids, span, starts = self.batches[int(step)]
            chosen = steps == step
            codes = ids.get_indexer(sample_ids[chosen])
            keys = codes.astype(np.int64) * span + positions[chosen]
            found = np.searchsorted(starts, keys, side="right") - 1
            out[chosen] = np.where(codes >= 0, found, -1)
        return out

    def flags(self, steps, sample_ids, positions, entropy: np.ndarray) -> np.ndarray:
        """True for each forking token: entropy strictly above its scope's threshold."""
        threshold = self.token_thresholds(steps, sample_ids, positions)
        with np.errstate(invalid="ignore"):
            return np.asarray(entropy > threshold) & np.isfinite(entropy)


def _empty_frame(scope: str) -> pd.DataFrame:
    columns = {"step": pd.Series(dtype="int64")}
    if scope == "sequence":
        columns["sample_id"] = pd.Series(dtype=object)
    if scope == "batch":
        columns["batch"] = pd.Series(dtype="int64")
    columns["threshold"] = pd.Series(dtype=float)
    columns["tokens"] = pd.Series(dtype="int64")
    return pd.DataFrame(columns)


def _key_arrays(batch, scope: str = "batch") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, sample ids, positions) of a batch; the scopes ``step`` and ``global`` use the
    steps only, so they get cheap placeholders for the others."""
    steps = step_array(batch.column("step"))
    if scope in ("step", "global"):
        empty = np.zeros(len(steps), dtype=np.int8)
        return steps, empty, empty
    samples = batch.column("sample_id").to_numpy(zero_copy_only=False).astype(object)
    positions = batch.column("position").to_numpy(zero_copy_only=False).astype(np.int64)
    return steps, samples, positions


def compute_thresholds(steps: np.ndarray, samples: np.ndarray, positions: np.ndarray,
                       entropy: np.ndarray, *, scope: str, ratio: float,
                       batch_size: int | None = None) -> ScopeThresholds:
    """Exact thresholds of ``scope`` over the given tokens (NaN entropies left out).

    Parameters
    ----------
    steps, samples, positions : numpy.ndarray
        Token keys (steps as int64 with :data:`NO_STEP` for none).
    entropy : numpy.ndarray
    scope : {"step", "global", "sequence", "batch"}
    ratio : float
    batch_size : int, optional
        Required for scope ``batch``.
    """
    keep = np.isfinite(entropy)
    if not keep.all():
        steps, samples, positions, entropy = (steps[keep], samples[keep], positions[keep],
                                              entropy[keep])
    q = 1 - ratio
    if not len(entropy):
        return ScopeThresholds(scope, ratio, batch_size, _empty_frame(scope))
    if scope == "global":
        frame = pd.DataFrame({"step": [NO_STEP], "threshold": [global_threshold([entropy],
                                                                                 ratio)],
                              "tokens": [len(entropy)]})
        return ScopeThresholds(scope, ratio, batch_size, frame)
    if scope == "step":
        groups = [(step, entropy[rows]) for step, rows in step_rows(steps)]
        frame = pd.DataFrame({"step": np.array([step for step, _ in groups], np.int64),
                              "threshold": [float(np.quantile(values, q))
                                            for _, values in groups],
                              "tokens": np.array([len(values) for _, values in groups],
                                                 np.int64)})
        return ScopeThresholds(scope, ratio, batch_size, frame)
    if scope == "sequence":
        keys = pd.MultiIndex.from_arrays([steps, samples])
        codes, unique = pd.factorize(keys, sort=True)
        frame = pd.DataFrame({"step": unique.get_level_values(0).to_numpy(np.int64),
                              "sample_id": unique.get_level_values(1).to_numpy(object),
                              "threshold": grouped_quantile(codes, entropy, q, len(unique)),
                              "tokens": np.bincount(codes, minlength=len(unique))})
        return ScopeThresholds(scope, ratio, batch_size, frame)
    # batch: stored order (step, sample_id, position), batches restart at each step
    batches, frames = {}, []
    for step in np.unique(steps):
        chosen = steps == step
        ids = pd.Index(np.unique(samples[chosen].astype(str)).astype(object))
        codes = ids.get_indexer(samples[chosen])
        pos = positions[chosen]
        span = int(pos.max() - min(int(pos.min()), 0)) + 2
        keys = codes.astype(np.int64) * span + pos
        order = np.argsort(keys, kind="stable")
        batch_of = np.empty(len(keys), dtype=np.int64)
        batch_of[order] = np.arange(len(keys)) // batch_size
        starts = keys[order][::batch_size]
        batches[int(step)] = (ids, span, starts)
        groups = int(batch_of.max()) + 1
        frames.append(pd.DataFrame({
            "step": int(step), "batch": np.arange(groups),
            "threshold": grouped_quantile(batch_of, entropy[chosen], q, groups),
            "tokens": np.bincount(batch_of, minlength=groups)}))
    return ScopeThresholds(scope, ratio, batch_size, pd.concat(frames, ignore_index=True),
                           batches)


class ForkingThresholds(Aggregator):
    """Pass 1: collect the scanned tokens' keys and entropies, finish with their thresholds.

    For the ``step``, ``sequence`` and ``batch`` scopes :meth:`seal` reduces each step-closed
    unit to its thresholds (memory of one unit); ``global`` runs over the whole run.
    """

    def __init__(self, source: str, *, scope: str, ratio: float,
                 batch_size: int | None = None, vocab_size: int | None = None,
                 top_k: int | None = None, sketch: bool = False):
        self.source, self.scope, self.ratio, self.batch_size = source, scope, ratio, batch_size
        self.vocab_size, self.top_k = vocab_size, top_k
        # a run-wide threshold from a fixed-size sketch (relative error DEFAULT_ALPHA)
        self.sketch = sketch and scope == "global"
        self.columns = _KEY_COLUMNS + columns_for(source)

    def start(self) -> list | QuantileSketch:
        return QuantileSketch() if self.sketch else []

    def update(self, state: list, batch: pa.RecordBatch) -> list:
        entropy = token_entropy(batch, self.source, vocab_size=self.vocab_size,
                                top_k=self.top_k)
        if self.sketch:
            state.add(entropy)
        elif self.scope == "global":
            # a run-wide threshold needs the entropies only, not the token keys
            empty = np.empty(len(entropy), dtype=np.int8)
            state.append((empty, empty, empty, entropy))
        else:
            state.append((*_key_arrays(batch, self.scope), entropy))
        return state

    def merge(self, left: list, right: list) -> list:
        if self.sketch:
            return left.merge(right)
        return left + right

    def seal(self, state: list) -> list:
        """Reduce the complete steps of a unit to their thresholds and free their values.

        Thresholds of the step-wise scopes depend on one step's tokens only (batches restart
        at each step), so one scan of the run holds one unit's entropies at a time.
        """
        if self.sketch or self.scope == "global":
            return state
        done = [part for part in state if isinstance(part, ScopeThresholds)]
        pending = [part for part in state if not isinstance(part, ScopeThresholds)]
        if pending:
            steps, samples, positions, entropy = (np.concatenate(parts)
                                                  for parts in zip(*pending))
            done.append(compute_thresholds(steps, samples, positions, entropy,
                                           scope=self.scope, ratio=self.ratio,
                                           batch_size=self.batch_size))
        return done

    def finish(self, state: list) -> ScopeThresholds:
        if self.scope != "global":
            return ScopeThresholds.concat(self.seal(state), self.scope, self.ratio,
                                          self.batch_size)
        if self.sketch:
            if not state.count:
                return ScopeThresholds(self.scope, self.ratio, self.batch_size,
                                       _empty_frame(self.scope))
            frame = pd.DataFrame({"step": [NO_STEP], "threshold": [
                float(state.quantile([1 - self.ratio])[0])], "tokens": [state.count]})
            return ScopeThresholds(self.scope, self.ratio, self.batch_size, frame)
        if not state:
            return ScopeThresholds(self.scope, self.ratio, self.batch_size,
                                   _empty_frame(self.scope))
        steps, samples, positions, entropy = (np.concatenate(parts) for parts in zip(*state))
        return compute_thresholds(steps, samples, positions, entropy, scope=self.scope,
                                  ratio=self.ratio, batch_size=self.batch_size)


# -- counting by token text ------------------------------------------------------------------

def token_keys(batch) -> pa.Array:
    """Text a token is counted under: its ``token``, else ``<id N>``, else ``<unknown>``."""
    names = batch.schema.names
    text = batch.column("token") if "token" in names else pa.nulls(batch.num_rows, pa.string())
    if text.null_count == 0:
        return text.combine_chunks() if isinstance(text, pa.ChunkedArray) else text
    if "token_id" in names:
        ids = pc.cast(batch.column("token_id"), pa.string())
        text = pc.coalesce(text, pc.binary_join_element_wise("<id ", ids, ">", ""))
    text = pc.coalesce(text, pa.scalar("<unknown>"))
    return text.combine_chunks() if isinstance(text, pa.ChunkedArray) else text


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


def count_forking(keys: pa.Array, flags: np.ndarray, judged: np.ndarray) -> pa.Table:
    """``token, count, forking_count`` per token text, over the judged tokens."""
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

    def __init__(self, source: str, thresholds: ScopeThresholds, *,
                 vocab_size: int | None = None, top_k: int | None = None):
        self.source, self.thresholds = source, thresholds
        self.vocab_size, self.top_k = vocab_size, top_k
        self.columns = _KEY_COLUMNS + _TOKEN_COLUMNS + columns_for(source)

    def start(self) -> list:
        return []

    def update(self, state: list, batch: pa.RecordBatch) -> list:
        entropy = token_entropy(batch, self.source, vocab_size=self.vocab_size,
                                top_k=self.top_k)
        flags = self.thresholds.flags(*_key_arrays(batch, self.thresholds.scope), entropy)
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

    def __init__(self, source: str, *, scope: str, ratio: float,
                 batch_size: int | None = None, vocab_size: int | None = None,
                 top_k: int | None = None):
        if scope == "global":
            raise EntropylensError("ForkingScan serves the step-wise scopes, not 'global'")
        self.source, self.scope, self.ratio, self.batch_size = source, scope, ratio, batch_size
        self.vocab_size, self.top_k = vocab_size, top_k
        self.columns = _KEY_COLUMNS + _TOKEN_COLUMNS + columns_for(source)

    def start(self) -> _UnitForks:
        return _UnitForks()

    def update(self, state: _UnitForks, batch: pa.RecordBatch) -> _UnitForks:
        entropy = token_entropy(batch, self.source, vocab_size=self.vocab_size,
                                top_k=self.top_k)
        state.pending.append((*_key_arrays(batch, self.scope), entropy, token_keys(batch)))
        return state

    def seal(self, state: _UnitForks) -> _UnitForks:
        if not state.pending:
            return state
        steps, samples, positions, entropy = (np.concatenate(parts) for parts in
                                              zip(*(p[:4] for p in state.pending)))
        keys = pa.concat_arrays([p[4] for p in state.pending])
        state.pending = []
        scoped = compute_thresholds(steps, samples, positions, entropy, scope=self.scope,
                                    ratio=self.ratio, batch_size=self.batch_size)
        state.thresholds.append(scoped)
        flags = scoped.flags(steps, samples, positions, entropy)
        state.counts = add_counts(state.counts + [count_forking(keys, flags,
                                                               np.isfinite(entropy))])
        return state

    def merge(self, left: _UnitForks, right: _UnitForks) -> _UnitForks:
        # tokens not sealed yet may share steps: they wait together for the next seal
        return _UnitForks(left.pending + right.pending, left.thresholds + right.thresholds,
                          add_counts(left.counts + right.counts))

    def finish(self, state: _UnitForks) -> tuple[ScopeThresholds, pd.DataFrame]:
        state = self.seal(state)
        return (ScopeThresholds.concat(state.thresholds, self.scope, self.ratio,
                                       self.batch_size), counts_frame(state.counts))


# -- the analysis ------------------------------------------------------------------------

THRESHOLD_COLUMNS = {"step": ["run", "step", "threshold", "tokens"],
                     "global": ["run", "step", "threshold", "tokens"],
                     "sequence": ["run", "step", "sample_id", "threshold", "tokens"],
                     "batch": ["run", "step", "batch", "threshold", "tokens"]}
TOKEN_COLUMNS = ["run", "token", "count", "forking_count", "forking_rate", "special"]
COMPOSITION_COLUMNS = ["run", "category", "forking_share", "all_share", "forking_tokens",
                       "tokens"]
RUN_COLUMNS = ["run", "entropy_source", "tokens", "forking_tokens", "forking_fraction",
               "units"]


@dataclass
class Forking:
    """Result of :func:`forking_tokens`.

    Attributes
    ----------
    ratio : float
    scope : str
    batch_size : int or None
    thresholds : pandas.DataFrame
        ``run, step, threshold, tokens`` (plus ``sample_id`` for scope ``sequence``, ``batch``
        for scope ``batch``; ``step`` is null for scope ``global``). ``tokens`` counts the
        scope's tokens with an entropy.
    top_tokens : pandas.DataFrame
        ``run, token, count, forking_count, forking_rate, special``: the ``top_n`` token
        texts most often forking; ``special`` marks tokenizer control tokens
        (:func:`entropylens.schema.is_special_token`: EOS, chat-template markers).
    top_by_rate : pandas.DataFrame
        Same columns: the ``top_n`` highest forking rates among texts seen at least
        ``min_count`` times.
    composition : pandas.DataFrame
        ``run, category, forking_share, all_share, forking_tokens, tokens`` for the categories
        whitespace, punctuation, digits and other: the share of forking tokens and of all
        tokens in each.
    runs : pandas.DataFrame
        ``run, entropy_source, tokens, forking_tokens, forking_fraction, units``.
    min_count : int
    skipped : list of str
        Runs left out (no per-token entropies), with the reason; not part of the
        ``forks --json`` output.
    """

    ratio: float
    scope: str
    batch_size: int | None
    thresholds: pd.DataFrame
    top_tokens: pd.DataFrame
    top_by_rate: pd.DataFrame
    composition: pd.DataFrame
    runs: pd.DataFrame
    min_count: int = 5
    _scopes: dict = field(default_factory=dict, repr=False)
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The JSON shape of ``entropylens forks --json`` (DESIGN.md section 6)."""
        return {"ratio": self.ratio, "scope": self.scope, "batch_size": self.batch_size,
                "min_count": self.min_count, "runs": _records(self.runs),
                "thresholds": _records(self.thresholds),
                "top_tokens": _records(self.top_tokens),
                "top_by_rate": _records(self.top_by_rate),
                "composition": _records(self.composition)}

    def scope_thresholds(self, run: str | None = None) -> ScopeThresholds:
        """The :class:`ScopeThresholds` of ``run`` (the only run when omitted)."""
        if run is None:
            if len(self._scopes) != 1:
                raise EntropylensError(f"several runs ({', '.join(self._scopes)}): name one")
            run = next(iter(self._scopes))
        if run not in self._scopes:
            raise EntropylensError(f"no forking thresholds for run {run!r} "
                                   f"(runs: {', '.join(self._scopes)})")
        return self._scopes[run]


def _check_options(ratio: float, scope: str, batch_size: int | None) -> None:
    if scope not in SCOPES:
        raise EntropylensError(f"unknown scope {scope!r} (one of {', '.join(SCOPES)})")
    if not (isinstance(ratio, (int, float)) and 0 < ratio < 1):
        raise EntropylensError(f"ratio must lie strictly between 0 and 1, got {ratio!r}")
    if scope == "batch":
        if batch_size is None or int(batch_size) < 1:
            raise EntropylensError("scope 'batch' needs a batch size of at least 1 token "
                                   "(--batch-size N)")
    elif batch_size is not None:
        raise EntropylensError(f"--batch-size applies to scope 'batch' only, not {scope!r}")


def _token_step_filters(store: Store, run: str) -> list[tuple[int, ds.Expression | None]]:
    """(step key, scan arguments) for each step of a run, tokens without a step last."""
    steps = [(int(s), None) for s in store.token_steps(run)]
    table = store.read_tokens(run, columns=["step"], filter=ds.field("step").is_null())
    if table.num_rows:
        steps.append((NO_STEP, ds.field("step").is_null()))
    return steps


def thresholds_plan(store: Store, run: str, source: str, manifest: dict, *, scope: str,
                    ratio: float, batch_size: int | None = None) -> Plan:
    """Thresholds of one run, in one scan (a plan, see :func:`entropylens.engine.run_plans`).

    The engine hands over step-closed units (tokens without a step form their own unit), so
    the step-wise scopes are exact while holding one unit's entropies at a time; ``global``
    holds the run's entropies, or a sketch for large runs.
    """
    options = {"vocab_size": manifest.get("vocab_size"), "top_k": manifest.get("top_k")}
    large = manifest.get("counts", {}).get("tokens", 0) > EXACT_GLOBAL_MAX_TOKENS
    aggregator = ForkingThresholds(source, scope=scope, ratio=ratio, batch_size=batch_size,
                                   sketch=large, **options)
    result = (yield {"t": aggregator})["t"]
    result.source, result.options = source, options
    result.keep_after_eos = scan_selection()["keep_after_eos"]
    return result


def run_thresholds(store: Store, run: str, source: str, manifest: dict, *, scope: str,
                   ratio: float, batch_size: int | None = None, engine: str = "local",
                   **engine_options) -> ScopeThresholds:
    """Thresholds of one run (:func:`thresholds_plan` run on its own)."""
    return run_plan(store, run, thresholds_plan(store, run, source, manifest, scope=scope,
                                                ratio=ratio, batch_size=batch_size),
                    engine=engine, **engine_options)


def _forking_scans(store: Store, run: str, source: str, manifest: dict, *, scope: str,
                   ratio: float, batch_size: int | None = None) -> Plan:
    """Thresholds and counts by text of one run: one scan for the step-wise scopes, two
    (thresholds, then counts) for ``global``."""
    options = {"vocab_size": manifest.get("vocab_size"), "top_k": manifest.get("top_k")}
    if scope == "global":
        scoped = yield from thresholds_plan(store, run, source, manifest, scope=scope,
                                            ratio=ratio)
        counts = (yield {"c": ForkingCounts(source, scoped, **options)})["c"]
        return scoped, counts
    scoped, counts = (yield {"f": ForkingScan(source, scope=scope, ratio=ratio,
                                              batch_size=batch_size, **options)})["f"]
    scoped.source, scoped.options = source, options
    scoped.keep_after_eos = scan_selection()["keep_after_eos"]
    return scoped, counts


def _public_thresholds(run: str, thresholds: ScopeThresholds) -> pd.DataFrame:
    frame = thresholds.frame.copy()
    frame.insert(0, "run", run)
    frame["step"] = frame["step"].astype("Int64").mask(frame["step"] == NO_STEP)
    return frame[THRESHOLD_COLUMNS[thresholds.scope]]


def _composition(run: str, counts: pd.DataFrame) -> pd.DataFrame:
    categories = counts["token"].map(token_category)
    by = counts.groupby(categories)[["count", "forking_count"]].sum() \
        .reindex(list(CATEGORIES), fill_value=0)
    total, forks = by["count"].sum(), by["forking_count"].sum()
    return pd.DataFrame({
        "run": run, "category": list(CATEGORIES),
        "forking_share": (by["forking_count"] / forks).to_numpy() if forks
        else np.full(len(CATEGORIES), np.nan),
        "all_share": (by["count"] / total).to_numpy() if total
        else np.full(len(CATEGORIES), np.nan),
        "forking_tokens": by["forking_count"].to_numpy(np.int64),
        "tokens": by["count"].to_numpy(np.int64)})


def _top(run: str, counts: pd.DataFrame, top_n: int, min_count: int):
    counts = counts.assign(run=run, forking_rate=counts["forking_count"] / counts["count"],
                           special=counts["token"].map(is_special_token).astype(bool))
    by_count = counts[counts["forking_count"] > 0].sort_values(
        ["forking_count", "count", "token"], ascending=[False, False, True]).head(top_n)
    by_rate = counts[(counts["count"] >= min_count) & (counts["forking_count"] > 0)] \
        .sort_values(["forking_rate", "count", "token"], ascending=[False, False, True]) \
        .head(top_n)
    return by_count[TOKEN_COLUMNS], by_rate[TOKEN_COLUMNS]


def forking_tokens(store: Store | str, runs=None, *, ratio: float = 0.2, scope: str = "step",
                   batch_size: int | None = None, min_count: int = 5, top_n: int = 30,
                   engine: str = "local", workers: int | None = None,
                   **engine_options) -> Forking:
    """Forking tokens: thresholds, the tokens most often forking, and their composition.

    Parameters
    ----------
    store : Store or path
    runs : str or sequence of str, optional
        Default: every run with per-token data.
    ratio : float
        ρ: the share of highest-entropy tokens that fork in each scope (default 0.2).
    scope : {"step", "global", "sequence", "batch"}
        See the module notes.
    batch_size : int, optional
        Tokens per batch, for scope ``batch`` only.
    min_count : int
        Minimum occurrences of a token text to be ranked by forking rate.
    top_n : int
        Rows per run of ``top_tokens`` and ``top_by_rate``.
    engine : {"local", "ray"}
    workers : int, optional
        Worker processes of the local engine (1: none).

    Returns
    -------
    Forking
        A token forks when its entropy is strictly above its scope's threshold
        ``numpy.quantile(entropies, 1 - ratio)``.

    Raises
    ------
    EntropylensError
        For an unknown scope, a ratio outside (0, 1), a missing or misplaced batch size, or
        runs without per-token data.
    """
    _check_options(ratio, scope, batch_size)
    return run_analysis("forking", store, runs, engine=engine, workers=workers, ratio=ratio,
                        scope=scope, batch_size=batch_size, min_count=min_count, top_n=top_n,
                        **engine_options)


def forking_plan(store: Store, run: str, source: str, manifest: dict, *, ratio: float = 0.2,
                 scope: str = "step", batch_size: int | None = None, min_count: int = 5,
                 top_n: int = 30) -> Plan:
    """One run's part of :func:`forking_tokens`, as a plan (see
    :func:`entropylens.engine.run_plans`); :func:`forking_from_parts` joins parts."""
    _check_options(ratio, scope, batch_size)
    ratio, batch_size = float(ratio), (int(batch_size) if batch_size is not None else None)
    scoped, counts = yield from _forking_scans(store, run, source, manifest, scope=scope,
                                               ratio=ratio, batch_size=batch_size)
    top, rate = _top(run, counts, top_n, min_count)
    total, forks = int(counts["count"].sum()), int(counts["forking_count"].sum())
    row = {"run": run, "entropy_source": source, "tokens": total, "forking_tokens": forks,
           "forking_fraction": forks / total if total else np.nan,
           "units": len(scoped.frame)}
    return run, scoped, _public_thresholds(run, scoped), top, rate, \
        _composition(run, counts), row


def forking_from_parts(parts: list[tuple], *, ratio: float = 0.2, scope: str = "step",
                       batch_size: int | None = None, min_count: int = 5,
                       skipped: Sequence[str] = ()) -> Forking:
    """The :class:`Forking` result of runs from the results of their plans."""
    ratio, batch_size = float(ratio), (int(batch_size) if batch_size is not None else None)
    return Forking(ratio=ratio, scope=scope, batch_size=batch_size,
                   thresholds=pd.concat([p[2] for p in parts], ignore_index=True),
                   top_tokens=pd.concat([p[3] for p in parts], ignore_index=True),
                   top_by_rate=pd.concat([p[4] for p in parts], ignore_index=True),
                   composition=pd.concat([p[5] for p in parts], ignore_index=True),
                   runs=pd.DataFrame([p[6] for p in parts], columns=RUN_COLUMNS),
                   min_count=min_count, _scopes={p[0]: p[1] for p in parts},
                   skipped=list(skipped))


class ForkingAnalysis(Analysis):
    """Registered form of :func:`forking_tokens`."""

    name = "forking"
    title = "Forking tokens"
    needs = ("tokens",)
    order = 40

    def plan(self, store: Store, run: str, inputs, *, ratio: float = 0.2,
             scope: str = "step", batch_size: int | None = None, min_count: int = 5,
             top_n: int = 30) -> Plan:
        source, manifest = token_source(store, run)
        return (yield from forking_plan(store, run, source, manifest, ratio=ratio,
                                        scope=scope, batch_size=batch_size,
                                        min_count=min_count, top_n=top_n))

    def combine(self, parts, *, skipped=(), ratio: float = 0.2, scope: str = "step",
                batch_size: int | None = None, min_count: int = 5, **options) -> Forking:
        return forking_from_parts(list(parts), ratio=ratio, scope=scope,
                                  batch_size=batch_size, min_count=min_count, skipped=skipped)

    def figures(self, result: Forking, run: str) -> list[FigureSpec]:
        from ..plots import forking_tokens_bar

        top = _of_run(result.top_tokens, run)
        if top.empty:
            return []
        n = min(20, len(top))
        return [FigureSpec("forking", f"{run}: most frequent forking tokens",
                           "How often each token is among the forking (highest-entropy) "
                           "tokens.",
                           lambda ax: forking_tokens_bar(result.top_tokens, run=run, top_n=n,
                                                         ax=ax),
                           figsize=(6.5, 0.24 * n + 1.2))]

    def section(self, result: Forking, run: str) -> dict:
        from ..base.pieces import token_label
        from ..base.jsonable import records as _records

        top = _records(_of_run(result.top_tokens, run))
        for row in top:
            row["label"] = token_label(row.get("token"))
        return {"ratio": result.ratio, "scope": result.scope, "top_tokens": top,
                "composition": _records(_of_run(result.composition, run))}

    def findings(self, result: Forking, run: str, shown: int = 6) -> list[Finding]:
        from ..base.pieces import token_label

        top = _of_run(result.top_tokens, run).head(shown)
        if top.empty:
            return []
        labels = [f"“{token_label(t)}”" for t in top["token"]]
        rule = f" (top {result.ratio:.0%} entropy per {result.scope})"
        return [Finding("forking", f"most frequent forking tokens{rule}: {', '.join(labels)}",
                        tier="key",
                        numbers={"tokens": [str(t) for t in top["token"]],
                                 "forking_count": [int(c) for c in top["forking_count"]]})]


def _of_run(frame: pd.DataFrame, run: str) -> pd.DataFrame:
    return frame[frame["run"] == run] if "run" in frame.columns else frame


register(ForkingAnalysis())


def forking_mask(tokens_table: pa.Table | pa.RecordBatch, forking: Forking, *,
                 run: str | None = None) -> np.ndarray:
    """The per-token forking flag of ``tokens_table`` under the thresholds of ``forking``.

    Parameters
    ----------
    tokens_table : pyarrow.Table or RecordBatch
        Tokens of ``run`` with ``step, sample_id, position`` and the columns of the run's
        entropy source (e.g. from ``store.read_tokens(run)``).
    forking : Forking
    run : str, optional
        Required when ``forking`` holds several runs.

    Returns
    -------
    numpy.ndarray of bool
        False for tokens without entropy or outside the scopes ``forking`` saw.
    """
    scoped = forking.scope_thresholds(run)
    return _mask(tokens_table, scoped)


def _mask(tokens_table, scoped: ScopeThresholds) -> np.ndarray:
    needed = set(_KEY_COLUMNS) | set(columns_for(scoped.source))
    missing = sorted(needed - set(tokens_table.schema.names))
    if missing:
        raise EntropylensError(f"the tokens table lacks column(s) {', '.join(missing)}")
    flags = scoped.flags(*_key_arrays(tokens_table), scoped.entropy(tokens_table))
    if not scoped.keep_after_eos and "after_eos" in tokens_table.schema.names:
        # left out of the thresholds and counts, so never forking
        flags = flags & ~pc.fill_null(tokens_table.column("after_eos"), False) \
            .to_numpy(zero_copy_only=False)
    return flags


def _step_tables(store: Store, run: str, columns: list[str], steps,
                 keep_after_eos: bool = False):
    """One step's tokens at a time, for the given step keys (NO_STEP: tokens without one);
    tokens marked after the end of their sequence are left out unless ``keep_after_eos``."""
    before_eos = None if keep_after_eos else \
        ds.field("after_eos").is_null() | (ds.field("after_eos") == False)  # noqa: E712
    for step in steps:
        if step == NO_STEP:
            where = ds.field("step").is_null()
            yield step, store.read_tokens(run, columns=columns, filter=where if before_eos
                                          is None else where & before_eos)
        else:
            yield step, store.read_tokens(run, columns=columns, steps=[step],
                                          filter=before_eos)


@dataclass
class ForkingOverlap:
    """Result of :func:`forking_overlap`.

    Attributes
    ----------
    run_a, run_b : str
    ratio : float
    scope : str
    shared_positions : int
        Positions ``(step, sample_id, position)`` where both runs have an entropy.
    forking_a, forking_b, both : int
        Forking positions of each run, and of both, among the shared ones.
    overlap : float or None
        Share of ``run_a``'s forking positions also forking in ``run_b``.
    jaccard : float or None
    token_mismatches : int
        Shared positions whose token ids differ (the runs were then not scored on the same
        tokens).
    warning : str or None
        A message when there are mismatches.
    by_step : list of dict
        ``{step, shared_positions, overlap}`` per step.
    """

    run_a: str
    run_b: str
    ratio: float
    scope: str
    shared_positions: int
    forking_a: int
    forking_b: int
    both: int
    overlap: float | None
    jaccard: float | None
    token_mismatches: int
    warning: str | None
    by_step: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """The ``overlap`` object of ``entropylens forks --overlap A B --json``."""
        return {"run_a": self.run_a, "run_b": self.run_b, "ratio": self.ratio,
                "scope": self.scope, "shared_positions": self.shared_positions,
                "forking_a": self.forking_a, "forking_b": self.forking_b, "both": self.both,
                "overlap": self.overlap, "jaccard": self.jaccard,
                "token_mismatches": self.token_mismatches, "warning": self.warning,
                "by_step": [dict(row) for row in self.by_step]}


def forking_overlap(store: Store | str, run_a: str, run_b: str, ratio: float = 0.2,
                    scope: str = "step", *, batch_size: int | None = None,
                    engine: str = "local", workers: int | None = None,
                    **engine_options) -> ForkingOverlap:
    """Overlap of the forking positions of two runs scored on the same tokens.

    Each run's forking tokens come from its own thresholds over all its tokens; positions are
    matched on ``(step, sample_id, position)``, one step at a time. arXiv 2506.01939
    (Table 1) reports about 86% overlap between a base model and its RL-trained checkpoint.

    Parameters
    ----------
    store : Store or path
    run_a, run_b : str
        Two runs holding the same completions (e.g. one checkpoint rescored by another).
    ratio, scope, batch_size, engine, workers
        As in :func:`forking_tokens`.

    Returns
    -------
    ForkingOverlap
        Counts are over shared positions where both runs have an entropy; ``to_dict()`` is
        the ``overlap`` object of ``entropylens forks --overlap A B --json``.

    Raises
    ------
    EntropylensError
        When the runs share no token position.
    """
    _check_options(ratio, scope, batch_size)
    store = open_store(store)
    chosen = {run: (source, manifest) for run, source, manifest in
              token_runs(store, [run_a, run_b])}
    for run in (run_a, run_b):
        if run not in chosen:
            raise EntropylensError(f"run {run!r} has no per-token entropies", path=store.path)
    if workers is not None:
        engine_options["workers"] = workers
    scoped = {run: run_thresholds(store, run, *chosen[run], scope=scope, ratio=float(ratio),
                                  batch_size=batch_size, engine=engine, **engine_options)
              for run in (run_a, run_b)}
    steps_a = {s for s, _ in _token_step_filters(store, run_a)}
    steps_b = {s for s, _ in _token_step_filters(store, run_b)}
    common = sorted(steps_a & steps_b)
    totals = {"shared": 0, "a": 0, "b": 0, "both": 0, "mismatch": 0}
    by_step = []
    # a run may be compared with itself: one reader per side, not one per name
    readers = [_step_tables(store, run, sorted(set(_KEY_COLUMNS) | {"token_id"}
                                                | set(columns_for(chosen[run][0]))), common,
                            keep_after_eos=bool(engine_options.get("keep_after_eos")))
               for run in (run_a, run_b)]
    for (step, table_a), (_, table_b) in zip(*readers):
        frame_a = _flag_frame(table_a, scoped[run_a])
        frame_b = _flag_frame(table_b, scoped[run_b])
        joined = frame_a.merge(frame_b, on=["sample_id", "position"], suffixes=("_a", "_b"))
        joined = joined[joined["judged_a"] & joined["judged_b"]]
        if not len(joined):
            continue
        fork_a, fork_b = joined["fork_a"].to_numpy(), joined["fork_b"].to_numpy()
        both = int((fork_a & fork_b).sum())
        totals["shared"] += len(joined)
        totals["a"] += int(fork_a.sum())
        totals["b"] += int(fork_b.sum())
        totals["both"] += both
        ids = joined[["token_id_a", "token_id_b"]].dropna()
        totals["mismatch"] += int((ids["token_id_a"] != ids["token_id_b"]).sum())
        by_step.append({"step": None if step == NO_STEP else int(step),
                        "shared_positions": len(joined),
                        "overlap": both / int(fork_a.sum()) if fork_a.any() else None})
    if not totals["shared"]:
        raise EntropylensError(f"runs {run_a!r} and {run_b!r} share no token position "
                               "(step, sample_id, position) with entropies in both: overlap "
                               "needs two runs scored on the same tokens", path=store.path)
    union = totals["a"] + totals["b"] - totals["both"]
    return ForkingOverlap(
        run_a=run_a, run_b=run_b, ratio=float(ratio), scope=scope,
        shared_positions=totals["shared"], forking_a=totals["a"], forking_b=totals["b"],
        both=totals["both"], overlap=totals["both"] / totals["a"] if totals["a"] else None,
        jaccard=totals["both"] / union if union else None,
        token_mismatches=totals["mismatch"],
        warning=(f"{totals['mismatch']} of {totals['shared']} shared positions hold "
                 "different token ids: the runs were not scored on the same tokens, so the "
                 "overlap compares different text") if totals["mismatch"] else None,
        by_step=by_step)


def _flag_frame(table: pa.Table, scoped: ScopeThresholds) -> pd.DataFrame:
    entropy = scoped.entropy(table)
    ids = table.column("token_id")
    return pd.DataFrame({
        "sample_id": table.column("sample_id").to_numpy(zero_copy_only=False),
        "position": table.column("position").to_numpy(zero_copy_only=False),
        "token_id": pd.array(ids.to_pylist() if ids.null_count else ids.to_numpy(),
                             dtype="Int64"),
        "fork": _mask(table, scoped), "judged": np.isfinite(entropy)})
