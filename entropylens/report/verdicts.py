"""Plain-language verdicts at the top of the report, each computed from analysis results.

Rules (the thresholds are the phases analysis's where it has them):

- **collapsed**: entropy came within 10% of its floor (an ``arrival_step`` exists) and the floor
  is at most 25% of the starting entropy; the verdict gives the share of the drop reached by
  the arrival step, the share in the first twelfth of training and the fastest-falling
  segment.
- **declined**: the curve falls by more than twice its noise but does not collapse.
- the saturation law predicts a ceiling only when the fit passes its quality gate
  (:func:`entropylens.analysis.saturation.ceiling_gate`);
- whether the run learns, has plateaued or exploded is the diagnosis' (its ``findings()``,
  :mod:`entropylens.analysis.diagnose`), judged beyond noise: no rule here says it.
- the forking tokens, planning/execution, covariance, run comparison and
  data-quality checks each give one sentence when their analysis is available.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..plots._display import token_label
from .collect import Results, RunResults

COLLAPSED_SHARE = 0.25
EARLY_FRACTION = 1 / 12
#: Verdicts that answer the report's first questions; shown before the figures.
KEY_KINDS = ("alarm", "entropy", "fit", "forking", "compare")
#: Verdicts listed from data-quality checks before the rest are counted.
MAX_QUALITY = 5


@dataclass
class Verdict:
    """One sentence of the report's top, with the numbers it states and where to look."""

    text: str
    anchor: str
    run: str | None = None
    kind: str = "info"
    severity: str = "info"
    numbers: dict = field(default_factory=dict)
    tier: str = "detail"

    def to_dict(self) -> dict:
        return {"run": self.run, "kind": self.kind, "severity": self.severity,
                "tier": self.tier, "text": self.text, "anchor": self.anchor,
                "numbers": dict(self.numbers)}


def _finite(value) -> bool:
    try:
        return value is not None and value is not pd.NA and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _f(value, digits: int = 2) -> str:
    return f"{float(value):.{digits}f}"


def entropy_verdict(entry: RunResults, anchor: str) -> Verdict | None:
    """Collapsed or declined, with when and how fast (None otherwise: the diagnosis says)."""
    curve_part, phases_part = entry.part("curve"), entry.part("phases")
    if not curve_part.ok:
        return None
    curve = curve_part.value.sort_values("step")
    steps = curve["step"].to_numpy(dtype=float)
    values = curve["entropy"].to_numpy(dtype=float)
    if not len(values):
        return None
    phases = phases_part.value if phases_part.ok else None
    start = phases.start_entropy if phases is not None and _finite(phases.start_entropy) \
        else float(values[0])
    floor = phases.floor if phases is not None and _finite(phases.floor) \
        else float(values[-max(3, math.ceil(len(values) / 10)):].mean())
    arrival = phases.arrival_step if phases is not None else None
    early = phases.early_drop_fraction if phases is not None else None
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
        text = (f"entropy collapsed from {_f(start)} to {_f(floor)} nats "
                f"({drop / start:.0%} lower): {share:.0%} of the drop happened by step "
                f"{arrival}")
        if _finite(early):
            text += f"; {early:.0%} in the first twelfth of training (by step {twelfth:.0f})"
        collapse = phases.collapse if phases is not None else None
        if collapse:
            numbers.update(fastest_start_step=collapse["start_step"],
                           fastest_end_step=collapse["end_step"], fastest_drop=collapse["drop"])
            text += (f"; fastest fall steps {collapse['start_step']}–{collapse['end_step']} "
                     f"(−{_f(collapse['drop'])} nats)")
        return Verdict(text, anchor, entry.run, "entropy", "warning", numbers)
    numbers["relative_change"] = (floor - start) / start if start > 0 else None
    if drop > 0 and _finite(early) and start > 0:
        numbers.update(arrival_step=arrival, early_drop_fraction=early)
        text = (f"entropy declined from {_f(start)} to {_f(floor)} nats ({drop / start:.0%} "
                f"lower) without collapsing")
        if arrival is not None:
            text += f"; within 10% of its floor from step {arrival}"
    else:
        # a rise or a steady entropy is the diagnosis' to judge (explosion, not learning)
        return None
    return Verdict(text, anchor, entry.run, "entropy", "info", numbers)


