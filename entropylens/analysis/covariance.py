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

Streaming: a first scan (:class:`StepMoments`, mergeable sums) gives each step's means; a
second pass (:class:`StepCovariance`) computes ``cov_i`` for a few steps at a time, holding at
most about ``max_tokens`` tokens' values in memory (a step larger than that alone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from scipy import stats

from ..engine import Aggregator, Plan, Scan, run_plan
from ..errors import EntropylensError
from ..store import Store
from .curves import TrainTokens, open_store, policy_entropy_plan
from .sequences import step_groups
from .summary import _records

#: Covariance groups: label and share of a step's tokens, ranked by covariance.
GROUPS = (("top 0.02%", 0.0002), ("top 0.2%", 0.002), ("top 2%", 0.02), ("top 20%", 0.2),
          ("top 50%", 0.5), ("all", 1.0))
GROUP_COLUMNS = ["run", "step", "group", "fraction", "tokens", "mean_cov"]
STEP_COLUMNS = ["run", "step", "tokens", "mean_cov", "entropy", "entropy_change_next"]
CORRELATION_COLUMNS = ["run", "pearson_r", "spearman_r", "n"]
#: Token values held in memory at once by the second pass (a larger step is taken alone).
MAX_TOKENS = 4_000_000


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


class StepMoments(Aggregator):
    """Per-step token count and sums of logprob and advantage (first pass)."""

    columns = ("step", "logprob", "advantage")

    def start(self) -> dict:
        return {}

    def update(self, state: dict, batch: pa.RecordBatch) -> dict:
        steps, logp, adv = _valid_pairs(batch)
        if not len(steps):
            return state
        unique, inverse = step_groups(steps)
        counts = np.bincount(inverse)
        sum_logp = np.bincount(inverse, weights=logp)
        sum_adv = np.bincount(inverse, weights=adv)
        for k, step in enumerate(unique.tolist()):
            old = state.get(step, (0, 0.0, 0.0))
            state[step] = (old[0] + int(counts[k]), old[1] + sum_logp[k], old[2] + sum_adv[k])
        return state

    def merge(self, left: dict, right: dict) -> dict:
        for step, (n, lp, a) in right.items():
            old = left.get(step, (0, 0.0, 0.0))
            left[step] = (old[0] + n, old[1] + lp, old[2] + a)
        return left

    def finish(self, state: dict) -> pd.DataFrame:
        """``step, tokens, mean_logprob, mean_advantage``."""
        rows = [{"step": s, "tokens": n, "mean_logprob": lp / n, "mean_advantage": a / n}
                for s, (n, lp, a) in sorted(state.items())]
        return pd.DataFrame(rows, columns=["step", "tokens", "mean_logprob", "mean_advantage"])


class StepCovariance(Aggregator):
    """Per-token covariance values of given steps, grouped by rank at finish (second pass).

    Parameters
    ----------
    means : mapping of step to (mean logprob, mean advantage)
        From :class:`StepMoments`; only these steps are kept.
    """

    columns = ("step", "logprob", "advantage")

    def __init__(self, means: dict):
        self.means = means

    def start(self) -> dict:
        return {}

    def update(self, state: dict, batch: pa.RecordBatch) -> dict:
        steps, logp, adv = _valid_pairs(batch)
        for step in step_groups(steps)[0].tolist():
            if step not in self.means:
                continue
            rows = steps == step
            mean_logp, mean_adv = self.means[step]
            values = (logp[rows] - mean_logp) * (adv[rows] - mean_adv)
            state.setdefault(step, []).append(values)
        return state

    def merge(self, left: dict, right: dict) -> dict:
        for step, arrays in right.items():
            left.setdefault(step, []).extend(arrays)
        return left

    def finish(self, state: dict) -> pd.DataFrame:
        """``step, group, fraction, tokens, mean_cov``: one row per step and group."""
        rows = []
        for step in sorted(state):
            values = np.sort(np.concatenate(state[step]))[::-1]
            for label, fraction in GROUPS:
                k = len(values) if fraction >= 1 else max(1, math.ceil(fraction * len(values)))
                rows.append({"step": step, "group": label, "fraction": fraction, "tokens": k,
                             "mean_cov": float(values[:k].mean())})
        return pd.DataFrame(rows, columns=["step", "group", "fraction", "tokens", "mean_cov"])


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


