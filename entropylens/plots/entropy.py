"""Figures of the per-step entropy: the policy-entropy curve and the quantile fan."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from ._style import (ENTROPY_COLOR, PERFORMANCE_COLOR, get_ax, legend_below, one_run,
                     phase_color, phase_name, require_columns)

_QUANTILE = re.compile(r"^p(\d+(?:\.\d+)?)$")


def entropy_curve(data: pd.DataFrame, *, phases: pd.DataFrame | None = None,
                  performance: pd.DataFrame | None = None, arrival_step: float | None = None,
                  run: str | None = None, x: str = "step", y: str = "entropy",
                  label: str | None = None, color=None, ax=None):
    """Policy entropy per step, detected phases shaded, performance on a second axis.

    Parameters
    ----------
    data : pandas.DataFrame
        The curve, e.g. the result of :func:`entropylens.policy_entropy`
        (``step, entropy, source``).
    phases : pandas.DataFrame, optional
        Segments ``start_step, end_step, label`` (a run's ``segments`` from
        :func:`entropylens.phases`); each is shaded from its start to its end step.
    performance : pandas.DataFrame, optional
        ``step, value, metric`` (:func:`entropylens.performance`), drawn on a right axis.
    arrival_step : float, optional
        Step where entropy first came within 10% of its floor; drawn as a dotted line.
    run : str, optional
        Keep only this run's rows when the frames hold a ``run`` column.
    x, y : str
        Column names of the curve.
    label : str, optional
        Legend label of the entropy line (default: the entropy source when given).
    color : colour, optional
    ax : matplotlib.axes.Axes, optional

    Returns
    -------
    matplotlib.axes.Axes
        The entropy axes; the performance axes, when drawn, is its twin (``ax.figure.axes``).
    """
    data = one_run(data, run, "entropy_curve")
    require_columns(data, [x, y], "entropy_curve")
    ax = get_ax(ax)
    data = data.sort_values(x)
    if label is None:
        sources = pd.unique(data["source"]) if "source" in data.columns else []
        label = f"policy entropy ({sources[0]})" if len(sources) == 1 else "policy entropy"
    handles = []
    if phases is not None and len(phases):
        phases = one_run(phases, run, "entropy_curve phases")
        require_columns(phases, ["start_step", "end_step", "label"], "entropy_curve phases")
        seen = set()
        for segment in phases.itertuples(index=False):
            span = ax.axvspan(float(segment.start_step), float(segment.end_step),
                              color=phase_color(segment.label), alpha=0.22, lw=0,
                              gid=f"phase:{segment.label}")
            if segment.label not in seen:
                seen.add(segment.label)
                span.set_label(phase_name(segment.label))
                handles.append(span)
    line, = ax.plot(data[x].to_numpy(dtype=float), data[y].to_numpy(dtype=float),
                    color=color or ENTROPY_COLOR, lw=1.8, marker="o", ms=2.5, label=label,
                    gid="entropy")
    handles.insert(0, line)
    if arrival_step is not None and np.isfinite(arrival_step):
        handles.append(ax.axvline(float(arrival_step), color="black", ls=":", lw=1.2,
                                  label=f"within 10% of floor (step {arrival_step:g})",
                                  gid="arrival"))
    ax.set_xlabel(x)
    ax.set_ylabel("entropy (nats)")
    ax.set_ylim(bottom=0)
    if performance is not None and len(performance):
        performance = one_run(performance, run, "entropy_curve performance")
        require_columns(performance, ["step", "value"], "entropy_curve performance")
        performance = performance.sort_values("step")
        metric = (str(performance["metric"].iloc[0]) if "metric" in performance.columns
                  else "performance")
        twin = ax.twinx()
        twin.grid(False)
        perf, = twin.plot(performance["step"].to_numpy(dtype=float),
                          performance["value"].to_numpy(dtype=float), color=PERFORMANCE_COLOR,
                          lw=1.4, marker="s", ms=3, label=metric, gid="performance")
        twin.set_ylabel(metric, color=PERFORMANCE_COLOR)
        twin.tick_params(axis="y", colors=PERFORMANCE_COLOR)
        handles.append(perf)
    legend_below(ax, handles)
    return ax


def quantile_columns(data: pd.DataFrame) -> list[tuple[float, str]]:
    """``(quantile, column)`` of every ``pNN`` column, sorted by quantile."""
    found = []
    for column in data.columns:
        match = _QUANTILE.match(str(column))
        if match:
            found.append((float(match.group(1)) / 100.0, str(column)))
    return sorted(found)


def quantile_fan(data: pd.DataFrame, *, run: str | None = None,
                 mean: str | None = "entropy_token_mean", log: bool = True,
                 floor: float = 1e-4, color=None, ax=None):
    """Per-step entropy quantiles as nested bands around the median.

    Parameters
    ----------
    data : pandas.DataFrame
        Per-step quantiles: ``step`` and ``pNN`` columns (``Distribution.steps`` or
        ``Summary.steps``). Symmetric quantiles pair into bands (p10-p90, p25-p75, ...);
        ``p50`` is the median line and the highest unpaired upper quantile (e.g. ``p99``)
        a dotted line.
    run : str, optional
        Keep only this run's rows.
    mean : str or None
        Column drawn as a dashed line (skipped when absent).
    log : bool
        Logarithmic entropy axis; values below ``floor`` are drawn at ``floor`` because
        near-deterministic tokens have entropies down to 0.
    floor : float
    color : colour, optional
    ax : matplotlib.axes.Axes, optional

    Returns
    -------
    matplotlib.axes.Axes
    """
    data = one_run(data, run, "quantile_fan")
    require_columns(data, ["step"], "quantile_fan")
    quantiles = quantile_columns(data)
    if not quantiles:
        raise ValueError("quantile_fan needs pNN quantile columns")
    ax = get_ax(ax)
    data = data.sort_values("step")
    steps = data["step"].to_numpy(dtype=float)
    inference = bool(len(steps)) and bool(np.isnan(steps).all())
    if inference:
        # an inference-only run has one "step" without a number: drawn at 0, labelled so
        steps = np.zeros(len(steps))
    if len(np.unique(steps[~np.isnan(steps)])) == 1:
        # one step only: the bands would have no width, so each spans the step +-0.4
        data = pd.concat([data.iloc[:1], data.iloc[:1]], ignore_index=True)
        steps = np.array([steps[0] - 0.4, steps[0] + 0.4])
    color = color or ENTROPY_COLOR

    def values(column):
        v = data[column].to_numpy(dtype=float)
        return np.maximum(v, floor) if log else v

    by_q = dict(quantiles)
    lower = [(q, c) for q, c in quantiles if q < 0.5 - 1e-9]
    pairs = [(c, by_q[round(1 - q, 9)]) for q, c in lower if round(1 - q, 9) in by_q]
    paired = {c for pair in pairs for c in pair}
    for i, (lo, hi) in enumerate(pairs):
        ax.fill_between(steps, values(lo), values(hi), color=color,
                        alpha=0.18 + 0.45 * (i + 1) / (len(pairs) + 1), lw=0,
                        label=f"{lo}–{hi}", gid=f"band:{lo}-{hi}")
    median = [c for q, c in quantiles if abs(q - 0.5) < 1e-9]
    if median:
        ax.plot(steps, values(median[0]), color="black", lw=1.5, label="median",
                gid=f"line:{median[0]}")
    if mean and mean in data.columns:
        ax.plot(steps, values(mean), color="#d62728", lw=1.2, ls="--", label="mean",
                gid=f"line:{mean}")
    upper = [c for q, c in quantiles if q > 0.5 + 1e-9 and c not in paired]
    if upper:
        # the highest unpaired quantile shows how far the forking tail reaches
        ax.plot(steps, values(upper[-1]), color=color, lw=1.0, ls=":", label=upper[-1],
                gid=f"line:{upper[-1]}")
    if log:
        ax.set_yscale("log")
    if inference:
        ax.set_xticks([0.0], ["inference (no training step)"])
        ax.set_xlabel("")
    else:
        ax.set_xlabel("step")
    ax.set_ylabel("token entropy (nats)" + (", log scale" if log else ""))
    legend_below(ax, ncol=5)
    return ax
