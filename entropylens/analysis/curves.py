"""Per-step curves the trend analyses share: policy entropy and performance.

:func:`policy_entropy` is the curve that :mod:`~entropylens.analysis.phases`,
:mod:`~entropylens.analysis.saturation`, :mod:`~entropylens.analysis.covariance` and
:mod:`~entropylens.analysis.compare` read. It is the plain token mean of each training step
(verl's default ``token-mean``, what trainers log as policy entropy), computed from the run's
tokens with the best entropy source when the run has training tokens, else the run's
``policy_entropy`` metric. The ``source`` column says which.

:func:`performance` is what the entropy is traded against: validation accuracy when the run
logged it, else the mean training reward, or any metric the caller names.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..engine import Aggregator, Plan, run_plan
from ..errors import EntropylensError
from ..estimators import best_entropy_source
from ..store import Store
from .distribution import StepStats

ENTROPY_COLUMNS = ["step", "entropy", "source", "tokens"]
PERFORMANCE_COLUMNS = ["step", "value", "metric"]
#: Token splits that count as training tokens (null: the source did not say).
TRAIN_SPLITS = ("train",)
#: Metric values beyond this magnitude are no measurement (a logging bug, an overflowed
#: counter, 1e308 as a sentinel) and are left out of curves, counted: kept, one such value
#: overflows the squares of a change-point cost or a fit and sinks the whole analysis.
MAX_METRIC_MAGNITUDE = 1e100


def open_store(store: Store | str) -> Store:
    """A :class:`Store` from a store or a path."""
    return store if isinstance(store, Store) else Store.open(store)


class TrainTokens(Aggregator):
    """Feed only training tokens that have a step to another aggregator.

    A token counts as a training token when its ``split`` is ``train`` or null (sources
    that log only training rollouts leave it empty); validation and inference tokens and
    tokens without a step are left out.

    Parameters
    ----------
    inner : Aggregator
        The aggregator that sees the kept rows.
    """

    def __init__(self, inner: Aggregator):
        self.inner = inner
        self.columns = tuple(sorted(set(inner.columns) | {"step", "split"}))

    def start(self) -> Any:
        return self.inner.start()

    def update(self, state: Any, batch: pa.RecordBatch) -> Any:
        keep = train_mask(batch)
        if keep is not None:
            batch = batch.filter(keep)
            if not batch.num_rows:
                return state
        return self.inner.update(state, batch)

    def seal(self, state: Any) -> Any:
        return self.inner.seal(state)

    def merge(self, left: Any, right: Any) -> Any:
        return self.inner.merge(left, right)

    def finish(self, state: Any) -> Any:
        return self.inner.finish(state)


def train_mask(batch: pa.RecordBatch) -> pa.Array | None:
    """Boolean mask of the training rows of a batch, or None when every row is one."""
    step = batch.column("step")
    split = batch.column("split")
    if not step.null_count and split.null_count == batch.num_rows:
        return None
    is_train = pc.fill_null(pc.is_in(split, value_set=pa.array(TRAIN_SPLITS)), True)
    is_train = pc.or_kleene(is_train, pc.is_null(split))
    return pc.fill_null(pc.and_(is_train, pc.is_valid(step)), False)


def _metric_series(metrics: pd.DataFrame, name: str) -> tuple[pd.DataFrame, str | None, int]:
    """Rows of canonical metric ``name`` (or raw key ``name``), one raw key, one row a step.

    When several raw keys map onto the same canonical metric, the one logged at the most
    steps is used (mixing two sources would make a curve jump between them).

    Values beyond :data:`MAX_METRIC_MAGNITUDE` are left out; ``attrs["out_of_range"]`` of
    the series counts them and ``attrs["note"]`` says so.

    Returns
    -------
    (DataFrame[step, value], raw_key, number of raw keys found)
    """
    values = metrics["value"].astype(float)
    sane = np.abs(values) <= MAX_METRIC_MAGNITUDE  # false for NaN and infinities too
    wild = np.isfinite(values) & ~sane
    named = metrics["metric"] == name
    if not (named & metrics["step"].notna() & sane).any():
        named = metrics["raw_key"] == name
    rows = metrics[named & metrics["step"].notna() & sane]
    out_of_range = int((named & metrics["step"].notna() & wild).sum())
    if rows.empty:
        return pd.DataFrame(columns=["step", "value"]), None, 0
    raw = rows["raw_key"].astype(object).where(rows["raw_key"].notna(), "")
    keys = rows.groupby(raw)["step"].nunique()
    best = keys.sort_values(ascending=False, kind="stable").index[0]
    series = (rows[raw == best].groupby("step", as_index=False)["value"].last()
              .sort_values("step").reset_index(drop=True))
    series["step"] = series["step"].astype("int64")
    series["value"] = series["value"].astype(float)
    series.attrs["out_of_range"] = out_of_range
    series.attrs["note"] = (f"{out_of_range} value(s) of {best or name} beyond "
                            f"±{MAX_METRIC_MAGNITUDE:g} left out") if out_of_range else None
    return series, best or None, len(keys)


def policy_entropy(store: Store | str, run: str, *, engine: str = "local",
                   **engine_options) -> pd.DataFrame:
    """The per-step policy-entropy curve of one run.

    Parameters
    ----------
    store : Store or path
    run : str
    engine : {"local", "ray"}

    Returns
    -------
    pandas.DataFrame
        ``step, entropy, source, tokens``: one row per training step, sorted by step.
        ``entropy`` is the mean over the step's training tokens (nats) with ``source`` the
        token entropy source (``exact``, ``topk`` or ``surprisal``), or the logged
        ``policy_entropy`` metric with ``source`` = ``"metric"`` and ``tokens`` = 0 when the
        run has no training tokens. ``attrs["raw_key"]`` names the metric's raw key.

    Raises
    ------
    EntropylensError
        When the run has neither training tokens nor a ``policy_entropy`` metric.
    """
    store = open_store(store)
    return run_plan(store, run, policy_entropy_plan(store, run, engine=engine,
                                                    **engine_options),
                    engine=engine, **engine_options)


def policy_entropy_plan(store: Store, run: str, *, engine: str = "local",
                        **engine_options) -> Plan:
    """:func:`policy_entropy` as a plan (see :func:`entropylens.engine.run_plans`).

    Phases, fit, covariance and compare all need this curve, so it is remembered per run
    (and engine): later calls are served without a scan.
    """
    manifest = store.manifest(run)
    stamp = (store.run_dir(run) / "manifest.json").stat().st_mtime_ns
    key = (str(store.path.resolve()), run, manifest.get("created"), stamp, engine,
           tuple(sorted((k, repr(v)) for k, v in engine_options.items())))
    if key in _CURVE_CACHE:
        return _CURVE_CACHE[key].copy()
    frame = yield from _policy_entropy(store, run, manifest)
    _CURVE_CACHE[key] = frame.copy()
    while len(_CURVE_CACHE) > _CURVE_CACHE_SIZE:
        _CURVE_CACHE.pop(next(iter(_CURVE_CACHE)))
    return frame


#: Recent policy-entropy curves, keyed by store, run, the run's creation time and engine.
_CURVE_CACHE: dict = {}
_CURVE_CACHE_SIZE = 32


def _policy_entropy(store: Store, run: str, manifest: dict) -> Plan:
    source = best_entropy_source(manifest) if manifest.get("counts", {}).get("tokens") else None
    if source is not None:
        stats = (yield {"steps": TrainTokens(StepStats(
            source, quantiles=(), vocab_size=manifest.get("vocab_size")))})["steps"]
        stats = stats.dropna(subset=["step", "entropy_token_mean"])
        if len(stats):
            frame = pd.DataFrame({"step": stats["step"].astype("int64").to_numpy(),
                                  "entropy": stats["entropy_token_mean"].astype(float).to_numpy(),
                                  "source": source,
                                  "tokens": stats["tokens"].astype("int64").to_numpy()})
            frame = frame.sort_values("step").reset_index(drop=True)
            frame.attrs["raw_key"] = None
            return frame
    series, raw_key, _ = _metric_series(store.read_metrics(run), "policy_entropy")
    if series.empty:
        raise EntropylensError(
            f"run {run!r} has no policy entropy: no training tokens with an entropy source "
            "and no 'policy_entropy' metric (map the trainer's key with --alias KEY="
            "policy_entropy at ingest)", path=store.run_dir(run))
    frame = pd.DataFrame({"step": series["step"].to_numpy(), "entropy": series["value"].to_numpy(),
                          "source": "metric", "tokens": np.zeros(len(series), dtype="int64")})
    frame.attrs.update(raw_key=raw_key, note=series.attrs["note"])
    return frame


def performance(store: Store | str, run: str, reward: str | None = None) -> pd.DataFrame:
    """The per-step performance curve of one run: validation accuracy, else mean reward.

    Parameters
    ----------
    store : Store or path
    run : str
    reward : str, optional
        Use this metric instead (a canonical name such as ``reward_mean``, or a raw key as
        logged).

    Returns
    -------
    pandas.DataFrame
        ``step, value, metric``, sorted by step. ``val_accuracy`` is a fraction: when every
        value lies in [0, 100] and some exceed 1 they are read as percentages and divided by
        100. ``attrs`` holds ``metric``, ``raw_key``, ``scaled`` (True after that division)
        and ``note`` (a sentence saying what was chosen or changed, or None).

    Raises
    ------
    EntropylensError
        When the run has neither metric (or not the one asked for).
    """
    store = open_store(store)
    metrics = store.read_metrics(run)
    candidates = [reward] if reward else ["val_accuracy", "reward_mean"]
    notes: list[str] = []
    for name in candidates:
        series, raw_key, n_keys = _metric_series(metrics, name)
        if series.empty:
            continue
        metric = name
        if series.attrs["note"]:
            notes.append(series.attrs["note"])
        if n_keys > 1:
            notes.append(f"{n_keys} raw keys map to {name}; used {raw_key!r} "
                         "(logged at the most steps)")
        scaled = False
        values = series["value"]
        if metric == "val_accuracy" and values.max() > 1 and values.min() >= 0 \
                and values.max() <= 100:
            series["value"] = values / 100.0
            scaled = True
            notes.append(f"{raw_key or name} looks like a percentage (max {values.max():g}); "
                         "divided by 100")
        frame = pd.DataFrame({"step": series["step"].to_numpy(),
                              "value": series["value"].to_numpy(dtype=float),
                              "metric": metric})
        frame.attrs.update({"metric": metric, "raw_key": raw_key, "scaled": scaled,
                            "note": "; ".join(notes) or None})
        return frame
    known = sorted(set(metrics["metric"].dropna()))
    if len(known) > 12:
        known = known[:12] + [f"... {len(known) - 12} more"]
    wanted = f"metric {reward!r}" if reward else "'val_accuracy' or 'reward_mean'"
    raise EntropylensError(f"run {run!r} has no {wanted} (metrics: {', '.join(known) or 'none'})",
                           path=store.run_dir(run))


def entropy_label(source: str) -> str:
    """How a curve's entropy is named in results: ``policy_entropy (exact tokens)``."""
    return "policy_entropy (metric)" if source == "metric" \
        else f"policy_entropy ({source} tokens)"


def is_number(value: Any) -> bool:
    """True for a finite int or float (not None, NaN or pandas NA)."""
    return isinstance(value, (int, float, np.integer, np.floating)) \
        and not isinstance(value, bool) and math.isfinite(float(value))
