"""Token-entropy distributions per step: means, quantiles, the near-zero fraction.

Policy entropy per step is reported two ways (DESIGN.md section 5): ``entropy_token_mean``,
the plain mean over tokens (verl's default ``token-mean``), and ``entropy_seq_mean``, the mean
over sequences of each sequence's token mean (arXiv 2505.22617, Eq. 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from ..engine import Aggregator
from ..estimators import columns_for, token_entropy

#: A token below this entropy (nats) counts as near-deterministic (arXiv 2506.01939).
LOW_ENTROPY = 0.01
#: Step key used for tokens without a step (pure inference logs).
NO_STEP = np.iinfo(np.int64).min


@dataclass
class _StepState:
    values: dict          # step -> list of float64 arrays (one step's entropies)
    sequences: list       # partial frames of (step, sample_id, sum, count)


class StepStats(Aggregator):
    """Per-step token-entropy statistics.

    Parameters
    ----------
    source : {"exact", "topk", "surprisal"}
        Entropy source (see :mod:`entropylens.estimators`).
    quantiles : tuple of float
        Quantiles to report, named ``p50``, ``p80``, ...
    vocab_size : int, optional
        For the top-k estimate.

    Notes
    -----
    Exact per-step quantiles need one step's values in memory: the state holds float64
    entropies per step until :meth:`finish`.
    """

    def __init__(self, source: str, *, quantiles=(0.5, 0.8), vocab_size: int | None = None):
        self.source = source
        self.quantiles = tuple(quantiles)
        self.vocab_size = vocab_size
        self.columns = ("step", "sample_id") + columns_for(source)

    def start(self) -> _StepState:
        return _StepState(values={}, sequences=[])

    def update(self, state: _StepState, batch: pa.RecordBatch) -> _StepState:
        values = token_entropy(batch, self.source, vocab_size=self.vocab_size)
        steps = batch.column("step")
        step_array = steps.fill_null(NO_STEP).to_numpy(zero_copy_only=False) \
            if steps.null_count else steps.to_numpy(zero_copy_only=False)
        finite = np.isfinite(values)
        if not finite.all():
            values, step_array = values[finite], step_array[finite]
            samples = batch.column("sample_id").filter(pa.array(finite))
        else:
            samples = batch.column("sample_id")
        if not len(values):
            return state
        order = np.argsort(step_array, kind="stable")
        sorted_steps = step_array[order]
        bounds = np.flatnonzero(np.diff(sorted_steps)) + 1
        for chunk in np.split(order, bounds):
            state.values.setdefault(int(step_array[chunk[0]]), []).append(values[chunk])
        frame = pd.DataFrame({"step": step_array, "sample_id": samples.to_numpy(
            zero_copy_only=False), "h": values})
        state.sequences.append(frame.groupby(["step", "sample_id"], sort=False)["h"]
                               .agg(["sum", "count"]).reset_index())
        return state

    def merge(self, left: _StepState, right: _StepState) -> _StepState:
        for step, arrays in right.values.items():
            left.values.setdefault(step, []).extend(arrays)
        left.sequences.extend(right.sequences)
        return left

    def finish(self, state: _StepState) -> pd.DataFrame:
        """One row per step: tokens, entropy_token_mean, entropy_seq_mean, quantiles, frac."""
        qnames = [quantile_name(q) for q in self.quantiles]
        columns = ["step", "tokens", "entropy_token_mean", "entropy_seq_mean", *qnames,
                   "frac_below_0_01"]
        if not state.values:
            return pd.DataFrame(columns=columns)
        seq = pd.concat(state.sequences).groupby(["step", "sample_id"])[["sum", "count"]].sum()
        seq_mean = (seq["sum"] / seq["count"]).groupby(level="step").mean()
        rows = []
        for step in sorted(state.values):
            values = np.concatenate(state.values[step])
            row = {"step": step, "tokens": len(values),
                   "entropy_token_mean": float(values.mean()),
                   "entropy_seq_mean": float(seq_mean.loc[step])}
            for name, q in zip(qnames, np.quantile(values, self.quantiles)):
                row[name] = float(q)
            row["frac_below_0_01"] = float(np.mean(values < LOW_ENTROPY))
            rows.append(row)
        frame = pd.DataFrame(rows, columns=columns)
        frame["step"] = frame["step"].astype("Int64").mask(frame["step"] == NO_STEP)
        return frame


def quantile_name(q: float) -> str:
    """Column name of a quantile: 0.5 -> ``p50``, 0.999 -> ``p99.9``."""
    percent = round(q * 100, 6)
    return f"p{percent:g}"
