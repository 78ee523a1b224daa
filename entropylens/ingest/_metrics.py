"""Turning wide step-metric tables (one column per metric) into the canonical long table."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa

from ..aliases import canonical_metric
from ..base.lazy import LazyModule

# pandas is imported by the first function that uses it: format sniffing and
# `entropylens formats` do not pay for it
pd = LazyModule("pandas")


def long_metrics(steps: Sequence, keys: Sequence[str], values: Sequence, *,
                 aliases: Mapping[str, str] | None = None,
                 split: str | None = None, run: Sequence | None = None) -> pa.Table:
    """Build canonical metric rows from parallel ``steps``, raw ``keys`` and ``values``.

    Non-numeric and non-finite values are dropped (a NaN in a wide export means "not logged at
    this step"). The split comes from the alias table unless ``split`` forces it.
    """
    cache: dict[str, tuple[str, str, bool]] = {}
    metrics, splits, approx = [], [], []
    for key in keys:
        if key not in cache:
            name = canonical_metric(key, aliases)
            cache[key] = (name.metric, split or name.split, name.approximate)
        m, s, a = cache[key]
        metrics.append(m)
        splits.append(s)
        approx.append(a)
    value_array = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce") \
        .to_numpy(dtype=float, na_value=np.nan)
    keep = np.isfinite(value_array)
    columns = {
        "step": pa.array(np.asarray(steps, dtype=object)[keep].tolist(), pa.int64()),
        "metric": pa.array(np.asarray(metrics, dtype=object)[keep].tolist(), pa.string()),
        "value": pa.array(value_array[keep], pa.float64()),
        "raw_key": pa.array(np.asarray(list(keys), dtype=object)[keep].tolist(), pa.string()),
        "split": pa.array(np.asarray(splits, dtype=object)[keep].tolist(), pa.string()),
    }
    if run is not None:
        columns["_run"] = pa.array(np.asarray(run, dtype=object)[keep].tolist(), pa.string())
    return pa.table(columns)


def wide_to_long(frame: pd.DataFrame, step_column: str, *,
                 aliases: Mapping[str, str] | None = None,
                 skip: Sequence[str] = (), split: str | None = None) -> pa.Table:
    """Melt a wide metrics frame (one row per step, one column per metric) into long rows.

    Parameters
    ----------
    frame : pandas.DataFrame
    step_column : str
        The column holding the step; rows without a step are dropped.
    aliases : mapping, optional
        User aliases, consulted before the built-in table.
    skip : sequence of str
        Columns that are not metrics (timestamps, run names).
    split : str, optional
        Force the split of every row.
    """
    steps = pd.to_numeric(frame[step_column], errors="coerce")
    frame = frame[steps.notna()]
    steps = steps[steps.notna()].astype("int64")
    keys, values, step_values = [], [], []
    for column in frame.columns:
        if column == step_column or column in skip:
            continue
        series = pd.to_numeric(frame[column], errors="coerce")
        mask = series.notna().to_numpy()
        if not mask.any():
            continue
        n = int(mask.sum())
        keys.extend([str(column)] * n)
        values.extend(series.to_numpy()[mask].tolist())
        step_values.extend(steps.to_numpy()[mask].tolist())
    return long_metrics(step_values, keys, values, aliases=aliases, split=split)
