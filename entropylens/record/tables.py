"""Canonical token and sequence rows from scored completions (rescorer and generate recorder)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from .scoring import TokenScores


class PieceTable:
    """Token id to tokenizer piece (``Ġthe``), looked up with numpy instead of per-id calls.

    Pieces are the tokenizer's own strings, as the shared SmolLM2 run logs them; the analyses
    know how to read ``Ġ``/``▁`` markers. Ids the tokenizer does not know give null.
    """

    def __init__(self, tokenizer, vocab_size: int | None = None):
        size = max(len(tokenizer), int(vocab_size or 0))
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        table = np.empty(size, dtype=object)
        table[:len(pieces)] = pieces
        table[len(pieces):] = None
        self._table = table

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        out = np.full(ids.shape, None, dtype=object)
        known = (ids >= 0) & (ids < len(self._table))
        out[known] = self._table[ids[known]]
        return out


@dataclass
class ScoredSequence:
    """One completion with its scored tokens.

    Attributes
    ----------
    meta : dict
        ``step, split, sample_id, group_id`` and the sequence columns to copy
        (``prompt, completion, reward, advantage, finish_reason, extra``).
    token_ids : ndarray of int64
        The completion's tokens, as scored.
    scores : TokenScores
        One row per token.
    """

    meta: dict
    token_ids: np.ndarray
    scores: TokenScores


_KEYS = ("step", "split", "sample_id", "group_id")
_SEQUENCE_COLUMNS = ("step", "split", "sample_id", "group_id", "prompt", "completion", "reward",
                     "advantage", "finish_reason", "extra")


def token_table(sequences: Sequence[ScoredSequence], pieces: PieceTable, top_k: int) -> pa.Table:
    """Token rows of several scored completions, in canonical column names."""
    lengths = np.array([len(s.token_ids) for s in sequences], dtype=np.int64)
    total = int(lengths.sum())
    columns: dict[str, Any] = {}
    for key in _KEYS:
        values = [s.meta.get(key) for s in sequences]
        columns[key] = pa.array(np.repeat(np.array(values, dtype=object), lengths).tolist(),
                                pa.int64() if key == "step" else pa.string())
    columns["position"] = pa.array(np.concatenate(
        [np.arange(n, dtype=np.int32) for n in lengths]) if total else
        np.empty(0, np.int32), pa.int32())
    ids = np.concatenate([s.token_ids for s in sequences]) if total else np.empty(0, np.int64)
    scores = TokenScores.concat([s.scores for s in sequences if len(s.token_ids)], top_k)
    columns["token_id"] = pa.array(ids, pa.int64())
    columns["token"] = pa.array(pieces(ids).tolist(), pa.string())
    columns["logprob"] = pa.array(scores.logprob, pa.float32())
    columns["entropy"] = pa.array(scores.entropy, pa.float32())
    if top_k > 0:
        k = scores.top_ids.shape[1]
        columns["top_ids"] = pa.FixedSizeListArray.from_arrays(
            pa.array(scores.top_ids.reshape(-1), pa.int64()), k)
        columns["top_tokens"] = pa.FixedSizeListArray.from_arrays(
            pa.array(pieces(scores.top_ids.reshape(-1)).tolist(), pa.string()), k)
        columns["top_logprobs"] = pa.FixedSizeListArray.from_arrays(
            pa.array(scores.top_logprobs.reshape(-1), pa.float32()), k)
    return pa.table(columns)


def sequence_table(sequences: Sequence[ScoredSequence]) -> pa.Table:
    """Sequence rows: the source's columns, ``num_tokens`` as scored."""
    rows = []
    for s in sequences:
        row = {key: s.meta.get(key) for key in _SEQUENCE_COLUMNS}
        row["num_tokens"] = int(len(s.token_ids))
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("step", pa.int64()), ("split", pa.string()), ("sample_id", pa.string()),
        ("group_id", pa.string()), ("prompt", pa.string()), ("completion", pa.string()),
        ("reward", pa.float64()), ("advantage", pa.float64()), ("finish_reason", pa.string()),
        ("extra", pa.string()), ("num_tokens", pa.int64())]))
