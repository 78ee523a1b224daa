"""Columns read dictionary-encoded (see :data:`entropylens.engine.DICTIONARY_COLUMNS`): plain
values for the code that needs them row by row, and one judgement per dictionary for the
code that judges each distinct text once."""

from __future__ import annotations

from typing import Any, Callable

import pyarrow as pa


def plain_values(array: pa.Array) -> pa.Array:
    """``array`` decoded to its values when dictionary-encoded, else as it is."""
    if pa.types.is_dictionary(array.type):
        return array.cast(array.type.value_type)
    return array


class DictionaryMemo:
    """``function(dictionary)``, computed once for the batches that share a dictionary.

    The batches read from one Parquet row group share one dictionary (the same buffers), a
    few thousand to a hundred thousand texts, so a judgement of every text (is it an EOS,
    its bytes) is worth keeping from one batch to the next. One entry: batches come in
    order. The dictionary is held with its result, so that its buffers cannot be freed and
    their addresses reused by another dictionary while the entry stands.

    Parameters
    ----------
    function : callable
        Of a dictionary (a pyarrow array of values), returning anything.
    """

    def __init__(self, function: Callable[[pa.Array], Any]):
        self.function = function
        self._entry: tuple | None = None    # (identity, dictionary, result)

    def __call__(self, dictionary: pa.Array) -> Any:
        identity = (dictionary.type, dictionary.offset, len(dictionary),
                    tuple(b.address if b is not None else 0 for b in dictionary.buffers()))
        entry = self._entry
        if entry is None or entry[0] != identity:
            entry = self._entry = (identity, dictionary, self.function(dictionary))
        return entry[2]
