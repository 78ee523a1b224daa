"""Weights & Biases exports: run histories and UI panel CSVs.

``wandb`` reads what ``run.history()`` / ``run.scan_history()`` return, saved as CSV, TSV,
Parquet, JSONL or a JSON list, and the run's history Parquet artifact. W&B adds ``_step``
(its own row counter), ``_runtime`` and ``_timestamp``; metrics logged at different times
sit on different rows, blank elsewhere. ``_step`` is only the step when the trainer logged no
step of its own: ``train/global_step`` (Hugging Face Trainer, TRL, OpenRLHF),
``trainer/global_step``, ``training/global_step`` (verl) or ``step`` (prime-rl) wins, and rows
without one (eval rows) take the step of the row before. prime-rl writes a trainer run and an
orchestrator run; their shared ``time/*`` and ``perf/*`` keys are named
``trainer/time/step`` and ``orchestrator/time/step`` so that both files can go into one run.

``wandb_panel`` reads the CSV of a chart's "Export CSV" button: a ``Step`` column and one
``"<run> - <metric>"`` column per run (with ``__MIN``/``__MAX`` companions, which are
skipped); a file holding several runs yields one run each.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from ..base.lazy import LazyModule
from ..errors import FormatError
from ._io import check_header_columns, iter_lines, read_document, read_parquet
from ._records import loads
from ._tracking import STEP_KEYS, exact_steps, melt, metric_table, trainer_steps
from .registry import Chunk, Sample

# pandas is imported by the first function that uses it: format sniffing and
# `entropylens formats` do not pay for it
pd = LazyModule("pandas")

_W_AND_B_COLUMNS = ("_step", "_runtime", "_timestamp")
_RUN_COLUMNS = ("run_name", "run", "run_id")
_INDEX_COLUMNS = re.compile(r"^(Unnamed: \d+|index|)$")
#: prime-rl process signatures (trainer: loss side; orchestrator: rollout side).
_PRIME_TRAINER = ("entropy/mean", "mismatch_kl/mean", "optim/lr")
_PRIME_ORCHESTRATOR = ("reward/mean", "seq_len/mean", "progress/total_tokens")
_PRIME_SHARED = re.compile(r"^(time|perf)/")
_PANEL_COLUMN = re.compile(r"^(?P<run>.+) - (?P<metric>.+?)(?P<extra>__(MIN|MAX))?$")
_PANEL_STEP = {"step", "train/global_step", "trainer/global_step", "global_step",
               "_step", "training/global_step"}


# -- history --------------------------------------------------------------------------------


def sniff_history(sample: Sample) -> float:
    names = sample.columns()
    if not names or "_step" not in names:
        return 0.0
    # a bare _step column could be anyone's; with W&B's clock columns it is W&B's
    return 0.95 if any(name in names for name in _W_AND_B_COLUMNS[1:]) else 0.8


#: Columns read as exact integers (never through float64, which merges steps above 2**53).
_STEP_COLUMNS = (*STEP_KEYS, "_step")


def _read_frame(path: Path, ctx) -> pd.DataFrame:
    sample_suffix = Sample(path).suffix
    try:
        with ctx.open() as fh:
            head = fh.peek(4)[:4] if hasattr(fh, "peek") else b""
            if head == b"PAR1" or sample_suffix == ".parquet":
                # a compressed Parquet file is decompressed into memory (bounded) first
                source = None if _starts_with_parquet_magic(path) \
                    else io.BytesIO(read_document(fh))
                table = read_parquet(path, source=source)
                return table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)
            if sample_suffix in (".csv", ".tsv"):
                delimiter = "\t" if sample_suffix == ".tsv" else ","
                check_header_columns(path, delimiter)
                return pd.read_csv(fh, sep=delimiter,
                                   low_memory=False,
                                   dtype={key: object for key in _STEP_COLUMNS})
            if sample_suffix in (".jsonl", ".ndjson"):
                records = []
                for number, line in iter_lines(fh):
                    try:
                        record = loads(line)
                    except ValueError as exc:
                        ctx.reject(number, f"not valid JSON: {str(exc).splitlines()[0][:120]}")
                        continue
                    if not isinstance(record, dict):
                        ctx.reject(number, f"expected a history row (an object), got "
                                           f"{type(record).__name__}")
                        continue
                    records.append(record)
                return _frame_from_records(records)
            data = json.loads(read_document(fh))
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise FormatError(f"cannot read as a W&B history export: "
                          f"{str(exc).splitlines()[0]}", path=path) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise FormatError("expected a list of history rows", path=path)
    return _frame_from_records(data)


def _starts_with_parquet_magic(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"PAR1"


def _frame_from_records(records: list[dict]) -> pd.DataFrame:
    """History rows to a frame whose step columns keep the integers exactly as parsed."""
    frame = pd.DataFrame.from_records(records)
    for key in _STEP_COLUMNS:
        if key in frame.columns:
            frame[key] = pd.Series([row.get(key) for row in records], index=frame.index,
                                   dtype=object)
    return frame


def _is_text(series: pd.Series) -> bool:
    """Whether a column holds text: ``object`` under pandas 2, ``str`` under pandas 3."""
    return series.dtype == object or isinstance(series.dtype, pd.StringDtype)


def _prime_rl_role(columns) -> str | None:
    names = set(columns)
    if any(key in names for key in _PRIME_TRAINER) and "entropy/mean" in names:
        return "trainer"
    if all(key in names for key in _PRIME_ORCHESTRATOR[:2]):
        return "orchestrator"
    return None


def read_history(path: Path, ctx) -> Iterator[Chunk]:
    frame = _read_frame(path, ctx)
    if frame.empty:
        raise FormatError("the history export has no rows", path=path)
    frame.columns = [str(c) for c in frame.columns]
    if "_step" in frame.columns:  # carrying steps forward needs rows in logging order
        order = exact_steps(frame["_step"]).reset_index(drop=True) \
            .sort_values(kind="stable", na_position="last").index
        frame = frame.iloc[order]
    steps, step_source, filled = trainer_steps(frame)
    keep = steps.notna().to_numpy()
    dropped = int((~keep).sum())
    runs = None
    run_column = next((c for c in _RUN_COLUMNS if c in frame.columns
                       and _is_text(frame[c])), None)
    if run_column is not None and frame[run_column].nunique(dropna=True) > 1:
        runs = frame[run_column].astype(object).where(frame[run_column].notna(), None) \
            .to_numpy()[keep]
    frame = frame[keep]
    steps = steps[keep].to_numpy("int64")
    skip = {*_W_AND_B_COLUMNS, *step_source.split("+"), *_RUN_COLUMNS}
    columns = [c for c in frame.columns if c not in skip and not c.startswith("_")
               and not _INDEX_COLUMNS.match(c)]
    aliases = {}
    role = _prime_rl_role(frame.columns)
    if role is not None:
        aliases = {c: f"{role}/{c}" for c in columns if _PRIME_SHARED.match(c)}
        ctx.note(framework=f"prime-rl {role}")
    point_steps, keys, values, point_runs = melt(frame, steps, columns, runs)
    ctx.note(step_source=step_source or "none")
    if filled:
        ctx.note(rows_with_carried_step=filled)
    if dropped:
        ctx.note(rows_without_step=dropped)
    yield Chunk("metrics", metric_table(point_steps, keys, values, path=path, ctx=ctx,
                                        runs=point_runs, aliases=aliases))


# -- UI panel CSV ---------------------------------------------------------------------------
def _panel_columns(names: list[str]) -> list[tuple[str, str, str]] | None:
    """``(column, run, metric)`` of a panel export's value columns, or None if not a panel."""
    if len(names) < 2 or "_step" in names:
        return None
    out = []
    for name in names[1:]:
        found = _PANEL_COLUMN.match(name)
        if not found:
            return None
        if not found.group("extra"):
            out.append((name, found.group("run"), found.group("metric")))
    return out or None


