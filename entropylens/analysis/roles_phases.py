"""The two phases of RL training that HICRA observes (arXiv 2509.03646): execution tokens
consolidate first, then the diversity of planning grams rises.

Phase rule (:func:`detect_phases`)
----------------------------------
Both phases are read off per-step series with a window of ``w`` logged steps
(default ``max(5, ceil(n / 10))`` for ``n`` steps):

**consolidation** uses the execution perplexity (the execution mean entropy when the run has
no logprobs). Smooth it with a centred running median of ``w`` points; its drop is
``D = smoothed[0] - min(smoothed)``. No consolidation is detected when ``D`` is less than
``min_drop`` (10%) of ``smoothed[0]``. Otherwise consolidation runs from the first step to the
first step ``t`` that (a) comes after the smoothed curve has covered half of ``D`` and (b)
starts a window of ``w`` steps whose Theil-Sen slope (per step, on the raw series) has an
absolute value of at most ``flat_tolerance * D / span`` (default 0.25: a quarter of the
run's average rate of descent; ``span`` is the number of steps the run covers). When no such
window exists the curve never flattens and consolidation lasts to the last step.

**exploration** uses the semantic entropy (steps with at least one gram). For every window of
``w`` consecutive such steps, a Mann-Kendall test (Kendall's tau of the values against the
step) for an increasing trend gives a one-sided p-value. Exploration starts at the first
window whose p-value is below ``alpha`` (0.05) and whose Theil-Sen slope is positive, *and*
from whose first step to the last step of the run the trend is still increasing at ``alpha``
(a sustained rise, not a blip); it ends at the last step of the unbroken chain of such
windows that follows. The sliding tests are not corrected for multiplicity; the
rest-of-run test is what guards against a lucky window.

Every phase comes with its evidence (window, slopes, tolerance, tau and p-values), and an
undetected phase says why.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..base.lazy import LazyModule
from ..errors import EntropylensError

# scipy.stats takes about a second to import: only phase detection pays for it
stats = LazyModule("scipy.stats")


def default_window(n_steps: int) -> int:
    """Window of the phase rule: ``max(5, ceil(n / 10))`` logged steps."""
    return max(5, math.ceil(n_steps / 10))


def theil_sen_slope(x: np.ndarray, y: np.ndarray) -> float:
    """Theil-Sen slope: the median of the slopes between every two points with increasing
    ``x``, as ``scipy.stats.theilslopes(y, x)[0]`` computes it (without the confidence
    interval, which sorts every slope: ten times the cost on a few hundred steps)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    deltax = x[:, np.newaxis] - x
    deltay = y[:, np.newaxis] - y
    increasing = deltax > 0
    slopes = deltay[increasing] / deltax[increasing]
    return float(np.median(slopes)) if len(slopes) else float("nan")


