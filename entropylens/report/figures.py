"""Draw the report's figures on pyplot-free Figures and save them as PNG.

Figures are made with :class:`matplotlib.figure.Figure` directly, so building a report never
touches pyplot's global state (no window, no figure left open in a notebook).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import seaborn as sns
from matplotlib.figure import Figure

from .. import plots
from ..store import real_folder, write_file_atomic
from .collect import Results, RunResults

DPI = 110


@dataclass
class FigureFile:
    """One figure of the report."""

    id: str
    title: str
    caption: str
    file: str          # relative to the report folder: figures/<id>.png
    png: bytes

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")

    def to_dict(self) -> dict:
        return {"id": self.id, "title": self.title, "caption": self.caption, "file": self.file}


def draw(draw_on: Callable, *, figsize=(7.5, 3.8), ncols: int = 1) -> bytes:
    """PNG bytes of a new figure on which ``draw_on(ax)`` (or ``draw_on(axes)``) draws."""
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85):
        figure = Figure(figsize=figsize, layout="constrained")
        axes = figure.subplots(1, ncols)
        draw_on(axes)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def run_figures(entry: RunResults, slug: str) -> dict[str, FigureFile]:
    """The figures of one run, keyed by kind (entropy, quantiles, fit, forking, ...)."""
    out: dict[str, FigureFile] = {}
    run = entry.run

    def add(kind, title, caption, draw_on, **kwargs):
        fid = f"{kind}-{slug}"
        out[kind] = FigureFile(fid, title, caption, f"figures/{fid}.png", draw(draw_on, **kwargs))

    curve, perf, phases = entry.part("curve"), entry.part("performance"), entry.part("phases")
    if curve.ok:
        segments = phases.value.segments if phases.ok else None
        arrival = phases.value.arrival_step if phases.ok else None
        add("entropy", f"{run}: policy entropy per step",
            "Token-mean policy entropy per step"
            + (", detected phases shaded" if segments is not None and len(segments) else "")
            + (f", {perf.value['metric'].iloc[0]} on the right axis" if perf.ok else "") + ".",
            lambda ax: plots.entropy_curve(curve.value, phases=segments,
                                           performance=perf.value if perf.ok else None,
                                           arrival_step=arrival, ax=ax))
    dist = entry.part("distribution")
    if dist.ok:
        add("quantiles", f"{run}: token-entropy quantiles per step",
            "Bands between symmetric per-step quantiles, median in black, mean dashed "
            "(log scale).",
            lambda ax: plots.quantile_fan(dist.value.steps, run=run, ax=ax))
    fit = entry.part("fit")
    if fit.ok:
        add("fit", f"{run}: saturation law",
            "Performance against policy entropy per step, the fitted law R = −a·exp(H) + b, "
            "its interval band and the predicted ceiling at H = 0.",
            lambda ax: plots.saturation_fit(fit.value, ax=ax))
    forking = entry.part("forking")
    if forking.ok and not _rows(forking.value.top_tokens, run).empty:
        n = min(20, len(_rows(forking.value.top_tokens, run)))
        add("forking", f"{run}: most frequent forking tokens",
            "How often each token is among the forking (highest-entropy) tokens.",
            lambda ax: plots.forking_tokens_bar(forking.value.top_tokens, run=run, top_n=n,
                                                ax=ax),
            figsize=(6.5, 0.24 * n + 1.2))
    roles = entry.part("roles")
    if roles.ok and not _rows(roles.value.steps, run).empty:
        semantic = getattr(roles.value, "semantic", None)
        detected = role_phases(roles.value, run)
        detected = detected[detected["detected"]] if len(detected) else detected
        add("roles", f"{run}: planning vs execution tokens",
            "Mean entropy of planning and execution tokens per step; semantic entropy of the "
            "strategic grams dashed, on the right axis"
            + ("; detected phases shaded." if len(detected) else "."),
            lambda ax: plots.planning_execution(roles.value.steps, run=run,
                                                semantic=semantic, phases=detected, ax=ax))
    cov = entry.part("covariance")
    if cov.ok:
        add("covariance", f"{run}: covariance groups",
            "Mean Cov(log π, A) per step in each covariance group (symmetric-log axis).",
            lambda ax: plots.covariance_groups(cov.value.groups, run=run, ax=ax))
    return out


def role_phases(roles, run: str):
    """The run's planning/execution phases as a table (``name, detected, start_step, ...``)."""
    import pandas as pd

    phases = getattr(roles, "phases", None) or {}
    rows = [{k: v for k, v in phase.items() if k != "evidence"}
            for phase in phases.get(run, [])]
    frame = pd.DataFrame(rows, columns=["name", "detected", "start_step", "end_step", "signal",
                                        "window", "reason"])
    frame["detected"] = frame["detected"].fillna(False).astype(bool)
    return frame


def _rows(frame, run):
    return frame[frame["run"] == run] if "run" in frame.columns else frame


def compare_figure(results: Results) -> FigureFile | None:
    """Runs overlaid: policy entropy and performance, side by side."""
    part = results.part("compare")
    if not part.ok:
        return None
    curves = part.value.curves
    metrics = list(dict.fromkeys(curves["metric"]))
    if not metrics:
        return None
    entropy = next((m for m in metrics if "entropy" in str(m)), metrics[0])
    shown = [entropy] + [m for m in metrics if m != entropy][:2]
    runs = [entry.run for entry in results.runs]

    def draw_on(axes):
        axes = axes if len(shown) > 1 else [axes]
        for ax, metric in zip(axes, shown):
            plots.run_overlay(curves, metric=metric, runs=runs, ax=ax)

    return FigureFile("compare", "Runs compared",
                      f"Each run's curves overlaid: {', '.join(shown)}.", "figures/compare.png",
                      draw(draw_on, figsize=(4.2 * len(shown) + 1, 3.6), ncols=len(shown)))


def write_figures(figures: list[FigureFile], folder: Path) -> None:
    """Write every figure to ``folder/figures/<id>.png``."""
    real_folder(folder / "figures")
    for figure in figures:
        write_file_atomic(folder / figure.file, figure.png)