def fit_verdict(entry: RunResults, anchor: str) -> Verdict | None:
    part = entry.part("fit")
    if not part.ok:
        return None
    fit = part.value
    numbers = {"a": fit.a, "b": fit.b, "ceiling": fit.ceiling, "r2": fit.r2, "n": fit.n,
               "performance": fit.y, "ceiling_reason": getattr(fit, "ceiling_reason", None)}
    if not _finite(fit.ceiling):
        # the fit's own quality gate (analysis.saturation.ceiling_gate) refused a ceiling
        text = (f"the saturation law R = −a·exp(H) + b does not describe this run "
                f"({getattr(fit, 'ceiling_reason', None) or 'no fit'}, {fit.n} points): no "
                "ceiling is predicted")
        return Verdict(text, anchor, entry.run, "fit", "info", numbers)
    text = (f"the fitted saturation law R = −a·exp(H) + b predicts a ceiling of "
            f"{_f(fit.ceiling)} {fit.y} (the fitted performance at zero entropy; R² "
            f"{_f(fit.r2)}, {fit.n} points, {fit.above_ceiling} observations above it)")
    observed = fit.data["R"].dropna()
    if len(observed):
        best = float(observed.max())
        numbers["best_observed"] = best
        text += f"; the best value reached so far is {_f(best)}"
    early = getattr(fit, "early", None) or {}
    if _finite(early.get("rmse")) and early.get("fraction"):
        numbers.update(early_fraction=early["fraction"], early_rmse=early["rmse"])
        text += (f"; fitted on the first {early['fraction']:.0%} of points it predicts the rest "
                 f"with RMSE {early['rmse']:.3f}")
    return Verdict(text, anchor, entry.run, "fit", "info", numbers)


def forking_verdict(entry: RunResults, anchor: str, shown: int = 6) -> Verdict | None:
    part = entry.part("forking")
    if not part.ok:
        return None
    top = part.value.top_tokens
    if "run" in top.columns:
        top = top[top["run"] == entry.run]
    if top.empty:
        return None
    top = top.head(shown)
    labels = [f"“{token_label(t)}”" for t in top["token"]]
    ratio, scope = getattr(part.value, "ratio", None), getattr(part.value, "scope", None)
    rule = f" (top {ratio:.0%} entropy per {scope})" if _finite(ratio) and scope else ""
    text = f"most frequent forking tokens{rule}: {', '.join(labels)}"
    numbers = {"tokens": [str(t) for t in top["token"]],
               "forking_count": [int(c) for c in top["forking_count"]]}
    return Verdict(text, anchor, entry.run, "forking", "info", numbers)


def roles_verdict(entry: RunResults, anchor: str) -> Verdict | None:
    part = entry.part("roles")
    if not part.ok:
        return None
    steps = part.value.steps
    if "run" in steps.columns:
        steps = steps[steps["run"] == entry.run]
    steps = steps.dropna(subset=["mean_entropy", "tokens"])
    means, counts = {}, {}
    for cls in ("planning", "execution"):
        rows = steps[steps["cls"] == cls]
        total = float(rows["tokens"].sum())
        if total > 0:
            counts[cls] = total
            means[cls] = float((rows["mean_entropy"] * rows["tokens"]).sum() / total)
    if len(means) < 2:
        return None
    share = counts["planning"] / (counts["planning"] + counts["execution"])
    text = (f"planning tokens average {_f(means['planning'])} nats of entropy, execution "
            f"tokens {_f(means['execution'])} ({share:.1%} of tokens are planning tokens)")
    numbers = {"planning_entropy": means["planning"], "execution_entropy": means["execution"],
               "planning_share": share}
    phases = getattr(part.value, "phases", None) or {}
    found = [p for p in phases.get(entry.run, []) if p.get("detected")]
    if found:
        text += "; " + ", ".join(f"{p['name']} phase from step {p['start_step']} to "
                                 f"{p['end_step']}" for p in found)
        numbers["phases"] = [{"name": p["name"], "start_step": p["start_step"],
                              "end_step": p["end_step"]} for p in found]
    elif phases.get(entry.run):
        text += "; neither the consolidation nor the exploration phase is detected"
    return Verdict(text, anchor, entry.run, "roles", "info", numbers)


