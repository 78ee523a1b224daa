"""Run every analysis the report shows, keeping going when one is not available.

The token analyses of a run run together as plans over shared scans
(:func:`entropylens.engine.run_plans`); each keeps its own outcome, so a run that lacks what
one analysis needs (a metric-only run has no tokens to find forking tokens in) costs that run
that section only. A section that cannot be computed carries the reason instead of a result,
and the report says "not available: <reason>".
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd

from ..analysis.covariance import covariance_from_parts, covariance_plan
from ..analysis.curves import policy_entropy_plan
from ..analysis.distribution import distribution_from_parts, distribution_plan
from ..analysis.forking import forking_from_parts, forking_plan
from ..analysis.roles import roles_from_parts, roles_plan
from ..analysis.summary import summary_from_parts, summary_plan
from ..engine import Failed, run_plans
from ..errors import EntropylensError, StoreReadError
from ..estimators import best_entropy_source
from ..store import Store
from ..workers import session

#: Where each analysis called by name lives: the public API first, then its analysis module.
#: (The token analyses run as plans, imported above.)
ANALYSES = {
    "performance": "curves",
    "phases": "phases",
    "fit_saturation": "saturation",
    "forking_mask": "forking",
    "compare": "compare",
}


@dataclass
class Part:
    """One analysis result, or the reason it is missing.

    Attributes
    ----------
    value : object
        The result (None when missing).
    reason : str or None
        Why the result is missing, in plain words; None when it is there.
    """

    value: Any = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


@dataclass
class RunResults:
    """Everything the report shows about one run."""

    run: str
    tokens: int
    sequences: int
    entropy_source: str | None
    vocab_size: int | None
    parts: dict[str, Part] = field(default_factory=dict)

    def part(self, name: str) -> Part:
        return self.parts.get(name, Part(reason="not computed"))


@dataclass
class Results:
    """Everything the report shows about a store."""

    store: Store
    runs: list[RunResults]
    summary: Any
    parts: dict[str, Part] = field(default_factory=dict)

    def part(self, name: str) -> Part:
        return self.parts.get(name, Part(reason="not computed"))


def analysis(name: str) -> Callable | None:
    """The analysis function ``name`` from the public API or its module; None when absent."""
    from .. import api

    function = getattr(api, name, None)
    if callable(function):
        return function
    try:
        module = importlib.import_module(f"entropylens.analysis.{ANALYSES[name]}")
    except ImportError:
        return None
    function = getattr(module, name, None)
    return function if callable(function) else None


def attempt(name: str, *args, **kwargs) -> Part:
    """Call analysis ``name``; a missing analysis or bad data becomes a :class:`Part` reason.

    Errors other than :class:`EntropylensError` are kept as reasons too (prefixed
    ``failed:``) so one broken section never costs the whole report.
    """
    function = analysis(name)
    if function is None:
        return Part(reason=f"this installation has no {name.replace('_', ' ')} analysis "
                           f"(entropylens.analysis.{ANALYSES[name]})")
    kwargs = _accepted(function, kwargs)
    try:
        return Part(value=function(*args, **kwargs))
    except Exception as exc:  # noqa: BLE001 - a report section must not sink the report
        return Part(reason=_reason(exc))


def _accepted(function: Callable, kwargs: dict) -> dict:
    """Drop keyword arguments (such as ``engine``) that ``function`` does not take."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in parameters}


def _first_run(part: Part, run: str) -> Part:
    """The run's own entry of a multi-run result with a ``runs`` list."""
    if not part.ok:
        return part
    runs = getattr(part.value, "runs", None)
    if isinstance(runs, list):
        for entry in runs:
            if getattr(entry, "run", None) == run:
                return Part(value=entry)
        return Part(reason=f"no result for run {run!r}")
    return part


def _usable_fit(part: Part) -> Part:
    """A fit without coefficients (``error`` set) counts as missing, with its reason."""
    if part.ok and getattr(part.value, "a", None) is None:
        return Part(reason=getattr(part.value, "error", None) or "the law could not be fitted")
    return part


def _non_empty(part: Part, attribute: str | None, reason: str) -> Part:
    if not part.ok:
        return part
    value = getattr(part.value, attribute) if attribute else part.value
    if isinstance(value, pd.DataFrame) and value.empty:
        return Part(value=part.value, reason=reason)
    return part


