"""Appending to a run: read what is new in growing sources since the last ingest.

Each source's state is kept in the run's manifest under ``append.sources``, keyed by the
source's absolute path:

- ``size``, ``mtime_ns``: the file as last read;
- ``head_sha256``, ``tail_sha256``, ``lines``: for line-oriented files (JSONL, CSV,
  console logs), checksums of the first and the last 64 KiB read (:func:`prefix_marks`) and
  the lines read; a later append checks that both ends are unchanged, so a log that was
  rewritten (not appended to) is an error rather than silently read twice. Files of the
  ``table`` format are then read from ``size`` on (``tail``: only the new lines are parsed);
  other formats are read whole and cut by step;
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
#: Bytes at each end of what was read that a later append checks for changes.
MARK_BYTES = 64 * 1024
#: Formats whose line-oriented files hold one record a line with no state between lines:
#: an append reads only the bytes after what was read before (a CSV's header line first).
TAIL_FORMATS = ("table",)


@dataclass
class SourceRead:
    """What one append read from one source (for the caller's report)."""

    path: str
    new_steps: list[int]
    held_step: int | None
    skipped: bool

from .driver import (IngestContext, _apply_notes, _clean_tokens, _finish_provenance,
                     _read_chunks, prepare)

def is_line_oriented(path: Path) -> bool:
    """Whether ``path`` is a plain file that grows by whole lines."""
    return path.is_file() and path.suffix.lower() in LINE_SUFFIXES


def prefix_marks(path: Path, size: int) -> dict:
    """Checksums of what was read of a line-oriented file: its first and its last
    :data:`MARK_BYTES` bytes before ``size``.

    Checking both ends costs the same however long the log grows; a file rewritten or
    truncated and written again differs there (a rewrite that keeps both ends byte for byte
    goes unnoticed)."""
    with open(path, "rb") as fh:
        head = fh.read(min(MARK_BYTES, size))
        start = max(0, size - MARK_BYTES)
        fh.seek(start)
        tail = fh.read(size - start)
    return {"head_sha256": hashlib.sha256(head).hexdigest(),
            "tail_sha256": hashlib.sha256(tail).hexdigest()}


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


def _snapshot(path: Path, start: int, end: int, folder: Path, header: bytes = b"") -> Path:
    """Copy ``header`` and bytes ``start:end`` of ``path`` to ``folder`` under the same name."""
    target = folder / path.name
    with open(path, "rb") as src, open(target, "wb") as dst:
        dst.write(header)
        src.seek(start)
        left = end - start
        while left > 0:
            block = src.read(min(_HASH_BLOCK, left))
            if not block:
                break
            dst.write(block)
            left -= len(block)
    return target


def _first_line(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.readline()


def _count_lines(path: Path, start: int, end: int) -> int:
    count = 0
    with open(path, "rb") as fh:
        fh.seek(start)
        left = end - start
        while left > 0:
            block = fh.read(min(_HASH_BLOCK, left))
            if not block:
                break
            count += block.count(b"\n")
            left -= len(block)
    return count


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
            marks = {k: state.get(k) for k in ("head_sha256", "tail_sha256")}
            if line and prefix_marks(path, state["size"]) != marks:
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
                tail = line and fmt.name in TAIL_FORMATS
                start = state["size"] if tail and state is not None else 0
                lines_before = state.get("lines", 0) if tail and state is not None else 0
                header = b""
                if line:  # complete lines only, and a snapshot that does not move under us
                    folder = Path(scratch) / str(index)
                    folder.mkdir()
                    if start and path.suffix.lower() in (".csv", ".tsv"):
                        header = _first_line(path)
                    source = _snapshot(path, start, read_size, folder, header)
                # a tail read holds only new records; a whole read is cut by step
                after = None if tail or state is None else state.get("last_step")
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
                        if exc.line is not None and start:
                            exc.line += lines_before - (1 if header else 0)
                        exc.args = (str(exc),)
                    raise
                # a growing source's newest step may still be half written
                held = newest if hold_last_step and not tail and not unchanged \
                    and newest is not None else None
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
                earlier = None if state is None else state.get("last_step")
                committed = max([*steps, *([earlier] if earlier is not None else [])]) \
                    if steps or earlier is not None else None
                states[key] = {"format": fmt.name, "size": read_size if line else size,
                               "mtime_ns": mtime, "line_oriented": line, "tail": tail,
                               "last_step": committed, "held_step": held}
                if line:
                    states[key].update(prefix_marks(path, read_size),
                                       lines=lines_before + _count_lines(path, start, read_size))
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
        if state.get("line_oriented"):  # a growing log: what was read, checked at both ends
            writer.add_source(resolved, format=fmt.name, size=state["size"], sha256=None,
                              head_sha256=state["head_sha256"],
                              tail_sha256=state["tail_sha256"])
        else:
            writer.add_source(resolved, format=fmt.name, size=file.stat().st_size,
                              sha256=sha256_file(file))


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


def ingest_appending(sources, out: str | Path | Store, *, run: str | None = None,
                     replace: bool = False, temperature: float | None = None,
                     vocab_size: int | None = None, logprob_basis: str | None = None,
                     progress: bool | None = None, **options) -> list[str]:
    """:func:`entropylens.ingest` with ``append=True``: add what is new in the sources
    since the last ingest to one run (created when missing), new steps only.

    Takes :func:`~entropylens.ingest.driver.ingest`'s arguments; ``replace`` is refused.
    """
    if replace:
        raise EntropylensError("--append and --replace exclude each other")
    resolved, base, ingest_options = prepare(
        sources, run=run, temperature=temperature, vocab_size=vocab_size,
        logprob_basis=logprob_basis, **options)
    store = out if isinstance(out, Store) else Store.create(out)
    try:
        append([(path, fmt) for path, fmt, _ in resolved], store, base,
               options=ingest_options, temperature=temperature, vocab_size=vocab_size,
               logprob_basis=logprob_basis)
    except BaseException:
        if not isinstance(out, Store):
            store.discard_if_unused()
        raise
    return [base]
