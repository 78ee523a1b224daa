"""Runs side by side: one table and one set of curves for every run of a store.

The table's row for a run gathers the entropy curve's ends, the collapse phases
(:mod:`~entropylens.analysis.phases`) and the saturation-law fit
(:mod:`~entropylens.analysis.saturation`). A run that lacks what one of them needs keeps the
others and says why in ``note``; it is never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pandas as pd

from ..engine import Plan
from ..errors import EntropylensError
from ..store import Store
from .curves import open_store, performance_curve
from .phases import analyse_curve
from .saturation import BOOTSTRAP, fit_curves
from .registry import Analysis, register, run_analysis
from ..base.jsonable import records as _records

TABLE_COLUMNS = ["run", "steps", "first_step", "last_step", "entropy_source", "first_entropy",
                 "last_entropy", "floor", "drop", "early_drop_fraction", "arrival_step",
                 "collapse_start", "collapse_end", "alarm", "performance_metric",
                 "first_performance", "final_performance", "ceiling", "r2", "fit_n", "note"]
CURVE_COLUMNS = ["run", "step", "metric", "value"]


@dataclass
class Comparison:
    """Result of :func:`compare`.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per run: ``run, steps, first_step, last_step, entropy_source, first_entropy,
        last_entropy, floor, drop`` (first entropy minus floor), ``early_drop_fraction,
        arrival_step, collapse_start, collapse_end`` (the largest rapid-collapse segment),
        ``alarm, performance_metric, first_performance, final_performance, ceiling, r2,
        fit_n, note``.
    curves : pandas.DataFrame
        Long ``run, step, metric, value``: ``policy_entropy`` and the run's performance
        metric (``val_accuracy`` or ``reward_mean``), plus ``reward_mean`` when validation
        accuracy is the performance metric.
    """

    table: pd.DataFrame
    curves: pd.DataFrame

    def to_dict(self) -> dict:
        """The JSON of ``entropylens compare --json``."""
        return {"runs": _records(self.table), "curves": _records(self.curves)}


def _curve_rows(run: str, frame: pd.DataFrame, metric: str, column: str) -> pd.DataFrame:
    return pd.DataFrame({"run": run, "step": frame["step"].astype("int64").to_numpy(),
                         "metric": metric, "value": frame[column].astype(float).to_numpy()})


def compare(store: Store | str, runs: str | Sequence[str] | None = None, *,
            reward: str | None = None, bootstrap: int = BOOTSTRAP, engine: str = "local",
            workers: int | None = None, **engine_options) -> Comparison:
    """Compare runs: entropy curve ends, phases, saturation fits and curves.

    Parameters
    ----------
    store : Store or path
    runs : str or sequence of str, optional
        Default: every run.
    reward : str, optional
        Performance metric for the fit and the curves (default: ``val_accuracy``, else
        ``reward_mean``).
    bootstrap : int
        Bootstrap resamples of the fits (their intervals are not in the table; 0 is
        fastest).
    engine : {"local", "ray"}
    workers : int, optional
        Worker processes of the local engine (1: none).

    Returns
    -------
    Comparison
    """
    return run_analysis("compare", open_store(store), runs, engine=engine, workers=workers,
                        reward=reward, bootstrap=bootstrap, **engine_options)


def _value_or_note(outcome, run: str, notes: list[str]):
    """The run's curve of a required analysis, or None with its reason added to ``notes``."""
    if outcome.ok:
        return outcome.value.of(run)
    notes.append(outcome.reason)
    return None


def compare_plan(store: Store, run: str, inputs, *, reward: str | None = None,
                 bootstrap: int = BOOTSTRAP) -> Plan:
    """One run's ``(table row, curve frames)`` of :func:`compare`, as a plan; the curves
    come in ``inputs`` (the ``policy_entropy`` and ``performance`` outcomes)."""
    row: dict = {"run": run}
    notes: list[str] = []
    curves: list[pd.DataFrame] = []
    entropy = _value_or_note(inputs["policy_entropy"], run, notes)
    if reward is None:
        perf = _value_or_note(inputs["performance"], run, notes)
    else:
        try:
            perf = performance_curve(store, run, reward)
        except EntropylensError as exc:
            perf = None
            notes.append(exc.message)
    if entropy is not None:
        curves.append(_curve_rows(run, entropy, "policy_entropy", "entropy"))
        phases = analyse_curve(entropy["step"], entropy["entropy"], perf=perf, run=run,
                               source=str(entropy["source"].iloc[0]))
        collapse = phases.collapse or {}
        row.update(steps=len(entropy), first_step=int(entropy["step"].iloc[0]),
                   last_step=int(entropy["step"].iloc[-1]),
                   entropy_source=str(entropy["source"].iloc[0]),
                   first_entropy=float(entropy["entropy"].iloc[0]),
                   last_entropy=float(entropy["entropy"].iloc[-1]), floor=phases.floor,
                   drop=phases.total_drop, early_drop_fraction=phases.early_drop_fraction,
                   arrival_step=phases.arrival_step,
                   collapse_start=collapse.get("start_step"),
                   collapse_end=collapse.get("end_step"), alarm=phases.alarm)
    if perf is not None:
        metric = perf.attrs["metric"]
        curves.append(_curve_rows(run, perf, metric, "value"))
        if metric == "val_accuracy" and reward is None:
            try:
                train = performance_curve(store, run, "reward_mean")
                curves.append(_curve_rows(run, train, "reward_mean", "value"))
            except EntropylensError:
                pass
        row.update(performance_metric=metric,
                   first_performance=float(perf["value"].iloc[0]),
                   final_performance=float(perf["value"].iloc[-1]))
    if entropy is not None and perf is not None:
        try:
            fit = fit_curves(entropy, perf, run=run, bootstrap=bootstrap)
            row.update(ceiling=fit.ceiling, r2=fit.r2, fit_n=fit.n)
        except EntropylensError as exc:
            notes.append(f"no fit: {exc.message}")
    row["note"] = "; ".join(notes) or None
    return row, curves
    yield  # no scan of its own: the curves are its inputs


def compare_from_parts(parts: Sequence[tuple]) -> Comparison:
    """The :class:`Comparison` of runs from the results of their :func:`compare_plan`."""
    table = pd.DataFrame([row for row, _ in parts]).reindex(columns=TABLE_COLUMNS)
    for column in ("steps", "first_step", "last_step", "arrival_step", "collapse_start",
                   "collapse_end", "fit_n"):
        table[column] = table[column].astype("Int64")
    curves = [frame for _, frames in parts for frame in frames]
    curves_frame = pd.concat(curves, ignore_index=True) if curves else \
        pd.DataFrame(columns=CURVE_COLUMNS)
    return Comparison(table=table, curves=curves_frame[CURVE_COLUMNS])


class CompareAnalysis(Analysis):
    """Registered form of :func:`compare`: one part per run, combined across runs. The
    report shows it once for all its runs (not as a per-run section)."""

    name = "compare"
    title = "Runs compared"
    requires = ("policy_entropy", "performance")
    in_report = False
    order = 90

    def plan(self, store: Store, run: str, inputs, *, reward: str | None = None,
             bootstrap: int = BOOTSTRAP) -> Plan:
        return compare_plan(store, run, inputs, reward=reward, bootstrap=bootstrap)

    def combine(self, parts, *, skipped=(), **options) -> Comparison:
        return compare_from_parts(parts)


register(CompareAnalysis())
