"""Run every analysis the report shows, keeping going when one is not available.

The report shows every registered analysis with ``in_report`` (:mod:`entropylens.analysis.
registry`) as a section of each run, plus three parts that span the runs: the overview and
data-quality checks (the ``summary`` analysis) and the comparison (``compare``). All of them
run per run through :func:`~entropylens.analysis.registry.run_parts`, so the scans that the
analyses ask for at the same time are fused: a run's tokens are read once per round (once
for every token analysis, plus once more when some completions have tokens after their
end-of-sequence token, counted by a second pass). Each analysis keeps its own outcome, so a
run that lacks what one analysis needs (a metric-only run has no tokens to find forking
tokens in) costs that run that section only: the section carries the reason instead of a
result, and the report says "not available: <reason>".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..analysis import registry
from ..analysis.registry import Analysis, Outcome
from ..engine import Failed
from ..store import Store
from ..workers import session

#: Analyses the report runs on every run besides its sections: the overview (whose scan also
#: runs the data-quality checks) and the comparison across runs.
SPANNING = ("summary", "compare")


@dataclass
class RunResults:
    """Everything the report shows about one run.

    Attributes
    ----------
    run : str
    tokens, sequences : int
    entropy_source : str or None
    vocab_size : int or None
    outcomes : dict
        Name of each ``in_report`` analysis to its :class:`~entropylens.analysis.registry.
        Outcome` for this run alone.
    """

    run: str
    tokens: int
    sequences: int
    entropy_source: str | None
    vocab_size: int | None
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    def part(self, name: str) -> Outcome:
        """The outcome of analysis ``name`` (missing: "not computed")."""
        return self.outcomes.get(name, Outcome(reason="not computed"))


@dataclass
class Results:
    """Everything the report shows about a store.

    Attributes
    ----------
    store : Store
    runs : list of RunResults
    sections : list of Analysis
        The ``in_report`` analyses, in report order.
    summary : entropylens.analysis.summary.Summary
    parts : dict
        ``"compare"`` and ``"quality"``: the outcomes that span runs.
    """

    store: Store
    runs: list[RunResults]
    sections: list[Analysis]
    summary: Any
    parts: dict[str, Outcome] = field(default_factory=dict)

    def part(self, name: str) -> Outcome:
        return self.parts.get(name, Outcome(reason="not computed"))


def collect(store: Store, runs: list[str], *, engine: str = "local",
            workers: int | None = None, keep_after_eos: bool = False) -> Results:
    """Run the report's analyses on ``runs`` of ``store``.

    Parameters
    ----------
    store : Store
    runs : list of str
        Run names (already resolved).
    engine : {"local", "ray"}
    workers : int, optional
        Processes of the local engine (default: :func:`entropylens.engine.local_workers`).
    keep_after_eos : bool
        Keep the tokens after the end of their sequence (left out by default).

    Returns
    -------
    Results
    """
    sections = registry.registered(in_report=True)
    spanning = [registry.get(name) for name in SPANNING
                if name != "compare" or len(runs) > 1]
    summary_parts, compare_parts, entries = [], [], []
    with session():   # engine workers, if any, serve every run
        for run in runs:
            parts = registry.run_parts(store, run, [*spanning, *sections], engine=engine,
                                        keep_after_eos=keep_after_eos,
                                        **({"workers": workers} if workers is not None else {}))
            if isinstance(parts["summary"], Failed):
                raise parts["summary"].error   # the store itself cannot be read
            summary_parts.append(parts["summary"])
            compare_parts.append(parts.get("compare"))
            entries.append(_run_results(store, run, parts["summary"], parts, sections))
    summary = registry.get("summary").combine(summary_parts)
    results = Results(store=store, runs=entries, sections=sections, summary=summary)
    # the summary plans ran every data-quality check on their own scans
    results.parts["quality"] = Outcome(value=summary.quality)
    if len(runs) > 1:
        results.parts["compare"] = _across(registry.get("compare"), compare_parts)
    else:
        results.parts["compare"] = Outcome(reason="the report holds a single run")
    return results


def _run_results(store: Store, run: str, summary_part: tuple, parts: dict,
                 sections: list[Analysis]) -> RunResults:
    _, row, _ = summary_part
    source = row["entropy_source"]
    entry = RunResults(run=run, tokens=int(row["tokens"]), sequences=int(row["sequences"]),
                       entropy_source=source if isinstance(source, str) else None,
                       vocab_size=store.manifest(run).get("vocab_size"))
    for analysis in sections:
        entry.outcomes[analysis.name] = registry.outcome(analysis, parts[analysis.name])
    return entry


def _across(analysis: Analysis, parts: list) -> Outcome:
    """The outcome of an analysis combined across the runs' parts."""
    failed = next((p for p in parts if isinstance(p, Failed)), None)
    if failed is not None:
        return registry.outcome(analysis, failed)
    try:
        return Outcome(value=analysis.combine(parts))
    except Exception as exc:  # noqa: BLE001 - one section must not sink the report
        return registry.outcome(analysis, Failed(exc))
