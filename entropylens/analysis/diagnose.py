"""The diagnosis: one status per run, with its evidence, likely cause and what to try.

Statuses (DESIGN.md section 5), decided in this order:

1. ``insufficient_data``: fewer than :data:`MIN_POINTS` policy-entropy points, or no
   performance curve (validation accuracy, else mean reward) with that many points (a run
   whose entropy is falling fast now is still ``collapsing`` without one).
2. ``entropy_explosion``: an explosion event (below) that has not recovered, while
   performance fell beyond its noise from before the explosion to the end of the run (or
   the run has no performance curve).
3. ``collapsing``: entropy falling fast now: over the recent window (the last quarter of its
   points, at least 4) the entropy line loses at least :data:`COLLAPSING_DROP` of its level
   at the window's start, beyond the curve's own noise.
4. ``collapsed_plateau``: entropy collapsed (it came within 10% of its floor and the floor
   is at most 25% of its start: the phases rule) and performance's recent trend is flat
   (or falling) within its noise: the saturation law's regime (arXiv 2505.22617).
5. ``learning``: performance's end level is above its start level beyond its noise (and
   no plateau was shown above).
6. ``not_learning``: otherwise (performance flat at its starting level, or lower), unless
   the level change is inconclusive and its noise still allows a rise of more than
   :data:`HIDDEN_RISE_SHARE` of the metric's range: then ``insufficient_data``.

Noise (:mod:`entropylens.analysis.noise`): binomial from the number of validation prompts
when known (``val_size``, or ``val_n``/``val_size`` in a ``config.json`` beside the run's
logs), else the curve's residual scatter. ``performance.plateau`` is null when the recent
trend is inconclusive: the noise is too large to tell flat from moving.

Which entropy: the verdicts use the **token mean** per training step (``entropy_token_mean``,
:func:`~entropylens.analysis.curves.policy_entropy`, what trainers log). Runs with tokens
also report the sequence mean of per-sequence token means (arXiv 2505.22617, Eq. 5) in
``entropy.definitions``.

Events
------
- ``explosion``: the entropy curve (running median of 3 points) peaks at least
  :data:`EXPLOSION_FACTOR` times its lowest level before the peak, by more than
  :data:`EXPLOSION_SIGMAS` noise units; it starts at the last point before the peak at most
  10% of the rise above that low and ends at the peak (``peak`` is the observed maximum).
- ``recovery``: after an explosion, down to the first step back within :data:`RECOVERY_BAND`
  of the rise above the pre-explosion low (``complete``: true), or, when it never gets back
  but falls at least half way, down to its lowest point after the peak (``complete``: false;
  the run still counts as exploded).
- ``collapse``: each ``rapid_collapse`` segment of the phases (``peak``: its start entropy).

Healthy versus frontier collapse (runs with token entropies)
------------------------------------------------------------
Decision tokens are the top-20% entropy tokens of each step (the forking tokens, arXiv
2506.01939) and, separately, the planning tokens of HICRA (arXiv 2509.03646). Per step the
mean entropy of each class is compared with the rest (first versus last level windows). A
collapse (the rest loses at least :data:`ROUTINE_FALL` of its entropy) is ``healthy`` when
the decision tokens keep at least :data:`DECISION_RETAINED` of theirs, else ``frontier``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from ..base.steps import step_array
from ..engine import Aggregator, Failed, Plan, together
from ..errors import EntropylensError
from ..estimators import best_entropy_source, columns_for, token_entropy
from ..store import Store
from .curves import (_metric_series, entropy_label, open_store, performance,
                     policy_entropy_plan, train_mask)
from .noise import (Change, Noise, curve_noise, level_change, level_window, metric_range,
                    Z, residual_scatter, trend_change, VAL_SIZE_KEYS)
from .phases import COLLAPSED_SHARE, analyse_curve
from .sequences import step_groups
from .registry import Analysis, FigureSpec, Finding, register, run_analysis

STATUSES = ("learning", "collapsing", "collapsed_plateau", "entropy_explosion", "not_learning",
            "insufficient_data")
#: A curve needs this many points to have a trend and a residual to judge it by.
MIN_POINTS = 3
#: "Not learning" needs the noise to rule out a real rise: when a rise of more than this share
#: of the metric's range still fits the data (estimate + 2 SE), the status is
#: insufficient_data (inconclusive), not a verdict the data cannot carry.
HIDDEN_RISE_SHARE = 0.5
#: "Falling fast now": the recent entropy line loses this share of its level (and more than
#: its noise): a third of the entropy gone within the last quarter of the run.
COLLAPSING_DROP = 0.3
#: An explosion multiplies the entropy (the real TRL explosion went 0.05 -> 6.36 nats) ...
EXPLOSION_FACTOR = 3.0
#: ... by far more than its step-to-step noise.
EXPLOSION_SIGMAS = 5.0
#: Back within this share of the rise above the pre-explosion low counts as recovered.
RECOVERY_BAND = 0.25
#: A collapse is judged healthy or frontier only when routine entropy fell this much.
ROUTINE_FALL = 0.3
#: Decision tokens that keep this share of their starting entropy kept their exploration.
DECISION_RETAINED = 0.5
#: A side measurement (response length, planning share) "moved" when it changed this much.
MOVED_SHARE = 0.2
#: Share of each step's tokens that are its decision (forking) tokens (arXiv 2506.01939).
DECISION_RATIO = 0.2
#: Settings read from a run's config (``config.json`` beside its logs) or from its text logs.
SETTING_KEYS = ("mode", "entropy_coeff", "clip_ratio_high", "clip_ratio_low", "loss_mode",
                *VAL_SIZE_KEYS)
#: Bytes of a text log searched for settings (configs are printed at the start).
SETTINGS_HEAD = 256_000

REFERENCES = {
    "clip_cov": "arXiv 2505.22617 (Clip-Cov / KL-Cov)",
    "clip_higher": "arXiv 2503.14476 (DAPO clip-higher)",
    "entropy_bonus": "arXiv 1707.06347 (PPO entropy bonus)",
    "top20": "arXiv 2506.01939 (top-20% high-entropy tokens)",
    "hicra": "arXiv 2509.03646 (HICRA)",
    "dapo_dynamic": "arXiv 2503.14476 (DAPO dynamic sampling)",
}


# -- result ----------------------------------------------------------------------------------
@dataclass
class RunDiagnosis:
    """The diagnosis of one run (see the module docstring for every rule).

    Attributes
    ----------
    run, status : str
    entropy : dict
        ``start, end, floor, drop_fraction, collapsed`` (nats; start and end are medians of
        the first and last 3 points), ``definition`` (which curve the verdicts use),
        ``definitions`` (both curves' start and end where the run has tokens), ``source``.
    performance : dict
        ``metric, start, end, best, trend, plateau, noise`` and the measured ``change``
        (level) and ``recent`` (trend) with their standard errors.
    events : list of dict
        ``kind, start_step, end_step, peak``.
    causes : list of str
    actions : list of dict
        ``text, reference``.
    evidence : list of str
        The numbers behind the status, in plain words.
    collapse_kind : dict or None
        Healthy versus frontier: ``kind`` and the per-class entropies.
    curve, perf : pandas.DataFrame
        The entropy and performance curves the status was read from (for the figure).
    """

    run: str
    status: str
    entropy: dict = field(default_factory=dict)
    performance: dict = field(default_factory=dict)
    events: list = field(default_factory=list)
    causes: list = field(default_factory=list)
    actions: list = field(default_factory=list)
    evidence: list = field(default_factory=list)
    collapse_kind: dict | None = None
    curve: pd.DataFrame | None = None
    perf: pd.DataFrame | None = None
    segments: pd.DataFrame | None = None

    @property
    def headline(self) -> str:
        """``status: first piece of evidence`` in one line."""
        first = self.evidence[0] if self.evidence else ""
        return f"{self.status.replace('_', ' ')}: {first}" if first else self.status

    def to_dict(self) -> dict:
        """One run of ``entropylens diagnose --json``."""
        return _plain({"run": self.run, "status": self.status, "headline": self.headline,
                       "entropy": self.entropy, "performance": self.performance,
                       "events": self.events, "causes": self.causes, "actions": self.actions,
                       "evidence": self.evidence, "collapse_kind": self.collapse_kind})


@dataclass
class Diagnosis:
    """Result of :func:`diagnose`: one :class:`RunDiagnosis` per run."""

    runs: list[RunDiagnosis]
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The JSON of ``entropylens diagnose --json``."""
        return {"runs": [r.to_dict() for r in self.runs], "skipped": list(self.skipped)}

    def run(self, name: str) -> RunDiagnosis:
        for item in self.runs:
            if item.run == name:
                return item
        raise KeyError(name)


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


# -- the run's settings ----------------------------------------------------------------------
_SETTING = re.compile(r"""['"]?\b(%s)\b['"]?\s*[:=]\s*['"]?([-+\w.]+)""" % "|".join(SETTING_KEYS))


def run_settings(store: Store, run: str) -> dict:
    """Settings of the run that change the advice: from a ``config.json`` beside its source
    files, else as printed in its text logs (``'entropy_coeff': 0.001``); values as found.

    Returns
    -------
    dict
        Keys among :data:`SETTING_KEYS`; empty when none is found.
    """
    found: dict = {}
    for source in store.manifest(run).get("sources", []):
        path = Path(str(source.get("path", "")))
        folder = path if path.is_dir() else path.parent
        config = folder / "config.json"
        if config.is_file():
            try:
                data = json.loads(config.read_text())
            except (OSError, ValueError):
                data = {}
            if isinstance(data, dict):
                for key in SETTING_KEYS:
                    if key in data and key not in found:
                        found[key] = data[key]
        if path.is_file() and path.suffix in (".log", ".txt", ".yaml", ".yml"):
            try:
                with open(path, "rb") as fh:
                    head = fh.read(SETTINGS_HEAD).decode("utf-8", "replace")
            except OSError:
                continue
            for key, value in _SETTING.findall(head):
                found.setdefault(key, _number(value))
    return found


def _number(text):
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return text


def interventions(settings: dict) -> set[str]:
    """Entropy interventions the run already applies: ``top20``, ``entropy_bonus``,
    ``clip_higher``, ``clip_cov``, ``kl_cov``."""
    out = set()
    mode = str(settings.get("mode", "")).lower()
    if "top20" in mode or "forking" in mode:
        out.add("top20")
    coeff = settings.get("entropy_coeff")
    if isinstance(coeff, (int, float)) and coeff > 0:
        out.add("entropy_bonus")
    high, low = settings.get("clip_ratio_high"), settings.get("clip_ratio_low")
    if isinstance(high, (int, float)) and isinstance(low, (int, float)) and high > low:
        out.add("clip_higher")
    loss = str(settings.get("loss_mode", "")).lower()
    for name in ("clip_cov", "kl_cov"):
        if name in loss:
            out.add(name)
    return out


def validation_size(settings: dict) -> int | None:
    """Number of validation prompts named in the settings, or None."""
    for key in VAL_SIZE_KEYS:
        value = settings.get(key)
        if isinstance(value, (int, float)) and value >= 1:
            return int(value)
    return None


# -- decision tokens -------------------------------------------------------------------------
class DecisionScan(Aggregator):
    """Per step, entropy sums and counts of the training tokens that fork (entropy above
    their step's ``1 - ratio`` quantile, as :func:`~entropylens.analysis.forking.
    forking_plan` puts it) and of the rest, in the same scan as the forking analysis.

    A unit holds whole steps, so at :meth:`seal` each step's threshold is final: it is
    computed there over every token of the step (all splits, as the forking analysis does),
    the tokens are flagged, and only the training tokens are summed, batch by batch.
    Memory: one unit's steps and entropies.
    """

    def __init__(self, source: str, *, ratio: float, vocab_size=None, top_k=None):
        self.source, self.ratio = source, ratio
        self.options = {"vocab_size": vocab_size, "top_k": top_k}
        self.columns = tuple(sorted({"step", "split", *columns_for(source)}))

    def start(self) -> dict:
        return {"pending": [], "sums": {}}

    def update(self, state: dict, batch: pa.RecordBatch) -> dict:
        entropy = token_entropy(batch, self.source, **self.options)
        train = train_mask(batch)
        state["pending"].append((step_array(batch.column("step")), entropy,
                                 None if train is None else
                                 train.to_numpy(zero_copy_only=False)))
        return state

    def seal(self, state: dict) -> dict:
        if not state["pending"]:
            return state
        from .forking_thresholds import compute_thresholds

        steps = np.concatenate([p[0] for p in state["pending"]])
        entropy = np.concatenate([p[1] for p in state["pending"]])
        placeholder = np.zeros(len(steps), np.int8)   # the step scope reads steps only
        flags = compute_thresholds(steps, placeholder, placeholder, entropy, scope="step",
                                   ratio=self.ratio).flags(steps, placeholder, placeholder,
                                                           entropy)
        end = 0
        for batch_steps, batch_entropy, train in state["pending"]:
            begin, end = end, end + len(batch_steps)
            keep = np.isfinite(batch_entropy)
            if train is not None:
                keep &= train
            _add_sums(state["sums"], batch_steps[keep], flags[begin:end][keep],
                      batch_entropy[keep])
        state["pending"] = []
        return state

    def merge(self, left: dict, right: dict) -> dict:
        # tokens not sealed yet may share steps: they wait together for the next seal
        sums = left["sums"]
        for step, (total, count) in right["sums"].items():
            if step in sums:
                sums[step][0] = sums[step][0] + total
                sums[step][1] = sums[step][1] + count
            else:
                sums[step] = [total, count]
        return {"pending": left["pending"] + right["pending"], "sums": sums}

    def finish(self, state: dict) -> pd.DataFrame:
        """``step, decision_entropy, routine_entropy`` (means over each class)."""
        state = self.seal(state)["sums"]
        if not state:
            return pd.DataFrame(columns=["step", "decision_entropy", "routine_entropy"])
        steps = sorted(state)
        totals = np.array([state[s][0] for s in steps])
        counts = np.array([state[s][1] for s in steps])
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)
        return pd.DataFrame({"step": np.array(steps, np.int64),
                             "decision_entropy": mean[:, 1], "routine_entropy": mean[:, 0]})


