"""Plain-language verdicts at the top of the report.

The sentences about one run are the findings of its analyses (the ``findings()`` hook of each
registered analysis, :mod:`entropylens.analysis.registry`): the entropy trend and alarm
(phases), the saturation ceiling, the forking tokens, planning/execution tokens and the
covariance. This module keeps what spans runs: the comparison of runs and the data-quality
checks, and the order of the whole list (alarms, then the key findings of each run, then the
comparison, then the details).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from ..analysis.registry import Finding
from .collect import Results

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


def from_finding(finding: Finding, run: str, anchor: str) -> Verdict:
    """An analysis' :class:`~entropylens.analysis.registry.Finding` about ``run`` as a
    verdict linking to ``anchor`` (its section of the run)."""
    return Verdict(finding.text, anchor, run, finding.kind, finding.severity,
                   dict(finding.numbers), finding.tier)


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
    return Verdict(text, anchor, None, "compare", "info", numbers, tier="key")


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


def verdicts(findings: list[Verdict], results: Results, anchors: dict) -> list[Verdict]:
    """Every verdict of the report: alarms, then the key findings of each run (entropy
    trend, saturation ceiling, forking tokens), then the comparison, then the details
    (planning tokens, covariance, data quality, ...).

    Parameters
    ----------
    findings : list of Verdict
        The runs' findings (:func:`from_finding`), run by run in report order.
    results : Results
    anchors : dict
        ``anchors["compare"]`` and ``anchors["quality"]``: where those sections are.
    """
    out = list(findings)
    compare = compare_verdict(results, anchors["compare"])
    if compare is not None:
        out.append(compare)
    out.extend(quality_verdicts(results, anchors["quality"]))

    def rank(verdict: Verdict) -> int:
        if verdict.severity == "alarm":
            return 0
        if verdict.tier == "key":
            return 2 if verdict.run is None else 1
        return 3
    return sorted(out, key=rank)
