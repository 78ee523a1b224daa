"""Forking tokens: the tokens most often among the highest-entropy ones."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..base.pieces import token_label
from ._style import ENTROPY_COLOR, get_ax, one_run, require_columns


def forking_tokens_bar(data: pd.DataFrame, *, run: str | None = None, top_n: int = 20,
                       value: str = "forking_count", color=None, ax=None):
    """Horizontal bars of the tokens most often forking, in the order of the data.

    Parameters
    ----------
    data : pandas.DataFrame
        ``Forking.top_tokens``: ``run, token, count, forking_count, forking_rate``.
    run : str, optional
        Keep only this run's rows.
    top_n : int
        Draw the first ``top_n`` rows (the analysis sorts them).
    value : str
        Bar length column: ``forking_count`` (default), ``forking_rate`` or ``count``.
    color : colour, optional
    ax : matplotlib.axes.Axes, optional

    Returns
    -------
    matplotlib.axes.Axes
        Bars from top to bottom in data order; y tick labels are the tokens as text
        (``␣`` marks a space, ``↵`` a newline).
    """
    data = one_run(data, run, "forking_tokens_bar")
    require_columns(data, ["token", value], "forking_tokens_bar")
    data = data.head(top_n)
    ax = get_ax(ax, figsize=(6.0, 0.22 * max(len(data), 4) + 1.0))
    positions = np.arange(len(data))
    ax.barh(positions, data[value].to_numpy(dtype=float), color=color or ENTROPY_COLOR,
            gid="bars")
    ax.set_yticks(positions, [token_label(t) for t in data["token"]], fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel({"forking_count": "times among the forking tokens",
                   "forking_rate": "share of its occurrences that fork",
                   "count": "occurrences"}.get(value, value))
    ax.grid(axis="y", visible=False)
    return ax
