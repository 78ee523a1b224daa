"""Diversity across a prompt's samples: pass@k curves and per-step diversity by split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns

from ._style import ENTROPY_COLOR, get_ax, legend_below, one_run, require_columns


def pass_at_k_curves(data: pd.DataFrame, *, run: str | None = None, split: str = "train",
                     metric: str = "pass_at_k", ax=None):
    """pass@k against k (log axis), one line per checkpoint, coloured from early to late.

    Parameters
    ----------
    data : pandas.DataFrame
        ``Diversity.pass_at_k``: ``run, step, split, k, pass_at_k, best_at_k``.
    run : str, optional
        Keep only this run's rows.
    split : str
        Which split's checkpoints to draw (rows without a step are one extra, black line).
    metric : {"pass_at_k", "best_at_k"}
    ax : matplotlib.axes.Axes, optional

    Returns
    -------
    matplotlib.axes.Axes
    """
    data = one_run(data, run, "pass_at_k_curves")
    require_columns(data, ["step", "split", "k", metric], "pass_at_k_curves")
    data = data[data["split"] == split]
    ax = get_ax(ax)
    steps = sorted(data["step"].dropna().unique())
    palette = sns.color_palette("rocket_r", max(len(steps), 1))
    for color, step in zip(palette, steps):
        rows = data[data["step"] == step].sort_values("k")
        ax.plot(rows["k"].to_numpy(float), rows[metric].to_numpy(float), color=color, lw=1.0,
                marker="o", ms=2, alpha=0.85, gid=f"step:{int(step)}")
    unstepped = data[data["step"].isna()].sort_values("k")
    if len(unstepped):
        ax.plot(unstepped["k"].to_numpy(float), unstepped[metric].to_numpy(float),
                color="black", lw=1.6, ls="--", marker="o", ms=3, label=f"{split} (no step)")
    ax.set_xscale("log", base=2)
    ks = sorted(data["k"].unique())
    ax.set_xticks(ks, [str(int(k)) for k in ks])
    ax.set_xlabel("k")
    ax.set_ylabel(metric.replace("_at_", "@"))
    ax.set_ylim(-0.02, 1.02 if metric == "pass_at_k" else None)
    if steps:
        import matplotlib as mpl

        norm = mpl.colors.Normalize(vmin=float(steps[0]), vmax=float(max(steps[-1],
                                                                         steps[0] + 1)))
        mappable = mpl.cm.ScalarMappable(norm=norm,
                                         cmap=mpl.colors.ListedColormap(palette))
        ax.figure.colorbar(mappable, ax=ax, label="step", pad=0.01)
    legend_below(ax)
    return ax


def diversity_steps(data: pd.DataFrame, *, y: str = "distinct_answers_mean",
                    run: str | None = None, entropy: bool = False, ax=None):
    """One diversity column of ``Diversity.steps`` against the step, one line per split.

    Parameters
    ----------
    data : pandas.DataFrame
        ``Diversity.steps``: ``run, step, split`` and ``y`` (and ``entropy``).
    y : str
        The column to draw (``distinct_answers_mean``, ``zero_variance_share``,
        ``correctness_variance_mean``, ...).
    run : str, optional
    entropy : bool
        Also draw the step's training policy entropy on a second y axis.
    ax : matplotlib.axes.Axes, optional

    Returns
    -------
    matplotlib.axes.Axes
        Rows without a step (an evaluation outside training) are dashed horizontal lines.
    """
    data = one_run(data, run, "diversity_steps")
    require_columns(data, ["step", "split", y], "diversity_steps")
    ax = get_ax(ax)
    splits = list(pd.unique(data["split"]))
    palette = dict(zip(splits, sns.color_palette("colorblind", max(len(splits), 1))))
    for split in splits:
        rows = data[data["split"] == split]
        stepped = rows.dropna(subset=["step"]).sort_values("step")
        if len(stepped):
            ax.plot(stepped["step"].to_numpy(float), stepped[y].to_numpy(float, na_value=np.nan),
                    color=palette[split], lw=1.3, marker="o", ms=2.5, label=str(split),
                    gid=f"split:{split}")
        for value in rows.loc[rows["step"].isna(), y].dropna():
            ax.axhline(float(value), color=palette[split], lw=1.3, ls="--",
                       label=f"{split} (no step)")
    ax.set_xlabel("step")
    ax.set_ylabel(y.replace("_", " "))
    handles, _ = ax.get_legend_handles_labels()
    if entropy and "entropy" in data.columns and data["entropy"].notna().any():
        twin = ax.twinx()
        curve = data.dropna(subset=["step", "entropy"]).drop_duplicates("step").sort_values(
            "step")
        (line,) = twin.plot(curve["step"].to_numpy(float), curve["entropy"].to_numpy(float),
                            color=ENTROPY_COLOR, lw=1.0, ls=":", label="training entropy")
        twin.set_ylabel("policy entropy (nats)")
        twin.grid(False)
        handles.append(line)
    legend_below(ax, handles)
    return ax