def _increasing_test(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Mann-Kendall test for an increasing trend: (tau, one-sided p, Theil-Sen slope)."""
    if len(y) < 3 or np.ptp(y) == 0:
        return 0.0, 1.0, 0.0
    tau, p_two = stats.kendalltau(x, y)
    if not np.isfinite(tau):
        return 0.0, 1.0, 0.0
    p_one = p_two / 2 if tau > 0 else 1 - p_two / 2
    return float(tau), float(p_one), theil_sen_slope(x, y)


def _consolidation(steps: np.ndarray, values: np.ndarray, signal: str, window: int,
                   flat_tolerance: float, min_drop: float) -> dict:
    phase = {"name": "consolidation", "detected": False, "start_step": None, "end_step": None,
             "signal": signal, "window": window, "reason": None, "evidence": {}}
    ok = np.isfinite(values)
    x, y = steps[ok].astype(np.float64), values[ok]
    if len(y) < 2 * window:
        phase["reason"] = (f"{len(y)} logged steps have an {signal}; the rule needs two "
                           f"windows ({2 * window})")
        return phase
    smooth = pd.Series(y).rolling(window, center=True, min_periods=1).median().to_numpy()
    drop = float(smooth[0] - smooth.min())
    evidence = {"initial": float(smooth[0]), "minimum": float(smooth.min()), "drop": drop,
                "relative_drop": drop / smooth[0] if smooth[0] else float("nan")}
    phase["evidence"] = evidence
    if not smooth[0] > 0 or drop < min_drop * smooth[0]:
        phase["reason"] = (f"the smoothed {signal} drops by {evidence['relative_drop']:.1%}, "
                           f"less than the {min_drop:.0%} the rule requires")
        return phase
    span = float(x[-1] - x[0]) or 1.0
    tolerance = flat_tolerance * drop / span
    half = int(np.argmax(smooth <= smooth[0] - 0.5 * drop))
    evidence.update({"tolerance": tolerance, "half_drop_step": int(x[half])})
    phase.update(detected=True, start_step=int(x[0]))
    for i in range(half, len(y) - window + 1):
        slope = theil_sen_slope(x[i:i + window], y[i:i + window])
        if abs(slope) <= tolerance:
            phase["end_step"] = int(x[i])
            evidence.update({"flat_window": [int(x[i]), int(x[i + window - 1])],
                             "flat_slope": slope})
            phase["reason"] = (f"{signal} fell by {drop:.4g} and is flat from step "
                               f"{int(x[i])} (|Theil-Sen slope| {abs(slope):.3g} <= "
                               f"{tolerance:.3g} per step over {window} steps)")
            return phase
    phase["end_step"] = int(x[-1])
    evidence["flat_window"] = None
    phase["reason"] = (f"{signal} fell by {drop:.4g} and had not flattened by the last step "
                       f"(no window of {window} steps with |slope| <= {tolerance:.3g})")
    return phase


def _exploration(steps: np.ndarray, values: np.ndarray, window: int, alpha: float) -> dict:
    phase = {"name": "exploration", "detected": False, "start_step": None, "end_step": None,
             "signal": "semantic_entropy", "window": window, "reason": None, "evidence": {}}
    ok = np.isfinite(values)
    x, y = steps[ok].astype(np.float64), values[ok]
    if len(y) < window + 1:
        phase["reason"] = (f"{len(y)} steps have strategic grams; the rule needs more than "
                           f"one window ({window})")
        return phase
    windows = []
    for i in range(len(y) - window + 1):
        tau, p, slope = _increasing_test(x[i:i + window], y[i:i + window])
        windows.append({"start_step": int(x[i]), "end_step": int(x[i + window - 1]),
                        "tau": tau, "p_value": p, "slope": slope,
                        "significant": bool(p < alpha and slope > 0)})
    phase["evidence"]["windows"] = windows
    for i, win in enumerate(windows):
        if not win["significant"]:
            continue
        tau_rest, p_rest, slope_rest = _increasing_test(x[i:], y[i:])
        if p_rest < alpha and slope_rest > 0:
            j = i
            while j + 1 < len(windows) and windows[j + 1]["significant"]:
                j += 1
            phase.update(detected=True, start_step=win["start_step"],
                         end_step=windows[j]["end_step"])
            phase["evidence"].update({"window_tau": win["tau"], "window_p": win["p_value"],
                                      "window_slope": win["slope"], "rest_tau": tau_rest,
                                      "rest_p": p_rest, "rest_slope": slope_rest})
            phase["reason"] = (f"semantic entropy rises from step {win['start_step']} "
                               f"(window tau {win['tau']:.2f}, p {win['p_value']:.3g}; to the "
                               f"end tau {tau_rest:.2f}, p {p_rest:.3g})")
            return phase
    best = min(windows, key=lambda w: w["p_value"])
    phase["reason"] = (f"no sustained rise of semantic entropy: best window "
                       f"{best['start_step']}-{best['end_step']} has tau {best['tau']:.2f}, "
                       f"p {best['p_value']:.3g} (alpha {alpha:g}), and no significant window "
                       "is followed by a rising trend to the end")
    return phase


def detect_phases(steps: pd.DataFrame, semantic: pd.DataFrame, *, window: int | None = None,
                  flat_tolerance: float = 0.25, min_drop: float = 0.1,
                  alpha: float = 0.05) -> list[dict]:
    """Apply the documented phase rule (module docstring) to one run's tables.

    Parameters
    ----------
    steps : pandas.DataFrame
        The run's rows of :attr:`Roles.steps`.
    semantic : pandas.DataFrame
        The run's rows of :attr:`Roles.semantic`.
    window : int, optional
        Steps per window; default :func:`default_window` of the number of steps.
    flat_tolerance : float
        Flat means ``|slope| <= flat_tolerance * drop / span``.
    min_drop : float
        Smallest relative drop that counts as consolidation.
    alpha : float
        Significance level of the trend tests.

    Returns
    -------
    list of dict
        ``consolidation`` then ``exploration``: ``name, detected, start_step, end_step,
        signal, window, reason, evidence``.
    """
    execution = steps[(steps["cls"] == "execution") & steps["step"].notna()] \
        .sort_values("step")
    signal = "perplexity" if execution["perplexity"].notna().any() else "mean_entropy"
    sem = semantic[semantic["step"].notna()].sort_values("step")
    n_steps = max(len(execution), len(sem))
    w = int(window) if window else default_window(n_steps)
    if w < 3:
        raise EntropylensError(f"the phase window must be at least 3 steps, got {w}")
    return [
        _consolidation(execution["step"].to_numpy(np.int64),
                       execution[signal].to_numpy(np.float64), f"execution {signal}", w,
                       flat_tolerance, min_drop),
        _exploration(sem["step"].to_numpy(np.int64),
                     sem["semantic_entropy"].to_numpy(np.float64), w, alpha),
    ]
