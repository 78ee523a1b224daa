"""Token statistics by origin (on-policy versus refinement tokens, Critique-GRPO)."""

from __future__ import annotations

import pandas as pd
import seaborn as sns

from ._style import get_ax, legend_below, one_run, require_columns


def origin_steps(data: pd.DataFrame, *, y: str = "entropy_mean", run: str | None = None,
                 ax=None):
    """One column of ``Origins.steps`` against the step, one line per origin.

    Parameters
    ----------
    data : pandas.DataFrame
        ``Origins.steps``: ``run, step, origin`` and ``y``.
    y : str
        ``entropy_mean``, ``p50``, ``forking_share``, ``covariance_mean``, ...
    run : str, optional
    ax : matplotlib.axes.Axes, optional

    Returns
    -------
    matplotlib.axes.Axes
    """
    data = one_run(data, run, "origin_steps")
    require_columns(data, ["step", "origin", y], "origin_steps")
    ax = get_ax(ax)
    origins = sorted(pd.unique(data["origin"]))
    palette = sns.color_palette("colorblind", max(len(origins), 1))
    for color, origin in zip(palette, origins):
        rows = data[data["origin"] == origin].sort_values("step")
        ax.plot(rows["step"].to_numpy(float), rows[y].to_numpy(float), color=color, lw=1.3,
                marker="o", ms=2.5, label=str(origin), gid=f"origin:{origin}")
    ax.set_xlabel("step")
    ax.set_ylabel(y.replace("_", " "))
    legend_below(ax)
    return ax