def _add_sums(sums: dict, steps: np.ndarray, flags: np.ndarray, entropy: np.ndarray) -> None:
    """Add one batch's per-step entropy sums and counts of the routine (0) and forking (1)
    tokens to ``sums`` (step -> [sums, counts], each of two)."""
    unique, codes = step_groups(steps)
    key = codes * 2 + flags
    totals = np.bincount(key, weights=entropy, minlength=2 * len(unique)).reshape(-1, 2)
    counts = np.bincount(key, minlength=2 * len(unique)).reshape(-1, 2)
    for step, total, count in zip(unique.tolist(), totals, counts):
        if step in sums:
            sums[step][0] += total
            sums[step][1] += count
        else:
            sums[step] = [total, count]


def _classify(frame: pd.DataFrame, decision: str, routine: str, label: str) -> dict | None:
    """Healthy or frontier from one pair of per-step class curves (None: no collapse)."""
    frame = frame.dropna(subset=[decision, routine]).sort_values("step")
    if len(frame) < 2 * MIN_POINTS:
        return None
    k = level_window(len(frame))
    first, last = frame.head(k), frame.tail(k)
    d0, d1 = float(first[decision].mean()), float(last[decision].mean())
    r0, r1 = float(first[routine].mean()), float(last[routine].mean())
    out = {"decision": label, "decision_start": d0, "decision_end": d1, "rest_start": r0,
           "rest_end": r1, "steps": [int(first["step"].iloc[0]), int(last["step"].iloc[-1])]}
    if r0 <= 0 or (r0 - r1) / r0 < ROUTINE_FALL:
        out["kind"] = None
        return out
    out["kind"] = "healthy" if d0 > 0 and d1 / d0 >= DECISION_RETAINED else "frontier"
    return out


