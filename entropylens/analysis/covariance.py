"""Token covariance of log-probability and advantage (arXiv 2505.22617, Eq. 10).

Under policy gradient the step's entropy change is approximately ``-eta * Cov(log pi, A)``:
tokens that are both likely and rewarded lower the entropy. Per token of a training step,

    cov_i = (logp_i - mean(logp)) * (A_i - mean(A)),

the means taken over that step's tokens that have both a log-probability and an advantage.
The step's mean covariance is the mean of ``cov_i`` over all of them (the biased sample
covariance). Groups rank the step's tokens by ``cov_i`` from the largest: the top 0.02%, 0.2%,
2%, 20% and 50% (``ceil(fraction * N)`` tokens, at least one) and all; Table 1 of the paper
has 5.654, 3.112, 1.385, 0.351, 0.152 and 0.003 at step 1 for Qwen2.5-7B.

The entropy change of a step is the next step's policy entropy minus its own (both from
:func:`~entropylens.analysis.curves.policy_entropy`); the correlation of each step's mean
covariance with it is reported as Pearson and Spearman coefficients.

Streaming: one scan (:class:`StepCovariance`). The engine's units hold whole steps, so each
step's means and ``cov_i`` are computed when its unit is sealed: memory of one unit.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..engine import Aggregator, Plan
from ..errors import EntropylensError
from ..store import Store
from .curves import TrainTokens, open_store, policy_entropy_plan
from .registry import Analysis, FigureSpec, Finding, register, run_analysis
from .sequences import step_rows
from ..base.jsonable import records as _records
from ..base.lazy import LazyModule

# scipy.stats takes about half a second to import: only the correlations pay for it
stats = LazyModule("scipy.stats")

#: Covariance groups: label and share of a step's tokens, ranked by covariance.
GROUPS = (("top 0.02%", 0.0002), ("top 0.2%", 0.002), ("top 2%", 0.02), ("top 20%", 0.2),
          ("top 50%", 0.5), ("all", 1.0))
GROUP_COLUMNS = ["run", "step", "group", "fraction", "tokens", "mean_cov"]
STEP_COLUMNS = ["run", "step", "tokens", "mean_cov", "entropy", "entropy_change_next"]
CORRELATION_COLUMNS = ["run", "pearson_r", "spearman_r", "n"]


def _valid_pairs(batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps, logprobs and advantages of the rows that have all three, as numpy arrays."""
    step, logp, adv = (batch.column(c) for c in ("step", "logprob", "advantage"))
    if step.null_count or logp.null_count or adv.null_count:
        keep = pc.and_(pc.and_(pc.is_valid(step), pc.is_valid(logp)), pc.is_valid(adv))
        step, logp, adv = (pc.filter(a, keep) for a in (step, logp, adv))
    step = step.to_numpy(zero_copy_only=False)
    logp = logp.to_numpy(zero_copy_only=False).astype(np.float64)
    adv = adv.to_numpy(zero_copy_only=False).astype(np.float64)
    finite = np.isfinite(logp) & np.isfinite(adv)
    if not finite.all():
        step, logp, adv = step[finite], logp[finite], adv[finite]
    return step, logp, adv


