"""Per-step curves the trend analyses share: policy entropy and performance.

:func:`policy_entropy` is the curve that :mod:`~entropylens.analysis.phases`,
:mod:`~entropylens.analysis.saturation`, :mod:`~entropylens.analysis.covariance` and
:mod:`~entropylens.analysis.compare` read. It is the plain token mean of each training step
(verl's default ``token-mean``, what trainers log as policy entropy), computed from the run's
tokens with the best entropy source when the run has training tokens, else the run's
``policy_entropy`` metric. The ``source`` column says which.

:func:`performance` is what the entropy is traded against: validation accuracy when the run
logged it, else the mean training reward, or any metric the caller names. Its steps are
aligned with the entropy curve's (:func:`align_metric_steps`): a validation score sits at
the step whose entropy is that of the policy it validated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..engine import Aggregator, Plan, scan_selection
from ..errors import EntropylensError
from ..estimators import best_entropy_source
from ..ingest.step_basis import source_step_basis, step_offset
from ..store import Store, open_store
from .distribution import StepStats
from .registry import Analysis, register, run_analysis

ENTROPY_COLUMNS = ["step", "entropy", "source", "tokens", "entropy_seq_mean"]
PERFORMANCE_COLUMNS = ["step", "value", "metric"]
#: Token splits that count as training tokens (null: the source did not say).
TRAIN_SPLITS = ("train",)
#: Metric values beyond this magnitude are no measurement (a logging bug, an overflowed
#: counter, 1e308 as a sentinel) and are left out of curves, counted: kept, one such value
#: overflows the squares of a change-point cost or a fit and sinks the whole analysis.
MAX_METRIC_MAGNITUDE = 1e100


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
        self.dictionary_columns = getattr(inner, "dictionary_columns", ())
        self.columns = tuple(sorted(set(inner.columns) | {"step", "split"}))

    def share_key(self) -> tuple | None:
        """The inner aggregator's key, over training tokens: shared where that one is."""
        key = self.inner.share_key()
        return None if key is None else (TrainTokens, key)

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
                   workers: int | None = None, **engine_options) -> pd.DataFrame:
    """The per-step policy-entropy curve of one run.

    Parameters
    ----------
    store : Store or path
    run : str
    engine : {"local", "ray"}
    workers : int, optional
        Worker processes of the local engine (1: none).
    **engine_options
        ``keep_after_eos=True`` keeps the tokens after the end of their sequence, left out
        by default; engine options such as ``batch_size``.

    Returns
    -------
    pandas.DataFrame
        ``step, entropy, source, tokens, entropy_seq_mean``: one row per training step,
        sorted by step. ``entropy`` is the token mean over the step's training tokens (nats,
        ``entropy_token_mean``: what the trend analyses and the diagnosis use) with
        ``source`` the token entropy source (``exact``, ``topk`` or ``surprisal``), or the
        logged ``policy_entropy`` metric with ``source`` = ``"metric"`` and ``tokens`` = 0
        when the run has no training tokens. ``entropy_seq_mean`` is the other definition,
        the mean over sequences of each sequence's token mean (arXiv 2505.22617, Eq. 5;
        NaN for a logged metric). ``attrs["raw_key"]`` names the metric's raw key (also
        :attr:`PolicyEntropy.raw_key` of the registered analysis).

    Raises
    ------
    EntropylensError
        When the run has neither training tokens nor a ``policy_entropy`` metric.
    """
    return run_analysis("policy_entropy", open_store(store), [run], engine=engine,
                        workers=workers, **engine_options).of(run)


def policy_entropy_plan(store: Store, run: str, *, engine: str = "local",
                        **engine_options) -> Plan:
    """:func:`policy_entropy` as a plan (see :func:`entropylens.engine.run_plans`).

    Phases, fit, covariance and compare all need this curve, so it is remembered per run
    (and engine): later calls are served without a scan.
    """
    manifest = store.manifest(run)
    stamp = (store.run_dir(run) / "manifest.json").stat().st_mtime_ns
    options = {**engine_options, **scan_selection()}
    key = (str(store.path.resolve()), run, manifest.get("created"), stamp, engine,
           tuple(sorted((k, repr(v)) for k, v in options.items())))
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
                                  "tokens": stats["tokens"].astype("int64").to_numpy(),
                                  # the other definition (2505.22617 Eq. 5), same scan
                                  "entropy_seq_mean":
                                      stats["entropy_seq_mean"].astype(float).to_numpy()})
            frame = frame.sort_values("step").reset_index(drop=True)
            frame.attrs["raw_key"] = None
            return frame
    series, raw_key, _ = _metric_series(store.read_metrics(run), "policy_entropy")
    if series.empty and source is not None:
        # tokens with entropies but no training step: an API or evaluation log, where an
        # alias cannot help (summary, forks, roles and report work on such runs)
        raise EntropylensError(
            f"run {run!r} holds inference tokens only (no training step): the entropy curve, "
            "its phases, the saturation fit and the diagnosis need training steps",
            path=store.run_dir(run))
    if series.empty:
        raise EntropylensError(
            f"run {run!r} has no policy entropy: no training tokens with an entropy source "
            "and no 'policy_entropy' metric (map the trainer's key with --alias KEY="
            "policy_entropy at ingest)", path=store.run_dir(run))
    frame = pd.DataFrame({"step": series["step"].to_numpy(), "entropy": series["value"].to_numpy(),
                          "source": "metric", "tokens": np.zeros(len(series), dtype="int64"),
                          "entropy_seq_mean": np.nan})
    frame.attrs.update(raw_key=raw_key, note=series.attrs["note"])
    return frame


