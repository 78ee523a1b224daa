"""Token-entropy distributions per step and per run: means, quantiles, the near-zero
fraction and histograms on fixed bins.

Policy entropy per step is reported two ways (DESIGN.md section 5): ``entropy_token_mean``,
the plain mean over tokens (verl's default ``token-mean``), and ``entropy_seq_mean``, the mean
over sequences of each sequence's token mean (arXiv 2505.22617, Eq. 5).

Reference (arXiv 2506.01939, Qwen3-8B at T = 1): 50.64% of tokens below 0.01 nats, 80th
percentile 0.672.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..base.jsonable import records as _records
from ..base.steps import NO_STEP, step_array
from ..engine import Aggregator, Plan
from ..errors import EntropylensError
from ..estimators import best_entropy_source, columns_for, token_entropy
from ..store import Store
from .sequences import run_keys, run_lengths, sequence_starts, step_rows
from .registry import Analysis, FigureSpec, register, run_analysis
from .sketch import DEFAULT_ALPHA, QuantileSketch

#: A token below this entropy (nats) counts as near-deterministic (arXiv 2506.01939).
LOW_ENTROPY = 0.01


@dataclass
class _StepState:
    values: dict          # open step -> list of float64 arrays (one step's entropies)
    sequences: list       # Arrow tables (step, sample_id, h_sum, h_count) of open steps
    rows: dict = field(default_factory=dict)   # sealed step -> finished row (and its sum)


class StepStats(Aggregator):
    """Per-step token-entropy statistics.

    Parameters
    ----------
    source : {"exact", "topk", "surprisal"}
        Entropy source (see :mod:`entropylens.estimators`).
    quantiles : tuple of float
        Quantiles to report, named ``p50``, ``p80``, ...
    vocab_size : int, optional
        For the top-k estimate.
    top_k : int, optional
        Nominal k of the top-k lists (see :func:`entropylens.estimators.topk_bounds`).

    Notes
    -----
    Tokens without an entropy from ``source`` (NaN) are left out of every statistic.
    Exact per-step quantiles need one step's values in memory: the state holds float64
    entropies of the open steps only; :meth:`seal` (called by the engine once a step-closed
    unit is scanned) reduces each complete step to its row and frees its values, so memory
    is bounded by one unit, not by the run.
    """

    dictionary_columns = ("sample_id",)   # completions told apart by index

    def __init__(self, source: str, *, quantiles=(0.5, 0.8), vocab_size: int | None = None,
                 top_k: int | None = None):
        self.source = source
        self.quantiles = tuple(quantiles)
        self.vocab_size = vocab_size
        self.top_k = top_k
        self.columns = ("step", "sample_id") + columns_for(source)

    def share_key(self) -> tuple | None:
        """Step statistics of one source and quantiles are the same whoever asks (a
        subclass, which may compute something else, shares only if it says so)."""
        if type(self) is not StepStats:
            return None
        return (StepStats, self.source, self.quantiles, self.vocab_size, self.top_k)

    def start(self) -> _StepState:
        return _StepState(values={}, sequences=[])

    def entropy(self, batch: pa.RecordBatch) -> np.ndarray:
        """Per-token entropy of a batch from this aggregator's source."""
        return token_entropy(batch, self.source, vocab_size=self.vocab_size, top_k=self.top_k)

    def update(self, state: _StepState, batch: pa.RecordBatch) -> _StepState:
        return self._fold(state, batch, self.entropy(batch))

    def _fold(self, state: _StepState, batch: pa.RecordBatch,
              values: np.ndarray) -> _StepState:
        steps = step_array(batch.column("step"))
        finite = np.isfinite(values)
        if not finite.all():
            values, steps = values[finite], steps[finite]
            samples = batch.column("sample_id").filter(pa.array(finite))
        else:
            samples = batch.column("sample_id")
        if not len(values):
            return state
        for step, rows in step_rows(steps):
            state.values.setdefault(int(step), []).append(values[rows])
        # per-completion sums over runs of rows (no hashing of the string keys); the sums
        # run in row order, so they are the same on every engine
        starts = sequence_starts(steps, samples)
        state.sequences.append(run_keys(steps, samples, starts).append_column(
            "h_sum", pa.array(np.add.reduceat(values, starts), pa.float64())).append_column(
            "h_count", pa.array(run_lengths(starts, len(values)))))
        return state

    def seal(self, state: _StepState) -> _StepState:
        """Reduce every open step (complete: no later batch holds it) to its row."""
        if not state.values:
            return state
        seq = pa.concat_tables(state.sequences).group_by(
            ["step", "sample_id"], use_threads=False).aggregate(
            [("h_sum", "sum"), ("h_count", "sum")])
        means = pa.table({"step": seq.column("step"), "mean": pc.divide(
            seq.column("h_sum_sum"), pc.cast(seq.column("h_count_sum"), pa.float64()))})
        per_step = means.group_by("step", use_threads=False).aggregate([("mean", "mean")])
        seq_mean = dict(zip(per_step.column("step").to_pylist(),
                            per_step.column("mean_mean").to_pylist()))
        qnames = [quantile_name(q) for q in self.quantiles]
        for step in sorted(state.values):
            if step in state.rows:
                raise EntropylensError(f"step {step} sealed twice: the engine must hand "
                                       "every step to one unit")
            values = np.concatenate(state.values[step])
            below = int((values < LOW_ENTROPY).sum())
            row = {"step": step, "tokens": len(values),
                   "entropy_token_mean": float(values.mean()),
                   "entropy_seq_mean": float(seq_mean[step])}
            total = float(values.sum())
            if self.quantiles:   # the policy-entropy curve asks for none
                # selecting the order statistics in place (after the sums, whose rounding
                # depends on the order) takes half the time of a sort, same values exactly
                for name, q in zip(qnames, np.quantile(values, self.quantiles,
                                                       overwrite_input=True)):
                    row[name] = float(q)
            row["frac_below_0_01"] = below / len(values)
            state.rows[step] = (row, total, below)
        state.values, state.sequences = {}, []
        return state

    def merge(self, left: _StepState, right: _StepState) -> _StepState:
        for step, arrays in right.values.items():
            left.values.setdefault(step, []).extend(arrays)
        left.sequences.extend(right.sequences)
        for step, row in right.rows.items():
            if step in left.rows:
                raise EntropylensError(f"step {step} sealed in two partial states")
            left.rows[step] = row
        return left

    def finish(self, state: _StepState) -> pd.DataFrame:
        """One row per step: tokens, entropy_token_mean, entropy_seq_mean, quantiles,
        frac_below_0_01, then ``entropy_sum`` and ``tokens_below_0_01`` (the exact sum and
        count behind the mean and fraction, for run-wide figures)."""
        qnames = [quantile_name(q) for q in self.quantiles]
        columns = ["step", "tokens", "entropy_token_mean", "entropy_seq_mean", *qnames,
                   "frac_below_0_01", "entropy_sum", "tokens_below_0_01"]
        state = self.seal(state)
        if not state.rows:
            return pd.DataFrame(columns=columns)
        rows = [{**row, "entropy_sum": total, "tokens_below_0_01": below}
                for row, total, below in (state.rows[step] for step in sorted(state.rows))]
        frame = pd.DataFrame(rows, columns=columns)
        frame["step"] = frame["step"].astype("Int64").mask(frame["step"] == NO_STEP)
        return frame


