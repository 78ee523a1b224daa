"""Token statistics split by where the tokens came from (the ``origin`` column).

Critique-GRPO (arXiv 2506.03106) trains on a mix of on-policy responses and critique-guided
refinements, the latter as off-policy tokens; any run can label its tokens with an ``origin``
(``on_policy``, ``refinement`` or a user's label mapped at ingest with ``--map origin=COLUMN``).
Per training step and origin (tokens without one are ``unlabelled``):

- ``tokens``, the mean entropy and its 20th, 50th and 80th percentiles (``numpy.quantile``'s
  linear rule; the run's best entropy source);
- ``forking_share``: the share of the origin's tokens that fork, i.e. whose entropy is strictly
  above the step's threshold, the 80th percentile of *all* the step's tokens (the top-20% rule
  of arXiv 2506.01939, one threshold for every origin so that the shares compare);
- ``covariance_mean``: the mean over the origin's tokens of
  ``(logp - mean logp) * (A - mean A)``, the means taken over all the step's tokens that have
  both (arXiv 2505.22617, Eq. 10; null without advantages).

Streaming: one scan (:class:`OriginScan`) over training tokens; the engine's units hold whole
steps, so each step is reduced when its unit is sealed (memory of one unit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..engine import Aggregator, Plan
from ..errors import EntropylensError
from ..estimators import best_entropy_source, columns_for, token_entropy
from ..store import Store
from .curves import TrainTokens, open_store
from .registry import Analysis, FigureSpec, register, run_analysis
from .sequences import step_rows
from ..base.jsonable import records as _records

#: Origin of tokens that have none.
UNLABELLED = "unlabelled"
#: Share of a step's tokens that fork (top 20% by entropy).
RATIO = 0.2
QUANTILES = (0.2, 0.5, 0.8)
COLUMNS = ["run", "step", "origin", "tokens", "token_share", "entropy_mean", "p20", "p50",
           "p80", "forking_share", "covariance_mean"]


class OriginScan(Aggregator):
    """Per step and origin: tokens, entropy mean and quantiles, forking share, covariance."""

    def __init__(self, source: str, *, vocab_size: int | None = None,
                 top_k: int | None = None):
        self.source, self.vocab_size, self.top_k = source, vocab_size, top_k
        self.columns = tuple(sorted({"step", "origin", "logprob", "advantage",
                                     *columns_for(source)}))

    def start(self) -> dict:
        return {"pending": {}, "rows": []}

    def update(self, state: dict, batch: pa.RecordBatch) -> dict:
        steps = batch.column("step").to_numpy(zero_copy_only=False)
        entropy = token_entropy(batch, self.source, vocab_size=self.vocab_size,
                                top_k=self.top_k)
        origin = np.asarray(pc.fill_null(batch.column("origin"), UNLABELLED)
                            .to_numpy(zero_copy_only=False), dtype=object)
        logp, adv = (pc.cast(batch.column(c), pa.float64()).fill_null(np.nan)
                     .to_numpy(zero_copy_only=False) for c in ("logprob", "advantage"))
        for step, rows in step_rows(steps):
            state["pending"].setdefault(step, []).append(
                (origin[rows], entropy[rows], logp[rows], adv[rows]))
        return state

    def seal(self, state: dict) -> dict:
        for step in sorted(state["pending"]):
            parts = state["pending"][step]
            origin, entropy, logp, adv = (np.concatenate([p[i] for p in parts])
                                          for i in range(4))
            state["rows"] += _step_rows(step, origin, entropy, logp, adv)
        state["pending"] = {}
        return state

    def merge(self, left: dict, right: dict) -> dict:
        pending = {step: list(parts) for step, parts in left["pending"].items()}
        for step, parts in right["pending"].items():
            pending.setdefault(step, []).extend(parts)
        return {"pending": pending, "rows": left["rows"] + right["rows"]}

    def finish(self, state: dict) -> pd.DataFrame:
        frame = pd.DataFrame(self.seal(state)["rows"], columns=COLUMNS[1:])
        return frame.sort_values(["step", "origin"], kind="stable").reset_index(drop=True)


def _step_rows(step: int, origin: np.ndarray, entropy: np.ndarray, logp: np.ndarray,
               adv: np.ndarray) -> list[dict]:
    """The rows of one complete step (see the module docstring)."""
    has_entropy = np.isfinite(entropy)
    threshold = np.quantile(entropy[has_entropy], 1 - RATIO) if has_entropy.any() else np.nan
    both = np.isfinite(logp) & np.isfinite(adv)
    cov = np.full(len(logp), np.nan)
    if both.any():
        cov[both] = (logp[both] - logp[both].mean()) * (adv[both] - adv[both].mean())
    rows = []
    for label in sorted(set(origin.tolist())):
        mine = origin == label
        values = entropy[mine & has_entropy]
        quantiles = np.quantile(values, QUANTILES) if len(values) else [np.nan] * 3
        covs = cov[mine & both]
        rows.append({"step": int(step), "origin": str(label), "tokens": int(mine.sum()),
                     "token_share": float(mine.mean()),
                     "entropy_mean": float(values.mean()) if len(values) else np.nan,
                     "p20": float(quantiles[0]), "p50": float(quantiles[1]),
                     "p80": float(quantiles[2]),
                     "forking_share": float((values > threshold).mean()) if len(values)
                     else np.nan,
                     "covariance_mean": float(covs.mean()) if len(covs) else np.nan})
    return rows


@dataclass
class Origins:
    """Result of :func:`origins`.

    Attributes
    ----------
    steps : pandas.DataFrame
        :data:`COLUMNS`: one row per run, training step and origin.
    skipped : list of str
    """

    steps: pd.DataFrame
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The JSON of ``entropylens origins --json``."""
        return {"ratio": RATIO, "steps": _records(self.steps), "skipped": list(self.skipped)}


