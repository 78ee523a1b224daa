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
from ..analysis.registry import FigureSpec
from ..store import real_folder, write_file_atomic
from .collect import Results

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


def figure_file(spec: FigureSpec, slug: str) -> FigureFile:
    """Draw an analysis' :class:`~entropylens.analysis.registry.FigureSpec` of one run; its
    id (HTML id and file name) is ``<kind>-<run slug>``."""
    fid = f"{spec.kind}-{slug}"
    return FigureFile(fid, spec.title, spec.caption, f"figures/{fid}.png",
                      draw(spec.draw, figsize=spec.figsize, ncols=spec.ncols))


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