def quantile_name(q: float) -> str:
    """Column name of a quantile: 0.5 -> ``p50``, 0.999 -> ``p99.9``."""
    percent = round(q * 100, 6)
    return f"p{percent:g}"


# -- distributions: quantiles, histograms, global quantiles --------------------------------

#: Quantiles of :func:`distribution`, named ``p10 ... p99``.
DISTRIBUTION_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.8, 0.9, 0.95, 0.99)

#: Default histogram edges (nats): 0, then 10 log-spaced bins a decade from 1e-4 to 10^1.5,
#: then an open last bin. The first bin also holds values below 0 (float rounding; the
#: data-quality checks report real negatives) and the last everything above 10^1.5, so no
#: token is ever left out of a histogram.
DEFAULT_BINS = np.concatenate([[0.0], np.logspace(-4, 1.5, 56), [np.inf]])


#: Runs up to this many tokens get exact global quantiles (their values, 8 bytes a token, are
#: held until the end); larger runs get :class:`~entropylens.analysis.sketch.QuantileSketch`
#: estimates within relative error :data:`~entropylens.analysis.sketch.DEFAULT_ALPHA`.
EXACT_GLOBAL_MAX_TOKENS = 2_000_000
GLOBAL_MODES = ("auto", "exact", "sketch")