# -- events ----------------------------------------------------------------------------------
def entropy_events(steps, values, segments: pd.DataFrame | None = None) -> list[dict]:
    """Explosion, recovery and collapse events of an entropy curve (module docstring)."""
    steps = np.asarray(steps)
    values = np.asarray(values, dtype=float)
    events: list[dict] = []
    if len(values) >= MIN_POINTS:
        smooth = pd.Series(values).rolling(3, center=True, min_periods=1).median().to_numpy()
        sigma = residual_scatter(values)
        top = int(np.argmax(smooth))
        low = float(smooth[:top + 1].min())
        rise = float(smooth[top] - low)
        if top > 0 and low >= 0 and smooth[top] >= EXPLOSION_FACTOR * max(low, 1e-12) \
                and rise > EXPLOSION_SIGMAS * sigma:
            calm = np.flatnonzero(smooth[:top] <= low + 0.1 * rise)
            begin = int(calm[-1]) if len(calm) else 0
            peak_at = begin + int(np.argmax(values[begin:top + 2]))
            events.append({"kind": "explosion", "start_step": int(steps[begin]),
                           "end_step": int(steps[peak_at]), "peak": float(values[peak_at]),
                           "low": low})
            back = np.flatnonzero(smooth[top:] <= low + RECOVERY_BAND * rise)
            lowest = top + int(np.argmin(smooth[top:]))
            if len(back):
                events.append({"kind": "recovery", "start_step": int(steps[peak_at]),
                               "end_step": int(steps[top + int(back[0])]),
                               "peak": float(values[peak_at]), "complete": True})
            elif smooth[lowest] <= smooth[top] - 0.5 * rise:
                # half way down or more, but still far above the pre-explosion level
                events.append({"kind": "recovery", "start_step": int(steps[peak_at]),
                               "end_step": int(steps[lowest]), "peak": float(values[peak_at]),
                               "complete": False, "level": float(smooth[lowest])})
    if segments is not None:
        for seg in segments.itertuples(index=False):
            if seg.label == "rapid_collapse":
                events.append({"kind": "collapse", "start_step": int(seg.start_step),
                               "end_step": int(seg.end_step), "peak": float(seg.start_entropy)})
    return sorted(events, key=lambda e: (e["start_step"], e["kind"]))