def sniff_panel(sample: Sample) -> float:
    if sample.suffix not in (".csv", ".tsv"):
        return 0.0
    names = sample.columns()
    if not names or _panel_columns(names) is None:
        return 0.0
    return 0.9 if names[0].strip().lower() in _PANEL_STEP or names[0] == "Step" else 0.6


def read_panel(path: Path, ctx) -> Iterator[Chunk]:
    frame = _read_frame(path, ctx)
    frame.columns = [str(c) for c in frame.columns]
    x_axis = frame.columns[0]
    if x_axis.strip().lower() not in _PANEL_STEP:
        raise FormatError(f"the chart was exported with x-axis {x_axis!r}; export it with "
                          "Step (or a global step) as the x-axis", path=path, field=x_axis)
    columns = _panel_columns(list(frame.columns))
    if columns is None:
        raise FormatError("expected '<run> - <metric>' columns after the step column",
                          path=path)
    steps = exact_steps(frame[x_axis])
    keep = steps.notna().to_numpy()
    frame, steps = frame[keep], steps[keep].to_numpy("int64")
    several = len({run for _, run, _ in columns}) > 1
    point_steps, keys, values, runs = [], [], [], []
    for column, run, metric in columns:
        s, _, v, _ = melt(frame[[column]], steps, [column])
        point_steps.extend(s)
        keys.extend([metric] * len(s))
        values.extend(v)
        runs.extend([run] * len(s))
    ctx.note(step_source=x_axis)
    yield Chunk("metrics", metric_table(point_steps, keys, values, path=path, ctx=ctx,
                                        runs=runs if several else None))
