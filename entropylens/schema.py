"""The canonical Arrow schemas of the store and their validation.

Three tables make a run (DESIGN.md section 3): one row per generated token, one row per
completion, and step metrics in long format. Ingestors produce Arrow data with any subset of
these columns; :func:`conform` casts it onto the canonical schema, adds the missing nullable
columns and reports the first offending column and row when a value does not fit.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .base.encoding import DictionaryMemo
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
    # where the token came from: "on_policy", "refinement" (Critique-GRPO) or a user label
    pa.field("origin", pa.string()),
    # true at a position after the first end-of-sequence token of its completion (padding the
    # model never sampled); marked at ingest by mark_after_eos, null where it cannot be told
    pa.field("after_eos", pa.bool_()),
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
    # where the completion came from (see the token column of the same name)
    pa.field("origin", pa.string()),
    # the completion's final answer as its producer extracted it (not the reference answer)
    pa.field("final_answer", pa.string()),
    # a reward per criterion (e.g. per test case), as in Vector Policy Optimization
    pa.field("reward_vector", pa.list_(pa.float64())),
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

#: Texts of end-of-sequence tokens across tokenizers (ChatML, Llama 2/3, GPT-2, Gemma, Phi,
#: DeepSeek, gpt-oss, Mistral). The one definition of "end of sequence" for ingest marking,
#: the analyses' filter and the quality checks.
EOS_TOKENS = ("<|im_end|>", "</s>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>",
              "<eos>", "<end_of_turn>", "<|end|>", "<|eom_id|>", "<|return|>",
              "<｜end▁of▁sentence｜>", "<|end▁of▁sentence|>", "[EOS]", "<|EOT|>")
#: Control tokens of chat templates and tokenizers: ``<|im_start|>``, ``<s>``, ``[INST]``,
#: ``<｜begin▁of▁sentence｜>``, ``<start_of_turn>``, ``<pad>``...
_SPECIAL_TOKEN = re.compile(r"^(<\|[^<>\s]*\|>|<｜[^<>\s]*｜>|</?[a-z][a-z0-9_]*>|\[/?[A-Z_]+\])$")
#: Step key of rows without a step when marking (they form one group per sample_id).
_NO_STEP = np.iinfo(np.int64).min


def eos_mask(token: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Boolean numpy mask of the end-of-sequence tokens (:data:`EOS_TOKENS`) of a column of
    token texts, plain or dictionary-encoded (surrounding whitespace ignored; null texts are
    not EOS)."""
    if isinstance(token, pa.ChunkedArray):
        token = token.combine_chunks()
    if not len(token):
        return np.zeros(0, dtype=bool)
    # judge each distinct text once (a batch repeats a few thousand texts); a column read
    # dictionary-encoded is judged on its dictionary as it is
    encoded = token if pa.types.is_dictionary(token.type) else pc.dictionary_encode(token)
    eos_text = _eos_texts(encoded.dictionary)
    indices = encoded.indices
    if indices.null_count:   # null texts are not EOS: the slot after the dictionary
        indices = pc.fill_null(indices, len(eos_text) - 1)
    return eos_text[indices.to_numpy(zero_copy_only=False)]


def _judge_eos_texts(dictionary: pa.Array) -> np.ndarray:
    """Whether each text of a dictionary is an EOS, and False for a null text after them."""
    judged = pc.fill_null(pc.is_in(pc.utf8_trim_whitespace(dictionary),
                                   value_set=pa.array(EOS_TOKENS)), False)
    return np.append(judged.to_numpy(zero_copy_only=False), False)


#: the EOS judgement of a dictionary, kept for the batches of one row group that share it
_eos_texts = DictionaryMemo(_judge_eos_texts)


def is_special_token(text: str | None) -> bool:
    """Whether a token text is a tokenizer control token (EOS, chat-template markers,
    padding), not text the model writes."""
    if text is None:
        return False
    text = text.strip()
    return text in EOS_TOKENS or bool(_SPECIAL_TOKEN.match(text))


def mark_after_eos(table: pa.Table, first_eos: pa.Table | None = None, *,
                   forget: bool = True) -> tuple[pa.Table, pa.Table | None]:
    """Set the ``after_eos`` column: true at positions after the first EOS of the completion.

    Rows of one completion may arrive over several tables (chunks, batches), so the first
    EOS position of each completion that had one is carried over in ``first_eos``.

    Parameters
    ----------
    table : pyarrow.Table
        With ``sample_id``, ``position`` and ``token`` (and ``step`` when present). Without
        token texts nothing can be told: ``after_eos`` stays null.
    first_eos : pyarrow.Table, optional
        ``step, sample_id, first`` (the first EOS position of a completion) from the tables
        before, as returned by the previous call.
    forget : bool
        Carry only the completions of this table (the ingest's bound on memory: a
        completion's rows arrive together); False carries every completion seen (a
        step-closed scan unit).

    Returns
    -------
    (pyarrow.Table, pyarrow.Table or None)
        The table with ``after_eos`` set (added or replaced) and the ``first_eos`` to pass
        to the next call.
    """
    n = table.num_rows
    names = table.column_names
    if not n or not {"token", "position", "sample_id"} <= set(names) \
            or table.column("token").null_count == n:
        return _set_column(table, "after_eos", pa.nulls(n, pa.bool_())), \
            (None if forget else first_eos)
    is_eos = eos_mask(table.column("token"))
    positions = pc.fill_null(table.column("position").cast(pa.int64()), -1) \
        .to_numpy(zero_copy_only=False)
    steps = pc.fill_null(table.column("step").cast(pa.int64()), _NO_STEP).combine_chunks() \
        if "step" in names else pa.array(np.full(n, _NO_STEP, dtype=np.int64))
    samples = table.column("sample_id").cast(pa.string()).combine_chunks()
    # runs of consecutive rows of one completion (rows usually come completion by
    # completion): the work below is per run, not per row
    same = pc.fill_null(pc.and_(pc.equal(steps.slice(1), steps.slice(0, n - 1)),
                                pc.equal(samples.slice(1), samples.slice(0, n - 1))), False)
    starts = np.concatenate([[0], np.flatnonzero(~same.to_numpy(zero_copy_only=False)) + 1])
    no_eos = np.iinfo(np.int64).max
    run_first = np.minimum.reduceat(np.where(is_eos, positions, no_eos), starts)
    index = pa.array(starts)
    runs = pa.table({"step": steps.take(index), "sample_id": samples.take(index),
                     "first": run_first, "run": np.arange(len(starts), dtype=np.int64)})
    found = runs.filter(pa.array(run_first != no_eos)).select(["step", "sample_id", "first"])
    if first_eos is not None and first_eos.num_rows:
        found = pa.concat_tables([first_eos, found])
    if found.num_rows:
        found = found.group_by(["step", "sample_id"], use_threads=False) \
            .aggregate([("first", "min")]).rename_columns({"first_min": "first"}) \
            .select(["step", "sample_id", "first"])
    first_of_run = np.full(len(starts), no_eos, dtype=np.int64)
    if found.num_rows:
        keys = runs.select(["step", "sample_id", "run"])
        joined = keys.join(found, keys=["step", "sample_id"], join_type="inner",
                           use_threads=False)
        first_of_run[joined.column("run").to_numpy()] = joined.column("first").to_numpy()
        if forget:
            found = found.join(keys.select(["step", "sample_id"]), keys=["step", "sample_id"],
                               join_type="left semi", use_threads=False)
    first = np.repeat(first_of_run, np.diff(np.append(starts, n)))
    after = pa.array(positions > first)
    return _set_column(table, "after_eos", after), found


def _set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


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
