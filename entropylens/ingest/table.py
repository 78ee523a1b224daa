"""The generic ``table`` format: Parquet, CSV or JSONL files with canonical (or mapped) columns.

Which run table a file fills is read off its columns: ``position`` with token data makes
tokens, ``completion`` makes sequences, ``metric``/``value`` makes long metrics, and a
``step`` column with numeric columns makes wide metrics (one column per metric, melted and
mapped through the alias table). ``--map canonical=source`` renames columns; ``a+b`` as the
source joins two columns with ``:`` (e.g. ``sample_id=prompt_idx+sample_idx``). Common
column names are recognised without a map: ``prompt_idx``/``sample_idx`` give ``group_id``
and ``sample_id``, ``response``/``output`` give ``completion``, ``score`` gives ``reward``.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson

from ..errors import FormatError
from ..schema import METRIC_SCHEMA, SEQUENCE_SCHEMA, TOKEN_SCHEMA
from ._io import check_header_columns, iter_parquet_batches
from ._metrics import wide_to_long
from .registry import Chunk, Format, Sample, register

BATCH_ROWS = 256 * 1024
_TOKEN_COLUMNS = {"token", "token_id", "logprob", "entropy", "top_logprobs"}
_PROMPT_KEYS = ("prompt_idx", "prompt_id", "prompt_index", "group_idx", "group_index")
_SAMPLE_KEYS = ("sample_idx", "sample_index", "completion_idx", "response_idx", "generation_idx")
#: Recognised synonyms: canonical name -> source names tried in order.
_SYNONYMS = {
    "completion": ("response", "output", "generated_text", "completion_text"),
    "prompt": ("query", "input", "prompt_text"),
    "reward": ("score", "rewards"),
    "num_tokens": ("length", "response_length", "completion_length"),
    "step": ("global_step", "training_step", "iteration"),
}


def _columns_of(sample: Sample) -> list[str] | None:
    """Column names of a table file; a JSON record with nested objects is no flat table."""
    if sample.suffix in (".jsonl", ".ndjson", ".json"):
        record = sample.first_json()
        if not (isinstance(record, dict) and record
                and not any(isinstance(v, dict) for v in record.values())):
            return None
    return sample.columns()


def _apply_names(names: list[str], mapping: Mapping[str, str]) -> dict[str, str]:
    """Canonical name -> source expression for the columns of a file."""
    present = set(names)
    chosen: dict[str, str] = {}
    for canonical, source in mapping.items():
        chosen[canonical] = source
    used = {part for source in chosen.values() for part in source.split("+")}
    for name in names:
        if name in TOKEN_SCHEMA.names or name in SEQUENCE_SCHEMA.names \
                or name in METRIC_SCHEMA.names:
            if name not in chosen and name not in used:
                chosen[name] = name
    for canonical, options in _SYNONYMS.items():
        if canonical not in chosen:
            for option in options:
                if option in present and option not in used:
                    chosen[canonical] = option
                    break
    prompt = next((k for k in _PROMPT_KEYS if k in present), None)
    sample = next((k for k in _SAMPLE_KEYS if k in present), None)
    if "sample_id" not in chosen:
        if prompt and sample:
            chosen["sample_id"] = f"{prompt}+{sample}"
        elif sample:
            chosen["sample_id"] = sample
    if "group_id" not in chosen and prompt:
        chosen["group_id"] = prompt
    return chosen


def _kind(chosen: Mapping[str, str], names: list[str]) -> str | None:
    if "position" in chosen and _TOKEN_COLUMNS & set(chosen):
        return "tokens"
    if "completion" in chosen:
        return "sequences"
    if "metric" in chosen and "value" in chosen:
        return "metrics_long"
    if "step" in chosen and len(names) > 1:
        return "metrics_wide"
    return None


def sniff(sample: Sample) -> float:
    names = _columns_of(sample)
    if not names:
        return 0.0
    kind = _kind(_apply_names(names, sample.mapping), names)
    if kind is None:
        return 0.2
    # generic: specific formats (W&B exports, TRL completions) score higher when they match
    return 0.6 if kind != "metrics_wide" else 0.55


def _expression(table: pa.Table, source: str, path: Path) -> pa.Array:
    parts = source.split("+")
    for part in parts:
        if part not in table.column_names:
            raise FormatError(f"column '{part}' not found (columns: "
                              f"{', '.join(table.column_names)})", path=path, field=part)
    if len(parts) == 1:
        return table.column(parts[0])
    pieces = [pc.cast(table.column(p), pa.string()) for p in parts]
    return pc.binary_join_element_wise(*pieces, ":")


def _rename(table: pa.Table, chosen: Mapping[str, str], schema: pa.Schema, path: Path,
            extra_json: bool = False) -> pa.Table:
    columns = {}
    for canonical, source in chosen.items():
        if canonical in schema.names:
            column = _expression(table, source, path)
            if canonical in ("sample_id", "group_id", "split") and \
                    not pa.types.is_string(column.type):
                column = pc.cast(column, pa.string())
            columns[canonical] = column
    if extra_json:
        used = {part for source in chosen.values() for part in source.split("+")}
        rest = [name for name in table.column_names if name not in used
                and name not in schema.names]
        if rest and "extra" not in columns:
            rows = table.select(rest).to_pylist()
            columns["extra"] = pa.array([json.dumps(r, default=str, ensure_ascii=False)
                                         for r in rows], pa.string())
    return pa.table(columns)


class _BadCsvRows:
    """pyarrow's handler of CSV rows with the wrong number of fields: drop the row under
    ``--on-error skip`` (counted, with its line), else keep the error that names the line
    (pyarrow ignores exceptions raised inside a handler, so it is raised afterwards)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.error: Exception | None = None

    @contextmanager
    def quiet(self):
        """Keep pyarrow from printing a traceback when a bad row is not even UTF-8 (it
        fails to build the row for the handler and reports that as 'unraisable')."""
        previous = sys.unraisablehook

        def hook(unraisable):
            if unraisable.object is self:
                self.error = self.error or FormatError(
                    "a row with the wrong number of fields holds invalid UTF-8")
                return
            previous(unraisable)

        sys.unraisablehook = hook
        try:
            yield
        finally:
            sys.unraisablehook = previous

    def __call__(self, row) -> str:
        message = (f"expected {row.expected_columns} fields, got {row.actual_columns}: "
                   f"{row.text[:80]!r}")
        try:
            if self.ctx is None:
                raise FormatError(message, path=None, line=row.number)
            self.ctx.reject(row.number, message)
            return "skip"
        except FormatError as exc:
            self.error = self.error or exc
            return "error"


