"""The completions to rescore: a store run, or a sequence file ingested on the side, and the
token ids the source logged (see :mod:`entropylens.record.rescorer`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import EntropylensError
from ..store import Store, open_store

# -- reading the source -------------------------------------------------------------------
@dataclass
class _Source:
    sequences: pa.Table
    label: str
    sources: list
    store: Store | None
    run: str | None
    record_numbers: np.ndarray
    ingested: bool = False  # a sequence file read into a temporary store


def _read_source(src, source_run: str | None, format: str | None, steps, limit: int | None,
                 workdir: Path) -> _Source:
    """The sequences to rescore, from a store run or a sequence file ingested on the side."""
    is_store = isinstance(src, Store) or (Path(src) / "store.json").exists()
    if is_store:
        store = open_store(src)
        runs = store.runs()
        if source_run is None:
            if len(runs) != 1:
                raise EntropylensError(f"the store holds {len(runs)} runs "
                                       f"({', '.join(runs) or 'none'}): pick one with "
                                       "--source-run", path=store.path)
            source_run = runs[0]
        table = store.read_sequences(source_run)
        label = f"{store.path}#{source_run}"
        sources = [{"path": str(store.run_dir(source_run).resolve()),
                    "format": "entropylens-store", "size": None, "sha256": None,
                    "run": source_run}]
    else:
        from ..ingest import ingest

        path = Path(src)
        if not path.exists():
            raise EntropylensError("no such file or folder", path=path)
        tmp = Store.create(workdir / "source")
        ingest(path, tmp, run="source", format=format, progress=False)
        store, source_run = tmp, "source"
        table = store.read_sequences(source_run)
        label = str(path)
        sources = store.manifest(source_run)["sources"]
    if table.num_rows == 0:
        raise EntropylensError("holds no completions to rescore (no sequences table with "
                               "prompt and completion text)", path=label)
    numbers = np.arange(1, table.num_rows + 1)
    if steps is not None:
        keep = pc.fill_null(pc.is_in(table.column("step"),
                                     value_set=pa.array(list(steps), pa.int64())), False)
        table, numbers = table.filter(keep), numbers[keep.to_numpy(zero_copy_only=False)]
        if table.num_rows == 0:
            raise EntropylensError(f"no completion at step(s) {', '.join(map(str, steps))}",
                                   path=label)
    if limit is not None:
        table, numbers = table.slice(0, limit), numbers[:limit]
    return _Source(table, label, sources, store, source_run, numbers, ingested=not is_store)


def _logged_ids(source: _Source, window: pa.Table) -> dict[tuple, np.ndarray]:
    """Token ids the source run logged for a window's completions, per ``(step, sample_id)``."""
    store, run = source.store, source.run
    if store is None or not store.manifest(run)["counts"].get("tokens"):
        return {}
    import pyarrow.dataset as ds

    steps = sorted(set(window.column("step").drop_null().to_pylist()))
    samples = sorted(set(window.column("sample_id").to_pylist()))
    filter = ds.field("step").isin(pa.array(steps, pa.int64())) if steps else None
    if window.column("step").null_count:
        filter = ds.field("step").is_null() if filter is None else \
            (filter | ds.field("step").is_null())
    filter = filter & ds.field("sample_id").isin(pa.array(samples, pa.string()))
    table = store.read_tokens(run, columns=["step", "sample_id", "position", "token_id"],
                              filter=filter)
    if table.num_rows == 0 or table.column("token_id").null_count == table.num_rows:
        return {}
    table = table.sort_by([("step", "ascending"), ("sample_id", "ascending"),
                           ("position", "ascending")])
    step = np.asarray(table.column("step").to_pylist(), dtype=object)
    sample = np.asarray(table.column("sample_id").to_pylist(), dtype=object)
    ids = table.column("token_id").to_numpy(zero_copy_only=False)
    change = np.flatnonzero((step[1:] != step[:-1]) | (sample[1:] != sample[:-1])) + 1
    bounds = np.concatenate([[0], change, [len(ids)]])
    return {(step[start], sample[start]): ids[start:end].astype(np.int64)
            for start, end in zip(bounds[:-1], bounds[1:])}
