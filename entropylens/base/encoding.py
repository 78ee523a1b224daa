"""Columns read dictionary-encoded (see :data:`entropylens.engine.DICTIONARY_COLUMNS`) as
plain arrays, for the code that needs their values row by row."""

from __future__ import annotations

import pyarrow as pa


def plain_values(array: pa.Array) -> pa.Array:
    """``array`` decoded to its values when dictionary-encoded, else as it is."""
    if pa.types.is_dictionary(array.type):
        return array.cast(array.type.value_type)
    return array
