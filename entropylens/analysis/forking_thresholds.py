"""Forking thresholds: the ``(1 - ratio)`` entropy quantile of each scope (arXiv 2506.01939).

A token forks when its entropy is strictly above its scope's threshold (see
:mod:`entropylens.analysis.forking` for the scopes and the rule). This module computes the
thresholds: the exact grouped quantiles, :class:`ScopeThresholds` (thresholds and the flag
of each token under them), the :class:`ForkingThresholds` aggregator and the plan that runs
it over one run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from ..base.encoding import plain_values
from ..base.steps import NO_STEP, step_array
from ..engine import Aggregator, Plan, run_plan, scan_selection
from ..errors import EntropylensError
from ..estimators import columns_for, token_entropy
from ..store import Store
from .distribution import EXACT_GLOBAL_MAX_TOKENS
from .sequences import sorted_bounds, step_rows
from .sketch import QuantileSketch

SCOPES = ("step", "global", "sequence", "batch")
#: Columns that place a token: its scope keys.
KEY_COLUMNS = ("step", "sample_id", "position")


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
            where = _step_lookup(frame["step"].to_numpy(np.int64), steps)
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
        runs = _step_runs(self.frame["step"].to_numpy(np.int64), steps) \
            if self.scope == "step" else None
        if runs is not None:
            # rows in stored order: one comparison per step's rows, no per-token thresholds
            bounds, where = runs
            known = self.frame["threshold"].to_numpy(np.float64)
            out = np.zeros(len(steps), bool)
            for row, begin, end in zip(where.tolist(), bounds[:-1].tolist(),
                                       bounds[1:].tolist()):
                if row >= 0:
                    np.greater(entropy[begin:end], known[row], out=out[begin:end])
        else:
            threshold = self.token_thresholds(steps, sample_ids, positions)
            with np.errstate(invalid="ignore"):
                out = np.asarray(entropy > threshold)
        infinite = entropy == np.inf   # above any threshold, but no entropy to rank
        if infinite.any():
            out &= ~infinite
        return out


def _step_runs(known: np.ndarray, steps: np.ndarray):
    """For rows in stored order (steps non-decreasing): the bounds of each step's rows
    (:func:`~entropylens.analysis.sequences.sorted_bounds`) and the row of that step in
    the distinct steps ``known`` (-1 for none), looked up once per step; None otherwise."""
    bounds = sorted_bounds(steps) if len(steps) else None
    if bounds is None:
        return None
    return bounds, pd.Index(known).get_indexer(steps[bounds[:-1]])


def _step_lookup(known: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Row of each of ``steps`` in the distinct steps ``known`` (-1 for none)."""
    runs = _step_runs(known, steps)
    if runs is None:
        return pd.Index(known).get_indexer(steps)
    bounds, where = runs
    return np.repeat(where, np.diff(bounds))


def _empty_frame(scope: str) -> pd.DataFrame:
    columns = {"step": pd.Series(dtype="int64")}
    if scope == "sequence":
        columns["sample_id"] = pd.Series(dtype=object)
    if scope == "batch":
        columns["batch"] = pd.Series(dtype="int64")
    columns["threshold"] = pd.Series(dtype=float)
    columns["tokens"] = pd.Series(dtype="int64")
    return pd.DataFrame(columns)


def key_columns(scope: str) -> tuple[str, ...]:
    """The key columns a scope reads: the steps only for ``step`` and ``global``."""
    return ("step",) if scope in ("step", "global") else KEY_COLUMNS


def key_arrays(batch, scope: str = "batch") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, sample ids, positions) of a batch; the scopes ``step`` and ``global`` use the
    steps only, so they get cheap placeholders for the others."""
    steps = step_array(batch.column("step"))
    if scope in ("step", "global"):
        empty = np.zeros(len(steps), dtype=np.int8)
        return steps, empty, empty
    samples = plain_values(batch.column("sample_id")).to_numpy(zero_copy_only=False) \
        .astype(object)
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
        self.columns = key_columns(scope) + columns_for(source)

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
            state.append((*key_arrays(batch, self.scope), entropy))
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


def check_options(ratio: float, scope: str, batch_size: int | None) -> None:
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


def token_step_filters(store: Store, run: str) -> list[tuple[int, ds.Expression | None]]:
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


def forking_flags(tokens_table, scoped: ScopeThresholds) -> np.ndarray:
    """Whether each token of ``tokens_table`` forks under ``scoped`` (False for tokens
    without entropy, outside the scopes seen, or after the end of their sequence when the
    thresholds left those out)."""
    needed = set(KEY_COLUMNS) | set(columns_for(scoped.source))
    missing = sorted(needed - set(tokens_table.schema.names))
    if missing:
        raise EntropylensError(f"the tokens table lacks column(s) {', '.join(missing)}")
    flags = scoped.flags(*key_arrays(tokens_table), scoped.entropy(tokens_table))
    if not scoped.keep_after_eos and "after_eos" in tokens_table.schema.names:
        # left out of the thresholds and counts, so never forking
        flags = flags & ~pc.fill_null(tokens_table.column("after_eos"), False) \
            .to_numpy(zero_copy_only=False)
    return flags
