"""Runs of consecutive rows of one completion, the unit most token statistics group by.

Stores keep a run's tokens sorted by ``(step, sample_id, position)``, so a completion is a
run of consecutive rows. Reducing runs with ``numpy.ufunc.reduceat`` is several times
faster than hashing the string ``sample_id`` of every row; a completion split across runs
(unsorted input, or a batch boundary) only yields several partial rows with the same key,
which the callers fold by key as they would any partial state.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..base.encoding import plain_values


def sequence_starts(steps: np.ndarray, sample_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """First row of every run of consecutive rows with the same ``(step, sample_id)``.

    Parameters
    ----------
    steps : numpy.ndarray of int64
        Step of every row (rows without a step already given one sentinel value).
    sample_ids : pyarrow string array, plain or dictionary-encoded
        ``sample_id`` of every row.

    Returns
    -------
    numpy.ndarray of int64
        Increasing row indices, starting with 0 (empty for no rows).
    """
    n = len(steps)
    if n == 0:
        return np.zeros(0, np.int64)
    if isinstance(sample_ids, pa.ChunkedArray):
        sample_ids = sample_ids.combine_chunks()
    if pa.types.is_dictionary(sample_ids.type):
        # equal indices are equal ids; a dictionary holding an id twice only splits a run,
        # which the callers fold by key like any partial row
        sample_ids = sample_ids.indices
    same_sample = pc.equal(sample_ids.slice(1), sample_ids.slice(0, n - 1))
    if sample_ids.null_count:   # two missing ids in a row are one key, as in a group-by
        both_null = pc.and_(pc.is_null(sample_ids.slice(1)),
                            pc.is_null(sample_ids.slice(0, n - 1)))
        same_sample = pc.or_kleene(same_sample, both_null)
    same_sample = pc.fill_null(same_sample, False).to_numpy(zero_copy_only=False)
    change = (steps[1:] != steps[:-1]) | ~same_sample
    return np.concatenate([[0], np.flatnonzero(change) + 1]).astype(np.int64)


def run_keys(steps: np.ndarray, sample_ids: pa.Array, starts: np.ndarray) -> pa.Table:
    """``step, sample_id`` of every run (ids as plain strings, whatever their encoding)."""
    ids = plain_values(pc.take(sample_ids, pa.array(starts)))
    return pa.table({"step": pa.array(steps[starts], pa.int64()), "sample_id": ids})


def run_lengths(starts: np.ndarray, n: int) -> np.ndarray:
    """Rows of every run."""
    return np.diff(np.append(starts, n)).astype(np.int64)


def sorted_bounds(steps: np.ndarray) -> np.ndarray | None:
    """Start of every step's rows and the end of the last, when the rows come in stored
    order (steps non-decreasing), as they do from a scan; None otherwise."""
    if len(steps) > 1 and not (steps[1:] >= steps[:-1]).all():
        return None
    return np.concatenate([[0], np.flatnonzero(steps[1:] != steps[:-1]) + 1,
                           [len(steps)]]).astype(np.int64)


def step_groups(steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``numpy.unique(steps, return_inverse=True)``, without sorting when rows come in
    stored order."""
    steps = np.asarray(steps)
    if not len(steps):
        return steps[:0], np.zeros(0, np.int64)
    bounds = sorted_bounds(steps)
    if bounds is None:
        unique, codes = np.unique(steps, return_inverse=True)
        return unique, codes.reshape(-1)
    return steps[bounds[:-1]], np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))


def step_rows(steps: np.ndarray) -> Iterator[tuple[int, slice | np.ndarray]]:
    """``(step, rows)`` for every distinct step, by increasing step: ``rows`` is a slice
    when the rows come in stored order, else the step's row indices (in row order)."""
    steps = np.asarray(steps)
    if not len(steps):
        return
    bounds = sorted_bounds(steps)
    if bounds is not None:   # stored order: no codes, no sort
        for step, begin, end in zip(steps[bounds[:-1]].tolist(), bounds[:-1].tolist(),
                                    bounds[1:].tolist()):
            yield step, slice(begin, end)
        return
    unique, codes = np.unique(steps, return_inverse=True)
    codes = codes.reshape(-1)
    order = np.argsort(codes, kind="stable")
    edges = np.searchsorted(codes[order], np.arange(len(unique) + 1))
    for k, step in enumerate(unique.tolist()):
        yield step, order[edges[k]:edges[k + 1]]


def inside_runs(starts: np.ndarray, n: int) -> np.ndarray:
    """For each pair of neighbouring rows, whether both lie in the same run."""
    inside = np.ones(max(n - 1, 0), bool)
    inside[starts[1:] - 1] = False
    return inside
