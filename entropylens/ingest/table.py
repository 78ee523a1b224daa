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

import io
import json
import re
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
from ._io import check_header_columns, iter_lines, iter_parquet_batches, open_binary
from ._records import loads
from ._metrics import wide_to_long
from .registry import Chunk, Sample

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
            yield from iter_parquet_batches(path, batch_rows=BATCH_ROWS)
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
            yield from _json_batches(path, ctx)
    except (pa.ArrowInvalid, OSError) as exc:
        if bad_rows is not None and bad_rows.error is not None:
            raise FormatError(bad_rows.error.message, path=path,
                              line=bad_rows.error.line) from None
        raise FormatError(f"cannot read as {suffix.lstrip('.') or 'table'}: "
                          f"{str(exc).splitlines()[0]}", path=path) from None


#: Bytes of JSON Lines handed to pyarrow's parser at a time (whole lines).
JSON_BLOCK_BYTES = 16 << 20
_ARROW_ROW = re.compile(r" in row (\d+)$")


def _json_batches(path: Path, ctx) -> Iterator[pa.RecordBatch]:
    """JSON Lines parsed by pyarrow one block of whole lines at a time, so that a bad line
    is named by its line in the file (pyarrow counts rows within its own blocks) and can be
    skipped with ``--on-error skip``; the first block's columns fix the schema, as
    pyarrow's streaming reader does."""
    schema = None
    block: list[tuple[int, bytes]] = []
    size = 0
    with open_binary(path) as fh:
        for number, line in iter_lines(fh):
            block.append((number, line))
            size += len(line) + 1
            if size >= JSON_BLOCK_BYTES:
                table = _parse_json_block(block, schema, path, ctx)
                if table is not None:
                    schema = table.schema if schema is None else schema
                    yield from table.to_batches()
                block, size = [], 0
    if block:
        table = _parse_json_block(block, schema, path, ctx)
        if table is not None:
            yield from table.to_batches()


def _reject_json(ctx, path: Path, number: int, message: str) -> None:
    if ctx is None:
        raise FormatError(message, path=path, line=number)
    ctx.reject(number, message)


def _parse_json_block(block: list[tuple[int, bytes]], schema: pa.Schema | None, path: Path,
                      ctx) -> pa.Table | None:
    """One block of numbered JSON lines as a table; bad lines are rejected through ``ctx``
    (an error naming the line, or skipped and counted) and the rest parsed again."""
    checked = False
    parse = pajson.ParseOptions(explicit_schema=schema) if schema is not None else None
    while block:
        data = b"\n".join(line for _, line in block)
        read = pajson.ReadOptions(block_size=len(data) + 1, use_threads=False)
        try:
            return pajson.read_json(io.BytesIO(data), read_options=read, parse_options=parse)
        except pa.ArrowInvalid as exc:
            message = str(exc).splitlines()[0]
        if not checked:  # every line that is no JSON object at all, in one pass
            checked = True
            kept = []
            for number, line in block:
                try:
                    record = loads(line)
                except ValueError as exc:
                    _reject_json(ctx, path, number,
                                 f"not valid JSON: {str(exc).splitlines()[0][:120]}")
                    continue
                if not isinstance(record, dict):
                    _reject_json(ctx, path, number, f"expected a JSON object, got "
                                                    f"{type(record).__name__}")
                    continue
                kept.append((number, line))
            if len(kept) < len(block):
                block = kept
                continue
        # valid JSON that does not fit the columns: pyarrow names its row in this block
        found = _ARROW_ROW.search(message)
        if found is None or int(found.group(1)) >= len(block):
            raise FormatError(f"cannot read as JSON Lines: {message}", path=path)
        number, _ = block.pop(int(found.group(1)))
        _reject_json(ctx, path, number, _ARROW_ROW.sub("", message))
    return None


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
