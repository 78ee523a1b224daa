"""Shared figure conventions: axes creation, colours, and input checks."""

from __future__ import annotations

from typing import Sequence

import pandas as pd
import seaborn as sns

#: Fill colour of each collapse-phase label (labels not listed get a neutral grey).
PHASE_COLORS = {
    "rapid_collapse": "#d62728",
    "slow_decline": "#ff9896",
    "plateau": "#c7c7c7",
    "rise": "#98df8a",
    "recovery": "#c5b0d5",
}
ENTROPY_COLOR = "#1f4e79"
PERFORMANCE_COLOR = "#2ca02c"


def get_ax(ax=None, *, figsize: tuple[float, float] = (7.0, 3.6)):
    """Return ``ax``, or the axes of a new figure drawn in seaborn's white-grid style."""
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt  # only here: the report draws on pyplot-free Figures

    with sns.axes_style("whitegrid"):
        _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def run_colors(runs: Sequence[str]) -> dict[str, tuple]:
    """One colour-blind-safe colour per run, stable for a given run order."""
    palette = sns.color_palette("colorblind", max(len(runs), 1))
    return {run: palette[i % len(palette)] for i, run in enumerate(runs)}


def phase_color(label: str) -> str:
    return PHASE_COLORS.get(str(label).lower().replace(" ", "_"), "#dddddd")


def phase_name(label: str) -> str:
    """A phase label as words: ``rapid_collapse`` -> ``rapid collapse``."""
    return str(label).replace("_", " ")


def require_columns(data: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """Raise ``ValueError`` naming the missing columns of ``data``."""
    missing = [c for c in columns if c not in data.columns]
    if missing:
        raise ValueError(f"{what} needs columns {', '.join(missing)} "
                         f"(has {', '.join(map(str, data.columns))})")


def one_run(data: pd.DataFrame, run: str | None, what: str) -> pd.DataFrame:
    """Rows of ``run``; with ``run=None`` the data must hold a single run (or no run column)."""
    if "run" not in data.columns:
        return data
    if run is None:
        runs = pd.unique(data["run"])
        if len(runs) > 1:
            raise ValueError(f"{what}: the data holds several runs ({', '.join(map(str, runs))});"
                             " pass run=")
        return data
    return data[data["run"] == run]


def legend_below(ax, handles=None, *, ncol: int = 3, **kwargs):
    """A legend under the axes, so it never hides data (constrained layout makes room)."""
    if handles is None:
        handles, _ = ax.get_legend_handles_labels()
    if not handles:
        return None
    return ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16),
                     ncol=min(ncol, len(handles)), fontsize="small", frameon=False, **kwargs)