def _batches(path: Path, suffix: str, ctx=None) -> Iterator[pa.RecordBatch]:
    bad_rows = None
    try:
        if suffix == ".parquet":
            yield from iter_parquet_batches(path)
        elif suffix in (".csv", ".tsv"):
            delimiter = "\t" if suffix == ".tsv" else ","
            check_header_columns(path, delimiter)
            bad_rows = _BadCsvRows(ctx)
            parse = pacsv.ParseOptions(delimiter=delimiter,
                                       newlines_in_values=True, invalid_row_handler=bad_rows)
            # one thread: pyarrow gives the bad row's line number only then
            with bad_rows.quiet():  # open_csv already parses the first block
                reader = pacsv.open_csv(path, parse_options=parse,
                                        read_options=pacsv.ReadOptions(block_size=16 << 20,
                                                                       use_threads=False))
                yield from reader
        else:
            reader = pajson.open_json(path, read_options=pajson.ReadOptions(block_size=16 << 20))
            yield from reader
    except (pa.ArrowInvalid, OSError) as exc:
        if bad_rows is not None and bad_rows.error is not None:
            raise FormatError(bad_rows.error.message, path=path,
                              line=bad_rows.error.line) from None
        raise FormatError(f"cannot read as {suffix.lstrip('.') or 'table'}: "
                          f"{str(exc).splitlines()[0]}", path=path) from None


def _is_parquet(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"PAR1"


def read(path: Path, ctx) -> Iterator[Chunk]:
    sample = Sample(path)
    suffix = sample.suffix
    if suffix not in (".csv", ".tsv", ".jsonl", ".ndjson", ".json") and _is_parquet(path):
        suffix = ".parquet"
    offset = 0
    kind = chosen = None
    for batch in _batches(path, suffix, ctx):
        table = pa.Table.from_batches([batch])
        if kind is None:
            chosen = _apply_names(table.column_names, ctx.options.mapping)
            kind = _kind(chosen, table.column_names)
            if kind is None:
                raise FormatError(
                    "cannot tell which table this is: tokens need 'position' and token data, "
                    "sequences need 'completion', metrics need 'step' (columns: "
                    f"{', '.join(table.column_names)}); use --map canonical=source",
                    path=path)
            missing = [c for c in ("sample_id",) if kind in ("tokens", "sequences")
                       and c not in chosen]
            if missing:
                raise FormatError(f"required column '{missing[0]}' is missing and cannot be "
                                  "derived; map it with --map sample_id=COLUMN",
                                  path=path, field=missing[0])
        if kind == "tokens":
            yield Chunk("tokens", _rename(table, chosen, TOKEN_SCHEMA, path), offset)
        elif kind == "sequences":
            yield Chunk("sequences", _rename(table, chosen, SEQUENCE_SCHEMA, path, True), offset)
        elif kind == "metrics_long":
            yield Chunk("metrics", _rename(table, chosen, METRIC_SCHEMA, path), offset)
        else:
            frame = table.to_pandas()
            step_source = chosen["step"]
            frame = frame.rename(columns={step_source: "__step__"})
            yield Chunk("metrics", wide_to_long(frame, "__step__", aliases=ctx.options.aliases),
                        offset)
        offset += table.num_rows


register(Format(
    name="table",
    description="Parquet, CSV or JSONL with canonical columns (or --map): tokens, "
                "sequences, or wide/long step metrics",
    sniff=sniff,
    read=read,
    produces=("tokens", "sequences", "metrics"),
))
