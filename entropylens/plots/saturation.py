"""The fitted saturation law R = -a·exp(H) + b (arXiv 2505.22617, Eq. 6)."""

from __future__ import annotations

import numpy as np

from ._style import ENTROPY_COLOR, get_ax, legend_below


def law_band(fit, h: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Lower and upper edge of the law over the fit's intervals of ``a`` and ``b``.

    Uses the fit's own ``band(h)`` when it has one; otherwise the envelope of
    ``-a·exp(h) + b`` over the four corners of the ``a_ci`` × ``b_ci`` box (wider than a
    joint interval, because ``a`` and ``b`` are correlated). None when no interval is known.
    """
    band = getattr(fit, "band", None)
    if callable(band):
        lower, upper = band(h)
        return np.asarray(lower, dtype=float), np.asarray(upper, dtype=float)
    a_ci, b_ci = getattr(fit, "a_ci", None), getattr(fit, "b_ci", None)
    if a_ci is None or b_ci is None or any(v is None for v in (*a_ci, *b_ci)):
        return None
    curves = np.array([-a * np.exp(h) + b for a in a_ci for b in b_ci], dtype=float)
    if not np.isfinite(curves).all():
        return None
    return curves.min(axis=0), curves.max(axis=0)


def law_label(a: float, b: float) -> str:
    """``R = −a·exp(H) + b`` with the numbers in and the signs simplified."""
    first = f"{'−' if a >= 0 else ''}{abs(a):.3g}·exp(H)"
    return f"R = {first} {'+' if b >= 0 else '−'} {abs(b):.3g}"


def _r2(value) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.2f}"


def saturation_fit(fit, *, band: bool = True, color=None, ax=None):
    """Points (H, R) by step, the fitted law, its interval band and the predicted ceiling.

    Parameters
    ----------
    fit : SaturationFit
        Result of :func:`entropylens.fit_saturation` for one run: ``data`` (``step, H, R``),
        ``a``, ``b``, ``ceiling``, ``r2``, ``a_ci``, ``b_ci``, ``x``, ``y`` and
        ``predict(h)``.
    band : bool
        Shade the law's interval band (see :func:`law_band`).
    color : colour, optional
    ax : matplotlib.axes.Axes, optional

    Returns
    -------
    matplotlib.axes.Axes
    """
    if fit.a is None or fit.b is None:
        raise ValueError(f"saturation_fit: run {fit.run!r} has no fit "
                         f"({getattr(fit, 'error', None) or 'no coefficients'})")
    ax = get_ax(ax)
    color = color or ENTROPY_COLOR
    data = fit.data.sort_values("step")
    h_points = data["H"].to_numpy(dtype=float)
    points = ax.scatter(h_points, data["R"].to_numpy(dtype=float),
                        c=data["step"].to_numpy(dtype=float), cmap="viridis", s=18, zorder=3,
                        label="steps (colour: step)", gid="points")
    ax.figure.colorbar(points, ax=ax, label="step", pad=0.01)
    h_max = float(np.nanmax(h_points)) if len(h_points) else 1.0
    grid = np.linspace(0.0, max(h_max, 1e-6) * 1.05, 200)
    if band:
        edges = law_band(fit, grid)
        if edges is not None:
            ax.fill_between(grid, edges[0], edges[1], color=color, alpha=0.15, lw=0,
                            label="interval band", gid="band")
    ax.plot(grid, np.asarray(fit.predict(grid), dtype=float), color=color, lw=1.8,
            label=f"{law_label(fit.a, fit.b)}  (R² {_r2(fit.r2)})", gid="law")
    if fit.ceiling is not None:   # None: the fit failed its quality gate (ceiling_reason)
        ax.axhline(fit.ceiling, color="#d62728", ls="--", lw=1.1, gid="ceiling",
                   label=f"fitted performance at H = 0: {fit.ceiling:.3g}")
        ax.plot([0.0], [fit.ceiling], marker="*", ms=12, color="#d62728", zorder=4)
    else:
        ax.set_title(f"no ceiling: {fit.ceiling_reason}", fontsize=8, loc="left")
    ax.set_xlabel(f"H: {fit.x}" if getattr(fit, "x", None) else "policy entropy H")
    ax.set_ylabel(f"R: {fit.y}" if getattr(fit, "y", None) else "performance R")
    ax.set_xlim(left=0)
    # frame the measured points and the ceiling; the band may run far beyond them
    ceiling = [] if fit.ceiling is None else [float(fit.ceiling)]
    shown = np.concatenate([data["R"].to_numpy(dtype=float), ceiling])
    shown = shown[np.isfinite(shown)]
    if len(shown):
        low, high = float(shown.min()), float(shown.max())
        pad = 0.12 * (high - low) if high > low else 0.05 * max(abs(high), 1.0)
        ax.set_ylim(low - pad, high + pad)
    legend_below(ax, ncol=2)
    return ax