class StepCovariance(Aggregator):
    """Per-step covariance groups in one pass.

    The engine hands over step-closed units, so when a unit is sealed each of its steps is
    complete: the step's means, every ``cov_i`` and the groups by rank are computed there
    and the values freed. Memory: one unit's (logprob, advantage) pairs.
    """

    columns = ("step", "logprob", "advantage")

    def share_key(self) -> tuple | None:
        """No settings: the covariance and the diagnosis that reads it scan once."""
        return (StepCovariance,) if type(self) is StepCovariance else None

    def start(self) -> dict:
        return {"pending": {}, "rows": []}

    def update(self, state: dict, batch: pa.RecordBatch) -> dict:
        steps, logp, adv = _valid_pairs(batch)
        for step, rows in step_rows(steps):
            state["pending"].setdefault(step, []).append((logp[rows], adv[rows]))
        return state

    def seal(self, state: dict) -> dict:
        for step in sorted(state["pending"]):
            pairs = state["pending"][step]
            logp = np.concatenate([p[0] for p in pairs])
            adv = np.concatenate([p[1] for p in pairs])
            values = np.sort((logp - logp.mean()) * (adv - adv.mean()))[::-1]
            for label, fraction in GROUPS:
                k = len(values) if fraction >= 1 else max(1, math.ceil(fraction * len(values)))
                state["rows"].append({"step": step, "group": label, "fraction": fraction,
                                      "tokens": k, "mean_cov": float(values[:k].mean())})
        state["pending"] = {}
        return state

    def merge(self, left: dict, right: dict) -> dict:
        # values not sealed yet may belong to the same step: they wait together
        pending = {step: list(pairs) for step, pairs in left["pending"].items()}
        for step, pairs in right["pending"].items():
            pending.setdefault(step, []).extend(pairs)
        return {"pending": pending, "rows": left["rows"] + right["rows"]}

    def finish(self, state: dict) -> pd.DataFrame:
        """``step, group, fraction, tokens, mean_cov``: one row per step and group."""
        frame = pd.DataFrame(self.seal(state)["rows"],
                             columns=["step", "group", "fraction", "tokens", "mean_cov"])
        return frame.sort_values("step", kind="stable").reset_index(drop=True)