def run_step_basis(manifest: dict, table: str) -> str:
    """The step basis of one table of a run: ``policy_version``, ``logged_step``, ``unknown``
    or ``mixed`` (sources of that table disagree).

    Runs ingested before the basis was recorded get it from their sources' formats.
    """
    recorded = manifest.get("step_basis")
    if recorded:
        return recorded.get(table, "unknown")
    bases = {source_step_basis(source.get("format", "")) for source in manifest.get("sources", ())}
    return bases.pop() if len(bases) == 1 else ("mixed" if bases else "unknown")


def align_metric_steps(metrics: pd.DataFrame, manifest: dict) -> tuple[pd.DataFrame, dict]:
    """Move metric rows onto the steps of the run's entropy curve, policy by policy.

    A training row logged at step ``g`` of a ``logged_step`` source comes from the policy
    after ``g - 1`` updates, a validation row from the policy after ``g`` updates (see
    :mod:`entropylens.ingest.step_basis`); on a ``policy_version`` source both come from the
    policy after ``g`` updates. Each row goes to the step at which the entropy curve (from
    the run's tokens when it has them, else from its metrics) holds that same policy: from a
    verl or Hugging Face tracker, validation logged at ``g`` moves to ``g + 1`` and training
    rows stay. Unknown or mixed bases move nothing and say so.

    Returns
    -------
    (DataFrame, dict)
        The metrics with aligned ``step``, and ``{"entropy", "metrics", "val_shift",
        "train_shift", "note"}`` describing what was done.
    """
    entropy_table = "tokens" if manifest.get("counts", {}).get("tokens") else "metrics"
    entropy_basis = run_step_basis(manifest, entropy_table)
    metric_basis = run_step_basis(manifest, "metrics")
    info = {"entropy": entropy_basis, "metrics": metric_basis, "val_shift": 0,
            "train_shift": 0, "note": None}
    unclear = {entropy_basis, metric_basis} & {"unknown", "mixed"}
    if unclear:
        info["note"] = (f"step basis {'/'.join(sorted(unclear))}: validation is paired with "
                        "the entropy logged at the same step, which may be one policy off")
        return metrics, info
    info["val_shift"] = step_offset(entropy_basis)
    info["train_shift"] = step_offset(entropy_basis) - step_offset(metric_basis)
    if not (info["val_shift"] or info["train_shift"]) or metrics.empty:
        return metrics, info
    is_val = (metrics["split"] == "val").fillna(False).to_numpy(bool)
    aligned = metrics.copy()
    aligned["step"] = metrics["step"] + np.where(is_val, info["val_shift"], info["train_shift"])
    if info["val_shift"]:
        info["note"] = (f"validation logged at step g ran on the policy after g updates: "
                        f"paired with the entropy of step g+{info['val_shift']}")
    else:
        info["note"] = (f"training metrics logged at step g come from the policy after g-1 "
                        f"updates: moved to step g{info['train_shift']:+d}")
    return aligned, info


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
    return run_analysis("performance", open_store(store), [run], reward=reward).of(run)


def performance_curve(store: Store, run: str, reward: str | None = None) -> pd.DataFrame:
    """:func:`performance` of one run, read directly (a read of the run's metrics)."""
    metrics, alignment = align_metric_steps(store.read_metrics(run), store.manifest(run))
    candidates = [reward] if reward else ["val_accuracy", "reward_mean"]
    notes: list[str] = [alignment["note"]] if alignment["note"] else []
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
                            "step_basis": alignment, "note": "; ".join(notes) or None})
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


