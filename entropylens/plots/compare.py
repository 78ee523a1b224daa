"""Several runs overlaid on one axes."""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from ._style import get_ax, require_columns, run_colors


def run_overlay(data: pd.DataFrame, *, metric: str, runs: Sequence[str] | None = None,
                log: bool = False, ax=None):
    """One line per run of one metric over steps.

    Parameters
    ----------
    data : pandas.DataFrame
        Long curves ``run, step, metric, value`` (``Comparison.curves``).
    metric : str
        The metric to draw (e.g. ``policy_entropy``).
    runs : sequence of str, optional
        Runs in legend order (default: order of appearance); also fixes the colours.
    log : bool
        Logarithmic y axis.
    ax : matplotlib.axes.Axes, optional

    Returns
    -------
    matplotlib.axes.Axes
    """
    require_columns(data, ["run", "step", "metric", "value"], "run_overlay")
    rows = data[data["metric"] == metric]
    runs = list(runs) if runs is not None else list(pd.unique(data["run"]))
    colors = run_colors(runs)
    ax = get_ax(ax)
    for run in runs:
        curve = rows[rows["run"] == run].dropna(subset=["value"]).sort_values("step")
        if not len(curve):
            continue
        ax.plot(curve["step"].to_numpy(dtype=float), curve["value"].to_numpy(dtype=float),
                color=colors[run], lw=1.6, marker="o", ms=2.5, label=str(run), gid=f"run:{run}")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    if ax.lines:
        ax.legend(title="run", loc="best", fontsize="small", framealpha=0.85)
    return ax