@dataclass
class Covariance:
    """Result of :func:`covariance`.

    Attributes
    ----------
    groups : pandas.DataFrame
        ``run, step, group, fraction, tokens, mean_cov``.
    steps : pandas.DataFrame
        ``run, step, tokens, mean_cov, entropy, entropy_change_next`` (the next logged step's
        policy entropy minus this step's; null at the last step).
    correlation : pandas.DataFrame
        ``run, pearson_r, spearman_r, n``: mean covariance against the next entropy change,
        over the steps that have both (coefficients null with fewer than 3 such steps).
    skipped : list of str
        Why runs were left out (several runs asked for, some without the columns).
    """

    groups: pd.DataFrame
    steps: pd.DataFrame
    correlation: pd.DataFrame
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The JSON of ``entropylens covariance --json``."""
        return {"groups": _records(self.groups), "steps": _records(self.steps),
                "correlation": _records(self.correlation), "skipped": list(self.skipped)}


def _correlation(run: str, steps: pd.DataFrame) -> dict:
    both = steps.dropna(subset=["mean_cov", "entropy_change_next"])
    n = len(both)
    pearson = spearman = None
    if n >= 3 and both["mean_cov"].nunique() > 1 and both["entropy_change_next"].nunique() > 1:
        x = both["mean_cov"].to_numpy(dtype=float)
        y = both["entropy_change_next"].to_numpy(dtype=float)
        pearson = float(stats.pearsonr(x, y)[0])
        spearman = float(stats.spearmanr(x, y)[0])
    return {"run": run, "pearson_r": pearson, "spearman_r": spearman, "n": n}


def covariance_plan(store: Store, run: str, *, engine: str = "local",
                    **engine_options) -> Plan:
    """One run's ``(groups, steps, correlation row)`` of :func:`covariance`, as a plan (see
    :func:`entropylens.engine.run_plans`). ``engine`` and its options only key the cached
    policy-entropy curve."""
    manifest = store.manifest(run)
    counts = manifest.get("counts", {})
    if not counts.get("tokens"):
        raise EntropylensError(f"run {run!r} has no tokens: the covariance needs per-token "
                               "logprob and advantage", path=store.run_dir(run))
    groups = (yield {"c": TrainTokens(StepCovariance())})["c"]
    if groups.empty:
        missing = []
        for column in ("logprob", "advantage"):
            values = store.read_tokens(run, columns=[column]).column(column)
            if values.null_count == len(values):
                missing.append(column)
        what = " and ".join(missing) or "logprob and advantage on the same training tokens"
        raise EntropylensError(f"run {run!r} has no token {what}: the covariance needs both "
                               "(map the columns at ingest with --map advantage=COLUMN)",
                               path=store.run_dir(run))
    groups.insert(0, "run", run)
    overall = groups[groups["group"] == "all"][["step", "tokens", "mean_cov"]]
    curve = yield from policy_entropy_plan(store, run, engine=engine, **engine_options)
    curve = curve.assign(entropy_change_next=curve["entropy"].shift(-1) - curve["entropy"])
    per_step = overall.merge(curve[["step", "entropy", "entropy_change_next"]], on="step",
                             how="left")
    per_step.insert(0, "run", run)
    return groups[GROUP_COLUMNS], per_step[STEP_COLUMNS], _correlation(run, per_step)


class CovarianceAnalysis(Analysis):
    """Registered form of :func:`covariance` (see :mod:`entropylens.analysis.registry`)."""

    name = "covariance"
    title = "Covariance of log-probability and advantage"
    needs = ("tokens",)
    order = 60

    def plan(self, store: Store, run: str, inputs) -> Plan:
        return covariance_plan(store, run)

    def combine(self, parts, *, skipped=(), **options) -> Covariance:
        return covariance_from_parts(list(parts), skipped=skipped)

    def figures(self, result: Covariance, run: str) -> list[FigureSpec]:
        from ..plots import covariance_groups

        if result.groups.empty:
            return []
        return [FigureSpec("covariance", f"{run}: covariance groups",
                           "Mean Cov(log π, A) per step in each covariance group "
                           "(symmetric-log axis).",
                           lambda ax: covariance_groups(result.groups, run=run, ax=ax))]

    def section(self, result: Covariance, run: str) -> dict:
        return {"groups": _records(result.groups), "correlation": _records(result.correlation)}

    def findings(self, result: Covariance, run: str) -> list[Finding]:
        row = result.correlation.iloc[0] if len(result.correlation) else None
        if row is None or row["pearson_r"] is None or pd.isna(row["pearson_r"]):
            return []
        r, n = float(row["pearson_r"]), int(row["n"])
        spearman = row["spearman_r"]
        return [Finding("covariance",
                        f"mean Cov(log π, A) and the next step's entropy change correlate with "
                        f"Pearson r = {r:.2f} over {n} steps (theory: negative, entropy falls "
                        f"when confident tokens are reinforced)",
                        numbers={"pearson_r": r,
                                 "spearman_r": None if spearman is None or pd.isna(spearman)
                                 else float(spearman), "n": n})]


register(CovarianceAnalysis())


def covariance(store: Store | str, runs: str | Sequence[str] | None = None, *,
               engine: str = "local", workers: int | None = None,
               max_tokens: int | None = None, **engine_options) -> Covariance:
    """Covariance of token log-probability and advantage per step, by group.

    Parameters
    ----------
    store : Store or path
    runs : str or sequence of str, optional
        Default: every run. When several are asked for, runs without per-token logprob and
        advantage are left out; a single such run raises.
    engine : {"local", "ray"}
    workers : int, optional
        Worker processes of the local engine (1: none).
    max_tokens : int, optional
        Deprecated and ignored: the covariance runs in one pass that holds one unit of the
        engine at a time.

    Returns
    -------
    Covariance

    Raises
    ------
    EntropylensError
        When no run asked for has both logprob and advantage on its training tokens.
    """
    if max_tokens is not None:
        warnings.warn("covariance(max_tokens=...) no longer applies: the covariance runs in "
                      "one pass holding one unit at a time", DeprecationWarning, stacklevel=2)
    return run_analysis("covariance", open_store(store), runs, engine=engine, workers=workers,
                        **engine_options)


def covariance_from_parts(parts: list[tuple], *, skipped: Sequence[str] = ()) -> Covariance:
    """The :class:`Covariance` of runs from the results of their :func:`covariance_plan`."""
    return Covariance(groups=pd.concat([p[0] for p in parts], ignore_index=True),
                      steps=pd.concat([p[1] for p in parts], ignore_index=True),
                      correlation=pd.DataFrame([p[2] for p in parts],
                                               columns=CORRELATION_COLUMNS),
                      skipped=list(skipped))
