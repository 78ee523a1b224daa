"""The run summary: what each run holds and its per-step entropy statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import pandas as pd

from ..base.jsonable import records as _records
from ..engine import Plan, scan_selection
from ..estimators import best_entropy_source
from ..store import Store
from .distribution import step_stats
from .quality import QUALITY_COLUMNS, quality_plan, quality_scan
from .registry import Analysis, register, run_analysis

RUN_COLUMNS = ["run", "tokens", "sequences", "steps", "entropy_source", "tokens_after_eos",
               "after_eos"]
STEP_COLUMNS = ["run", "step", "tokens", "entropy_token_mean", "entropy_seq_mean", "p50", "p80",
                "frac_below_0_01"]


@dataclass
class Summary:
    """Result of :func:`summary`.

    Attributes
    ----------
    runs : pandas.DataFrame
        One row per run: ``run, tokens, sequences, steps, entropy_source,
        tokens_after_eos, after_eos``: the tokens after the end of their sequence (padding
        never sampled) and whether the statistics left them out (``"excluded"``, the
        default) or kept them (``"kept"``, ``keep_after_eos=True``).
    steps : pandas.DataFrame
        One row per run and step: ``run, step, tokens, entropy_token_mean, entropy_seq_mean,
        p50, p80, frac_below_0_01``.
    warnings : list of str
        ``"RUN: message"`` for every data-quality check of severity ``warning``.
    quality : pandas.DataFrame
        Every data-quality finding (:func:`entropylens.analysis.quality.quality`):
        ``run, check, severity, count, message``.
    """

    runs: pd.DataFrame
    steps: pd.DataFrame
    warnings: list[str] = field(default_factory=list)
    quality: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(
        columns=QUALITY_COLUMNS))

    def to_dict(self) -> dict:
        """The JSON shape of ``entropylens summary --json`` (DESIGN.md section 6)."""
        return {"runs": _records(self.runs), "steps": _records(self.steps),
                "warnings": list(self.warnings), "quality": _records(self.quality)}


def _metric_steps(store: Store, run: str) -> pd.DataFrame:
    """Per-step rows of a run without tokens, from its ``policy_entropy`` metric."""
    metrics = store.read_metrics(run)
    entropy = metrics[metrics["metric"] == "policy_entropy"]
    entropy = entropy.dropna(subset=["step"]).groupby("step", as_index=False)["value"].last()
    frame = pd.DataFrame({"run": run, "step": entropy["step"].astype("Int64"), "tokens": 0,
                          "entropy_token_mean": entropy["value"]})
    return frame.reindex(columns=STEP_COLUMNS)


def summary_plan(store: Store, run: str) -> Plan:
    """One run's per-step rows, run row and data-quality rows, as a plan (see
    :func:`entropylens.engine.run_plans`)."""
    manifest = store.manifest(run)
    counts = manifest.get("counts", {})
    source = best_entropy_source(manifest) if counts.get("tokens") else None
    scan = None
    if source is not None:
        # the data-quality checks ride on the same scan as the statistics
        results = yield {"steps": step_stats(source, manifest),
                         "quality": quality_scan(store, run, manifest)}
        stats, scan = results["steps"], results["quality"]
        stats.insert(0, "run", run)
        steps = stats[STEP_COLUMNS]
    else:
        steps = _metric_steps(store, run)
        source = "metric" if len(steps) else None
    checks = yield from quality_plan(store, run, manifest, scan)
    after = checks[checks["check"] == "tokens_after_eos"]["count"] if len(checks) else ()
    row = {"run": run, "tokens": counts.get("tokens", 0),
           "sequences": counts.get("sequences", 0), "steps": int(steps["step"].nunique()),
           "entropy_source": source,
           # counted by the quality checks from the data, so older stores have it too
           "tokens_after_eos": int(sum(after)) if counts.get("tokens") else 0,
           "after_eos": "kept" if scan_selection()["keep_after_eos"] else "excluded"}
    return steps, row, checks


def summary(store: Store | str, runs: str | Sequence[str] | None = None, *,
            engine: str = "local", workers: int | None = None, **engine_options) -> Summary:
    """Summarise runs: contents and per-step entropy statistics.

    Per-step statistics come from the best entropy source of each run's tokens (exact, then
    top-k, then surprisal); a run with only step metrics reports its ``policy_entropy``
    metric as ``entropy_token_mean`` and ``metric`` as its source. The data-quality checks
    (:func:`entropylens.analysis.quality.quality`) ride on the same scan.

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
    Summary
    """
    return run_analysis("summary", store, runs, engine=engine, workers=workers,
                        **engine_options)


class SummaryAnalysis(Analysis):
    """Registered form of :func:`summary`. The report shows it as its overview table (and
    its data-quality rows as the data-quality section), not as a per-run section."""

    name = "summary"
    title = "Runs"
    in_report = False
    order = 0
    skip_runs = False   # every run asked for, or its error

    def plan(self, store: Store, run: str, inputs) -> Plan:
        return summary_plan(store, run)

    def combine(self, parts, *, skipped=(), **options) -> Summary:
        return summary_from_parts(list(parts))


def summary_from_parts(parts: list[tuple]) -> Summary:
    """The :class:`Summary` of runs from the results of their :func:`summary_plan`."""
    step_frames = [steps for steps, _, _ in parts]
    run_rows = [row for _, row, _ in parts]
    quality_frames = [checks for _, _, checks in parts if len(checks)]
    steps = pd.concat(step_frames, ignore_index=True) if step_frames else \
        pd.DataFrame(columns=STEP_COLUMNS)
    quality = pd.concat(quality_frames, ignore_index=True) if quality_frames else \
        pd.DataFrame(columns=QUALITY_COLUMNS)
    warnings = [f"{row.run}: {row.message}" for row in quality.itertuples()
                if row.severity == "warning"]
    return Summary(runs=pd.DataFrame(run_rows, columns=RUN_COLUMNS), steps=steps,
                   warnings=warnings, quality=quality)


register(SummaryAnalysis())
