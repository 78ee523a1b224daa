"""Plain JSON values from tables and numpy scalars (``--json``, ``report.json``, manifests).

Standard JSON has no NaN or infinity: every helper here turns them into ``None``.
"""

from __future__ import annotations

import datetime as _dt
import math
import sys
from pathlib import Path
from typing import Any


def _numpy():
    """numpy when it is loaded, else None: no value can be a numpy scalar before numpy
    loads, and commands that print no table should not pay for importing it."""
    return sys.modules.get("numpy")


def plain(value: Any) -> Any:
    """``value`` with numpy scalars, non-finite floats, dates, ``pandas.NA`` and nested
    containers made JSON-ready (NaN, infinities and NA become None, dict keys strings)."""
    np = _numpy()
    if np is not None and isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)) or (np is not None and isinstance(value, np.ndarray)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (_dt.datetime, _dt.date)):  # pandas.Timestamp is a datetime
        return value.isoformat()
    pandas = sys.modules.get("pandas")  # pandas.NA exists only once pandas is imported
    if pandas is not None and value is pandas.NA:
        return None
    return value


def records(frame) -> list[dict]:
    """Rows of a DataFrame as JSON-ready dicts (NaN and NA become None); ``[]`` for None.

    Parameters
    ----------
    frame : pandas.DataFrame or None
        Any table; its column names become the keys.

    Returns
    -------
    list of dict
        One dict per row, in order.
    """
    if frame is None:
        return []
    rows = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
    return [{str(k): plain(v) for k, v in row.items()} for row in rows]


def finite(obj):
    """Replace NaN and infinities by None, through dicts, lists and tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def json_default(value: Any):
    """``default=`` hook of :func:`json.dumps` for numpy scalars, paths and dates."""
    np = _numpy()
    if np is not None and isinstance(value, np.integer):
        return int(value)
    if np is not None and isinstance(value, np.floating):
        value = float(value)
        return None if not math.isfinite(value) else value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
