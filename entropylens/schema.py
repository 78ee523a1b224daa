"""The canonical Arrow schemas of the store and their validation.

Three tables make a run (DESIGN.md section 3): one row per generated token, one row per
completion, and step metrics in long format. Ingestors produce Arrow data with any subset of
these columns; :func:`conform` casts it onto the canonical schema, adds the missing nullable
columns and reports the first offending column and row when a value does not fit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import SchemaError

TOKEN_SCHEMA = pa.schema([
    pa.field("step", pa.int64()),
    pa.field("split", pa.string()),
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("group_id", pa.string()),
    pa.field("position", pa.int32(), nullable=False),
    pa.field("token_id", pa.int64()),
    pa.field("token", pa.string()),
    pa.field("logprob", pa.float32()),
    pa.field("entropy", pa.float32()),
    pa.field("top_ids", pa.list_(pa.int64())),
    pa.field("top_tokens", pa.list_(pa.string())),
    pa.field("top_logprobs", pa.list_(pa.float32())),
    pa.field("advantage", pa.float32()),
])

SEQUENCE_SCHEMA = pa.schema([
    pa.field("step", pa.int64()),
    pa.field("split", pa.string()),
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("group_id", pa.string()),
    pa.field("prompt", pa.string()),
    pa.field("completion", pa.string()),
    pa.field("reward", pa.float64()),
    pa.field("advantage", pa.float64()),
    pa.field("num_tokens", pa.int64()),
    pa.field("finish_reason", pa.string()),
    pa.field("extra", pa.string()),
])

METRIC_SCHEMA = pa.schema([
    pa.field("step", pa.int64()),
    pa.field("metric", pa.string(), nullable=False),
    pa.field("value", pa.float64()),
    pa.field("raw_key", pa.string()),
    pa.field("split", pa.string()),
])

#: One row per node of a search tree (MCTS over reasoning steps, graph traversal): the
#: tree's ``tree_id`` (a prompt or episode) within its training ``step``, the node and its
#: parent (null at the root), its depth (root 0), the action that leads to it, the policy's
#: probability (``prior``) and/or log-probability (``logprob``) of that action, and the
#: search's statistics. Readers validate each tree whole (see ingest/_trees.py).
NODE_SCHEMA = pa.schema([
    pa.field("step", pa.int64()),
    pa.field("tree_id", pa.string(), nullable=False),
    pa.field("node_id", pa.string(), nullable=False),
    pa.field("parent_id", pa.string()),
    pa.field("depth", pa.int32(), nullable=False),
    pa.field("action", pa.string()),
    pa.field("prior", pa.float64()),
    pa.field("logprob", pa.float64()),
    pa.field("visits", pa.float64()),
    pa.field("value", pa.float64()),
    pa.field("reward", pa.float64()),
    pa.field("terminal", pa.bool_()),
])

SCHEMAS = {"tokens": TOKEN_SCHEMA, "sequences": SEQUENCE_SCHEMA, "metrics": METRIC_SCHEMA,
           "nodes": NODE_SCHEMA}

#: Values of the ``split`` column.
SPLITS = ("train", "val", "inference")

#: Logprobs at or below this are API sentinels (OpenAI and vLLM servers use -9999.0).
SENTINEL_LOGPROB = -9999.0


def _first_bad_row(column: pa.ChunkedArray | pa.Array, target: pa.DataType) -> int | None:
    """Return the index of the first value of ``column`` that cannot be cast to ``target``."""
    values = column.to_pylist()
    for i, value in enumerate(values):
        if value is None:
            continue
        try:
            pa.array([value]).cast(target)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            return i
    return None


def _cast_column(column, target: pa.DataType, name: str, path, row_offset: int):
    if column.type == target:
        return column
    try:
        return column.cast(target)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        bad = _first_bad_row(column, target)
        if bad is None:
            raise SchemaError(f"column of type {column.type} cannot hold {target}: {exc}",
                              path=path, field=name) from None
        value = column[bad].as_py()
        raise SchemaError(f"row {row_offset + bad + 1}: value {value!r} is not {target}",
                          path=path, field=name) from None


def conform(data: pa.Table | pa.RecordBatch, kind: str, *, path: str | Path | None = None,
            row_offset: int = 0) -> pa.Table:
    """Cast ``data`` onto the canonical schema of ``kind``.

    Missing nullable columns are added as nulls, extra columns are dropped, types are cast
    (``fixed_size_list`` becomes ``list``, ``large_string`` becomes ``string``, ...).

    Parameters
    ----------
    data : pyarrow.Table or pyarrow.RecordBatch
        Columns named canonically.
    kind : {"tokens", "sequences", "metrics", "nodes"}
        Which schema to conform to.
    path : str or Path, optional
        Source file, named in error messages.
    row_offset : int
        Rows of the same source already seen, so that row numbers in messages are absolute.

    Returns
    -------
    pyarrow.Table

    Raises
    ------
    SchemaError
        Naming the first offending column and row: a required column missing, a null in a
        non-nullable column, or a value that does not fit the column's type.
    """
    schema = SCHEMAS[kind]
    table = pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data
    columns = []
    for field in schema:
        if field.name not in table.column_names:
            if not field.nullable:
                raise SchemaError(f"required column '{field.name}' is missing "
                                  f"(columns present: {', '.join(table.column_names) or 'none'})",
                                  path=path, field=field.name)
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        column = _cast_column(table.column(field.name), field.type, field.name, path, row_offset)
        if not field.nullable and column.null_count:
            bad = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise SchemaError(f"row {row_offset + bad + 1}: required value is null",
                              path=path, field=field.name)
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


def validate(table: pa.Table, kind: str, *, path: str | Path | None = None) -> None:
    """Check that ``table`` already has the canonical schema of ``kind`` and valid values.

    Raises
    ------
    SchemaError
        Naming the first offending column (and row where the problem is a value).
    """
    schema = SCHEMAS[kind]
    for field in schema:
        if field.name not in table.column_names:
            raise SchemaError(f"required column '{field.name}' is missing", path=path,
                              field=field.name)
        column = table.column(field.name)
        if column.type != field.type:
            raise SchemaError(f"has type {column.type}, expected {field.type}", path=path,
                              field=field.name)
        if not field.nullable and column.null_count:
            bad = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise SchemaError(f"row {bad + 1}: required value is null", path=path,
                              field=field.name)
    if "split" in table.column_names and table.num_rows:
        split = table.column("split")
        ok = pc.or_kleene(pc.is_in(split, value_set=pa.array(SPLITS)), pc.is_null(split))
        if not pc.all(ok).as_py():
            bad = int(np.flatnonzero(~ok.to_numpy(zero_copy_only=False))[0])
            raise SchemaError(f"row {bad + 1}: split {split[bad].as_py()!r} is not one of "
                              f"{', '.join(SPLITS)}", path=path, field="split")