def _curve_records(frames: Sequence[pd.DataFrame], runs: Sequence[str]) -> pd.DataFrame:
    """Per-run curves as one long table with a leading ``run`` column."""
    long = pd.concat([frame.assign(run=run)[["run", *frame.columns]]
                      for run, frame in zip(runs, frames)], ignore_index=True)
    long.attrs = {}   # what the parts carried in attrs is in the result's fields
    return long


@dataclass
class PolicyEntropy:
    """Result of the registered ``policy_entropy`` analysis: the curves of one or more runs.

    Attributes
    ----------
    curve : pandas.DataFrame
        ``run, step, entropy, source, tokens`` (see :func:`policy_entropy`).
    raw_key : dict
        Run name to the raw metric key the curve was read from (None for token curves).
    note : dict
        Run name to what was left out of a logged curve (values beyond any sane range), or
        None.
    skipped : list of str
        Why runs were left out.
    """

    curve: pd.DataFrame
    raw_key: dict = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    note: dict = field(default_factory=dict)

    def of(self, run: str) -> pd.DataFrame:
        """The curve of ``run`` as :func:`policy_entropy` returns it."""
        frame = self.curve[self.curve["run"] == run].drop(columns="run").reset_index(drop=True)
        frame.attrs = {"raw_key": self.raw_key.get(run), "note": self.note.get(run)}
        return frame

    def to_dict(self) -> dict:
        from ..base.jsonable import records as _records

        return {"curve": _records(self.curve), "raw_key": dict(self.raw_key),
                "note": dict(self.note), "skipped": list(self.skipped)}


class PolicyEntropyAnalysis(Analysis):
    """The policy-entropy curve: the shared input of phases, the saturation fit and compare
    (they name it in ``requires``, so the report computes it once per run)."""

    name = "policy_entropy"
    title = "Policy entropy"
    in_report = False
    order = 5

    def plan(self, store: Store, run: str, inputs) -> Plan:
        frame = yield from policy_entropy_plan(store, run)
        frame.attrs["run"] = run
        return frame

    def combine(self, parts, *, skipped=(), **options) -> PolicyEntropy:
        runs = [part.attrs["run"] for part in parts]
        return PolicyEntropy(curve=_curve_records(parts, runs),
                             raw_key={run: part.attrs.get("raw_key")
                                      for run, part in zip(runs, parts)},
                             note={run: part.attrs.get("note") for run, part in zip(runs, parts)},
                             skipped=list(skipped))


@dataclass
class Performance:
    """Result of the registered ``performance`` analysis.

    Attributes
    ----------
    curve : pandas.DataFrame
        ``run, step, value, metric`` (see :func:`performance`).
    metric, raw_key, scaled, note : dict
        Run name to the metric chosen, its raw key, whether percentages were divided by 100
        and a sentence saying what was chosen or changed (None when nothing was).
    skipped : list of str
    """

    curve: pd.DataFrame
    metric: dict = field(default_factory=dict)
    raw_key: dict = field(default_factory=dict)
    scaled: dict = field(default_factory=dict)
    note: dict = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def of(self, run: str) -> pd.DataFrame:
        """The curve of ``run`` as :func:`performance` returns it (``attrs`` included)."""
        frame = self.curve[self.curve["run"] == run].drop(columns="run").reset_index(drop=True)
        frame.attrs = {"metric": self.metric.get(run), "raw_key": self.raw_key.get(run),
                       "scaled": self.scaled.get(run, False), "note": self.note.get(run)}
        return frame

    def to_dict(self) -> dict:
        from ..base.jsonable import records as _records

        return {"curve": _records(self.curve), "metric": dict(self.metric),
                "raw_key": dict(self.raw_key), "scaled": dict(self.scaled),
                "note": dict(self.note), "skipped": list(self.skipped)}


class PerformanceAnalysis(Analysis):
    """The performance curve (validation accuracy, else mean reward, or ``reward=``)."""

    name = "performance"
    title = "Performance"
    in_report = False
    order = 6

    def plan(self, store: Store, run: str, inputs, *, reward: str | None = None) -> Plan:
        frame = performance_curve(store, run, reward)
        frame.attrs["run"] = run
        return frame
        yield  # a plan without a scan: the metrics are read directly

    def combine(self, parts, *, skipped=(), **options) -> Performance:
        runs = [part.attrs["run"] for part in parts]
        return Performance(curve=_curve_records(parts, runs),
                           **{key: {run: part.attrs.get(key) for run, part in zip(runs, parts)}
                              for key in ("metric", "raw_key", "scaled", "note")},
                           skipped=list(skipped))


register(PolicyEntropyAnalysis())
register(PerformanceAnalysis())
