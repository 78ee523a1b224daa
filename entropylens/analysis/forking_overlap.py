"""Overlap of the forking positions of two runs scored on the same tokens (arXiv
2506.01939, Table 1: about 86 % between a base model and its RL-trained checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

from ..base.steps import NO_STEP
from ..errors import EntropylensError
from ..estimators import columns_for
from ..store import Store, open_store
from .distribution import token_runs
from .forking_thresholds import (KEY_COLUMNS, ScopeThresholds, check_options, forking_flags,
                                 run_thresholds, token_step_filters)


def _step_tables(store: Store, run: str, columns: list[str], steps,
                 keep_after_eos: bool = False):
    """One step's tokens at a time, for the given step keys (NO_STEP: tokens without one);
    tokens marked after the end of their sequence are left out unless ``keep_after_eos``."""
    before_eos = None if keep_after_eos else \
        ds.field("after_eos").is_null() | (ds.field("after_eos") == False)  # noqa: E712
    for step in steps:
        if step == NO_STEP:
            where = ds.field("step").is_null()
            yield step, store.read_tokens(run, columns=columns, filter=where if before_eos
                                          is None else where & before_eos)
        else:
            yield step, store.read_tokens(run, columns=columns, steps=[step],
                                          filter=before_eos)


@dataclass
class ForkingOverlap:
    """Result of :func:`forking_overlap`.

    Attributes
    ----------
    run_a, run_b : str
    ratio : float
    scope : str
    shared_positions : int
        Positions ``(step, sample_id, position)`` where both runs have an entropy.
    forking_a, forking_b, both : int
        Forking positions of each run, and of both, among the shared ones.
    overlap : float or None
        Share of ``run_a``'s forking positions also forking in ``run_b``.
    jaccard : float or None
    token_mismatches : int
        Shared positions whose token ids differ (the runs were then not scored on the same
        tokens).
    warning : str or None
        A message when there are mismatches.
    by_step : list of dict
        ``{step, shared_positions, overlap}`` per step.
    """

    run_a: str
    run_b: str
    ratio: float
    scope: str
    shared_positions: int
    forking_a: int
    forking_b: int
    both: int
    overlap: float | None
    jaccard: float | None
    token_mismatches: int
    warning: str | None
    by_step: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """The ``overlap`` object of ``entropylens forks --overlap A B --json``."""
        return {"run_a": self.run_a, "run_b": self.run_b, "ratio": self.ratio,
                "scope": self.scope, "shared_positions": self.shared_positions,
                "forking_a": self.forking_a, "forking_b": self.forking_b, "both": self.both,
                "overlap": self.overlap, "jaccard": self.jaccard,
                "token_mismatches": self.token_mismatches, "warning": self.warning,
                "by_step": [dict(row) for row in self.by_step]}


def forking_overlap(store: Store | str, run_a: str, run_b: str, ratio: float = 0.2,
                    scope: str = "step", *, batch_size: int | None = None,
                    engine: str = "local", workers: int | None = None,
                    **engine_options) -> ForkingOverlap:
    """Overlap of the forking positions of two runs scored on the same tokens.

    Each run's forking tokens come from its own thresholds over all its tokens; positions are
    matched on ``(step, sample_id, position)``, one step at a time. arXiv 2506.01939
    (Table 1) reports about 86% overlap between a base model and its RL-trained checkpoint.

    Parameters
    ----------
    store : Store or path
    run_a, run_b : str
        Two runs holding the same completions (e.g. one checkpoint rescored by another).
    ratio, scope, batch_size, engine, workers
        As in :func:`forking_tokens`.

    Returns
    -------
    ForkingOverlap
        Counts are over shared positions where both runs have an entropy; ``to_dict()`` is
        the ``overlap`` object of ``entropylens forks --overlap A B --json``.

    Raises
    ------
    EntropylensError
        When the runs share no token position.
    """
    check_options(ratio, scope, batch_size)
    store = open_store(store)
    chosen = {run: (source, manifest) for run, source, manifest in
              token_runs(store, [run_a, run_b])}
    for run in (run_a, run_b):
        if run not in chosen:
            raise EntropylensError(f"run {run!r} has no per-token entropies", path=store.path)
    if workers is not None:
        engine_options["workers"] = workers
    scoped = {run: run_thresholds(store, run, *chosen[run], scope=scope, ratio=float(ratio),
                                  batch_size=batch_size, engine=engine, **engine_options)
              for run in (run_a, run_b)}
    steps_a = {s for s, _ in token_step_filters(store, run_a)}
    steps_b = {s for s, _ in token_step_filters(store, run_b)}
    common = sorted(steps_a & steps_b)
    totals = {"shared": 0, "a": 0, "b": 0, "both": 0, "mismatch": 0}
    by_step = []
    # a run may be compared with itself: one reader per side, not one per name
    readers = [_step_tables(store, run, sorted(set(KEY_COLUMNS) | {"token_id"}
                                                | set(columns_for(chosen[run][0]))), common,
                            keep_after_eos=bool(engine_options.get("keep_after_eos")))
               for run in (run_a, run_b)]
    for (step, table_a), (_, table_b) in zip(*readers):
        frame_a = _flag_frame(table_a, scoped[run_a])
        frame_b = _flag_frame(table_b, scoped[run_b])
        joined = frame_a.merge(frame_b, on=["sample_id", "position"], suffixes=("_a", "_b"))
        joined = joined[joined["judged_a"] & joined["judged_b"]]
        if not len(joined):
            continue
        fork_a, fork_b = joined["fork_a"].to_numpy(), joined["fork_b"].to_numpy()
        both = int((fork_a & fork_b).sum())
        totals["shared"] += len(joined)
        totals["a"] += int(fork_a.sum())
        totals["b"] += int(fork_b.sum())
        totals["both"] += both
        ids = joined[["token_id_a", "token_id_b"]].dropna()
        totals["mismatch"] += int((ids["token_id_a"] != ids["token_id_b"]).sum())
        by_step.append({"step": None if step == NO_STEP else int(step),
                        "shared_positions": len(joined),
                        "overlap": both / int(fork_a.sum()) if fork_a.any() else None})
    if not totals["shared"]:
        raise EntropylensError(f"runs {run_a!r} and {run_b!r} share no token position "
                               "(step, sample_id, position) with entropies in both: overlap "
                               "needs two runs scored on the same tokens", path=store.path)
    union = totals["a"] + totals["b"] - totals["both"]
    return ForkingOverlap(
        run_a=run_a, run_b=run_b, ratio=float(ratio), scope=scope,
        shared_positions=totals["shared"], forking_a=totals["a"], forking_b=totals["b"],
        both=totals["both"], overlap=totals["both"] / totals["a"] if totals["a"] else None,
        jaccard=totals["both"] / union if union else None,
        token_mismatches=totals["mismatch"],
        warning=(f"{totals['mismatch']} of {totals['shared']} shared positions hold "
                 "different token ids: the runs were not scored on the same tokens, so the "
                 "overlap compares different text") if totals["mismatch"] else None,
        by_step=by_step)


def _flag_frame(table: pa.Table, scoped: ScopeThresholds) -> pd.DataFrame:
    entropy = scoped.entropy(table)
    ids = table.column("token_id")
    return pd.DataFrame({
        "sample_id": table.column("sample_id").to_numpy(zero_copy_only=False),
        "position": table.column("position").to_numpy(zero_copy_only=False),
        "token_id": pd.array(ids.to_pylist() if ids.null_count else ids.to_numpy(),
                             dtype="Int64"),
        "fork": forking_flags(table, scoped), "judged": np.isfinite(entropy)})