# -- the rules -------------------------------------------------------------------------------
def _robust_end(values: np.ndarray, head: bool) -> float:
    part = values[:3] if head else values[-3:]
    return float(np.median(part))


def diagnose_curves(curve: pd.DataFrame | None, perf: pd.DataFrame | None, *, run: str,
                    val_size: int | None = None, settings: dict | None = None,
                    extras: dict | None = None) -> RunDiagnosis:
    """The diagnosis of one run from its curves (the rules of the module docstring).

    Parameters
    ----------
    curve : pandas.DataFrame or None
        ``step, entropy, source`` (:func:`~entropylens.analysis.curves.policy_entropy`).
    perf : pandas.DataFrame or None
        ``step, value, metric`` (:func:`~entropylens.analysis.curves.performance`).
    run : str
    val_size : int, optional
        Validation prompts behind each accuracy point (binomial noise).
    settings : dict, optional
        :func:`run_settings` (which interventions the run already applies).
    extras : dict, optional
        ``seq_curve`` (sequence-mean curve), ``decision`` (:class:`DecisionScan` result),
        ``roles`` (roles step table), ``length`` (step, value of response length),
        ``covariance`` (step, mean_cov).

    Returns
    -------
    RunDiagnosis
    """
    settings = settings or {}
    extras = extras or {}
    applied = interventions(settings)
    if curve is None or len(curve) < MIN_POINTS:
        n = 0 if curve is None else len(curve)
        return RunDiagnosis(run, "insufficient_data", causes=[
            f"{n} policy-entropy point(s): at least {MIN_POINTS} steps with an entropy "
            "(per-token entropies or a logged policy_entropy metric) are needed"],
            evidence=[f"{n} entropy point(s)"], curve=curve, perf=perf)
    curve = curve.sort_values("step").reset_index(drop=True)
    steps = curve["step"].to_numpy()
    h = curve["entropy"].to_numpy(dtype=float)
    source = str(curve["source"].iloc[0])
    phases = analyse_curve(steps, h, perf=None, run=run, source=source)
    start, end = _robust_end(h, True), _robust_end(h, False)
    floor = float(phases.floor)
    collapsed = phases.arrival_step is not None and floor <= COLLAPSED_SHARE * start
    entropy = {"start": start, "end": end, "floor": floor,
               "drop_fraction": (start - floor) / start if start > 0 else None,
               "collapsed": bool(collapsed), "arrival_step": phases.arrival_step,
               "first_step": int(steps[0]), "last_step": int(steps[-1]),
               "source": source, "definition": "token mean per step (entropy_token_mean): "
               + entropy_label(source)}
    definitions = {"entropy_token_mean": {"start": start, "end": end}}
    seq = extras.get("seq_curve")
    if seq is not None and len(seq) >= MIN_POINTS:
        sv = seq.sort_values("step")["entropy_seq_mean"].to_numpy(dtype=float)
        definitions["entropy_seq_mean"] = {"start": _robust_end(sv, True),
                                           "end": _robust_end(sv, False),
                                           "label": "sequence mean of per-sequence token "
                                                    "means (arXiv 2505.22617, Eq. 5)"}
    entropy["definitions"] = definitions
    events = entropy_events(steps, h, phases.segments)
    diagnosis = RunDiagnosis(run, "insufficient_data", entropy=entropy, events=events,
                             curve=curve, perf=perf, segments=phases.segments)

    # entropy now: the recent line, judged against the curve's own noise
    h_noise = Noise("residual", phases.noise or 0.0, np.full(len(h), phases.noise or 0.0))
    h_recent = trend_change(steps, h, h_noise, margin=0.0)
    window_start = float(np.median(h[-len(h) // 4 - 1:][:3])) if len(h) >= 4 else start
    falling_fast = h_recent.verdict == "fall" and window_start > 0 and \
        -h_recent.estimate >= COLLAPSING_DROP * window_start

    explosion = next((e for e in events if e["kind"] == "explosion"), None)
    recovered = any(e["kind"] == "recovery" and e["complete"] for e in events)
    has_perf = perf is not None and len(perf) >= MIN_POINTS
    if has_perf:
        perf = perf.sort_values("step").reset_index(drop=True)
        ps = perf["step"].to_numpy()
        pv = perf["value"].to_numpy(dtype=float)
        metric = str(perf["metric"].iloc[0])
        size = val_size if metric == "val_accuracy" else None
        noise = curve_noise(pv, size)
        margin_scale = metric_range(pv, metric)
        level = level_change(ps, pv, noise, 0.05 * margin_scale)
        recent = trend_change(ps, pv, noise, 0.05 * margin_scale)
        k = level_window(len(pv))
        plateau = {"flat": True, "rise": False, "fall": False}.get(recent.verdict)
        diagnosis.performance = {
            "metric": metric, "start": float(pv[:k].mean()), "end": float(pv[-k:].mean()),
            "best": float(pv.max()), "best_step": int(ps[int(np.argmax(pv))]),
            "trend": recent.verdict, "plateau": plateau, "noise": noise.to_dict(),
            "change": level.to_dict(), "recent": recent.to_dict(), "points": int(len(pv)),
            "range": margin_scale}
    else:
        noise = level = recent = None

    d = diagnosis
    perf_fell_in_explosion = None
    if explosion is not None and has_perf:
        before = pv[ps < explosion["start_step"]]
        if len(before) >= 1:
            kb = min(len(before), level_window(len(pv)))
            ref = before[-kb:]
            se = math.sqrt(float((noise.points[:kb] ** 2).sum()) / kb ** 2
                           + float((noise.points[-k:] ** 2).sum()) / k ** 2)
            drop = float(pv[-k:].mean() - ref.mean())
            perf_fell_in_explosion = drop + 2.0 * se < 0
            d.performance["before_explosion"] = float(ref.mean())
    if explosion is not None and not recovered and perf_fell_in_explosion is not False:
        d.status = "entropy_explosion"
    elif not has_perf:
        d.status = "collapsing" if falling_fast else "insufficient_data"
    elif falling_fast:
        d.status = "collapsing"
    elif collapsed and recent.verdict in ("flat", "fall"):
        d.status = "collapsed_plateau"
    elif level.verdict == "rise":
        d.status = "learning"
    elif level.verdict == "inconclusive" and \
            level.estimate + Z * level.se > HIDDEN_RISE_SHARE * margin_scale:
        d.status = "insufficient_data"
        d.causes.append(f"{metric} changed by {_f(level.estimate)} ± {_f(Z * level.se)}: too "
                        "few or too noisy points to tell whether the run learns")
    else:
        d.status = "not_learning"
    _explain(d, h_recent, level, recent, noise, explosion, applied, extras, settings)
    return d


def _f(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def _explain(d: RunDiagnosis, h_recent: Change, level: Change | None, recent: Change | None,
             noise: Noise | None, explosion: dict | None, applied: set, extras: dict,
             settings: dict) -> None:
    """Evidence, causes and actions of a diagnosis (plain words, each action cited)."""
    e, p = d.entropy, d.performance
    entropy_text = (f"entropy {_f(e['start'])} -> {_f(e['end'])} nats over steps "
                    f"{e['first_step']}-{e['last_step']}"
                    + (f" ({e['drop_fraction']:.0%} below its start at the floor)"
                       if e.get("drop_fraction") and e["drop_fraction"] > 0 else ""))
    perf_text = None
    if p:
        perf_text = (f"{p['metric']} {_f(p['start'])} -> {_f(p['end'])} (best {_f(p['best'])} "
                     f"at step {p['best_step']}; change {level.estimate:+.3f} ± "
                     f"{2 * level.se:.3f}, {noise.describe()})")
        recent_text = (f"last {p['recent']['start_step']}-{p['recent']['end_step']}: "
                       f"{recent.estimate:+.3f} ± {2 * recent.se:.3f} -> {recent.verdict}")
    status = d.status
    evidence, causes, actions = d.evidence, d.causes, d.actions

    def act(text: str, ref: str) -> None:
        actions.append({"text": text, "reference": REFERENCES[ref]})

    if status == "entropy_explosion":
        evidence.append(f"entropy rose from {_f(explosion['low'])} to a peak of "
                        f"{_f(explosion['peak'])} nats at step {explosion['end_step']} (from "
                        f"step {explosion['start_step']})"
                        + (f" while {p['metric']} fell from {_f(p['before_explosion'])} to "
                           f"{_f(p['end'])}" if p.get("before_explosion") is not None else ""))
        causes.append("the policy is spreading probability over many tokens: updates too "
                      "large for the run (learning rate, clipping) or an objective that "
                      "rewards negative-advantage tokens")
        if "entropy_bonus" in applied:
            causes.append(f"the run applies an entropy bonus (entropy_coeff "
                          f"{settings.get('entropy_coeff')}) that pushes entropy up")
            act("lower or remove the entropy bonus", "entropy_bonus")
        act("restart from a checkpoint before step "
            f"{explosion['start_step']} with a smaller learning rate or a KL-Cov penalty on "
            "high-covariance tokens", "clip_cov")
    elif status == "collapsing":
        evidence.append(f"entropy is falling fast now: {h_recent.estimate:+.3g} nats over "
                        f"steps {h_recent.start_step}-{h_recent.end_step} "
                        f"(± {2 * h_recent.se:.2g})")
        causes.append("confident, positively rewarded tokens dominate the update (entropy "
                      "change ≈ −η·Cov(log π, A))")
        _collapse_actions(act, applied)
    elif status == "collapsed_plateau":
        evidence.append(f"entropy collapsed ({_f(e['start'])} -> floor {_f(e['floor'])} nats, "
                        f"within 10% of it from step {e['arrival_step']}) while "
                        f"{p['metric']} has stopped improving ({recent_text})")
        causes.append("entropy is exhausted: the saturation law R = −a·exp(H) + b "
                      "(arXiv 2505.22617) leaves little gain at H near 0")
        _collapse_actions(act, applied)
    elif status == "learning":
        evidence.append(f"{p['metric']} rose beyond its noise: {perf_text}")
        if e["collapsed"]:
            causes.append(f"entropy has collapsed (floor {_f(e['floor'])} nats) while "
                          "performance still rises: gains will slow as entropy runs out")
            _collapse_actions(act, applied)
        elif recent.verdict in ("flat", "fall"):
            causes.append(f"{p['metric']} has not risen over its last points ({recent_text}) "
                          f"but entropy has not collapsed (floor {_f(e['floor'])} nats, "
                          f"{1 - (e['drop_fraction'] or 0):.0%} of its start): not the "
                          "saturation regime; more steps or a harder task may still help")
    elif status == "not_learning":
        evidence.append(f"{p['metric']} did not rise beyond its noise: {perf_text}")
        if p["end"] <= 0.05 * p["range"]:
            causes.append(f"{p['metric']} is near 0: almost no rewarded completions, so "
                          "GRPO groups carry no signal")
            act("make the task easier or filter prompts whose groups all score the same "
                "(dynamic sampling)", "dapo_dynamic")
        if p["start"] >= 0.8 * p["range"]:
            causes.append(f"{p['metric']} started at {_f(p['start'])}: little room left to "
                          "improve on this task")
        if "top20" in applied:
            causes.append(f"the run already restricts the policy gradient to the top-20% "
                          f"entropy tokens (config mode {settings.get('mode')!r}): the other "
                          "80% of tokens get no gradient")
            act("compare with the plain policy gradient (all tokens) or raise the share of "
                "tokens the gradient flows through", "top20")
        if not e["collapsed"] and (e.get("drop_fraction") or 0) < 0.1:
            causes.append("entropy did not fall either: the policy is not being moved")
    else:
        if not causes:
            causes.append("not enough data to judge")
        if not p:
            evidence.append(entropy_text)
            causes.append("no performance curve (validation accuracy or mean reward) with "
                          f"{MIN_POINTS} or more points: learning cannot be judged")
    if status != "insufficient_data" or p:
        evidence.append(entropy_text)
        if perf_text and status not in ("learning", "not_learning"):
            evidence.append(perf_text)
        if p:
            evidence.append(recent_text)
    _why(d, extras)


def _collapse_actions(act, applied: set) -> None:
    act("clip the update of the few tokens with the largest Cov(log π, A) (Clip-Cov) or put "
        "a KL penalty on them (KL-Cov)", "clip_cov")
    if "clip_higher" not in applied:
        act("raise the upper clipping bound (clip-higher, e.g. 0.28) so that unlikely tokens "
            "can gain probability", "clip_higher")
    if "top20" not in applied:
        act("send the policy gradient only through the top-20% entropy tokens",
            "top20")
    if "entropy_bonus" not in applied:
        act("add a small entropy bonus (watch for explosion)", "entropy_bonus")
    act("weight the advantage of planning tokens (HICRA) so that exploration stays where the "
        "decisions are", "hicra")


def _moved(series: pd.DataFrame | None, column: str, steps: tuple[int, int]) -> tuple | None:
    """(start level, end level) of a side curve over the diagnosis' steps, or None."""
    if series is None or series.empty:
        return None
    series = series.dropna(subset=[column]).sort_values("step")
    series = series[(series["step"] >= steps[0]) & (series["step"] <= steps[1])]
    if len(series) < 2 * MIN_POINTS:
        return None
    k = level_window(len(series))
    return float(series[column].head(k).mean()), float(series[column].tail(k).mean())


def _why(d: RunDiagnosis, extras: dict) -> None:
    """Say what moved with the entropy (response length, planning share, covariance sign),
    and whether the collapse is healthy or frontier."""
    e = d.entropy
    if not e:
        return
    span = (e["first_step"], e["last_step"])
    direction = "fell" if e["end"] < e["start"] else "rose"
    length = _moved(extras.get("length"), "value", span)
    if length and length[0] > 0 and abs(length[1] - length[0]) / length[0] >= MOVED_SHARE:
        went = "shrank" if length[1] < length[0] else "grew"
        d.causes.append(f"responses {went} from {length[0]:.0f} to {length[1]:.0f} tokens "
                        f"while entropy {direction}")
    roles = extras.get("roles")
    if roles is not None and not roles.empty:
        table = roles.pivot_table(index="step", columns="cls", values="tokens", aggfunc="sum")
        if {"planning", "execution"} <= set(table.columns):
            share = pd.DataFrame({"step": table.index.astype("int64"),
                                  "value": (table["planning"] / table.sum(axis=1)).to_numpy()})
            moved = _moved(share, "value", span)
            if moved and moved[0] > 0 and abs(moved[1] - moved[0]) / moved[0] >= MOVED_SHARE:
                d.causes.append(f"the planning-token share went from {moved[0]:.1%} to "
                                f"{moved[1]:.1%} while entropy {direction}")
    cov = extras.get("covariance")
    if cov is not None and not cov.empty:
        mean = float(cov["mean_cov"].mean())
        positive = float((cov["mean_cov"] > 0).mean())
        if direction == "fell" and positive >= 0.6:
            d.causes.append(f"Cov(log π, A) was positive at {positive:.0%} of steps (mean "
                            f"{mean:.3g}): confident tokens were reinforced, which lowers "
                            "entropy")
        elif direction == "rose" and positive <= 0.4:
            d.causes.append(f"Cov(log π, A) was negative at {1 - positive:.0%} of steps: "
                            "unlikely tokens were reinforced, which raises entropy")
    kinds = []
    for key, label in (("decision", "top-20% entropy tokens"), ("planning", "planning tokens")):
        frame = extras.get(key)
        if frame is None or frame.empty:
            continue
        judged = _classify(frame, "decision_entropy", "routine_entropy", label)
        if judged is not None:
            kinds.append(judged)
    if kinds:
        kind = "frontier" if any(k["kind"] == "frontier" for k in kinds) else \
            ("healthy" if any(k["kind"] == "healthy" for k in kinds) else None)
        d.collapse_kind = {"kind": kind, "by": kinds}
        if kind is not None:
            parts = [f"{k['decision']} {k['decision_start']:.2f} -> {k['decision_end']:.2f} "
                     f"nats, the rest {k['rest_start']:.2f} -> {k['rest_end']:.2f}"
                     for k in kinds]
            word = ("healthy: entropy fell on routine tokens while the decision tokens kept "
                    "theirs" if kind == "healthy" else
                    "frontier: entropy fell at the decision tokens too")
            d.causes.append(f"the collapse is {word} ({'; '.join(parts)})")


# -- the registered analysis ----------------------------------------------------------------
def diagnose_plan(store: Store, run: str, *, val_size: int | None = None,
                  reward: str | None = None, engine: str = "local", **engine_options) -> Plan:
    """One run's :class:`RunDiagnosis`, as a plan (reuses the policy-entropy, forking, roles
    and covariance plans)."""
    from .covariance import covariance_plan
    from .forking import forking_plan
    from .roles import roles_plan

    manifest = store.manifest(run)
    settings = run_settings(store, run)
    size = val_size or validation_size(settings)
    source = best_entropy_source(manifest) if manifest.get("counts", {}).get("tokens") \
        else None
    # the curve, forking thresholds, decision split, roles and covariance read the tokens
    # together (one scan)
    subplans = {"curve": policy_entropy_plan(store, run, engine=engine, **engine_options)}
    if source is not None:
        subplans.update(
            forks=forking_plan(store, run, source, manifest, ratio=DECISION_RATIO),
            decision=_decision_plan(source, manifest),
            roles=roles_plan(store, run),
            covariance=covariance_plan(store, run, engine=engine, **engine_options))
    done = yield from together(subplans)
    curve = _usable(done["curve"])
    try:
        perf = performance(store, run, reward)
    except EntropylensError:
        perf = None
    extras: dict = {}
    metrics = store.read_metrics(run) if manifest.get("counts", {}).get("metrics") else None
    if metrics is not None:
        length, _, _ = _metric_series(metrics, "response_length_mean")
        if len(length):
            extras["length"] = length
    if curve is not None and "entropy_seq_mean" in curve:
        extras["seq_curve"] = curve.dropna(subset=["entropy_seq_mean"])
    if source is not None:
        if "length" not in extras and manifest.get("counts", {}).get("sequences"):
            lengths = store.read_sequences(run, columns=["step", "num_tokens"]).to_pandas()
            lengths = lengths.dropna().groupby("step", as_index=False)["num_tokens"].mean()
            extras["length"] = lengths.rename(columns={"num_tokens": "value"})
        forks, roles_part, covariance = (_usable(done[k]) for k in ("forks", "roles",
                                                                     "covariance"))
        decision = _usable(done["decision"])
        if forks is not None and decision is not None:
            extras["decision"] = decision
        table = roles_part[0] if isinstance(roles_part, tuple) else None
        if isinstance(table, pd.DataFrame) and {"cls", "mean_entropy"} <= set(table):
            extras["roles"] = table
            pivot = table.pivot_table(index="step", columns="cls", values="mean_entropy")
            if {"planning", "execution"} <= set(pivot.columns):
                extras["planning"] = pd.DataFrame({
                    "step": pivot.index.astype("int64"),
                    "decision_entropy": pivot["planning"].to_numpy(float),
                    "routine_entropy": pivot["execution"].to_numpy(float)})
        if covariance is not None:
            extras["covariance"] = covariance[1].dropna(subset=["mean_cov"])
    return diagnose_curves(curve, perf, run=run, val_size=size, settings=settings,
                           extras=extras)


def _decision_plan(source: str, manifest: dict) -> Plan:
    """The :class:`DecisionScan` of one run, as a plan (read with the forking scan)."""
    return (yield {"d": DecisionScan(source, ratio=DECISION_RATIO,
                                     vocab_size=manifest.get("vocab_size"),
                                     top_k=manifest.get("top_k"))})["d"]


def _usable(outcome):
    """A sub-plan's result, None when the run cannot have it (other errors propagate)."""
    if isinstance(outcome, Failed):
        if isinstance(outcome.error, EntropylensError):
            return None
        raise outcome.error
    return outcome


class DiagnoseAnalysis(Analysis):
    """Registered form of :func:`diagnose` (see :mod:`entropylens.analysis.registry`)."""

    name = "diagnose"
    title = "Diagnosis"
    order = 0
    headline = True

    def plan(self, store: Store, run: str, inputs, *, val_size: int | None = None,
             reward: str | None = None, **options) -> Plan:
        counts = store.manifest(run).get("counts", {})
        if not (counts.get("tokens") or counts.get("metrics")) and counts.get("nodes"):
            raise EntropylensError(f"run {run!r} holds search trees only (no training curve "
                                   "to diagnose): see its branch-entropy section",
                                   path=store.run_dir(run))
        return diagnose_plan(store, run, val_size=val_size, reward=reward)

    def combine(self, parts, *, skipped=(), **options) -> Diagnosis:
        return Diagnosis(runs=list(parts), skipped=list(skipped))

    def figures(self, result: Diagnosis, run: str) -> list[FigureSpec]:
        from ..plots import entropy_curve

        item = result.run(run)
        if item.curve is None or item.curve.empty:
            return []
        return [FigureSpec("diagnose", f"{run}: entropy and performance",
                           f"Status {item.status.replace('_', ' ')}. Policy entropy per step "
                           "(token mean) with its phases shaded; performance on the right "
                           "axis.",
                           lambda ax: entropy_curve(item.curve, phases=item.segments,
                                                    performance=item.perf,
                                                    arrival_step=item.entropy.get(
                                                        "arrival_step"), ax=ax))]

    def section(self, result: Diagnosis, run: str) -> dict:
        return result.run(run).to_dict()

    def findings(self, result: Diagnosis, run: str) -> list[Finding]:
        item = result.run(run)
        severity = {"learning": "good", "collapsing": "warning",
                    "collapsed_plateau": "alarm", "entropy_explosion": "alarm",
                    "not_learning": "alarm", "insufficient_data": "info"}[item.status]
        text = item.headline
        if item.causes:
            text += "; " + item.causes[0]
        return [Finding("diagnose", text, severity, "key",
                        {"status": item.status, "entropy": item.entropy,
                         "performance": item.performance, "events": item.events})]


register(DiagnoseAnalysis())


def diagnose(store: Store | str, runs: str | Sequence[str] | None = None, *,
             val_size: int | None = None, reward: str | None = None, engine: str = "local",
             workers: int | None = None, **options) -> Diagnosis:
    """Diagnose each run: a status, its evidence, likely causes and what to try.

    Parameters
    ----------
    store : Store or path
    runs : str or sequence of str, optional
        Default: every run.
    val_size : int, optional
        Validation prompts behind each accuracy point (binomial noise); default: read from
        the run's config when it names one, else the residual scatter of the curve.
    reward : str, optional
        Performance metric instead of ``val_accuracy`` / ``reward_mean``.
    engine : {"local", "ray"}
    workers : int, optional

    Returns
    -------
    Diagnosis
        ``.to_dict()`` is the JSON of ``entropylens diagnose --json``.
    """
    return run_analysis("diagnose", open_store(store), runs, engine=engine, workers=workers,
                        val_size=val_size, reward=reward, **options)
