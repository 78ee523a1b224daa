"""Sampling noise of a curve, and changes judged beyond it.

A validation accuracy measured on ``n`` prompts is a binomial proportion: its standard error
is ``sqrt(p (1 - p) / n)`` (0.0625 at p = 0.5 with 64 prompts), so a last stretch that moves by
0.007 says nothing either way. Every claim the diagnosis makes about performance (a rise, a
fall, a plateau) goes through :func:`judge`, which needs the change *and* its standard error.

Noise of one observation
------------------------
- **binomial**: when the number of validation prompts ``n`` is known (the logs carry it, or
  the user gives ``--val-size N``), the standard error of each point ``p_i`` is
  ``sqrt(p_i' (1 - p_i') / n)`` with ``p_i'`` clipped to ``[0.5/n, 1 - 0.5/n]`` (a score of 0
  or 1 on ``n`` prompts is not exact: the clip keeps its error above zero).
- **residual**: otherwise the scatter of the curve around its own trend,
  :func:`residual_scatter`: the larger of the median absolute step-to-step difference
  / (0.6745 * sqrt 2) (white noise) and the scaled median absolute deviation around a running
  median of ``max(5, n/10)`` points (slow wander that the first misses).

Judging a change
----------------
A change with estimate ``d`` and standard error ``se`` is

- ``flat`` when the whole interval ``d ± Z se`` lies within ``± margin`` (an equivalence
  test: flat is claimed only when the data rule out a change larger than ``margin``; a
  change that is real but smaller than that is still flat in practice);
- else ``rise`` when ``d - Z se > 0`` and ``fall`` when ``d + Z se < 0`` (``Z`` = 2: about
  95% two-sided);
- ``inconclusive`` otherwise: the noise is too large to tell.

Two changes are measured: the **level change** (mean of the last ``k`` points minus mean of
the first ``k``, ``k = max(3, ceil(m/10))``) and the **recent trend** (the gain of a
least-squares line over the last ``max(4, ceil(m/4))`` points, from its first to its last
step; its standard error follows from the per-point errors, ``Var(slope) = sum(w_i^2
sigma_i^2)`` with ``w_i = (x_i - mean x) / Sxx``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

#: Standard errors a change must clear to be claimed (about 95% two-sided).
Z = 2.0
#: A recent trend is flat when it provably moves less than this share of the metric's range
#: over its window (5 points of accuracy on a 0-1 scale).
PLATEAU_MARGIN = 0.05
#: Share of a curve's points (at least MIN_RECENT) that make its recent window.
RECENT_SHARE = 0.25
#: A line through fewer points than this has too little left to judge its trend by.
MIN_RECENT = 4
#: Share of a curve's points (at least MIN_LEVEL) averaged for its start and end levels.
LEVEL_SHARE = 0.1
MIN_LEVEL = 3
#: Keys of a validation set's size in a run's config (``config.json`` beside its logs).
VAL_SIZE_KEYS = ("val_size", "val_n", "n_val", "val_prompts", "num_val_prompts")


@dataclass
class Change:
    """A change of a curve with its standard error and the judgement beyond noise.

    Attributes
    ----------
    estimate : float
        The change (end minus start).
    se : float
        Its standard error.
    verdict : {"rise", "fall", "flat", "inconclusive"}
    start_step, end_step : int
        The steps it is measured between.
    """

    estimate: float
    se: float
    verdict: str
    start_step: int
    end_step: int

    def to_dict(self) -> dict:
        return {"estimate": _num(self.estimate), "se": _num(self.se), "verdict": self.verdict,
                "start_step": self.start_step, "end_step": self.end_step}


@dataclass
class Noise:
    """How noisy one observation of a curve is, and where that figure comes from.

    Attributes
    ----------
    kind : {"binomial", "residual"}
    sigma : float
        Typical standard error of one point (binomial: at the curve's mean).
    points : numpy.ndarray
        Standard error of each point.
    n : int or None
        Validation prompts (binomial only).
    """

    kind: str
    sigma: float
    points: np.ndarray
    n: int | None = None

    def describe(self) -> str:
        """``binomial SE 0.062 (64 validation prompts)`` or ``residual scatter 0.031``."""
        if self.kind == "binomial":
            return f"binomial SE {self.sigma:.3g} ({self.n} validation prompts)"
        return f"residual scatter {self.sigma:.3g} (no validation size known)"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "sigma": _num(self.sigma), "n": self.n}


def _num(value) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def binomial_se(p, n: int) -> np.ndarray | float:
    """Standard error of proportion(s) ``p`` measured on ``n`` items (clipped, see above)."""
    if n < 1:
        raise ValueError(f"binomial_se: n must be at least 1, got {n}")
    clipped = np.clip(np.asarray(p, dtype=float), 0.5 / n, 1 - 0.5 / n)
    se = np.sqrt(clipped * (1 - clipped) / n)
    return float(se) if np.ndim(se) == 0 else se


def residual_scatter(values) -> float:
    """Robust scatter of a curve around its own trend (see the module docstring); 0 for a
    constant curve or fewer than two points."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n < 2 or float(np.ptp(values)) == 0:
        return 0.0
    by_difference = np.median(np.abs(np.diff(values))) / (0.6745 * math.sqrt(2))
    window = max(5, (n // 10) | 1)
    smooth = pd.Series(values).rolling(window, center=True, min_periods=1).median().to_numpy()
    residual = values - smooth
    by_residual = 1.4826 * np.median(np.abs(residual - np.median(residual)))
    return float(max(by_difference, by_residual))


def curve_noise(values, val_size: int | None = None) -> Noise:
    """The noise of each point of a performance curve: binomial with ``val_size`` prompts,
    else the curve's residual scatter."""
    values = np.asarray(values, dtype=float)
    if val_size:
        return Noise("binomial", binomial_se(float(values.mean()), val_size),
                     np.atleast_1d(binomial_se(values, val_size)), int(val_size))
    sigma = residual_scatter(values)
    return Noise("residual", sigma, np.full(len(values), sigma))


def metric_range(values, metric: str | None = None) -> float:
    """The range a metric can move over: 1 for a fraction (every value in [0, 1]), else the
    range it covered in the run."""
    values = np.asarray(values, dtype=float)
    if len(values) and values.min() >= 0 and values.max() <= 1:
        return 1.0
    return float(np.ptp(values)) if len(values) else 0.0


def judge(estimate: float, se: float, margin: float) -> str:
    """``rise``, ``fall``, ``flat`` or ``inconclusive`` (see the module docstring)."""
    # rounding error of a noiseless curve is no change
    tiny = 1e-9 * max(1.0, abs(margin))
    if abs(estimate) + Z * se <= margin + tiny:
        return "flat"
    if estimate - Z * se > tiny:
        return "rise"
    if estimate + Z * se < -tiny:
        return "fall"
    return "inconclusive"


def level_window(m: int) -> int:
    """Points averaged for the start and end levels of an ``m``-point curve."""
    return min(m, max(MIN_LEVEL, math.ceil(LEVEL_SHARE * m)))


def recent_window(m: int) -> int:
    """Points of the recent window of an ``m``-point curve."""
    return min(m, max(MIN_RECENT, math.ceil(RECENT_SHARE * m)))


def level_change(steps, values, noise: Noise, margin: float) -> Change:
    """End level minus start level (means of :func:`level_window` points), judged."""
    steps = np.asarray(steps)
    values = np.asarray(values, dtype=float)
    k = level_window(len(values))
    first, last = values[:k], values[-k:]
    se = math.sqrt(float((noise.points[:k] ** 2).sum() + (noise.points[-k:] ** 2).sum())) / k
    estimate = float(last.mean() - first.mean())
    return Change(estimate, se, judge(estimate, se, margin), int(steps[0]), int(steps[-1]))


def trend_change(steps, values, noise: Noise, margin: float,
                 window: int | None = None) -> Change:
    """Gain of the least-squares line over the last ``window`` points, judged.

    Parameters
    ----------
    steps, values : sequences
        The curve in step order.
    noise : Noise
        Its per-point standard errors.
    margin : float
        The largest change that still counts as flat.
    window : int, optional
        Default :func:`recent_window`.
    """
    steps = np.asarray(steps, dtype=float)
    values = np.asarray(values, dtype=float)
    k = window or recent_window(len(values))
    x, y, sigma = steps[-k:], values[-k:], noise.points[-k:]
    sxx = float(((x - x.mean()) ** 2).sum())
    if k < 2 or sxx == 0:
        return Change(0.0, math.inf, "inconclusive", int(x[0]), int(x[-1]))
    weights = (x - x.mean()) / sxx
    slope = float((weights * y).sum())
    span = float(x[-1] - x[0])
    estimate = slope * span
    se = math.sqrt(float((weights ** 2 * sigma ** 2).sum())) * span
    return Change(estimate, se, judge(estimate, se, margin), int(x[0]), int(x[-1]))