def origins_plan(store: Store, run: str) -> Plan:
    """One run's rows of :func:`origins`, as a plan."""
    manifest = store.manifest(run)
    source = best_entropy_source(manifest)
    if source is None:
        raise EntropylensError(f"run {run!r} has no token entropy source: the origin split "
                               "needs tokens", path=store.run_dir(run))
    missing = EntropylensError(f"run {run!r} has no token origins: label them at ingest "
                               "(--map origin=COLUMN)", path=store.run_dir(run))
    if store.token_column_empty(run, "origin"):
        raise missing   # from the footers: a report of a run without origins reads nothing
    scan = OriginScan(source, vocab_size=manifest.get("vocab_size"),
                      top_k=manifest.get("top_k"))
    frame = (yield {"o": TrainTokens(scan)})["o"]
    if frame.empty or set(frame["origin"]) == {UNLABELLED}:
        raise missing
    frame.insert(0, "run", run)
    return frame[COLUMNS]


class OriginsAnalysis(Analysis):
    """Registered form of :func:`origins` (see :mod:`entropylens.analysis.registry`)."""

    name = "origins"
    title = "Token statistics by origin (on-policy versus refinement)"
    needs = ("tokens",)
    order = 75
    only_where_present = True

    def plan(self, store: Store, run: str, inputs, **options) -> Plan:
        return origins_plan(store, run)

    def combine(self, parts, *, skipped=(), **options) -> Origins:
        return Origins(pd.concat(list(parts), ignore_index=True), skipped=list(skipped))

    def figures(self, result: Origins, run: str) -> list[FigureSpec]:
        from ..plots import origin_steps

        return [FigureSpec(
            "origins", f"{run}: entropy and forking share by origin",
            "Mean token entropy (left) and share of tokens above the step's top-20% entropy "
            "threshold (right), one line per origin.",
            lambda axes: [origin_steps(result.steps, y=y, run=run, ax=ax)
                          for y, ax in zip(("entropy_mean", "forking_share"), axes)],
            figsize=(10, 3.6), ncols=2)]

    def section(self, result: Origins, run: str) -> dict:
        mine = result.steps[result.steps["run"] == run]
        overall = []
        for origin, rows in mine.groupby("origin", sort=True):
            weights = rows["tokens"].to_numpy(float)

            def weighted(column, rows=rows, weights=weights):
                values = rows[column].to_numpy(float)
                keep = np.isfinite(values)
                return float(np.average(values[keep], weights=weights[keep])) \
                    if keep.any() else None

            overall.append({"origin": origin, "tokens": int(weights.sum()),
                            "entropy_mean": weighted("entropy_mean"),
                            "forking_share": weighted("forking_share"),
                            "covariance_mean": weighted("covariance_mean")})
        return {"ratio": RATIO, "origins": overall, "steps": _records(mine)}


register(OriginsAnalysis())


def origins(store: Store | str, runs: str | Sequence[str] | None = None, *,
            engine: str = "local", workers: int | None = None, **engine_options) -> Origins:
    """Token entropy, quantiles, forking share and covariance per step and token origin.

    Parameters
    ----------
    store : Store or path
    runs : str or sequence of str, optional
        Default: every run; runs without token origins are left out (a single one raises).
    engine : {"local", "ray"}
    workers : int, optional

    Returns
    -------
    Origins
    """
    return run_analysis("origins", open_store(store), runs, engine=engine, workers=workers,
                        **engine_options)
