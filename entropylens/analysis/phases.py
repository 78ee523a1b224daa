"""Collapse phases of the per-step policy-entropy curve.

Method
------
The curve is :func:`~entropylens.analysis.curves.policy_entropy` (token mean per training
step). It is cut into segments by **PELT** (``ruptures``) with a **piecewise-linear
least-squares cost** (each segment is fitted by its own line in the step; irregular step
spacing is respected) and a **BIC penalty** ``3 * sigma**2 * log(n)``: a new segment must
lower the residual sum of squares by more than its three parameters (break, intercept, slope)
cost under Gaussian noise of scale ``sigma``. ``sigma`` is a robust noise estimate, the larger
of (a) the median absolute step-to-step difference / (0.6745 * sqrt 2) and (b) the scaled
median absolute deviation around a running median of ``max(5, n/10)`` points (it catches
slow wander that (a) misses), floored at 1% of the curve's range. Segments hold at least
``max(3, ceil(n/20))`` points; curves of more than :data:`MAX_POINTS` points consider change
points only every ``ceil(n/MAX_POINTS)`` points, so the search stays fast.

Labels
------
Let ``R`` be the range (max - min) of the fitted segment lines, ``span`` the steps the curve
covers, and for each segment ``rate = slope * span / R`` (the share of the whole range the
segment's trend would cover over the whole run) and ``change`` its fitted end minus start.

- ``plateau``: ``|rate| < 0.5`` or ``|change| < 0.1 R``; every segment is a plateau when
  ``R <= 2 sigma`` (the curve is flat within its noise);
- ``rise``: otherwise ``rate >= 0.5``;
- ``rapid_collapse``: ``rate <= -3`` (falling fast enough to cover the whole range in a third
  of the run) and, after neighbours of the same label are merged, a drop of at least 25% of
  ``R``; a faster but smaller fall is a ``slow_decline``;
- ``slow_decline``: the other falling segments.

The segments' lines need not meet. Where the fitted value jumps between two neighbours by
more than ``2 sigma`` and 25% of ``R`` (a fall faster than the minimum segment length), the
jump becomes a segment of its own, from the last step of one to the first step of the next,
labelled by the same rule. Adjacent segments with the same label are merged and refitted.

Then:

- a ``plateau`` whose own line changes by more than twice its standard error
  (``sigma / sqrt(Sxx) * length``) and by at least half its starting level is a ``rise`` or a
  ``slow_decline`` after all (a sustained late trend is kept even when it is small against
  the run's range);
- a falling segment that starts at three times the curve's starting level or more is a
  ``recovery`` (the way down from an entropy explosion), not a collapse;
- segments share no step (a jump takes the touching points of its neighbours), and each
  segment's ``start_entropy`` and ``end_entropy`` are **observed**: the median of its first and
  last three points (of its first and last half when it has fewer than six), never a value
  of the fitted line.

Summary numbers
---------------
- ``start_entropy``: the first point of the curve; ``floor``: the mean of its last
  ``max(3, ceil(n/10))`` points; ``total_drop = start_entropy - floor``.
- ``early_drop_fraction = (start_entropy - H(s0 + span/12)) / total_drop`` with ``H`` linearly
  interpolated between logged steps: the share of the total drop that happened in the first
  twelfth of the steps (arXiv 2505.22617 reports 0.73). None when the curve does not fall by
  more than ``2 sigma`` overall.
- ``arrival_step``: the first step whose entropy is at most ``floor + 0.1 * total_drop``
  ("within 10% of the total drop above the floor"); None when there is no drop.
- ``alarm``: True when entropy has collapsed (an ``arrival_step`` exists and the floor is at
  most 25% of the starting entropy) while performance has plateaued beyond its noise: the
  line over the last ``max(4, ceil(m/4))`` of the ``m`` performance points (validation
  accuracy, else mean reward) provably moves less than 5% of the metric's range
  (:mod:`entropylens.analysis.noise`: flat, not merely inconclusive). The message says why
  in either case; ``entropylens diagnose`` gives the full judgement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from ..engine import Plan
from ..store import Store
from .curves import open_store
from .noise import curve_noise, metric_range, residual_scatter, trend_change
from .registry import Analysis, FigureSpec, Finding, register, required, run_analysis

PHASE_LABELS = ("rapid_collapse", "slow_decline", "plateau", "rise", "recovery")
SEGMENT_COLUMNS = ["start_step", "end_step", "label", "start_entropy", "end_entropy", "slope"]
#: Fewer points than this give no segmentation (a line needs a residual to judge noise).
MIN_POINTS = 3
#: Longer curves consider change points only every ceil(n / MAX_POINTS) points.
MAX_POINTS = 400
#: Which policy entropy the segments, summary numbers and alarm use.
ENTROPY_DEFINITION = "entropy_token_mean: token mean per training step"
#: Thresholds of the labelling rule (see the module docstring).
PLATEAU_RATE = 0.5
PLATEAU_CHANGE = 0.1
COLLAPSE_RATE = -3.0
COLLAPSE_DROP = 0.25
#: The first twelfth of training (arXiv 2505.22617: 200 of 2400 steps).
EARLY_FRACTION = 1 / 12
#: "Within 10% of the floor": of the total drop.
ARRIVAL_BAND = 0.1
#: A collapsed run's floor is at most this share of its starting entropy.
COLLAPSED_SHARE = 0.25
#: Performance has plateaued when its recent trend gains less than this share of its range.
PLATEAU_GAIN = 0.05
#: A segment's start and end entropies are the median of this many observed points at each
#: end (robust to one noisy step, and never a fitted value below zero).
ROBUST_POINTS = 3
#: A flat-looking segment is kept as a trend when its fitted change is beyond twice its
#: standard error and at least this share of its own starting level (a late rise from 0.054
#: to 0.118 nats is small against the run's range but doubles the entropy).
SUSTAINED_SHARE = 0.5
#: A fall that starts this many times above the curve's starting level is the way down from
#: an explosion (``recovery``), not a collapse.
RECOVERY_FACTOR = 3.0


@dataclass
class RunPhases:
    """Phases of one run's entropy curve (see the module docstring for every definition).

    Attributes
    ----------
    run : str
    segments : pandas.DataFrame
        ``start_step, end_step, label, start_entropy, end_entropy, slope`` (slope in nats per
        step, of the segment's fitted line; start/end entropy observed: the median of the
        first and last :data:`ROBUST_POINTS` points of the segment). Segments share no
        step.
    early_drop_fraction, arrival_step, floor, start_entropy, total_drop
    alarm : bool
    alarm_message : str
    entropy_source : str
        ``exact``, ``topk``, ``surprisal`` or ``metric``.
    noise : float
        The noise scale ``sigma`` used by the penalty and the flatness test.
    change_points : list of int
        Steps that begin a new segment before labels were merged.
    performance_metric : str or None
    note : str or None
    seq_mean : dict or None
        The same summary numbers (``start_entropy, floor, total_drop, early_drop_fraction,
        arrival_step``) of the other definition, the sequence mean (arXiv 2505.22617, Eq. 5),
        where the run has tokens; segments and alarm use the token mean.
    """

    run: str | None
    segments: pd.DataFrame
    early_drop_fraction: float | None
    arrival_step: int | None
    floor: float | None
    start_entropy: float | None
    total_drop: float | None
    alarm: bool
    alarm_message: str
    entropy_source: str | None = None
    noise: float | None = None
    change_points: list[int] = field(default_factory=list)
    performance_metric: str | None = None
    note: str | None = None
    seq_mean: dict | None = None

    @property
    def collapse(self) -> dict | None:
        """The ``rapid_collapse`` segment with the largest drop, or None."""
        rapid = self.segments[self.segments["label"] == "rapid_collapse"]
        if rapid.empty:
            return None
        drop = rapid["start_entropy"] - rapid["end_entropy"]
        row = rapid.loc[drop.idxmax()]
        return {"start_step": int(row["start_step"]), "end_step": int(row["end_step"]),
                "drop": float(row["start_entropy"] - row["end_entropy"])}

    def to_dict(self) -> dict:
        """One run of ``entropylens phases --json``."""
        return {
            "run": self.run,
            "segments": [_plain(r) for r in self.segments.to_dict(orient="records")],
            "early_drop_fraction": _num(self.early_drop_fraction),
            "arrival_step": self.arrival_step,
            "floor": _num(self.floor),
            "start_entropy": _num(self.start_entropy),
            "total_drop": _num(self.total_drop),
            "collapse": self.collapse,
            "alarm": bool(self.alarm),
            "alarm_message": self.alarm_message,
            "entropy_source": self.entropy_source,
            "performance_metric": self.performance_metric,
            "noise": _num(self.noise),
            "change_points": list(self.change_points),
            "method": "PELT, piecewise-linear least squares, BIC penalty 3*sigma^2*log(n)",
            "note": self.note,
            "entropy_definition": ENTROPY_DEFINITION,
            "entropy_seq_mean": self.seq_mean,
        }


@dataclass
class Phases:
    """Result of :func:`phases`: one :class:`RunPhases` per run.

    Attributes
    ----------
    runs : list of RunPhases
        One per run asked for (a run without an entropy curve, among several, has an empty
        entry whose ``note`` says why).
    curves : dict
        Run name to the policy-entropy curve the phases were found on
        (:func:`~entropylens.analysis.curves.policy_entropy`).
    performance : dict
        Run name to the performance curve (:func:`~entropylens.analysis.curves.performance`),
        or None with the reason in ``performance_reason``.
    performance_reason : dict
        Run name to why it has no performance curve (None when it has one).
    """

    runs: list[RunPhases]
    curves: dict = field(default_factory=dict, repr=False)
    performance: dict = field(default_factory=dict, repr=False)
    performance_reason: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        """The JSON shape of ``entropylens phases --json`` (DESIGN.md section 6)."""
        return {"runs": [r.to_dict() for r in self.runs]}

    @property
    def segments(self) -> pd.DataFrame:
        """All segments in one table with a leading ``run`` column."""
        frames = [r.segments.assign(run=r.run) for r in self.runs]
        if not frames:
            return pd.DataFrame(columns=["run", *SEGMENT_COLUMNS])
        return pd.concat(frames, ignore_index=True)[["run", *SEGMENT_COLUMNS]]


def _num(value) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _plain(row: dict) -> dict:
    out = {}
    for key, value in row.items():
        if isinstance(value, np.integer):
            value = int(value)
        elif isinstance(value, np.floating):
            value = _num(float(value))
        out[key] = value
    return out


# -- noise and change points -----------------------------------------------------------------
def noise_scale(values: np.ndarray) -> float:
    """Robust noise scale of a curve (see the module docstring); 0 for a constant curve."""
    values = np.asarray(values, dtype=float)
    spread = float(values.max() - values.min()) if len(values) else 0.0
    if len(values) < 2 or spread == 0:
        return 0.0
    return max(residual_scatter(values), 0.01 * spread)


def change_points(steps: np.ndarray, values: np.ndarray, sigma: float) -> list[int]:
    """End indices (exclusive, ruptures style) of the piecewise-linear segments."""
    import ruptures

    n = len(values)
    min_size = max(3, math.ceil(n / 20))
    if sigma == 0 or n < 2 * min_size:
        return [n]
    span = float(steps[-1] - steps[0]) or 1.0
    signal = np.column_stack([values, np.ones(n), (steps - steps[0]) / span])
    jump = max(1, math.ceil(n / MAX_POINTS))
    algo = ruptures.Pelt(custom_cost=_line_cost(jump), min_size=min_size,
                         jump=jump).fit(signal)
    return [int(b) for b in algo.predict(pen=3.0 * sigma ** 2 * math.log(n))]


def segment_rss(x: np.ndarray, y: np.ndarray, jump: int = 1) -> np.ndarray:
    """Residual sum of squares of the least-squares line of ``y`` on ``x`` over the
    segments PELT asks about: ``rss[start // jump, column(end)]`` for ``y[start:end]``,
    with starts on the grid of ``jump`` and ends on it or at ``n`` (the last column; NaN
    where ``end <= start``).

    Welford's updates, one point at a time for every segment start at once: as accurate as
    a fit per segment, in n vector steps (PELT asks for a number of segments quadratic in
    the grid, and one ``lstsq`` each took seconds for a few hundred steps). Memory: the
    grid squared, at most about (:data:`MAX_POINTS` + 2) squared numbers.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = len(y)
    starts = len(range(0, n, jump))
    rss = np.full((starts, n // jump + 2), np.nan)
    count = np.zeros(starts)
    mean_x, mean_y = np.zeros(starts), np.zeros(starts)
    sxx, syy, sxy = np.zeros(starts), np.zeros(starts), np.zeros(starts)
    for k in range(n):
        live = slice(0, k // jump + 1)   # the segments starting at or before k take point k
        count[live] += 1
        dx, dy = x[k] - mean_x[live], y[k] - mean_y[live]
        mean_x[live] += dx / count[live]
        mean_y[live] += dy / count[live]
        ex, ey = x[k] - mean_x[live], y[k] - mean_y[live]
        sxx[live] += dx * ex
        syy[live] += dy * ey
        sxy[live] += dx * ey
        if (k + 1) % jump and k + 1 < n:
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            fitted = np.where(sxx[live] > 0, sxy[live] ** 2 / sxx[live], 0.0)
        rss[live, _rss_column(k + 1, n, jump)] = np.maximum(syy[live] - fitted, 0.0)
    return rss


def _rss_column(end: int, n: int, jump: int) -> int:
    """Column of :func:`segment_rss` of a segment end (on the grid, or ``n``)."""
    return end // jump if end % jump == 0 else n // jump + 1


def _line_cost(jump: int):
    """A ruptures cost: the piecewise-linear least squares of ``model="linear"`` (signal
    columns: the values, then the covariates ``1, t``), every segment's residual read from
    one :func:`segment_rss` table. Segments off the grid (PELT asks for none) are fitted
    one by one."""
    from ruptures.base import BaseCost
    from ruptures.costs import CostLinear, NotEnoughPoints

    class LineCost(BaseCost):
        model = "line"
        min_size = 2

        def fit(self, signal):
            self.signal = signal
            self.rss = segment_rss(signal[:, 2], signal[:, 0], jump)
            self.exact = CostLinear().fit(signal)
            return self

        def error(self, start, end):
            if end - start < self.min_size:
                raise NotEnoughPoints
            n = len(self.signal)
            if start % jump or (end % jump and end != n):
                return self.exact.error(start, end)
            return float(self.rss[start // jump, _rss_column(end, n, jump)])

    return LineCost()


def _line(steps: np.ndarray, values: np.ndarray) -> tuple[float, float, float]:
    """Slope and fitted first/last value of a least-squares line."""
    if len(values) < 2 or steps[-1] == steps[0]:
        mean = float(values.mean())
        return 0.0, mean, mean
    slope, intercept = np.polyfit(steps, values, 1)
    return float(slope), float(intercept + slope * steps[0]), float(intercept + slope * steps[-1])


def _segments(steps, values, bounds) -> list[dict]:
    out, start = [], 0
    for end in bounds:
        slope, first, last = _line(steps[start:end], values[start:end])
        out.append({"i0": start, "i1": end, "slope": slope, "first": first, "last": last})
        start = end
    return out


def _transition(steps, left: dict, right: dict) -> dict:
    """The jump between two fitted segments, from the last point of one to the next's first."""
    i0, i1 = left["i1"] - 1, right["i0"]
    gap = float(steps[i1] - steps[i0]) or 1.0
    return {"i0": i0, "i1": i1 + 1, "first": left["last"], "last": right["first"],
            "slope": (right["first"] - left["last"]) / gap, "jump": True}


def _label(seg: dict, extent: float, span: float, sigma: float) -> str:
    """The label of one segment or jump by the rule of the module docstring."""
    change = seg["last"] - seg["first"]
    rate = seg["slope"] * span / extent if extent > 0 else 0.0
    flat_curve = sigma == 0 or extent <= 2 * sigma
    if flat_curve or abs(rate) < PLATEAU_RATE or abs(change) < PLATEAU_CHANGE * extent:
        return "plateau"
    if seg.get("jump") and (abs(change) <= 2 * sigma or abs(change) < COLLAPSE_DROP * extent):
        return "plateau"
    if rate > 0:
        return "rise"
    return "rapid_collapse" if rate <= COLLAPSE_RATE else "slow_decline"


def _merge_same(steps, values, segments) -> list[dict]:
    merged: list[dict] = []
    for seg in segments:
        if merged and merged[-1]["label"] == seg["label"]:
            i0, i1 = merged[-1]["i0"], seg["i1"]
            slope, first, last = _line(steps[i0:i1], values[i0:i1])
            merged[-1].update(i1=i1, slope=slope, first=first, last=last, jump=False)
        else:
            merged.append(dict(seg))
    return merged


def label_segments(steps: np.ndarray, values: np.ndarray, bounds: Sequence[int],
                   sigma: float) -> pd.DataFrame:
    """Label the segments ending at ``bounds`` and merge neighbours of the same label.

    The segments' lines need not meet: where the fitted value jumps between two segments by
    more than ``2 sigma`` and 25% of the range, the jump becomes a segment of its own from the
    last step of one to the first step of the next (a collapse faster than the minimum
    segment length shows up this way) and is labelled by the same rule.
    """
    fitted = _segments(steps, values, bounds)
    ends = [v for s in fitted for v in (s["first"], s["last"])]
    extent = max(ends) - min(ends)
    span = float(steps[-1] - steps[0]) or 1.0
    segments: list[dict] = []
    for k, seg in enumerate(fitted):
        if k:
            jump = _transition(steps, fitted[k - 1], seg)
            jump["label"] = _label(jump, extent, span, sigma)
            if jump["label"] != "plateau":
                segments.append(jump)
        seg["label"] = _label(seg, extent, span, sigma)
        _keep_sustained(seg, steps, values, sigma)   # before merging plateaus together
        segments.append(seg)
    segments = _merge_same(steps, values, segments)
    for seg in segments:
        if seg["label"] == "rapid_collapse" and \
                seg["first"] - seg["last"] < COLLAPSE_DROP * extent:
            seg["label"] = "slow_decline"
    start_level = float(np.median(values[:ROBUST_POINTS]))
    for seg in segments:
        if seg["label"] in ("rapid_collapse", "slow_decline") and start_level > 0 and \
                seg["first"] >= RECOVERY_FACTOR * start_level:
            seg["label"] = "recovery"
    segments = _merge_same(steps, values, segments)
    return pd.DataFrame([_observed(s, steps, values) for s in _disjoint(segments)],
                        columns=SEGMENT_COLUMNS)


def _keep_sustained(seg: dict, steps, values, sigma: float) -> None:
    """Relabel a plateau whose own trend is real and large for its level (module docstring
    of :data:`SUSTAINED_SHARE`)."""
    if seg["label"] != "plateau" or seg.get("jump") or sigma == 0:
        return
    x = steps[seg["i0"]:seg["i1"]].astype(float)
    if len(x) < MIN_POINTS or x[-1] == x[0]:
        return
    se = sigma / math.sqrt(float(((x - x.mean()) ** 2).sum())) * (x[-1] - x[0])
    change = seg["last"] - seg["first"]
    level = float(np.median(values[seg["i0"]:seg["i0"] + ROBUST_POINTS]))
    if abs(change) > 2 * se and level > 0 and abs(change) >= SUSTAINED_SHARE * level:
        seg["label"] = "rise" if change > 0 else "slow_decline"


def _disjoint(segments: list[dict]) -> list[dict]:
    """Segments that share no point: a jump between two segments takes their touching
    points, and the neighbours give them up (each keeps at least one point)."""
    out = [dict(s) for s in segments]
    for k in range(1, len(out)):
        left, right = out[k - 1], out[k]
        if right["i0"] < left["i1"]:
            if left["i1"] - 1 > left["i0"] and (right.get("jump") or not left.get("jump")):
                left["i1"] = right["i0"]
            else:
                right["i0"] = left["i1"]
    return [s for s in out if s["i1"] > s["i0"]]


def _observed(seg: dict, steps, values) -> dict:
    """A segment's row: observed (median) entropies at its ends, the fitted slope."""
    part = values[seg["i0"]:seg["i1"]]
    # a short segment's ends must not share points: at most half of it at each end
    k = max(1, min(ROBUST_POINTS, len(part) // 2))
    return {"start_step": int(steps[seg["i0"]]), "end_step": int(steps[seg["i1"] - 1]),
            "label": seg["label"], "start_entropy": float(np.median(part[:k])),
            "end_entropy": float(np.median(part[-k:])), "slope": seg["slope"]}


# -- summary numbers -------------------------------------------------------------------------
def _performance_plateau(perf: pd.DataFrame | None) -> tuple[bool | None, str]:
    """Whether performance has plateaued beyond its noise (None when it cannot be judged or
    the noise is too large to tell) and why (:func:`entropylens.analysis.noise.trend_change`
    over the recent window, residual-scatter noise, flat within PLATEAU_GAIN of the
    metric's range)."""
    if perf is None or len(perf) < MIN_POINTS:
        return None, "no reward or accuracy curve with 3 or more points"
    name = perf["metric"].iloc[0]
    values = perf["value"].to_numpy(dtype=float)
    noise = curve_noise(values)
    change = trend_change(perf["step"].to_numpy(), values, noise,
                          PLATEAU_GAIN * metric_range(values))
    text = (f"{name} changed by {change.estimate:+.3f} ± {2 * change.se:.3f} over steps "
            f"{change.start_step}-{change.end_step} ({noise.describe()}): "
            f"{change.verdict}")
    if change.verdict == "inconclusive":
        return None, text
    # falling is no better than flat for the alarm: no gain left from the collapsed entropy
    return change.verdict in ("flat", "fall"), text


def _empty(run: str | None, note: str, *, start: float | None = None,
           source: str | None = None, metric: str | None = None) -> RunPhases:
    return RunPhases(run=run, segments=pd.DataFrame(columns=SEGMENT_COLUMNS),
                     early_drop_fraction=None, arrival_step=None, floor=None,
                     start_entropy=start, total_drop=None, alarm=False,
                     alarm_message="not evaluated", entropy_source=source,
                     performance_metric=metric, note=note)


def analyse_curve(steps: Sequence[float], entropy: Sequence[float], *,
                  perf: pd.DataFrame | None = None, run: str | None = None,
                  source: str | None = None) -> RunPhases:
    """Segment one entropy curve and compute its summary numbers and alarm.

    Parameters
    ----------
    steps, entropy : sequences of numbers
        The curve, one point per step (sorted by step here).
    perf : pandas.DataFrame, optional
        ``step, value, metric`` from :func:`~entropylens.analysis.curves.performance`, for the
        alarm.
    run, source : str, optional
        Carried into the result.

    Returns
    -------
    RunPhases
    """
    frame = pd.DataFrame({"step": np.asarray(steps, dtype=float),
                          "h": np.asarray(entropy, dtype=float)})
    frame = frame[np.isfinite(frame["h"]) & np.isfinite(frame["step"])].sort_values("step")
    x = frame["step"].to_numpy()
    y = frame["h"].to_numpy()
    n = len(y)
    metric = None if perf is None or perf.empty else str(perf["metric"].iloc[0])
    if n < MIN_POINTS:
        return _empty(run, f"{n} step(s): at least {MIN_POINTS} are needed for phases",
                      start=float(y[0]) if n else None, source=source, metric=metric)
    sigma = noise_scale(y)
    bounds = change_points(x, y, sigma)
    segments = label_segments(x, y, bounds, sigma)
    start = float(y[0])
    floor = float(y[-max(3, math.ceil(n / 10)):].mean())
    drop = start - floor
    early = arrival = None
    note = None
    if sigma > 0 and drop > 2 * sigma:
        span = x[-1] - x[0]
        early = (start - float(np.interp(x[0] + span * EARLY_FRACTION, x, y))) / drop
        reached = np.flatnonzero(y <= floor + ARRIVAL_BAND * drop)
        arrival = int(x[reached[0]]) if len(reached) else None
    else:
        note = "entropy does not fall by more than twice its noise: no drop to measure"
    collapsed = arrival is not None and floor <= COLLAPSED_SHARE * start
    plateaued, perf_text = _performance_plateau(perf)
    if not collapsed:
        alarm = False
        message = (f"no alarm: entropy floor {floor:.3g} nats is "
                   + ("not a collapse" if arrival is None else
                      f"{floor / start:.0%} of its start {start:.3g} (alarm at <= "
                      f"{COLLAPSED_SHARE:.0%})"))
    elif plateaued is None:
        alarm = False
        message = (f"entropy collapsed to {floor:.3g} nats by step {arrival}, but the alarm "
                   f"was not evaluated: {perf_text}")
    else:
        alarm = bool(plateaued)
        state = "has plateaued" if plateaued else "is still improving"
        message = (f"entropy sits near its floor {floor:.3g} nats ({1 - floor / start:.0%} "
                   f"below its start) since step {arrival} while performance {state}: "
                   f"{perf_text}")
        if alarm:
            message = "ALARM: " + message + ("; further training is unlikely to help without "
                                             "an entropy intervention")
    change = [int(x[b]) for b in bounds[:-1]]
    return RunPhases(run=run, segments=segments, early_drop_fraction=early,
                     arrival_step=arrival, floor=floor, start_entropy=start, total_drop=drop,
                     alarm=alarm, alarm_message=message, entropy_source=source, noise=sigma,
                     change_points=change, performance_metric=metric, note=note)


def seq_mean_summary(curve: pd.DataFrame) -> dict | None:
    """Summary numbers of a curve's ``entropy_seq_mean`` (None without that definition)."""
    if "entropy_seq_mean" not in curve:
        return None
    seq = curve.dropna(subset=["entropy_seq_mean"])
    if len(seq) < MIN_POINTS:
        return None
    other = analyse_curve(seq["step"], seq["entropy_seq_mean"])
    return {"definition": "entropy_seq_mean: mean over sequences of each sequence's token "
                          "mean (arXiv 2505.22617, Eq. 5)",
            "start_entropy": _num(other.start_entropy), "floor": _num(other.floor),
            "total_drop": _num(other.total_drop),
            "early_drop_fraction": _num(other.early_drop_fraction),
            "arrival_step": other.arrival_step}


def phases(store: Store | str, runs: str | Sequence[str] | None = None, *,
           engine: str = "local", workers: int | None = None, **engine_options) -> Phases:
    """Collapse phases of each run's policy-entropy curve.

    Parameters
    ----------
    store : Store or path
    runs : str or sequence of str, optional
        Default: every run.
    engine : {"local", "ray"}
    workers : int, optional
        Worker processes of the local engine (1: none).

    Returns
    -------
    Phases
        ``.runs`` holds one :class:`RunPhases` per run; ``.to_dict()`` is the JSON of
        ``entropylens phases --json``. The module docstring defines every number.
    """
    return run_analysis("phases", open_store(store), runs, engine=engine, workers=workers,
                        **engine_options)


class PhasesAnalysis(Analysis):
    """Registered form of :func:`phases`. In the report it is the run's first block: the
    policy-entropy curve with its phases shaded and the performance on the right axis."""

    name = "phases"
    title = "Policy entropy and phases"
    requires = ("policy_entropy", "performance")
    order = 10

    def plan(self, store: Store, run: str, inputs) -> Plan:
        curve = required(inputs, "policy_entropy").of(run)
        perf_outcome = inputs["performance"]
        perf = perf_outcome.value.of(run) if perf_outcome.ok else None
        found = analyse_curve(curve["step"], curve["entropy"], perf=perf, run=run,
                              source=str(curve["source"].iloc[0]))
        found.seq_mean = seq_mean_summary(curve)
        return found, curve, perf, perf_outcome.reason
        yield  # no scan of its own: the curves are its inputs

    def placeholder(self, run: str, reason: str):
        # one run without an entropy curve must not hide the phases of the others
        return _empty(run, f"skipped: {reason}"), None, None, None

    def combine(self, parts, *, skipped=(), **options) -> Phases:
        runs = [part[0] for part in parts]
        return Phases(runs=runs,
                      curves={r.run: part[1] for r, part in zip(runs, parts)
                              if part[1] is not None},
                      performance={r.run: part[2] for r, part in zip(runs, parts)},
                      performance_reason={r.run: part[3] for r, part in zip(runs, parts)})

    def figures(self, result: Phases, run: str) -> list[FigureSpec]:
        from ..plots import entropy_curve

        found, curve = result.runs[0], result.curves[run]
        perf = result.performance.get(run)
        segments = found.segments
        return [FigureSpec(
            "entropy", f"{run}: policy entropy per step",
            "Token-mean policy entropy per step"
            + (", detected phases shaded" if len(segments) else "")
            + (f", {perf['metric'].iloc[0]} on the right axis" if perf is not None else "")
            + ".",
            lambda ax: entropy_curve(curve, phases=segments, performance=perf,
                                     arrival_step=found.arrival_step, ax=ax))]

    def section(self, result: Phases, run: str) -> dict:
        from ..base.jsonable import records as _records

        perf = result.performance.get(run)
        return {"curve": _records(result.curves[run]),
                "performance": _records(perf) if perf is not None else [],
                "performance_reason": result.performance_reason.get(run),
                "phases": result.runs[0].to_dict(), "phases_reason": None}

    def findings(self, result: Phases, run: str) -> list[Finding]:
        found, curve = result.runs[0], result.curves[run]
        # the plateau alarm stays in the phases' JSON; the report says it once, through the
        # diagnosis (collapsed_plateau), which judges the plateau beyond noise
        out = []
        trend = entropy_trend(curve, found)
        if trend is not None:
            out.append(trend)
        return out


def _finite(value) -> bool:
    try:
        return value is not None and value is not pd.NA and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def entropy_trend(curve: pd.DataFrame, found: RunPhases) -> Finding | None:
    """Collapsed, declined, rose or held steady, with when and how fast (the report's first
    sentence about a run).

    - **collapsed**: entropy came within 10% of its floor (an ``arrival_step`` exists) and the
      floor is at most 25% of the starting entropy; the sentence gives the share of the drop
      reached by the arrival step, the share in the first twelfth of training and the
      fastest-falling segment.
    - **declined**: the curve falls but does not collapse.

    A rise or a steady entropy gives no sentence: whether that is an explosion or a run that
    does not learn is the diagnosis' to judge, beyond noise (:mod:`.diagnose`).
    """
    curve = curve.sort_values("step")
    steps = curve["step"].to_numpy(dtype=float)
    values = curve["entropy"].to_numpy(dtype=float)
    if not len(values):
        return None
    start = found.start_entropy if _finite(found.start_entropy) else float(values[0])
    floor = found.floor if _finite(found.floor) \
        else float(values[-max(3, math.ceil(len(values) / 10)):].mean())
    arrival, early = found.arrival_step, found.early_drop_fraction
    numbers = {"start_entropy": start, "floor": floor, "first_step": int(steps[0]),
               "last_step": int(steps[-1]), "entropy_source": str(curve["source"].iloc[0])
               if "source" in curve.columns else None}
    drop = start - floor
    if arrival is not None and start > 0 and floor <= COLLAPSED_SHARE * start:
        at_arrival = float(np.interp(arrival, steps, values))
        share = (start - at_arrival) / drop if drop > 0 else None
        twelfth = steps[0] + (steps[-1] - steps[0]) * EARLY_FRACTION
        numbers.update(arrival_step=int(arrival), drop_share_by_arrival=share,
                       relative_drop=drop / start, early_drop_fraction=early,
                       early_step=float(twelfth))
        text = (f"entropy collapsed from {start:.2f} to {floor:.2f} nats "
                f"({drop / start:.0%} lower): {share:.0%} of the drop happened by step "
                f"{arrival}")
        if _finite(early):
            text += f"; {early:.0%} in the first twelfth of training (by step {twelfth:.0f})"
        collapse = found.collapse
        if collapse:
            numbers.update(fastest_start_step=collapse["start_step"],
                           fastest_end_step=collapse["end_step"], fastest_drop=collapse["drop"])
            text += (f"; fastest fall steps {collapse['start_step']}–{collapse['end_step']} "
                     f"(−{collapse['drop']:.2f} nats)")
        return Finding("entropy", text, severity="warning", tier="key", numbers=numbers)
    numbers["relative_change"] = (floor - start) / start if start > 0 else None
    if drop > 0 and _finite(early) and start > 0:
        numbers.update(arrival_step=arrival, early_drop_fraction=early)
        text = (f"entropy declined from {start:.2f} to {floor:.2f} nats ({drop / start:.0%} "
                f"lower) without collapsing")
        if arrival is not None:
            text += f"; within 10% of its floor from step {arrival}"
    else:
        return None
    return Finding("entropy", text, tier="key", numbers=numbers)


register(PhasesAnalysis())
