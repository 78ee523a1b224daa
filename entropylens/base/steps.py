"""The ``step`` column as numpy, with a sentinel for tokens logged without a step."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: Step key used for tokens without a step (pure inference logs).
NO_STEP = np.iinfo(np.int64).min


def step_array(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A ``step`` column as int64 numpy, :data:`NO_STEP` where it is missing."""
    if column.null_count:
        column = pc.fill_null(column, NO_STEP)
    return column.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