def covariance_verdict(entry: RunResults, anchor: str) -> Verdict | None:
    part = entry.part("covariance")
    if not part.ok:
        return None
    table = part.value.correlation
    if "run" in table.columns:
        table = table[table["run"] == entry.run]
    if table.empty or not _finite(table["pearson_r"].iloc[0]):
        return None
    row = table.iloc[0]
    r, n = float(row["pearson_r"]), int(row["n"])
    text = (f"mean Cov(log π, A) and the next step's entropy change correlate with Pearson "
            f"r = {_f(r)} over {n} steps (theory: negative, entropy falls when confident "
            f"tokens are reinforced)")
    return Verdict(text, anchor, entry.run, "covariance", "info",
                   {"pearson_r": r, "spearman_r": _maybe(row.get("spearman_r")), "n": n})


def _maybe(value):
    return float(value) if _finite(value) else None


def compare_verdict(results: Results, anchor: str) -> Verdict | None:
    part = results.part("compare")
    if not part.ok:
        return None
    table = part.value.table
    column = next((c for c in ("last_entropy", "final_entropy", "entropy_last")
                   if c in table.columns), None)
    if column is None:
        return None
    rows = table.dropna(subset=[column])
    if len(rows) < 2:
        return None
    ranked = rows.sort_values(column, ascending=False)
    high, low = ranked.iloc[0], ranked.iloc[-1]
    text = (f"{high['run']} keeps the most entropy ({_f(high[column])} nats at its last step), "
            f"{low['run']} the least ({_f(low[column])})")
    numbers = {"highest_run": str(high["run"]), "highest": float(high[column]),
               "lowest_run": str(low["run"]), "lowest": float(low[column])}
    perf = next((c for c in ("final_performance", "final_reward", "last_performance")
                 if c in table.columns), None)
    if perf is not None and rows[perf].notna().sum() >= 2:
        best = rows.dropna(subset=[perf]).sort_values(perf, ascending=False).iloc[0]
        numbers.update(best_performance_run=str(best["run"]), best_performance=float(best[perf]))
        text += f"; the best final performance is {best['run']}'s ({_f(best[perf])})"
    return Verdict(text, anchor, None, "compare", "info", numbers)


def quality_verdicts(results: Results, anchor: str) -> list[Verdict]:
    part = results.part("quality")
    if not part.ok or part.value is None or part.value.empty:
        return []
    frame = part.value
    serious = frame[frame["severity"].astype(str).str.lower().isin(["error", "warning"])]
    out = [Verdict(f"{row.message}", anchor, None if pd.isna(row.run) else str(row.run),
                   "quality", "warning", {"check": str(row.check), "count": _count(row.count)})
           for row in serious.head(MAX_QUALITY).itertuples(index=False)]
    if len(serious) > MAX_QUALITY:
        out.append(Verdict(f"{len(serious) - MAX_QUALITY} more data-quality warnings", anchor,
                           None, "quality", "warning", {"more": len(serious) - MAX_QUALITY}))
    return out


def _count(value):
    return int(value) if _finite(value) else None


def verdicts(results: Results, anchors: dict) -> list[Verdict]:
    """Every verdict of the report: alarms, then per run the entropy trend, the saturation
    ceiling and the forking tokens, then the comparison (tier ``key``), then planning tokens,
    covariance and data quality (tier ``detail``).

    Parameters
    ----------
    results : Results
    anchors : dict
        ``anchors[run][kind]`` and ``anchors[None][kind]``: the page anchor of each figure.
    """
    out: list[Verdict] = []
    for entry in results.runs:
        a = anchors[entry.run]
        for make, kind in ((entropy_verdict, "entropy"),
                           (fit_verdict, "fit"), (forking_verdict, "forking"),
                           (roles_verdict, "roles"), (covariance_verdict, "covariance")):
            verdict = make(entry, a[kind])
            if verdict is not None:
                out.append(verdict)
    compare = compare_verdict(results, anchors[None]["compare"])
    if compare is not None:
        out.append(compare)
    out.extend(quality_verdicts(results, anchors[None]["quality"]))
    for verdict in out:
        verdict.tier = "key" if verdict.kind in KEY_KINDS else "detail"
    # alarms first, then the key questions (collapse, ceiling, forks, comparison), then the rest
    rank = {"alarm": 0, "entropy": 1, "fit": 1, "forking": 1, "compare": 2}
    return sorted(out, key=lambda v: rank.get(v.kind, 3))
