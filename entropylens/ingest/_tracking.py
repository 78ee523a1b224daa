"""Helpers shared by the step-metric readers (W&B, TensorBoard, verl, Hugging Face Trainer).

Readers collect raw points ``(step, raw_key, value)`` (and a source run where one file holds
several) and hand them to :func:`metric_table`, which turns them into canonical long rows
through :func:`._metrics.long_metrics` and the alias table, after:

- dropping non-numeric and non-finite values (a blank cell means "not logged at this step");
- keeping one value per ``(run, step, raw_key)``: the one of highest rank, then the last
  logged (a restarted run re-logs steps; verl prints validation twice, rounded and full);
- resolving collisions: when two raw keys map onto the same canonical name at one step
  (verl logs ``actor/kl_loss`` and ``actor/reward_kl_penalty``), the key of the earlier
  alias rule keeps the canonical name there and the other keeps its raw name;
- adding ``val_accuracy`` as the mean of the per-dataset ``val_accuracy/<ds>`` values of a
  step, where the source did not log an overall value itself.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa

from ..aliases import canonical_metric
from ..base.lazy import LazyModule
from ..errors import FormatError
from ._io import open_binary
from ._metrics import long_metrics
from .registry import Sample

# pandas is imported by the first function that uses it: format sniffing and
# `entropylens formats` do not pay for it
pd = LazyModule("pandas")

#: Columns that hold the trainer's own step, best first (W&B's ``_step`` is a row counter).
STEP_KEYS = ("train/global_step", "trainer/global_step", "training/global_step",
             "global_step", "step", "eval/global_step")
#: Suffixes of text logs whose sniffers may read past the sniff head.
TEXT_SUFFIXES = {"", ".log", ".txt", ".out", ".err", ".stdout", ".stderr"}
#: How far a text sniffer may read when the head holds no metric line yet.
TEXT_SNIFF_BYTES = 4 * 1024 * 1024

_MEAN_PREFIX = "val_accuracy/"


def text_lines(sample: Sample, pattern: re.Pattern, *, limit: int = TEXT_SNIFF_BYTES
               ) -> list[str]:
    """Lines of a text log matching ``pattern``, from the head or, failing that, from up to
    ``limit`` bytes of the file (console logs often start with pages of configuration)."""
    if sample.is_dir or b"\x00" in sample.head[:4096]:
        return []
    lines = [line for line in sample.text.splitlines() if pattern.search(line)]
    if lines or len(sample.head) < 64 * 1024 or sample.suffix not in TEXT_SUFFIXES:
        return lines
    try:
        with open_binary(sample.path) as fh:
            text = fh.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if pattern.search(line)][:1000]


_NUMPY_SCALAR = re.compile(r"\b(?:np|numpy)\.(?:float|int|uint|bool_)\w*\(([^()]*)\)")
_BARE_NONFINITE = re.compile(r"(?<=[:\[,(]\s)(-?inf|nan)(?=\s*[,}\])])")
_TENSOR_SCALAR = re.compile(r"\btensor\(([-+0-9.eE]+)(?:,[^()]*)?\)")


def python_literal(text: str):
    """Parse a Python literal as printed by ``print(dict)``, tolerating ``nan``/``inf``,
    ``np.float64(x)`` (NumPy 2 reprs) and ``tensor(x)``; raises ValueError when it is not."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        pass
    fixed = _NUMPY_SCALAR.sub(r"\1", text)
    fixed = _TENSOR_SCALAR.sub(r"\1", fixed)
    fixed = _BARE_NONFINITE.sub("None", fixed)
    try:
        return ast.literal_eval(fixed)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
        raise ValueError(str(exc)) from None