def exact_quantiles(arrays: list[np.ndarray], quantiles) -> np.ndarray:
    """Exact quantiles (numpy's default linear rule) of the concatenation of ``arrays``."""
    values = np.concatenate(arrays) if arrays else np.empty(0)
    if not len(values):
        return np.full(len(quantiles), np.nan)
    return np.quantile(values, quantiles)


def _check_bins(bins) -> np.ndarray:
    edges = np.asarray(DEFAULT_BINS if bins is None else bins, dtype=np.float64)
    if edges.ndim != 1 or len(edges) < 2 or np.isnan(edges).any() \
            or not (np.diff(edges) > 0).all():
        raise EntropylensError("histogram bins must be at least two strictly increasing "
                               "edges")
    return edges


def bin_index(values: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Histogram bin of each value: ``i`` with ``bins[i] <= value < bins[i + 1]``, values
    below the first edge in the first bin and at or above the last in the last.

    Where the inner edges are log-spaced (the default bins), the bin is guessed from the
    logarithm and then moved until the edges hold, which is exact and three times as fast
    as a binary search over the edges.
    """
    last = len(bins) - 2
    inner = bins[1:-1]
    if len(inner) < 3 or inner[0] <= 0 or not np.allclose(
            np.diff(np.log(inner)), np.log(inner[1] / inner[0]), rtol=1e-9, atol=0):
        return np.clip(np.searchsorted(bins, values, side="right") - 1, 0, last)
    per_bin = (len(inner) - 1) / (np.log10(inner[-1]) - np.log10(inner[0]))
    with np.errstate(divide="ignore", invalid="ignore"):
        guess = (np.log10(values) - np.log10(inner[0])) * per_bin + 1
    # fmax sends NaN (values below zero) and -inf (zero) to the first bin; NaN values go
    # to the last, where a binary search puts them
    which = np.minimum(np.fmax(np.floor(guess), 0), last).astype(np.int64)
    which[np.isnan(values)] = last
    while True:   # one round in practice: the guess is off by at most one bin
        down = (values < bins[which]) & (which > 0)   # (False for NaN)
        up = (values >= bins[which + 1]) & (which < last)
        if not (down.any() or up.any()):
            return which
        which += up.astype(np.int64) - down


@dataclass
class _DistributionState:
    histogram: dict                                    # step -> int64 counts per bin
    exact: list | None = None                          # every finite value (exact mode)
    sketch: QuantileSketch | None = None               # run-wide sketch (sketch mode)


class DistributionStats(Aggregator):
    """Fixed-bin histograms per step and run-wide quantiles of token entropy, in one pass.

    The per-step rows come from :class:`StepStats`, which :func:`distribution` runs beside
    this one (and a report shares with :func:`~entropylens.analysis.summary.summary`).

    Parameters
    ----------
    source : {"exact", "topk", "surprisal"}
    bins : sequence of float, optional
        Histogram edges (default :data:`DEFAULT_BINS`). Values below the first edge count in
        the first bin and values above the last in the last one.
    quantiles : tuple of float
        Run-wide quantiles to report (default :data:`DISTRIBUTION_QUANTILES`).
    vocab_size, top_k : int, optional
        For the top-k estimate.
    global_quantiles : {"exact", "sketch"}
        Run-wide quantiles from every value (memory grows with the run) or from a
        :class:`~entropylens.analysis.sketch.QuantileSketch` (fixed memory, relative error
        at most ``alpha``; see that module for the exact bound).
    alpha : float
        Relative accuracy of the sketch.

    Notes
    -----
    Tokens without an entropy from ``source`` (NaN) are left out.
    """

    def __init__(self, source: str, *, bins=None, quantiles=DISTRIBUTION_QUANTILES,
                 vocab_size: int | None = None, top_k: int | None = None,
                 global_quantiles: str = "exact", alpha: float = DEFAULT_ALPHA):
        self.source, self.quantiles = source, tuple(quantiles)
        self.vocab_size, self.top_k = vocab_size, top_k
        self.columns = ("step",) + columns_for(source)
        self.bins = _check_bins(bins)
        if global_quantiles not in ("exact", "sketch"):
            raise EntropylensError(f"global quantiles must be 'exact' or 'sketch', got "
                                   f"{global_quantiles!r}")
        self.global_quantiles, self.alpha = global_quantiles, alpha

    def start(self) -> _DistributionState:
        exact = self.global_quantiles == "exact"
        return _DistributionState(histogram={}, exact=[] if exact else None,
                                  sketch=None if exact else QuantileSketch(self.alpha))

    def update(self, state: _DistributionState, batch: pa.RecordBatch) -> _DistributionState:
        values = token_entropy(batch, self.source, vocab_size=self.vocab_size,
                               top_k=self.top_k)
        steps = step_array(batch.column("step"))
        finite = np.isfinite(values)
        if not finite.all():
            values, steps = values[finite], steps[finite]
        if not len(values):
            return state
        nbins = len(self.bins) - 1
        which = bin_index(values, self.bins)
        for step, rows in step_rows(steps):
            counts = np.bincount(which[rows], minlength=nbins)
            step = int(step)
            if step in state.histogram:
                state.histogram[step] += counts
            else:
                state.histogram[step] = counts
        if state.exact is not None:
            state.exact.append(values)
        else:
            state.sketch.add(values)
        return state

    def merge(self, left: _DistributionState, right: _DistributionState):
        for step, counts in right.histogram.items():
            left.histogram[step] = left.histogram[step] + counts if step in left.histogram \
                else counts
        if left.exact is not None:
            left.exact.extend(right.exact)
        else:
            left.sketch.merge(right.sketch)
        return left

    def finish(self, state: _DistributionState) -> dict:
        """``{"histogram", "global"}`` DataFrames (``step`` as in :class:`StepStats`)."""
        left, right = self.bins[:-1], self.bins[1:]
        frames = [pd.DataFrame({"step": step, "bin_left": left, "bin_right": right,
                                "count": counts.astype(np.int64)})
                  for step, counts in sorted(state.histogram.items())]
        histogram = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
            {"step": pd.Series(dtype="int64"), "bin_left": pd.Series(dtype=float),
             "bin_right": pd.Series(dtype=float), "count": pd.Series(dtype="int64")})
        histogram["step"] = histogram["step"].astype("Int64").mask(
            histogram["step"] == NO_STEP)
        if state.exact is not None:
            overall = exact_quantiles(state.exact, self.quantiles)
        else:
            overall = state.sketch.quantile(self.quantiles)
        return {"histogram": histogram,
                "global": pd.DataFrame({"q": list(self.quantiles), "value": overall})}


STEP_COLUMNS = ["run", "step", "tokens", "entropy_token_mean", "entropy_seq_mean",
                *[quantile_name(q) for q in DISTRIBUTION_QUANTILES], "frac_below_0_01",
                "entropy_source"]
RUN_COLUMNS = ["run", "entropy_source", "tokens", "entropy_token_mean", "frac_below_0_01"]


@dataclass
class Distribution:
    """Result of :func:`distribution`.

    Attributes
    ----------
    steps : pandas.DataFrame
        One row per run and step: ``run, step, tokens, entropy_token_mean, entropy_seq_mean,
        p10, p25, p50, p75, p80, p90, p95, p99, frac_below_0_01, entropy_source`` (the token
        mean and the mean of per-sequence means, named as in :class:`Summary`).
    histogram : pandas.DataFrame
        ``run, step, bin_left, bin_right, count`` on the same fixed bins for every step
        (empty bins included, so steps line up).
    global_quantiles : pandas.DataFrame
        ``run, q, value``: quantiles over every token of the run.
    runs : pandas.DataFrame
        ``run, entropy_source, tokens, entropy_token_mean, frac_below_0_01`` over the whole
        run.
    bins : numpy.ndarray
        The histogram edges.
    skipped : list of str
        Runs left out (no per-token entropies), with the reason.
    """

    steps: pd.DataFrame
    histogram: pd.DataFrame
    global_quantiles: pd.DataFrame
    runs: pd.DataFrame
    bins: np.ndarray
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready: ``{"bins", "runs", "steps", "histogram", "global_quantiles"}``."""
        return {"bins": [float(b) for b in self.bins], "runs": _records(self.runs),
                "steps": _records(self.steps), "histogram": _records(self.histogram),
                "global_quantiles": _records(self.global_quantiles),
                "skipped": list(self.skipped)}


def token_runs(store: Store, runs) -> list[tuple[str, str, dict]]:
    """``(run, entropy source, manifest)`` of each requested run that has token entropies.

    Raises
    ------
    EntropylensError
        When none of the runs has tokens with an entropy source.
    """
    chosen = []
    names = store.resolve_runs(runs)
    for run in names:
        manifest = store.manifest(run)
        source = best_entropy_source(manifest) if manifest.get("counts", {}).get("tokens") \
            else None
        if source is not None:
            chosen.append((run, source, manifest))
    if not chosen:
        raise EntropylensError(f"no token entropies in run(s) {', '.join(names)}: this "
                               "analysis needs per-token logs (entropy, top-k logprobs or "
                               "logprobs)", path=store.path)
    return chosen


def distribution(store: Store | str, runs=None, bins=None, *, engine: str = "local",
                 workers: int | None = None, global_quantiles: str = "auto",
                 **engine_options) -> Distribution:
    """Token-entropy distributions per step and per run.

    Parameters
    ----------
    store : Store or path
    runs : str or sequence of str, optional
        Default: every run. Runs without per-token data are left out (``summary`` reports
        their metric curves) and listed in ``skipped``.
    bins : sequence of float, optional
        Histogram edges in nats (default :data:`DEFAULT_BINS`, log-spaced).
    engine : {"local", "ray"}
    workers : int, optional
        Worker processes of the local engine (1: none).
    global_quantiles : {"auto", "exact", "sketch"}
        How ``global_quantiles`` are computed. ``auto`` (default): exact for runs of at most
        :data:`EXACT_GLOBAL_MAX_TOKENS` tokens, else from a mergeable sketch whose estimate
        lies within relative error 0.5 % (plus 1e-9 nats) of the exact quantile
        (:mod:`entropylens.analysis.sketch`). Per-step quantiles are always exact.

    Returns
    -------
    Distribution
        Every row says its ``entropy_source``.
    """
    edges = _check_bins(bins)
    if global_quantiles not in GLOBAL_MODES:
        raise EntropylensError(f"global_quantiles must be one of {', '.join(GLOBAL_MODES)}, "
                               f"got {global_quantiles!r}")
    return run_analysis("distribution", store, runs, engine=engine, workers=workers,
                        bins=edges, global_quantiles=global_quantiles, **engine_options)


def step_stats(source: str, manifest: dict) -> StepStats:
    """The per-step statistics of a run's tokens, with the distribution's quantiles: the
    same aggregator for :func:`distribution` and :func:`~entropylens.analysis.summary.summary`,
    so that a report that runs both computes them once."""
    return StepStats(source, quantiles=DISTRIBUTION_QUANTILES,
                     vocab_size=manifest.get("vocab_size"), top_k=manifest.get("top_k"))


def distribution_plan(store: Store, run: str, source: str, manifest: dict, *, bins=None,
                      global_quantiles: str = "auto") -> Plan:
    """One run's part of :func:`distribution`, as a plan (see
    :func:`entropylens.engine.run_plans`); :func:`distribution_from_parts` joins parts."""
    mode = global_quantiles if global_quantiles != "auto" else (
        "exact" if manifest.get("counts", {}).get("tokens", 0) <= EXACT_GLOBAL_MAX_TOKENS
        else "sketch")
    results = yield {"steps": step_stats(source, manifest), "dist": DistributionStats(
        source, bins=_check_bins(bins), vocab_size=manifest.get("vocab_size"),
        top_k=manifest.get("top_k"), global_quantiles=mode)}
    steps, result = results["steps"], results["dist"]
    frame = steps.copy()
    frame.insert(0, "run", run)
    frame["entropy_source"] = source
    histogram = result["histogram"]
    histogram.insert(0, "run", run)
    overall = result["global"]
    overall.insert(0, "run", run)
    tokens = int(steps["tokens"].sum())
    below = int(steps["tokens_below_0_01"].sum())
    total = float(np.sum(steps["entropy_sum"].to_numpy(np.float64)))
    row = {"run": run, "entropy_source": source, "tokens": tokens,
           "entropy_token_mean": total / tokens if tokens else np.nan,
           "frac_below_0_01": below / tokens if tokens else np.nan}
    return frame[STEP_COLUMNS], histogram, overall, row


def distribution_from_parts(parts: list[tuple], *, bins=None,
                            skipped: Sequence[str] = ()) -> Distribution:
    """The :class:`Distribution` of runs from the results of their plans."""
    return Distribution(steps=pd.concat([p[0] for p in parts], ignore_index=True),
                        histogram=pd.concat([p[1] for p in parts], ignore_index=True),
                        global_quantiles=pd.concat([p[2] for p in parts], ignore_index=True),
                        runs=pd.DataFrame([p[3] for p in parts], columns=RUN_COLUMNS),
                        bins=_check_bins(bins), skipped=list(skipped))


def token_source(store: Store, run: str) -> tuple[str, dict]:
    """The entropy source and manifest of a run with token entropies.

    Raises
    ------
    EntropylensError
        When the run has no tokens with an entropy source.
    """
    manifest = store.manifest(run)
    source = best_entropy_source(manifest) if manifest.get("counts", {}).get("tokens") \
        else None
    if source is None:
        raise EntropylensError(f"run {run!r} has no token entropies: this analysis needs "
                               "per-token logs (entropy, top-k logprobs or logprobs)",
                               path=store.run_dir(run))
    return source, manifest


class DistributionAnalysis(Analysis):
    """Registered form of :func:`distribution`: the quantile fan of each run."""

    name = "distribution"
    title = "Token-entropy distribution per step"
    needs = ("tokens",)
    order = 20

    def plan(self, store: Store, run: str, inputs, *, bins=None,
             global_quantiles: str = "auto") -> Plan:
        source, manifest = token_source(store, run)
        return (yield from distribution_plan(store, run, source, manifest, bins=bins,
                                             global_quantiles=global_quantiles))

    def combine(self, parts, *, skipped=(), bins=None, **options) -> Distribution:
        return distribution_from_parts(list(parts), bins=bins, skipped=skipped)

    def figures(self, result: Distribution, run: str) -> list[FigureSpec]:
        from ..plots import quantile_fan

        return [FigureSpec("quantiles", f"{run}: token-entropy quantiles per step",
                           "Bands between symmetric per-step quantiles, median in black, mean "
                           "dashed (log scale).",
                           lambda ax: quantile_fan(result.steps, run=run, ax=ax))]

    def section(self, result: Distribution, run: str) -> dict:
        from ..base.jsonable import records as _records

        if result.steps[result.steps["run"] == run].empty:
            raise EntropylensError("no token entropies")
        return {"steps": _records(result.steps[result.steps["run"] == run]),
                "global_quantiles": _records(
            result.global_quantiles[result.global_quantiles["run"] == run])}


register(DistributionAnalysis())
