"""Planning vs execution tokens (arXiv 2509.03646, HICRA)."""

from __future__ import annotations

import pandas as pd

from ._style import get_ax, legend_below, one_run, require_columns

ROLE_COLORS = {"planning": "#9467bd", "execution": "#8c564b"}
SEMANTIC_COLOR = "#e377c2"


def planning_execution(data: pd.DataFrame, *, run: str | None = None, y: str = "mean_entropy",
                       semantic: pd.DataFrame | None = None, phases: pd.DataFrame | None = None,
                       ax=None):
    """One line per token class over steps; semantic entropy on a second axis.

    Parameters
    ----------
    data : pandas.DataFrame
        ``Roles.steps``: ``run, step, cls, tokens, mean_entropy, perplexity,
        relative_perplexity``.
    run : str, optional
        Keep only this run's rows.
    y : str
        Column drawn per class (``mean_entropy`` or ``relative_perplexity``).
    semantic : pandas.DataFrame, optional
        ``Roles.semantic`` (``step, semantic_entropy``), drawn dashed on a right axis.
    phases : pandas.DataFrame, optional
        Detected role phases ``name, start_step, end_step``, shaded.
    ax : matplotlib.axes.Axes, optional

    Returns
    -------
    matplotlib.axes.Axes
    """
    data = one_run(data, run, "planning_execution")
    require_columns(data, ["step", "cls", y], "planning_execution")
    ax = get_ax(ax)
    handles = []
    if phases is not None and len(phases):
        phases = one_run(phases, run, "planning_execution phases")
        require_columns(phases, ["name", "start_step", "end_step"], "planning_execution phases")
        for i, phase in enumerate(phases.itertuples(index=False)):
            handles.append(ax.axvspan(float(phase.start_step), float(phase.end_step),
                                      color=["#c6dbef", "#fdd0a2", "#c7e9c0"][i % 3],
                                      alpha=0.35, lw=0, label=str(phase.name),
                                      gid=f"phase:{phase.name}"))
    for cls, rows in data.groupby("cls", sort=True):
        rows = rows.sort_values("step")
        line, = ax.plot(rows["step"].to_numpy(dtype=float), rows[y].to_numpy(dtype=float),
                        color=ROLE_COLORS.get(str(cls)), lw=1.6, marker="o", ms=2.5,
                        label=f"{cls} tokens", gid=f"cls:{cls}")
        handles.append(line)
    ax.set_xlabel("step")
    ax.set_ylabel({"mean_entropy": "mean token entropy (nats)",
                   "relative_perplexity": "relative perplexity"}.get(y, y))
    if semantic is not None and len(semantic):
        semantic = one_run(semantic, run, "planning_execution semantic")
        require_columns(semantic, ["step", "semantic_entropy"], "planning_execution semantic")
        semantic = semantic.sort_values("step")
        twin = ax.twinx()
        twin.grid(False)
        line, = twin.plot(semantic["step"].to_numpy(dtype=float),
                          semantic["semantic_entropy"].to_numpy(dtype=float),
                          color=SEMANTIC_COLOR, ls="--", lw=1.3,
                          label="semantic entropy of strategic grams", gid="semantic")
        twin.set_ylabel("semantic entropy (nats)", color=SEMANTIC_COLOR)
        twin.tick_params(axis="y", colors=SEMANTIC_COLOR)
        handles.append(line)
    legend_below(ax, handles)
    return ax