def to_float(value) -> float | None:
    """A finite float, or None for anything else (strings, booleans, nested values, NaN)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        value = float(value)
        return value if np.isfinite(value) else None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
        return value if np.isfinite(value) else None
    return None


def melt(frame: pd.DataFrame, steps: np.ndarray, columns: Sequence[str],
         runs: np.ndarray | None = None) -> tuple[list, list, list, list | None]:
    """Wide rows to parallel ``steps, keys, values[, runs]`` lists (numeric cells only)."""
    out_steps, out_keys, out_values = [], [], []
    out_runs = [] if runs is not None else None
    for column in columns:
        series = frame[column]
        if series.dtype == object:
            try:
                # booleans are flags, not measurements (and CSV exports lose them anyway)
                series = pd.to_numeric(series.map(lambda v: None if isinstance(v, bool) else v),
                                       errors="coerce")
            except (TypeError, ValueError):
                continue  # media dicts, tables, lists
        elif pd.api.types.is_bool_dtype(series.dtype) or \
                not pd.api.types.is_numeric_dtype(series.dtype):
            continue
        numbers = series.to_numpy(dtype=float, na_value=np.nan)
        keep = np.isfinite(numbers)
        if not keep.any():
            continue
        n = int(keep.sum())
        out_steps.extend(steps[keep].tolist())
        out_keys.extend([str(column)] * n)
        out_values.extend(numbers[keep].tolist())
        if out_runs is not None:
            out_runs.extend(runs[keep].tolist())
    return out_steps, out_keys, out_values, out_runs


_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def _exact_step(value) -> int | None:
    """One step as an exact int, None for what is no integral step in int64 range."""
    if isinstance(value, (bool, np.bool_)) or value is None:
        return None
    if isinstance(value, (str, bytes)):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return None
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value) or value != np.floor(value):
            return None
        value = int(value)
    if isinstance(value, (int, np.integer)):
        value = int(value)
        return value if _INT64_MIN <= value <= _INT64_MAX else None
    return None


def exact_steps(values) -> pd.Series:
    """Steps as nullable ``Int64``, exactly.

    Integers keep every digit: a round trip through float64 merges ``2**62`` and
    ``2**62 + 1`` and turns ``2**63 - 1`` into ``-2**63``. Integral floats and numeric text
    convert; fractions, text, booleans and values outside int64 become missing.
    """
    series = values if isinstance(values, pd.Series) else pd.Series(values, dtype=object)
    if pd.api.types.is_integer_dtype(series.dtype) and not \
            pd.api.types.is_unsigned_integer_dtype(series.dtype):
        return series.astype("Int64")
    if pd.api.types.is_float_dtype(series.dtype):
        numbers = series.to_numpy(float, na_value=np.nan)
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(numbers) & (numbers == np.floor(numbers)) \
                & (np.abs(numbers) < 2.0 ** 63)
        exact = pd.array(np.where(ok, numbers, 0).astype(np.int64), dtype="Int64")
        exact[~ok] = pd.NA
        return pd.Series(exact, index=series.index)
    return pd.Series([_exact_step(v) for v in series], index=series.index, dtype="Int64")


def trainer_steps(frame: pd.DataFrame) -> tuple[pd.Series, str, int]:
    """The trainer step of each row of a tracker history.

    The first of :data:`STEP_KEYS` logged on a row is its step; rows without one (an eval
    row, a custom ``wandb.log``) take the step of the row before them, since trackers write
    rows in time order. Without any of those columns, W&B's ``_step`` is the step.

    Returns
    -------
    steps : pandas.Series of Int64
        Exact steps (:func:`exact_steps`); missing for rows before the first known step.
    source : str
        The column(s) the steps came from.
    filled : int
        Rows whose step was carried forward.
    """
    present = [key for key in STEP_KEYS if key in frame.columns]
    numeric = {key: exact_steps(frame[key]) for key in present}
    present = [key for key in present if numeric[key].notna().any()]
    if not present:
        if "_step" in frame.columns:
            return exact_steps(frame["_step"]), "_step", 0
        return pd.Series(pd.NA, index=frame.index, dtype="Int64"), "", 0
    steps = numeric[present[0]].copy()
    for key in present[1:]:
        steps = steps.fillna(numeric[key])
    known = steps.notna()
    filled = steps.ffill()
    if "_step" in frame.columns and filled.isna().any():
        # rows before the first trainer step (verl's validation before training, logged with
        # wandb.log(step=0)) take W&B's _step where it equals the trainer step on every row
        # that has both: the trainer passed its own step to wandb.log
        wandb_step = exact_steps(frame["_step"])
        both = known & wandb_step.notna()
        if both.any() and (wandb_step[both] == steps[both]).all():
            filled = filled.fillna(wandb_step)
    return filled, "+".join(present), int((~known & filled.notna()).sum())


def metric_table(steps: Sequence, keys: Sequence[str], values: Sequence, *, path: Path,
                 ctx=None, runs: Sequence | None = None, ranks: Sequence[int] | None = None,
                 aliases: Mapping[str, str] | None = None) -> pa.Table:
    """Canonical long metric rows from raw points (see the module docstring).

    Parameters
    ----------
    steps, keys, values : sequences of equal length
        Raw points; values that are not finite numbers are dropped.
    path : Path
        The source, named by the error raised when nothing is left.
    ctx : IngestContext, optional
        Receives notes: ``approximate_metrics`` and ``metric_collisions``.
    runs : sequence, optional
        Source run of each point (a ``_run`` column is added).
    ranks : sequence of int, optional
        Which of two values of one ``(run, step, key)`` wins: higher rank, then later.
    aliases : mapping, optional
        Extra aliases on top of the user's (``ctx.options.aliases`` come first).

    Raises
    ------
    FormatError
        When no numeric point with a step is left.
    """
    user = dict(ctx.options.aliases) if ctx is not None else {}
    extra = {**(aliases or {}), **user}
    step_array = np.asarray(steps) if len(steps) else np.zeros(0, np.int64)
    frame = pd.DataFrame({
        # exact integers: a float64 round trip would merge steps above 2**53
        "step": pd.Series(step_array, dtype="Int64") if step_array.dtype.kind == "i"
        else exact_steps(pd.Series(list(steps), dtype=object)),
        "key": pd.Series(keys, dtype=object).astype(str),
        "value": pd.to_numeric(pd.Series(values, dtype=object), errors="coerce"),
        "run": pd.Series(runs if runs is not None else [None] * len(keys), dtype=object),
        "rank": np.asarray(ranks if ranks is not None else np.zeros(len(keys)), dtype=int),
    })
    frame = frame[np.isfinite(frame["value"].to_numpy(float, na_value=np.nan))
                  & frame["step"].notna()]
    if frame.empty:
        raise FormatError("no recognisable step metric found", path=path)
    frame = frame.assign(step=frame["step"].astype("int64"), run_key=frame["run"].fillna(""))
    frame = frame.reset_index(drop=True).reset_index(names="order")
    frame = frame.sort_values(["rank", "order"], kind="stable") \
        .drop_duplicates(["run_key", "step", "key"], keep="last").sort_values("order")

    names = {key: canonical_metric(key, extra) for key in frame["key"].unique()}
    frame = frame.assign(metric=frame["key"].map(lambda key: names[key].metric),
                         priority=frame["key"].map(lambda key: names[key].priority))
    # collisions: at one (run, step), several raw keys claim one canonical name
    aliased = frame[frame["metric"] != frame["key"]]
    best = aliased.sort_values(["priority", "key"], kind="stable") \
        .drop_duplicates(["run_key", "step", "metric"], keep="first")
    lost = aliased.index.difference(best.index)
    losers = {key: names[key].metric for key in frame.loc[lost, "key"].unique()}
    has_run = runs is not None and frame["run"].notna().any()
    parts = []
    for rows, keep_raw in ((frame.drop(index=lost), False), (frame.loc[lost], True)):
        if rows.empty:
            continue
        rows_aliases = {**extra, **{key: key for key in rows["key"].unique()}} if keep_raw \
            else extra
        parts.append(long_metrics(rows["step"].tolist(), rows["key"].tolist(),
                                  rows["value"].tolist(), aliases=rows_aliases,
                                  run=rows["run"].tolist() if has_run else None))

    means = _dataset_means(frame.drop(index=lost))
    if len(means):
        mean_keys = {key: "val_accuracy" for key in means["key"].unique()}
        parts.append(long_metrics(means["step"].tolist(), means["key"].tolist(),
                                  means["value"].tolist(), aliases=mean_keys,
                                  run=means["run"].tolist() if has_run else None))
    table = pa.concat_tables(parts)

    if ctx is not None:
        approximate = sorted(key for key, name in names.items() if name.approximate)
        if approximate:
            ctx.note(approximate_metrics=approximate)
        if losers:
            ctx.note(metric_collisions={
                key: f"kept its raw name at steps where a preferred key gave {metric}"
                for key, metric in losers.items()})
    return table


def _dataset_means(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows ``step, key, value, run`` of ``val_accuracy`` as the mean over datasets."""
    metric = frame["metric"]
    per_dataset = frame[metric.str.startswith(_MEAN_PREFIX)]
    if per_dataset.empty:
        return pd.DataFrame(columns=["step", "key", "value", "run"])
    explicit = frame[metric == "val_accuracy"]
    have = set(zip(explicit["run_key"], explicit["step"]))
    rows = []
    for (run_key, step), group in per_dataset.groupby(["run_key", "step"], sort=True):
        if (run_key, step) in have:
            continue
        # named by the canonical per-dataset names, so that the raw key stays the same when
        # a framework logs one dataset under two keys (verl's step lines and dict lines)
        datasets = sorted(set(group["metric"]))
        rows.append({"step": step, "key": f"mean({', '.join(datasets)})",
                     "value": float(group["value"].mean()),
                     "run": group["run"].iloc[0]})
    return pd.DataFrame(rows, columns=["step", "key", "value", "run"])