def _reason(exc: Exception) -> str:
    if isinstance(exc, StoreReadError):  # a damaged store is no note: it stops the command
        raise exc
    if isinstance(exc, EntropylensError):
        return exc.message
    return f"failed: {type(exc).__name__}: {exc}"


def _outcome(value: Any, assemble: Callable | None = None) -> Part:
    """A plan's outcome as a :class:`Part` (a failure becomes its reason)."""
    if isinstance(value, Failed):
        return Part(reason=_reason(value.error))
    if assemble is None:
        return Part(value=value)
    try:
        return Part(value=assemble(value))
    except Exception as exc:  # noqa: BLE001 - a report section must not sink the report
        return Part(reason=_reason(exc))


def _run_plans(store: Store, run: str, manifest: dict, source: str | None,
               engine: str) -> dict[str, Any]:
    """Every token analysis of one run as plans over shared scans (one read per round)."""
    plans = {"summary": summary_plan(store, run),
             "curve": policy_entropy_plan(store, run, engine=engine)}
    if source is not None:
        plans["distribution"] = distribution_plan(store, run, source, manifest)
        plans["forking"] = forking_plan(store, run, source, manifest)
        plans["roles"] = roles_plan(store, run)
        plans["covariance"] = covariance_plan(store, run, engine=engine)
    return run_plans(store, run, plans, engine=engine)


def collect(store: Store, runs: list[str], *, engine: str = "local") -> Results:
    """Run the report's analyses on ``runs`` of ``store``.

    The token analyses of a run (summary and data quality, policy-entropy curve,
    distribution, forking tokens, roles, covariance) run as plans over shared scans, so the
    run's tokens are read once for all of them, plus once more when some completions have
    tokens after their end-of-sequence token (counted by a second pass). Covariance, phases
    and the saturation fit reuse the remembered policy-entropy curve.

    Parameters
    ----------
    store : Store
    runs : list of str
        Run names (already resolved).
    engine : {"local", "ray"}

    Returns
    -------
    Results
    """
    with session():   # engine workers, if any, serve every run
        return _collect(store, runs, engine)


def _collect(store: Store, runs: list[str], engine: str) -> Results:
    summary_parts, entries = [], []
    for run in runs:
        manifest = store.manifest(run)
        source = best_entropy_source(manifest) if manifest.get("counts", {}).get("tokens") \
            else None
        outcomes = _run_plans(store, run, manifest, source, engine)
        if isinstance(outcomes["summary"], Failed):
            raise outcomes["summary"].error   # the store itself cannot be read
        summary_parts.append(outcomes["summary"])
        _, row, _ = outcomes["summary"]
        entry = RunResults(run=run, tokens=int(row["tokens"]), sequences=int(row["sequences"]),
                           entropy_source=row["entropy_source"] if isinstance(
                               row["entropy_source"], str) else None,
                           vocab_size=manifest.get("vocab_size"))
        parts = entry.parts
        parts["curve"] = _non_empty(_outcome(outcomes["curve"]), None,
                                    "no policy entropy points")
        parts["performance"] = attempt("performance", store, run)
        parts["phases"] = _first_run(attempt("phases", store, run, engine=engine), run)
        parts["fit"] = _usable_fit(attempt("fit_saturation", store, run, engine=engine))
        if source is None:
            reason = "the run has no tokens (only step metrics)"
            for name in ("distribution", "forking", "roles", "covariance"):
                parts[name] = Part(reason=reason)
        else:
            parts["distribution"] = _non_empty(
                _outcome(outcomes["distribution"], lambda p: distribution_from_parts([p])),
                "steps", "no token entropies")
            parts["forking"] = _outcome(outcomes["forking"],
                                        lambda p: forking_from_parts([p]))
            parts["roles"] = _outcome(outcomes["roles"], lambda p: roles_from_parts([p]))
            parts["covariance"] = _non_empty(
                _outcome(outcomes["covariance"], lambda p: covariance_from_parts([p])),
                "groups", "no tokens with both a log-probability and an advantage")
        entries.append(entry)
    summary = summary_from_parts(summary_parts)
    results = Results(store=store, runs=entries, summary=summary)
    # the summary plans ran every data-quality check on their own scans
    results.parts["quality"] = Part(value=summary.quality)
    if len(runs) > 1:
        results.parts["compare"] = attempt("compare", store, runs, engine=engine)
    else:
        results.parts["compare"] = Part(reason="the report holds a single run")
    return results
