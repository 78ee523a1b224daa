"""Covariance of log-probability and advantage by covariance group (arXiv 2505.22617)."""

from __future__ import annotations

import pandas as pd
import seaborn as sns

from ._style import get_ax, one_run, require_columns


def covariance_groups(data: pd.DataFrame, *, run: str | None = None, ax=None):
    """Mean token covariance per step, one line per covariance group.

    Parameters
    ----------
    data : pandas.DataFrame
        ``Covariance.groups``: ``run, step, group, tokens, mean_cov``; groups are drawn in
        the order they first appear (the analysis orders them from the top 0.02% to all).
    run : str, optional
        Keep only this run's rows.
    ax : matplotlib.axes.Axes, optional

    Returns
    -------
    matplotlib.axes.Axes
        The y axis is symmetric-log because the top groups are orders of magnitude above
        the mean and covariances can be negative.
    """
    data = one_run(data, run, "covariance_groups")
    require_columns(data, ["step", "group", "mean_cov"], "covariance_groups")
    ax = get_ax(ax)
    groups = list(pd.unique(data["group"]))
    palette = sns.color_palette("rocket", max(len(groups), 1))
    for color, group in zip(palette, groups):
        rows = data[data["group"] == group].sort_values("step")
        ax.plot(rows["step"].to_numpy(dtype=float), rows["mean_cov"].to_numpy(dtype=float),
                color=color, lw=1.4, marker="o", ms=2, label=str(group), gid=f"group:{group}")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("mean Cov(log π, A)")
    ax.legend(title="covariance group", loc="center left", bbox_to_anchor=(1.01, 0.5),
              fontsize="small", frameon=False)
    return ax
