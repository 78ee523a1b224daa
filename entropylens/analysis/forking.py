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
step-closed units, so :class:`~.forking_counts.ForkingScan` computes a unit's thresholds
when it is sealed, flags and counts its tokens by text there and frees them: one scan,
memory bounded by one unit plus count tables bounded by the number of distinct texts.
``global`` is exact for runs of at most ``EXACT_GLOBAL_MAX_TOKENS`` tokens (their entropies
held in memory); larger runs take the threshold from a
:class:`~entropylens.analysis.sketch.QuantileSketch` (fixed memory, within relative error
0.5 % plus 1e-9 nats of the exact quantile). Its tokens are counted in a second pass
(:class:`~.forking_counts.ForkingCounts`), once the run's threshold is known.

Tokens without an entropy from the run's source (NaN) are neither counted nor forking.

This module is the analysis (its result, plan and registration); the thresholds are in
:mod:`.forking_thresholds`, the counting by token text in :mod:`.forking_counts` and the
overlap of two runs in :mod:`.forking_overlap`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from ..base.jsonable import records as _records
from ..base.steps import NO_STEP
from ..engine import Plan, scan_selection
from ..errors import EntropylensError
from ..schema import is_special_token
from ..store import Store
from .distribution import token_source
from .registry import Analysis, FigureSpec, Finding, register, run_analysis
from .forking_counts import CATEGORIES, ForkingCounts, ForkingScan, token_categories
from .forking_thresholds import (ScopeThresholds, check_options,
                                 forking_flags, thresholds_plan)

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
    categories = pd.Series(token_categories(counts["token"].to_numpy(object)),
                           index=counts.index)
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
    counts = counts.assign(run=run, forking_rate=counts["forking_count"] / counts["count"])
    by_count = counts[counts["forking_count"] > 0].sort_values(
        ["forking_count", "count", "token"], ascending=[False, False, True]).head(top_n)
    by_rate = counts[(counts["count"] >= min_count) & (counts["forking_count"] > 0)] \
        .sort_values(["forking_rate", "count", "token"], ascending=[False, False, True]) \
        .head(top_n)
    # judged for the rows shown only, not the whole vocabulary
    return tuple(top.assign(special=top["token"].map(is_special_token).astype(bool))
                 [TOKEN_COLUMNS] for top in (by_count, by_rate))


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
    check_options(ratio, scope, batch_size)
    return run_analysis("forking", store, runs, engine=engine, workers=workers, ratio=ratio,
                        scope=scope, batch_size=batch_size, min_count=min_count, top_n=top_n,
                        **engine_options)


def forking_plan(store: Store, run: str, source: str, manifest: dict, *, ratio: float = 0.2,
                 scope: str = "step", batch_size: int | None = None, min_count: int = 5,
                 top_n: int = 30) -> Plan:
    """One run's part of :func:`forking_tokens`, as a plan (see
    :func:`entropylens.engine.run_plans`); :func:`forking_from_parts` joins parts."""
    check_options(ratio, scope, batch_size)
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
    return forking_flags(tokens_table, scoped)
