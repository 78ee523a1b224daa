"""Appending to a run: read what is new in growing sources since the last ingest.

Each source's state is kept in the run's manifest under ``append.sources``, keyed by the
source's absolute path:

- ``size``, ``mtime_ns``: the file as last read;
- ``prefix_sha256``: for line-oriented files (JSONL, CSV, console logs), the checksum of the
  bytes read so far; a later append checks that this prefix is unchanged, so a log that was
  rewritten (not appended to) is an error rather than silently read twice;
- ``last_step``: the last step committed from this source. Rows of later steps are new;
  this is also how sources rewritten as a whole (Parquet, TensorBoard event files, W&B
  history, folders of per-step files) are appended to;
- ``held_step``: a step seen but not yet committed because the source was still growing
  (only when appending with ``hold_last_step``, as ``watch`` does): a trainer may still be
  writing that step's rows.

Line-oriented files are read from a snapshot of their complete lines, so a line being
written while we read is never parsed half-way. New rows go into new token part files; the
run is committed with :meth:`entropylens.store.Store.append_run`, atomically.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import EntropylensError, FormatError
from ..store import RunWriter, Store, validate_run_name
from . import registry

#: Suffixes of files that grow line by line (uncompressed: a compressed stream's prefix
#: cannot be checked or cut at a line).
LINE_SUFFIXES = (".jsonl", ".ndjson", ".csv", ".tsv", ".log", ".txt", ".out")
_HASH_BLOCK = 1 << 20


@dataclass
class SourceRead:
    """What one append read from one source (for the caller's report)."""

    path: str
    new_steps: list[int]
    held_step: int | None
    skipped: bool


def is_line_oriented(path: Path) -> bool:
    """Whether ``path`` is a plain file that grows by whole lines."""
    return path.is_file() and path.suffix.lower() in LINE_SUFFIXES


def _prefix_sha256(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    left = size
    with open(path, "rb") as fh:
        while left > 0:
            block = fh.read(min(_HASH_BLOCK, left))
            if not block:
                break
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def _complete_size(path: Path) -> int:
    """Bytes of ``path`` up to and including its last newline (0 when it has none)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        end = size
        while end > 0:
            start = max(0, end - _HASH_BLOCK)
            fh.seek(start)
            block = fh.read(end - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                return start + cut + 1
            end = start
    return 0


def _snapshot(path: Path, size: int, folder: Path) -> Path:
    """Copy the first ``size`` bytes of ``path`` to ``folder`` under the same file name."""
    target = folder / path.name
    with open(path, "rb") as src, open(target, "wb") as dst:
        left = size
        while left > 0:
            block = src.read(min(_HASH_BLOCK, left))
            if not block:
                break
            dst.write(block)
            left -= len(block)
    return target


def _fingerprint(path: Path) -> tuple[int, int]:
    """(size, newest mtime in ns) of a file, or of the files of a folder."""
    if path.is_file():
        st = path.stat()
        return st.st_size, st.st_mtime_ns
    size, newest = 0, 0
    for child in path.rglob("*"):
        if child.is_file():
            st = child.stat()
            size += st.st_size
            newest = max(newest, st.st_mtime_ns)
    return size, newest


def _step_filter(rows: pa.Table, after: int | None, before: int | None) -> pa.Table:
    """Rows with ``after < step < before`` (None: no bound); rows without a step are kept
    only on a source's first read (``after`` None)."""
    if "step" not in rows.column_names:
        return rows if after is None else rows.slice(0, 0)
    step = rows.column("step")
    if not pa.types.is_integer(step.type):
        step = pc.cast(step, pa.int64())
    keep = pc.is_valid(step) if after is not None else None
    if after is not None:
        keep = pc.and_(keep, pc.greater(step, after))
    if before is not None:
        below = pc.fill_null(pc.less(step, before), after is None)
        keep = below if keep is None else pc.and_(keep, below)
    return rows if keep is None else rows.filter(pc.fill_null(keep, False))


def _max_step(rows: pa.Table) -> int | None:
    if "step" not in rows.column_names or not rows.num_rows:
        return None
    step = rows.column("step")
    if not pa.types.is_integer(step.type):
        step = pc.cast(step, pa.int64())
    value = pc.max(step).as_py()
    return None if value is None else int(value)


def append(resolved: Sequence[tuple[Path, registry.Format]], store: Store, run: str, *,
           options, hold_last_step: bool = False, temperature: float | None = None,
           vocab_size: int | None = None, logprob_basis: str | None = None
           ) -> list[SourceRead]:
    """Add the new steps of ``resolved`` sources to ``run`` (created when missing).

    Parameters
    ----------
    resolved : sequence of (Path, Format)
        Sources as :func:`~entropylens.ingest.driver.resolve_sources` returns them.
    store : Store
    run : str
    options : IngestOptions
    temperature, vocab_size, logprob_basis : optional
        As in :func:`~entropylens.ingest.driver.ingest`: they override what the sources say.
    hold_last_step : bool
        Keep back the newest step of a source that grew since the last read (its trainer
        may still be writing it); it is committed once the source stops changing.

    Returns
    -------
    list of SourceRead
        One per source, in order.

    Raises
    ------
    EntropylensError
        When a source shrank or the part of it already read changed, or on bad data;
        the run is left as it was.
    """
    from .driver import (IngestContext, _apply_notes, _clean_tokens, _finish_provenance,
                         _read_chunks)

    validate_run_name(run)
    exists = store.has_run(run)
    manifest = store.manifest(run) if exists else {}
    states: dict = dict((manifest.get("append") or {}).get("sources") or {})
    plans = []
    for path, fmt in resolved:
        key = str(path.resolve())
        state = states.get(key)
        size, mtime = _fingerprint(path)
        line = is_line_oriented(path)
        read_size = _complete_size(path) if line else size
        if state is not None:
            if line and read_size < state["size"]:
                raise FormatError(f"the source shrank since the last ingest ({state['size']} "
                                  f"bytes read before, {read_size} now): it was rewritten, not "
                                  "appended to; ingest it again with --replace", path=path)
            if line and _prefix_sha256(path, state["size"]) != state["prefix_sha256"]:
                raise FormatError("the part of the source read by the last ingest changed: it "
                                  "was rewritten, not appended to; ingest it again with "
                                  "--replace", path=path)
            unchanged = (read_size if line else size) == state["size"] \
                and (line or mtime == state.get("mtime_ns"))
            if unchanged and state.get("held_step") is None:
                plans.append((path, fmt, key, state, None, False))
                continue
        else:
            unchanged = False
        plans.append((path, fmt, key, state, (read_size, size, mtime, line), unchanged))
    if all(plan[4] is None for plan in plans) and exists:
        return [SourceRead(str(p[0]), [], None, True) for p in plans]

    old_states = {k: dict(v) for k, v in states.items()}
    writer: RunWriter = store.append_run(run) if exists else store.write_run(run)
    before = writer.counts
    reads: list[SourceRead] = []
    try:
        with tempfile.TemporaryDirectory(prefix="entropylens-append-") as scratch:
            for index, (path, fmt, key, state, read, unchanged) in enumerate(plans):
                if read is None:
                    reads.append(SourceRead(str(path), [], None, True))
                    continue
                read_size, size, mtime, line = read
                source = path
                if line:  # complete lines only, and a snapshot that does not move under us
                    folder = Path(scratch) / str(index)
                    folder.mkdir()
                    source = _snapshot(path, read_size, folder)
                after = None if state is None else state.get("last_step")
                ctx = IngestContext(source, options, fmt.name)
                tables: list[tuple[str, pa.Table, int]] = []
                newest = None
                try:
                    for chunk in _read_chunks(fmt, source, ctx):
                        chunk = registry.Chunk(*chunk) if not isinstance(chunk, registry.Chunk) \
                            else chunk
                        data = chunk.data
                        if isinstance(data, pa.RecordBatch):
                            data = pa.Table.from_batches([data])
                        if "_run" in data.column_names:
                            if len(pc.unique(data.column("_run"))) > 1:
                                raise FormatError("this source holds several runs; append "
                                                  "reads sources of one run", path=path)
                            data = data.drop_columns(["_run"])
                        data = _step_filter(data, after, None)
                        top = _max_step(data)
                        if top is not None:
                            newest = top if newest is None else max(newest, top)
                        tables.append((chunk.kind, data, chunk.row_offset))
                except EntropylensError as exc:
                    if exc.path == str(source):  # name the user's file, not the snapshot
                        exc.path = str(path)
                        exc.args = (str(exc),)
                    raise
                # a growing source's newest step may still be half written
                held = newest if hold_last_step and not unchanged and newest is not None \
                    else None
                steps: set[int] = set()
                for kind, data, row_offset in tables:
                    if held is not None:
                        data = _step_filter(data, None, held)
                    if not data.num_rows:
                        continue
                    if "step" in data.column_names:
                        steps.update(int(s) for s in
                                     pc.unique(data.column("step").drop_null()).to_pylist())
                    _write(writer, kind, data, path, row_offset, _clean_tokens)
                committed = max(steps) if steps else after
                states[key] = {"format": fmt.name, "size": read_size if line else size,
                               "mtime_ns": mtime, "line_oriented": line,
                               "prefix_sha256": _prefix_sha256(path, read_size) if line
                               else None,
                               "last_step": committed, "held_step": held}
                _record_source(writer, path, fmt, states[key])
                _apply_notes(writer, ctx)
                reads.append(SourceRead(str(path), sorted(steps), held, False))
            wrote = any(r.new_steps for r in reads) or writer.counts != before
            if not exists and not wrote:
                writer.abort()
                if any(r.held_step is not None for r in reads):
                    return reads  # only a step still being written: nothing to commit yet
                raise FormatError("no tokens, sequences or metrics found",
                                  path=resolved[0][0])
            if exists and not wrote and states == old_states:
                writer.abort()  # nothing new: the run stays as it is
                return reads
            _finish_provenance(writer, options, temperature, vocab_size, logprob_basis)
            writer.manifest["append"] = {"sources": states}
            writer.commit()
    except BaseException:
        writer.abort()
        raise
    return reads


def _record_source(writer: RunWriter, path: Path, fmt: registry.Format, state: dict) -> None:
    """Record (or update) the files of a source in the manifest's source list; a
    line-oriented file is recorded as read (its complete lines)."""
    from ._io import sha256_file

    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    sources = writer.manifest["sources"]
    for file in files:
        resolved = str(file.resolve())
        sources[:] = [s for s in sources if s.get("path") != resolved]
        if state.get("line_oriented"):
            size, sha = state["size"], state["prefix_sha256"]
        else:
            size, sha = file.stat().st_size, sha256_file(file)
        writer.add_source(resolved, format=fmt.name, size=size, sha256=sha)


def _write(writer: RunWriter, kind: str, rows: pa.Table, path: Path, row_offset: int,
           clean) -> None:
    if kind == "tokens":
        rows, sentinels = clean(rows)
        counts = writer.manifest["counts"]
        for key, n in sentinels.items():
            counts[key] = counts.get(key, 0) + n
        writer.write_tokens(rows, path=path, row_offset=row_offset)
    elif kind == "sequences":
        writer.write_sequences(rows, path=path, row_offset=row_offset)
    elif kind == "metrics":
        writer.write_metrics(rows, path=path, row_offset=row_offset)
    else:
        raise FormatError(f"reader yielded unknown table kind {kind!r}", path=path)