def _batches_of_steps(moments: pd.DataFrame, max_tokens: int) -> list[list[int]]:
    """Consecutive steps grouped so each group holds at most ``max_tokens`` tokens."""
    groups: list[list[int]] = []
    held = 0
    for step, tokens in zip(moments["step"].tolist(), moments["tokens"].tolist()):
        if groups and held + tokens <= max_tokens:
            groups[-1].append(step)
            held += tokens
        else:
            groups.append([step])
            held = tokens
    return groups


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


def covariance_plan(store: Store, run: str, *, max_tokens: int = MAX_TOKENS,
                    engine: str = "local", **engine_options) -> Plan:
    """One run's ``(groups, steps, correlation row)`` of :func:`covariance`, as a plan (see
    :func:`entropylens.engine.run_plans`). ``engine`` and its options only key the cached
    policy-entropy curve."""
    manifest = store.manifest(run)
    counts = manifest.get("counts", {})
    if not counts.get("tokens"):
        raise EntropylensError(f"run {run!r} has no tokens: the covariance needs per-token "
                               "logprob and advantage", path=store.run_dir(run))
    moments = (yield {"m": TrainTokens(StepMoments())})["m"]
    if moments.empty:
        missing = []
        for column in ("logprob", "advantage"):
            values = store.read_tokens(run, columns=[column]).column(column)
            if values.null_count == len(values):
                missing.append(column)
        what = " and ".join(missing) or "logprob and advantage on the same training tokens"
        raise EntropylensError(f"run {run!r} has no token {what}: the covariance needs both "
                               "(map the columns at ingest with --map advantage=COLUMN)",
                               path=store.run_dir(run))
    means = {int(r.step): (r.mean_logprob, r.mean_advantage) for r in moments.itertuples()}
    frames = []
    for steps in _batches_of_steps(moments, max_tokens):
        chosen = {s: means[s] for s in steps}
        frames.append((yield Scan({"c": TrainTokens(StepCovariance(chosen))},
                                  steps=tuple(steps)))["c"])
    groups = pd.concat(frames, ignore_index=True)
    groups.insert(0, "run", run)
    overall = groups[groups["group"] == "all"][["step", "tokens", "mean_cov"]]
    curve = yield from policy_entropy_plan(store, run, engine=engine, **engine_options)
    curve = curve.assign(entropy_change_next=curve["entropy"].shift(-1) - curve["entropy"])
    per_step = overall.merge(curve[["step", "entropy", "entropy_change_next"]], on="step",
                             how="left")
    per_step.insert(0, "run", run)
    return groups[GROUP_COLUMNS], per_step[STEP_COLUMNS], _correlation(run, per_step)


def covariance(store: Store | str, runs: str | Sequence[str] | None = None, *,
               max_tokens: int = MAX_TOKENS, engine: str = "local",
               **engine_options) -> Covariance:
    """Covariance of token log-probability and advantage per step, by group.

    Parameters
    ----------
    store : Store or path
    runs : str or sequence of str, optional
        Default: every run. When several are asked for, runs without per-token logprob and
        advantage are left out; a single such run raises.
    max_tokens : int
        Token values the second pass may hold at once.
    engine : {"local", "ray"}

    Returns
    -------
    Covariance

    Raises
    ------
    EntropylensError
        When no run asked for has both logprob and advantage on its training tokens.
    """
    store = open_store(store)
    names = store.resolve_runs(runs)
    groups, steps, correlation, skipped = [], [], [], []
    for run in names:
        try:
            g, s, c = run_plan(store, run, covariance_plan(
                store, run, max_tokens=max_tokens, engine=engine, **engine_options),
                engine=engine, **engine_options)
        except EntropylensError as exc:
            if len(names) == 1:
                raise
            skipped.append(exc.message)
            continue
        groups.append(g)
        steps.append(s)
        correlation.append(c)
    if not groups:
        raise EntropylensError("no run has per-token logprob and advantage: "
                               + "; ".join(skipped), path=store.path)
    return covariance_from_parts(list(zip(groups, steps, correlation)), skipped=skipped)


def covariance_from_parts(parts: list[tuple], *, skipped: Sequence[str] = ()) -> Covariance:
    """The :class:`Covariance` of runs from the results of their :func:`covariance_plan`."""
    return Covariance(groups=pd.concat([p[0] for p in parts], ignore_index=True),
                      steps=pd.concat([p[1] for p in parts], ignore_index=True),
                      correlation=pd.DataFrame([p[2] for p in parts],
                                               columns=CORRELATION_COLUMNS),
                      skipped=list(skipped))
