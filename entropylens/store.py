"""The canonical Parquet store: one folder per run, written atomically.

Layout (DESIGN.md section 3)::

    STORE/store.json                        format version
    STORE/runs/<run>/manifest.json          provenance and counts
    STORE/runs/<run>/tokens/part-*.parquet  one row per generated token
    STORE/runs/<run>/sequences.parquet      one row per completion
    STORE/runs/<run>/metrics.parquet        one row per (step, metric)
    STORE/runs/<run>/nodes/part-*.parquet   one row per search-tree node (whole trees per part)

A run is written into a hidden temporary folder inside ``STORE/runs`` and renamed into place
only when complete, so a reader sees a run whole or not at all, and a failed or killed ingest
never damages the runs already there.

Writers take ``STORE/.lock``, an advisory file lock, to create the store and to rename runs into
place, so concurrent writers serialise their commits; readers never wait for it. Disk-full and
permission errors while writing become a :class:`~entropylens.errors.StoreError` naming the
path, after everything written so far is removed.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

try:  # POSIX advisory locks; Windows locks a byte range of the lock file instead
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None
    import msvcrt

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

if TYPE_CHECKING:
    import pandas as pd

from ._version import __version__
from .base.jsonable import finite as _finite
from .base.jsonable import json_default as _json_default
from .base.lazy import LazyModule
from .errors import RunExistsError, StoreError, StoreReadError
from .schema import (METRIC_SCHEMA, NODE_SCHEMA, SEQUENCE_SCHEMA, TOKEN_SCHEMA, conform,
                     mark_after_eos)

# pyarrow.dataset imports pandas: it loads with the first token scan, so that writing a
# store and listing formats stay cheap
ds = LazyModule("pyarrow.dataset")

STORE_FORMAT = "entropylens-store"
STORE_VERSION = 1
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=@-]{0,199}$")
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"
_WRITER_FILE = ".writer"
_LOCK_FILE = ".lock"
#: Entries a store folder may hold before its store.json exists: the lock file, the runs
#: folder and a store.json being written.
_CREATING = re.compile(r"^(\.lock|runs|\.store\.json\.[0-9a-f]+\.tmp)$")
#: Temporary run folders of unknown writers untouched this long are removed by later writes.
STALE_TMP_AGE_S = 24 * 3600

#: Rows buffered before a token part file is sorted and written. Bounds ingest memory.
ROWS_PER_PART = 1_000_000
#: Buffered bytes that also trigger a part file: rows with top-k lists are large.
BYTES_PER_PART = 128 * 1024 * 1024
#: Parquet row-group size of token parts: small enough that step filters skip most data.
ROWS_PER_GROUP = 128 * 1024
#: Node rows buffered before a node part file is written (parts hold whole trees, so a
#: part may exceed this by one chunk of trees). Analyses read one part at a time.
NODE_ROWS_PER_PART = 256 * 1024
#: Rejected-record examples kept in a manifest.
MAX_REJECTED_EXAMPLES = 20


def validate_run_name(name: str) -> str:
    """Return ``name`` if it is a safe run name, else raise :class:`StoreError`.

    A run name becomes a folder name, so it may hold letters, digits and ``. _ + = @ -``,
    must start with a letter or digit, and can never be ``..`` or contain a path separator.
    """
    if not isinstance(name, str) or not _RUN_NAME.match(name) or ".." in name:
        raise StoreError(f"invalid run name {name!r}: use letters, digits and . _ + = @ - "
                         "(no path separators, no '..', at most 200 characters)")
    return name


def _writer_of(folder: Path) -> tuple[int | None, str | None]:
    """(pid, host) from a temporary run folder's writer file, (None, None) without one."""
    try:
        pid, host = (folder / _WRITER_FILE).read_text().split()[:2]
        return int(pid), host
    except FileNotFoundError:
        return None, None
    except ValueError:
        return None, None


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _os_reason(exc: BaseException) -> str:
    """The operating system's reason for ``exc`` in a few words, on one line."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f" (errno {exc.errno})" if exc.errno else "")
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


#: Arrow's wording around the reason of a failed open: the path is named by the error itself.
_ARROW_NOISE = re.compile(r"^(\[Errno \d+\] )?(Could not open Parquet input source '[^']*': "
                          r"|Failed to open local file '[^']*'\. Detail: )")
_ARROW_ERRNO = re.compile(r"^\[errno (\d+)\] (.*?)( \(errno \d+\))?$")


def _read_reason(exc: BaseException) -> str:
    """Why a store file could not be read, on one line without Arrow's repetition of the
    path (``Permission denied (errno 13)``, ``Parquet magic bytes not found ...``)."""
    text = _ARROW_NOISE.sub("", _os_reason(exc))
    found = _ARROW_ERRNO.match(text)
    return f"{found.group(2)} (errno {found.group(1)})" if found else text


@contextmanager
def reading(path: str | Path, what: str = "") -> Iterator[None]:
    """Turn a failed read of the store (no permission, a truncated or damaged Parquet file)
    into a :class:`StoreReadError` naming ``path``: the one place where the analyses' reads
    of a store meet the operating system and Arrow."""
    try:
        yield
    except (StoreError, StoreReadError):
        raise
    except (OSError, pa.ArrowException) as exc:
        where = path if getattr(exc, "filename", None) is None else exc.filename
        raise StoreReadError(f"cannot read{' ' + what if what else ''}: "
                             f"{_read_reason(exc)}", path=where) from exc


def _chunk_all_null(chunk) -> bool:
    """Whether a column chunk's statistics prove it holds no value (every leaf slot null)."""
    if chunk is False:
        return False
    stats = chunk.statistics
    return stats is not None and stats.has_null_count and stats.null_count == chunk.num_values


def _compatible(found: pa.DataType, want: pa.DataType) -> bool:
    """Whether a column of a token part can be cast to its canonical type (older parts may
    hold narrower integers or floats, or plain strings)."""
    for family in (pa.types.is_integer, pa.types.is_floating,
                   lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)):
        if family(found) and family(want):
            return True
    return found == want or pa.types.is_null(found)


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a failed write (disk full, no permission, read-only file system) into a
    :class:`StoreError` naming the file concerned, or ``path`` when the error names none."""
    try:
        yield
    except StoreError:
        raise
    except (OSError, pa.ArrowException) as exc:
        where = getattr(exc, "filename", None) or path
        raise StoreError(f"cannot write: {_os_reason(exc)}", path=where) from exc


def _lock_fd(fd: int, blocking: bool) -> bool:
    """Take the exclusive lock of an open lock file; False when busy and not ``blocking``."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        return True
    while True:  # pragma: no cover - Windows
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            if not blocking:
                return False
            time.sleep(0.05)


def _acquire(folder: Path, *, blocking: bool, create: bool) -> int | None:
    """A file descriptor holding the store lock of ``folder``.

    ``create`` makes the folder (and the lock file) when missing; without it, None comes back
    when the lock file cannot be opened, or, when not ``blocking``, when a writer holds it.
    The lock file may be removed while we wait (a failed first ingest removes its store), so
    a lock is only good when the locked file is still the one at the path.
    """
    lock_path = folder / _LOCK_FILE
    while True:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            if create:
                raise
            try:  # a read-only store: a reader can still lock the existing file
                fd = os.open(lock_path, os.O_RDONLY)
            except OSError:
                return None
        try:
            if not _lock_fd(fd, blocking):
                os.close(fd)
                return None
            try:
                current = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            return fd
        os.close(fd)  # closing drops the lock
        if not create:
            return None


def _release(fd: int) -> None:
    os.close(fd)  # the lock goes with the last descriptor of the open file


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    The rename replaces whatever is at ``path``, a symbolic link included, so a link planted
    where a report file goes is never followed and its target is never overwritten.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def real_folder(path: Path) -> Path:
    """Make ``path`` a folder, replacing a symbolic link found there (never following it)."""
    if path.is_symlink():
        path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(_finite(obj), fh, indent=1, default=_json_default, allow_nan=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Store:
    """A folder of runs in the canonical format.

    Use :meth:`open` for an existing store and :meth:`create` to make one (or open it if it
    exists).

    Parameters
    ----------
    path : str or Path
        The store folder.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.runs_dir = self.path / "runs"

    # -- opening -----------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path) -> "Store":
        """Create a store at ``path``, or open the one already there.

        Safe to call from several processes at once: one creates the store, the others open
        it. The returned store remembers what this call created (:meth:`discard_if_unused`).
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise StoreError("exists and is not a folder", path=path)
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                path.mkdir()
                made_folder = True
            except FileExistsError:
                made_folder = False
            fd = _acquire(path, blocking=True, create=True)
            try:
                made_marker = cls._make_marker(path)
            finally:
                _release(fd)
        store = cls.open(path)
        store._created = (made_folder, made_marker)
        return store

    @staticmethod
    def _make_marker(path: Path) -> bool:
        """Write ``store.json`` and ``runs/`` into ``path`` unless a store is there (lock held).

        Returns whether it wrote them."""
        if (path / "store.json").exists():
            return False
        if not path.is_dir():
            path.mkdir(parents=True)  # removed while we waited for the lock
        elif any(not _CREATING.match(p.name) for p in path.iterdir()):
            raise StoreError("folder exists, is not empty and is not an entropylens store",
                             path=path)
        (path / "runs").mkdir(exist_ok=True)
        write_json_atomic(path / "store.json", {"format": STORE_FORMAT, "version": STORE_VERSION,
                                                "created_by": f"entropylens {__version__}"})
        return True

    @classmethod
    def open(cls, path: str | Path) -> "Store":
        """Open an existing store.

        Raises
        ------
        StoreError
            When ``path`` holds no store, one of an unknown version or a damaged one.
        """
        path = Path(path)
        marker = path / "store.json"
        if not marker.exists():
            raise StoreError("no entropylens store here (create one with "
                             "'entropylens ingest ... --out STORE')", path=path)
        try:
            meta = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StoreError(f"unreadable store.json: {_os_reason(exc)}", path=marker) from None
        if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT \
                or meta.get("version") != STORE_VERSION:
            found = (f"format {meta.get('format')!r} version {meta.get('version')!r}"
                     if isinstance(meta, dict) else f"a JSON {type(meta).__name__}")
            raise StoreError(f"unsupported store: {found}", path=marker)
        store = cls(path)
        if store.runs_dir.exists() and not store.runs_dir.is_dir():
            raise StoreError("damaged store: 'runs' is not a folder", path=store.runs_dir)
        try:
            store.runs_dir.mkdir(exist_ok=True)
        except OSError:  # a read-only store without runs: it simply holds none
            pass
        store._recover()
        return store

    #: (folder made, store.json written) by the :meth:`create` call that returned this store.
    _created: tuple[bool, bool] = (False, False)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the store's writer lock (``STORE/.lock``), waiting for other writers.

        Writers hold it only for short steps (creating the store, starting a temporary run
        folder, renaming runs into place); readers never take it and never wait.
        """
        with writing(self.path):
            fd = _acquire(self.path, blocking=True, create=True)
        try:
            yield
        finally:
            _release(fd)

    def _recover(self) -> None:
        """Finish or undo a replace that was interrupted between its two renames.

        Only when no writer holds the lock: a live writer's ``.old-*`` folder is its own,
        and it finishes or undoes the replace itself.
        """
        if not any(p.name.startswith(_OLD_PREFIX) for p in self._entries()):
            return
        fd = _acquire(self.path, blocking=False, create=False)
        if fd is None:
            return
        try:
            for old in self.runs_dir.glob(_OLD_PREFIX + "*"):
                name = old.name[len(_OLD_PREFIX):].rsplit("-", 1)[0]
                target = self.runs_dir / name
                try:
                    if target.exists():
                        shutil.rmtree(old, ignore_errors=True)
                    else:
                        os.replace(old, target)
                except OSError:
                    pass
        finally:
            _release(fd)

    def _entries(self) -> list[Path]:
        """Everything in ``runs/`` (empty when it cannot be listed)."""
        try:
            return list(self.runs_dir.iterdir())
        except OSError:
            return []

    def discard_if_unused(self) -> bool:
        """Undo what :meth:`create` made when the store still holds nothing at all.

        Removes ``store.json``, ``runs/`` and the lock file, and the folder when ``create``
        made it, but only when ``runs/`` is empty: a run or a temporary folder of another
        writer keeps the store. Returns whether the store was removed.
        """
        made_folder, made_marker = self._created
        if not made_marker:
            return False
        with self.lock():
            try:
                self.runs_dir.rmdir()  # fails unless empty
            except FileNotFoundError:
                pass
            except OSError:
                return False
            try:
                (self.path / "store.json").unlink(missing_ok=True)
                (self.path / _LOCK_FILE).unlink(missing_ok=True)
                if made_folder:
                    self.path.rmdir()
            except OSError:
                pass
        self._created = (False, False)
        return True

    def sweep_stale_tmp(self, *, max_age_s: float = STALE_TMP_AGE_S) -> list[str]:
        """Remove temporary run folders left by killed writers; returns their names.

        A ``.tmp-*`` folder goes when the process named in its writer file ran on this host
        and is gone, or, when that cannot be told (another host, no writer file), when
        nothing in it changed for ``max_age_s`` seconds. A folder of a live writer is never
        touched. Readers never see these folders either way.
        """
        removed = []
        if not self.runs_dir.is_dir():
            return removed
        host = socket.gethostname()
        now = time.time()
        for folder in self.runs_dir.glob(_TMP_PREFIX + "*"):
            try:
                pid, owner = _writer_of(folder)
                if owner == host and pid is not None:
                    stale = not _pid_alive(pid)
                else:
                    newest = max([folder.stat().st_mtime]
                                 + [p.stat().st_mtime for p in folder.rglob("*")])
                    stale = now - newest > max_age_s
            except OSError:  # vanished meanwhile (its writer committed or aborted)
                continue
            if stale:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
        return removed

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, runs={self.runs()!r})"

    # -- runs --------------------------------------------------------------------------
    def runs(self) -> list[str]:
        """Names of the complete runs, sorted."""
        with reading(self.runs_dir):
            if not self.runs_dir.is_dir():
                return []
            return sorted(p.name for p in self.runs_dir.iterdir()
                          if p.is_dir() and not p.name.startswith(".")
                          and (p / "manifest.json").exists())

    def has_run(self, name: str) -> bool:
        return name in self.runs()

    def run_dir(self, name: str) -> Path:
        """The folder of an existing run; raises :class:`StoreError` when there is none."""
        validate_run_name(name)
        path = self.runs_dir / name
        with reading(path):
            found = (path / "manifest.json").exists()
        if not found:
            known = ", ".join(self.runs()) or "none"
            raise StoreError(f"no run named {name!r} (runs: {known})", path=self.path)
        return path

    def resolve_runs(self, runs: str | Sequence[str] | None = None) -> list[str]:
        """Expand ``None`` to every run and check that named runs exist."""
        if runs is None or (not isinstance(runs, str) and len(runs) == 0):
            names = self.runs()
            if not names:
                raise StoreError("the store holds no runs", path=self.path)
            return names
        names = [runs] if isinstance(runs, str) else list(runs)
        for name in names:
            self.run_dir(name)
        return names

    def manifest(self, run: str) -> dict:
        """The run's manifest (provenance and counts)."""
        path = self.run_dir(run) / "manifest.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StoreError(f"unreadable manifest: {_read_reason(exc)}", path=path) from None

    def delete_run(self, name: str) -> None:
        """Remove a run (atomically: it is renamed away first)."""
        path = self.run_dir(name)
        trash = self.runs_dir / f"{_TMP_PREFIX}deleted-{name}-{uuid.uuid4().hex[:8]}"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def write_run(self, name: str, *, replace: bool = False) -> "RunWriter":
        """Start writing a run; use as a context manager.

        Raises
        ------
        RunExistsError
            When the run exists and ``replace`` is false (checked before anything is written).
        """
        return RunWriter(self, name, replace=replace)

    def append_run(self, name: str) -> "RunWriter":
        """Start adding rows to an existing run; commit replaces the run atomically.

        The new run folder holds hard links to the run's token part files (never rewritten),
        the new rows in new part files, the earlier sequences and metrics followed by the new
        ones, and the earlier manifest with updated counts. Aborting, or a crash before the
        commit, leaves the run as it was.
        """
        return RunWriter(self, name, replace=True, append=True)

    # -- reading -----------------------------------------------------------------------
    def token_parts(self, run: str) -> list[tuple[Path, pq.FileMetaData]]:
        """The run's token part files in storage order, each with its Parquet metadata,
        checked against the canonical token schema.

        Raises
        ------
        StoreReadError
            Naming the part that cannot be read or holds columns of another schema.
        """
        folder = self.run_dir(run) / "tokens"
        with reading(folder):
            paths = sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []
        parts = []
        for path in paths:
            with reading(path, "token part"):
                metadata = pq.read_metadata(path)
                schema = metadata.schema.to_arrow_schema()
            for field in schema:
                want = TOKEN_SCHEMA.field(field.name).type \
                    if field.name in TOKEN_SCHEMA.names else None
                if want is None or not _compatible(field.type, want):
                    expected = f"expected {want}" if want is not None else "not a token column"
                    raise StoreReadError(f"damaged token part: column '{field.name}' is "
                                         f"{field.type}, {expected}", path=path)
            if "step" not in schema.names:
                raise StoreReadError("damaged token part: no 'step' column", path=path)
            parts.append((path, metadata))
        return parts

    def _token_column_chunks(self, run: str, column: str) -> Iterator[tuple[int, Any]]:
        """``(rows, column chunk metadata)`` of every row group of the run's token parts:
        the chunk is None where a part file lacks the column (written before it existed:
        null there), ``False`` where the column is not one leaf (its statistics unusable)."""
        for _, metadata in self.token_parts(run):
            # a list column's one leaf is "name.list.element": match the top-level name
            leaves = [i for i in range(metadata.num_columns)
                      if metadata.schema.column(i).path.split(".")[0] == column]
            for group in range(metadata.num_row_groups):
                row_group = metadata.row_group(group)
                chunk = None if not leaves else \
                    row_group.column(leaves[0]) if len(leaves) == 1 else False
                yield row_group.num_rows, chunk

    def token_column_empty(self, run: str, column: str) -> bool:
        """True when the Parquet statistics prove that every token's ``column`` is null
        (for a list column: that no list holds a value).

        Reads only the part files' footers, so an analysis of a column the run never logged
        (token origins, most often) can say so without scanning the tokens. False whenever a
        row group lacks null counts: then only a scan can tell.
        """
        for rows, chunk in self._token_column_chunks(run, column):
            if rows and chunk is not None and not _chunk_all_null(chunk):
                return False
        return True

    def token_column_max(self, run: str, column: str) -> float | None:
        """The largest value of a numeric token column by the Parquet statistics (NaN
        ignored, as the statistics do), from the part files' footers: ``-inf`` when the
        column holds no value, None when a row group lacks statistics (only a scan can
        tell)."""
        largest = -float("inf")
        for rows, chunk in self._token_column_chunks(run, column):
            if not rows or chunk is None or _chunk_all_null(chunk):
                continue
            stats = chunk.statistics if chunk is not False else None
            if stats is None or not stats.has_min_max:
                return None
            largest = max(largest, float(stats.max))
        return largest

    def tokens_dataset(self, run: str) -> ds.Dataset:
        """The run's tokens as a :class:`pyarrow.dataset.Dataset` (possibly empty)."""
        parts = [path for path, _ in self.token_parts(run)]
        if not parts:
            return ds.dataset(pa.table({f.name: pa.array([], f.type) for f in TOKEN_SCHEMA},
                                       schema=TOKEN_SCHEMA))
        return ds.dataset([str(p) for p in parts], schema=TOKEN_SCHEMA, format="parquet")

    def head_tokens(self, run: str, rows: int, *, columns: Sequence[str]) -> pa.Table:
        """The first ``rows`` tokens in storage order (fewer when the run is smaller).

        Reads part files one row group at a time, without the read-ahead of a dataset scan,
        so a small sample costs a small read.
        """
        batches, held = [], 0
        schema = pa.schema([TOKEN_SCHEMA.field(c) for c in columns])
        for path, _ in self.token_parts(run):
            with reading(path, "token part"):
                for batch in pq.ParquetFile(path).iter_batches(batch_size=rows - held,
                                                               columns=list(columns)):
                    batches.append(batch)
                    held += batch.num_rows
                    if held >= rows:
                        break
                if held >= rows:
                    break
        if not batches:
            return schema.empty_table()
        with reading(self.runs_dir / run / "tokens"):
            return pa.Table.from_batches(batches).cast(schema)

    @staticmethod
    def _step_filter(steps: Iterable[int] | None, filter: ds.Expression | None):
        expr = filter
        if steps is not None:
            step_expr = ds.field("step").isin(pa.array(list(steps), pa.int64()))
            expr = step_expr if expr is None else (expr & step_expr)
        return expr

    def scan_tokens(self, run: str, *, columns: Sequence[str] | None = None,
                    steps: Iterable[int] | None = None, filter: ds.Expression | None = None,
                    batch_size: int = 256 * 1024) -> Iterator[pa.RecordBatch]:
        """Stream token batches with column projection and step filters.

        Parameters
        ----------
        run : str
        columns : sequence of str, optional
            Columns to read (all when omitted).
        steps : iterable of int, optional
            Keep only these steps; row groups of other steps are skipped from statistics.
        filter : pyarrow.dataset.Expression, optional
            Any further row filter.
        batch_size : int
            Maximum rows per batch.
        """
        dataset = self.tokens_dataset(run)
        expr = self._step_filter(steps, filter)
        with reading(self.runs_dir / run / "tokens"):
            yield from dataset.to_batches(columns=list(columns) if columns else None,
                                          filter=expr, batch_size=batch_size)

    def read_tokens(self, run: str, *, columns: Sequence[str] | None = None,
                    steps: Iterable[int] | None = None,
                    filter: ds.Expression | None = None) -> pa.Table:
        """Read tokens into one table (use :meth:`scan_tokens` for large runs)."""
        dataset = self.tokens_dataset(run)
        with reading(self.runs_dir / run / "tokens"):
            return dataset.to_table(columns=list(columns) if columns else None,
                                    filter=self._step_filter(steps, filter))

    def token_steps(self, run: str) -> list[int]:
        """Distinct non-null steps of the run's tokens, sorted."""
        steps = self.read_tokens(run, columns=["step"]).column("step")
        return sorted(pc.unique(steps.drop_null()).to_pylist())

    def read_sequences(self, run: str, *, columns: Sequence[str] | None = None) -> pa.Table:
        """The run's sequences table (empty with the canonical schema when absent)."""
        path = self.run_dir(run) / "sequences.parquet"
        with reading(path):
            if not path.exists():
                table = SEQUENCE_SCHEMA.empty_table()
                return table.select(list(columns)) if columns else table
            return pq.read_table(path, columns=list(columns) if columns else None,
                                 schema=SEQUENCE_SCHEMA)

    def node_parts(self, run: str) -> list[Path]:
        """The run's node part files in storage order (empty without search trees). Each
        holds whole trees sorted by ``step, tree_id``; a tree never spans two parts."""
        folder = self.run_dir(run) / "nodes"
        return sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []

    def read_nodes(self, run: str, *, columns: Sequence[str] | None = None,
                   steps: Iterable[int] | None = None) -> pa.Table:
        """Read the run's search-tree nodes into one table (use :meth:`node_parts` and
        :func:`read_node_part` for large runs)."""
        parts = self.node_parts(run)
        if not parts:
            table = NODE_SCHEMA.empty_table()
        else:
            table = ds.dataset([str(p) for p in parts], schema=NODE_SCHEMA,
                               format="parquet").to_table(filter=self._step_filter(steps, None))
        return table.select(list(columns)) if columns else table

    def read_metrics(self, run: str, *, pivot: bool = False,
                     split: str | None = None) -> pd.DataFrame:
        """The run's step metrics.

        Parameters
        ----------
        run : str
        pivot : bool
            Return one row per step and one column per metric instead of the long table.
        split : str, optional
            Keep only metrics of this split.

        Returns
        -------
        pandas.DataFrame
            Long format: ``step, metric, value, raw_key, split``.
        """
        path = self.run_dir(run) / "metrics.parquet"
        with reading(path):
            table = pq.read_table(path, schema=METRIC_SCHEMA) if path.exists() \
                else METRIC_SCHEMA.empty_table()
        frame = table.to_pandas()
        if split is not None:
            frame = frame[frame["split"] == split]
        if pivot:
            frame = frame.pivot_table(index="step", columns="metric", values="value",
                                      aggfunc="last").sort_index()
            frame.columns.name = None
        return frame


def _last_step(parts: Sequence[Path]) -> int | None:
    """The largest step in token part files, from their row-group statistics."""
    last = None
    for part in parts:
        metadata = pq.ParquetFile(part).metadata
        column = metadata.schema.names.index("step")
        for group in range(metadata.num_row_groups):
            stats = metadata.row_group(group).column(column).statistics
            if stats is None or not stats.has_min_max:
                # no statistics: read the column
                steps = pq.read_table(part, columns=["step"]).column("step")
                top = pc.max(steps).as_py()
            else:
                top = stats.max
            if top is not None:
                last = int(top) if last is None else max(last, int(top))
    return last


def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    import hashlib
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_node_part(path: str | Path, *, columns: Sequence[str] | None = None) -> pa.Table:
    """One node part file (whole trees) with the canonical node schema."""
    try:
        return pq.read_table(path, columns=list(columns) if columns else None,
                             schema=NODE_SCHEMA)
    except (OSError, pa.ArrowException) as exc:
        raise StoreError(f"unreadable node part file: {exc}", path=path) from exc


def open_store(store: "Store | str | os.PathLike") -> "Store":
    """``store`` itself when it is a :class:`Store`, else the store opened at that path."""
    return store if isinstance(store, Store) else Store.open(store)


TOKEN_KEY = ("step", "sample_id", "position")


def _adjacent_duplicate_mask(table: pa.Table, *, last: bool = False) -> pa.Array | None:
    """Of a table sorted by (step, sample_id, position), the rows equal on all three to the
    row before them (``last``: to the row after them); null steps compare equal. None when
    the table has fewer than two rows."""
    if table.num_rows < 2:
        return None
    same = None
    for name in TOKEN_KEY:
        column = table.column(name)
        head, tail = column.slice(0, table.num_rows - 1), column.slice(1)
        equal = pc.fill_null(pc.equal(head, tail), False)
        both_null = pc.and_(pc.is_null(head), pc.is_null(tail))
        equal = pc.or_(equal, both_null)
        same = equal if same is None else pc.and_(same, equal)
    pad = pa.array([False])
    chunks = [pad, *same.chunks] if not last else [*same.chunks, pad]
    return pa.chunked_array(chunks, pa.bool_()).combine_chunks()


def _count_by_step(steps: pa.ChunkedArray | pa.Array) -> dict:
    """``{step: rows}`` of a step column (None for rows without a step)."""
    counts = pc.value_counts(steps.combine_chunks() if isinstance(steps, pa.ChunkedArray)
                             else steps)
    return {row["values"]: row["counts"] for row in counts.to_pylist()}


class RunWriter:
    """Writes one run into a temporary folder and moves it into place on :meth:`commit`.

    Token batches are buffered up to :data:`ROWS_PER_PART` rows, sorted by
    ``step, sample_id, position`` and written as one part file, so memory stays bounded.
    Use as a context manager: leaving the block normally commits, an exception aborts and
    removes every file written.
    """

    def __init__(self, store: Store, name: str, *, replace: bool = False,
                 append: bool = False):
        validate_run_name(name)
        self.store = store
        self.name = name
        self.replace = replace
        self.append = append
        self.final = store.runs_dir / name
        if append:
            store.run_dir(name)  # raises when there is no such run
        if self.final.exists() and not replace:
            raise RunExistsError(f"run {name!r} already exists (use --replace to overwrite it)",
                                 path=store.path)
        store.sweep_stale_tmp()
        self.tmp = store.runs_dir / f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex[:12]}"
        try:
            with store.lock(), writing(self.tmp):
                # a failed first ingest next to this one removes the store when runs/ is
                # empty: under the lock, the store is either still there or made again
                store._make_marker(store.path)
                (self.tmp / "tokens").mkdir(parents=True)
            with writing(self.tmp):
                # who writes here: a later writer removes the folder once this process is gone
                (self.tmp / _WRITER_FILE).write_text(f"{os.getpid()} {socket.gethostname()}\n")
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        self.manifest: dict[str, Any] = {
            "run": name,
            "entropylens_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "sources": [],
            "temperature": None,
            "logprob_basis": "unknown",
            "vocab_size": None,
            "top_k": None,
            "entropy_sources": [],
            "counts": {},
            "rejected": {"count": 0, "examples": []},
        }
        self._token_buffer: list[pa.Table] = []
        self._buffered = 0
        self._parts = 0
        self._seq_writer: pq.ParquetWriter | None = None
        self._metrics: list[pa.Table] = []
        self._counts = {"tokens": 0, "sequences": 0, "metrics": 0, "exact_entropy": 0,
                        "topk": 0, "logprobs": 0, "null_logprobs": 0, "duplicate_tokens": 0,
                        "after_eos": 0}
        self._first_eos: pa.Table | None = None
        self._steps: set[int] = set()
        # per part file: its steps and the rows repeating the row before them, per step
        self._part_steps: list[set] = []
        self._part_repeats: list[dict] = []
        self._duplicates_known = False
        self._node_buffer: list[pa.Table] = []
        self._node_buffered = 0
        self._node_parts = 0
        self._node_counts = {"nodes": 0, "trees": 0}
        self._trees: set[tuple] = set()
        self._node_steps: set[int] = set()
        self._max_top_k = 0
        self._prepared = False
        self._old: Path | None = None  # the replaced run, kept until every run is in place
        self._done = False
        self._part_hashes: dict[str, str] = {}
        self._old_parts: list[Path] = []
        self._old_step_count = 0
        self._old_last_step: int | None = None
        if append:
            try:
                self._carry_over()
            except BaseException:
                self.abort()
                raise

    def _carry_over(self) -> None:
        """Start from the existing run: link its token parts, load its other tables and
        its manifest, and continue its counts (append mode)."""
        old = self.final
        with writing(self.tmp):
            self.manifest = json.loads((old / "manifest.json").read_text(encoding="utf-8"))
            if self.manifest.get("counts", {}).get("nodes"):
                # search trees are written whole per part; they are re-ingested, not appended
                raise StoreError(f"run {self.name!r} holds search trees: append adds to "
                                 "token and metric logs; ingest the trees again with "
                                 "--replace", path=old)
            parts = sorted((old / "tokens").glob("part-*.parquet"))
            for part in parts:
                # a hard link: the sealed part is shared, not copied or rewritten
                os.link(part, self.tmp / "tokens" / part.name)
            self._parts = max((int(p.stem.split("-")[1]) for p in parts), default=-1) + 1
            self._part_hashes = dict(self.manifest.get("parts") or {})
            for part in parts:
                if part.name not in self._part_hashes:  # a run written before parts were hashed
                    self._part_hashes[part.name] = _sha256(part)
            # earlier steps are counted, not listed: new rows' steps are checked against
            # the earlier parts only when they are not past the earlier last step
            self._old_parts = parts
            self._old_step_count = int(self.manifest.get("counts", {}).get("token_steps") or 0)
            self._old_last_step = _last_step(parts)
            if (old / "metrics.parquet").exists():
                self._metrics.append(pq.read_table(old / "metrics.parquet", schema=METRIC_SCHEMA))
            if (old / "sequences.parquet").exists():
                earlier = pq.read_table(old / "sequences.parquet", schema=SEQUENCE_SCHEMA)
                self._seq_writer = pq.ParquetWriter(self.tmp / "sequences.parquet",
                                                    SEQUENCE_SCHEMA, compression="zstd")
                self._seq_writer.write_table(earlier)
        counts = self.manifest.get("counts", {})
        for key, manifest_key in (("tokens", "tokens"), ("sequences", "sequences"),
                                  ("metrics", "metrics"), ("exact_entropy", "tokens_with_entropy"),
                                  ("topk", "tokens_with_topk"), ("logprobs", "tokens_with_logprob"),
                                  ("null_logprobs", "null_logprobs"),
                                  ("duplicate_tokens", "duplicate_tokens"),
                                  ("after_eos", "tokens_after_eos")):
            self._counts[key] = int(counts.get(manifest_key) or 0)
        self._max_top_k = int(self.manifest.get("top_k") or 0)

    # -- context manager ---------------------------------------------------------------
    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False

    # -- writing -----------------------------------------------------------------------
    def add_source(self, path: str | Path, *, format: str, sha256: str | None = None,
                   size: int | None = None, **extra: Any) -> None:
        """Record a source file in the manifest."""
        entry = {"path": str(path), "format": format, "size": size, "sha256": sha256}
        entry.update(extra)
        self.manifest["sources"].append(entry)

    def reject(self, *, path: str | Path | None, line: int | None, message: str) -> None:
        """Count a skipped bad record and keep the first examples."""
        rejected = self.manifest["rejected"]
        rejected["count"] += 1
        if len(rejected["examples"]) < MAX_REJECTED_EXAMPLES:
            rejected["examples"].append({"file": str(path) if path else None, "line": line,
                                         "message": message})

    def write_tokens(self, data: pa.Table | pa.RecordBatch, *, path=None,
                     row_offset: int = 0) -> None:
        """Conform and buffer token rows; a part file is written every ROWS_PER_PART rows."""
        table = conform(data, "tokens", path=path, row_offset=row_offset)
        if not table.num_rows:
            return
        # padding after the end of a completion, which token analyses leave out; the first
        # EOS of the last rows' completions carries over to the next call
        table, self._first_eos = mark_after_eos(table, self._first_eos)
        self._count_tokens(table)
        self._token_buffer.append(table)
        self._buffered += table.num_rows
        self._buffered_bytes = getattr(self, "_buffered_bytes", 0) + table.nbytes
        if self._buffered >= ROWS_PER_PART or self._buffered_bytes >= BYTES_PER_PART:
            self._flush_tokens()

    def _count_tokens(self, table: pa.Table, *, sign: int = 1) -> None:
        """Add a table's rows to the counts (``sign=-1``: take dropped rows out again)."""
        counts = self._counts
        counts["tokens"] += sign * table.num_rows
        counts["exact_entropy"] += sign * (table.num_rows - table.column("entropy").null_count)
        counts["logprobs"] += sign * (table.num_rows - table.column("logprob").null_count)
        counts["null_logprobs"] += sign * table.column("logprob").null_count
        top = table.column("top_logprobs")
        counts["topk"] += sign * (table.num_rows - top.null_count)
        if sign < 0:
            return
        if table.num_rows - top.null_count:
            lengths = pc.list_value_length(top)
            self._max_top_k = max(self._max_top_k, pc.max(lengths).as_py() or 0)
        self._steps.update(pc.unique(table.column("step").drop_null()).to_pylist())
        counts["after_eos"] += pc.sum(table.column("after_eos")).as_py() or 0

    def _flush_tokens(self) -> None:
        if not self._token_buffer:
            return
        table = pa.concat_tables(self._token_buffer)
        self._token_buffer, self._buffered = [], 0
        self._buffered_bytes = 0
        order = pc.sort_indices(table, sort_keys=[("step", "ascending"),
                                                  ("sample_id", "ascending"),
                                                  ("position", "ascending")])
        table = table.take(order)
        repeats = _adjacent_duplicate_mask(table)
        self._part_steps.append(set(pc.unique(table.column("step")).to_pylist()))
        self._part_repeats.append(_count_by_step(table.column("step").filter(repeats))
                                  if repeats is not None else {})
        out = self.tmp / "tokens" / f"part-{self._parts:05d}.parquet"
        with writing(out):
            pq.write_table(table, out, row_group_size=ROWS_PER_GROUP, compression="zstd")
        # the part's checksum names its content: caches of per-part results key on it
        self._part_hashes[out.name] = _sha256(out)
        self._parts += 1

    def write_sequences(self, data: pa.Table | pa.RecordBatch, *, path=None,
                        row_offset: int = 0) -> None:
        """Conform and append completion rows."""
        table = conform(data, "sequences", path=path, row_offset=row_offset)
        if not table.num_rows:
            return
        with writing(self.tmp / "sequences.parquet"):
            if self._seq_writer is None:
                self._seq_writer = pq.ParquetWriter(self.tmp / "sequences.parquet",
                                                    SEQUENCE_SCHEMA, compression="zstd")
            self._seq_writer.write_table(table)
        self._counts["sequences"] += table.num_rows

    def write_metrics(self, data: pa.Table | pa.RecordBatch, *, path=None,
                      row_offset: int = 0) -> None:
        """Conform and keep long-format metric rows (written, sorted, at commit)."""
        table = conform(data, "metrics", path=path, row_offset=row_offset)
        if table.num_rows:
            self._metrics.append(table)
            self._counts["metrics"] += table.num_rows

    # -- duplicate token keys across the whole run ------------------------------------
    def _step_filter_of(self, step) -> ds.Expression:
        return ds.field("step").is_null() if step is None else ds.field("step") == step

    def _shared_steps(self) -> set:
        """Steps whose tokens lie in more than one part file."""
        seen, shared = set(), set()
        for steps in self._part_steps:
            shared |= seen & steps
            seen |= steps
        return shared

    def find_duplicates(self) -> tuple[int, dict | None]:
        """Token rows repeating the (step, sample_id, position) of an earlier row anywhere in
        the run (not only within one part file), and the first repeated key.

        Call after the last :meth:`write_tokens`; it flushes the buffer. Steps held by one
        part were counted when it was written; a step spread over several parts is read
        back, one step at a time, so memory stays bounded by a step's keys.
        """
        self._flush_tokens()
        shared = self._shared_steps()
        total, first = 0, None
        for steps, repeats in zip(self._part_steps, self._part_repeats):
            total += sum(n for step, n in repeats.items() if step not in shared)
            if first is None:
                first = next(({"step": step} for step, n in repeats.items()
                              if n and step not in shared), None)
        for step in sorted(shared, key=lambda v: (v is not None, v)):
            keys = self._step_rows(step, columns=list(TOKEN_KEY))
            keys = keys.take(pc.sort_indices(keys, sort_keys=[(k, "ascending")
                                                              for k in TOKEN_KEY]))
            mask = _adjacent_duplicate_mask(keys)
            n = int(pc.sum(mask).as_py() or 0) if mask is not None else 0
            total += n
            if n and (first is None or "sample_id" not in first):
                row = keys.filter(mask).slice(0, 1).to_pylist()[0]
                first = row
        if first is not None and "sample_id" not in first:
            # a repeat inside one part: name its key too
            keys = self._step_rows(first["step"], columns=list(TOKEN_KEY))
            keys = keys.take(pc.sort_indices(keys, sort_keys=[(k, "ascending")
                                                              for k in TOKEN_KEY]))
            first = keys.filter(_adjacent_duplicate_mask(keys)).slice(0, 1).to_pylist()[0]
        self._counts["duplicate_tokens"] = total
        self._duplicates_known = True
        return total, first

    def _step_rows(self, step, *, columns=None) -> pa.Table:
        files = [self.tmp / "tokens" / f"part-{i:05d}.parquet"
                 for i, steps in enumerate(self._part_steps) if step in steps]
        return ds.dataset(files, format="parquet").to_table(
            columns=columns, filter=self._step_filter_of(step))

    def drop_duplicates(self, keep: str) -> int:
        """Keep one row of each repeated (step, sample_id, position): the first ingested
        (``keep="first"``) or the last (``keep="last"``); part files are rewritten.
        Returns the rows dropped."""
        if keep not in ("first", "last"):
            raise ValueError(f"keep must be 'first' or 'last', got {keep!r}")
        self._flush_tokens()
        shared = self._shared_steps()
        order = range(self._parts) if keep == "first" else range(self._parts - 1, -1, -1)
        seen: set = set()   # keys of shared steps already kept, in ingest order
        dropped = 0
        for i in order:
            if not any(self._part_repeats[i].values()) and not (self._part_steps[i] & shared):
                continue
            path = self.tmp / "tokens" / f"part-{i:05d}.parquet"
            table = pq.read_table(path)
            # within the part, rows of one key are in ingest order (stable sort)
            mask = _adjacent_duplicate_mask(table, last=keep == "last")
            drop = mask.to_pylist() if mask is not None else [False] * table.num_rows
            if self._part_steps[i] & shared:
                keys = zip(*(table.column(k).to_pylist() for k in TOKEN_KEY))
                for row, key in enumerate(keys):
                    if key[0] not in shared or drop[row]:
                        continue
                    if key in seen:
                        drop[row] = True
                    else:
                        seen.add(key)
            gone = table.filter(pa.array(drop))
            if not gone.num_rows:
                continue
            self._count_tokens(gone, sign=-1)
            table = table.filter(pc.invert(pa.array(drop)))
            pq.write_table(table, path, row_group_size=ROWS_PER_GROUP, compression="zstd")
            dropped += gone.num_rows
        self._part_repeats = [{} for _ in self._part_repeats]
        self._counts["duplicate_tokens"] = 0
        self._duplicates_known = True
        return dropped
    def write_nodes(self, data: pa.Table | pa.RecordBatch, *, path=None,
                    row_offset: int = 0) -> None:
        """Conform and buffer search-tree node rows; every call must hold whole trees.

        A part file is written once :data:`NODE_ROWS_PER_PART` rows are buffered, so parts
        hold whole trees and memory stays bounded. A tree (``step, tree_id``) seen in an
        earlier call is an error: its nodes would be split between parts.

        Raises
        ------
        SchemaError
            Naming the first offending column and row, or the tree written twice.
        """
        from .errors import SchemaError

        table = conform(data, "nodes", path=path, row_offset=row_offset)
        if not table.num_rows:
            return
        keys = table.group_by(["step", "tree_id"], use_threads=False).aggregate([]).to_pylist()
        for key in keys:
            tree = (key["step"], key["tree_id"])
            if tree in self._trees:
                step = "" if tree[0] is None else f" of step {tree[0]}"
                raise SchemaError(f"tree {tree[1]!r}{step} appears twice (duplicate tree id)",
                                  path=path, field="tree_id")
            self._trees.add(tree)
        self._node_counts["nodes"] += table.num_rows
        self._node_counts["trees"] += len(keys)
        self._node_steps.update(pc.unique(table.column("step").drop_null()).to_pylist())
        self._node_buffer.append(table)
        self._node_buffered += table.num_rows
        if self._node_buffered >= NODE_ROWS_PER_PART:
            self._flush_nodes()

    def _flush_nodes(self) -> None:
        if not self._node_buffer:
            return
        table = pa.concat_tables(self._node_buffer)
        self._node_buffer, self._node_buffered = [], 0
        # stable: a tree's nodes keep the reader's (parent before child) order
        order = pc.sort_indices(table, sort_keys=[("step", "ascending"),
                                                  ("tree_id", "ascending")])
        folder = self.tmp / "nodes"
        folder.mkdir(exist_ok=True)
        pq.write_table(table.take(order), folder / f"part-{self._node_parts:05d}.parquet",
                       compression="zstd")
        self._node_parts += 1

    @property
    def counts(self) -> dict[str, int]:
        """Rows written so far: ``tokens``, ``sequences``, ``metrics``, ``nodes`` and more."""
        return {**self._counts, **self._node_counts}

    # -- finishing ---------------------------------------------------------------------
    def commit(self) -> Path:
        """Write the remaining data and the manifest, then move the run into place."""
        if not self._done:
            commit_runs([self])
        return self.final

    def prepare(self) -> None:
        """Write the remaining data and the manifest into the temporary folder."""
        if self._prepared:
            return
        with writing(self.tmp):
            self._flush_tokens()
            if self._parts and not self._duplicates_known:
                self.find_duplicates()  # the manifest counts repeats across the whole run
            self._flush_nodes()
            if self._seq_writer is not None:
                self._seq_writer.close()
                self._seq_writer = None
            if self._metrics:
                metrics = pa.concat_tables(self._metrics)
                order = pc.sort_indices(metrics, sort_keys=[("metric", "ascending"),
                                                            ("step", "ascending")])
                pq.write_table(metrics.take(order), self.tmp / "metrics.parquet",
                               compression="zstd")
            self._finish_manifest()
            write_json_atomic(self.tmp / "manifest.json", self.manifest)
        self._prepared = True

    def _token_step_count(self) -> int:
        """Distinct token steps of the run (an appended run's earlier ones included)."""
        if not self.append or not self._old_parts:
            return len(self._steps)
        last = self._old_last_step
        later = {s for s in self._steps if last is None or s > last}
        maybe_old = self._steps - later
        if maybe_old:
            old = ds.dataset([str(p) for p in self._old_parts], format="parquet").to_table(
                columns=["step"], filter=ds.field("step").isin(
                    pa.array(sorted(maybe_old), pa.int64()))).column("step")
            maybe_old -= set(pc.unique(old.drop_null()).to_pylist())
        return self._old_step_count + len(later) + len(maybe_old)

    def _finish_manifest(self) -> None:
        counts = self._counts
        metric_steps: set[int] = set()
        for table in self._metrics:
            metric_steps.update(pc.unique(table.column("step").drop_null()).to_pylist())
        computed = {
            "tokens": counts["tokens"],
            "sequences": counts["sequences"],
            "metrics": counts["metrics"],
            "token_steps": self._token_step_count(),
            "metric_steps": len(metric_steps),
            "tokens_with_entropy": counts["exact_entropy"],
            "tokens_with_topk": counts["topk"],
            "tokens_with_logprob": counts["logprobs"],
            "null_logprobs": counts["null_logprobs"],
            # rows repeating an earlier row's (step, sample_id, position) anywhere in the
            # run, e.g. a record logged twice; 0 after --on-duplicate dropped them
            "duplicate_tokens": counts["duplicate_tokens"],
            # tokens after the first end-of-sequence token of their completion
            "tokens_after_eos": counts["after_eos"],
            # search trees (the node table): nodes, trees and distinct steps of trees
            "nodes": self._node_counts["nodes"],
            "trees": self._node_counts["trees"],
            "node_steps": len(self._node_steps),
        }
        # counts the driver added (sentinel values), kept; an appended run's earlier
        # manifest also holds the counts computed above, which the new values replace
        self.manifest["counts"] = {**computed, **{k: v for k, v in
                                                  self.manifest["counts"].items()
                                                  if k not in computed}}
        sources = []
        if counts["exact_entropy"]:
            sources.append("exact")
        if counts["topk"]:
            sources.append("topk")
        if counts["logprobs"]:
            sources.append("surprisal")
        self.manifest["entropy_sources"] = sources
        self.manifest["parts"] = dict(sorted(self._part_hashes.items()))
        if self.manifest.get("top_k") is None and self._max_top_k:
            self.manifest["top_k"] = self._max_top_k

    def _publish(self) -> None:
        """Rename the run into place, the replaced run aside (store lock held)."""
        if self.final.exists():
            if not self.replace:
                raise RunExistsError(f"run {self.name!r} already exists (use --replace to "
                                     "overwrite it)", path=self.store.path)
            self._old = self.store.runs_dir / f"{_OLD_PREFIX}{self.name}-{uuid.uuid4().hex[:8]}"
            os.replace(self.final, self._old)
        try:
            os.replace(self.tmp, self.final)
        except BaseException:
            if self._old is not None:
                os.replace(self._old, self.final)
                self._old = None
            raise
        (self.final / _WRITER_FILE).unlink(missing_ok=True)

    def _unpublish(self) -> None:
        """Undo :meth:`_publish`: the run back to its temporary folder, the old one back."""
        if self.final.exists() and not self.tmp.exists():
            os.replace(self.final, self.tmp)
        if self._old is not None:
            os.replace(self._old, self.final)
            self._old = None

    def abort(self) -> None:
        """Remove everything written so far; the store is as it was."""
        if self._seq_writer is not None:
            try:
                self._seq_writer.close()
            except Exception:
                pass
            self._seq_writer = None
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._done = True


def commit_runs(writers: Sequence[RunWriter]) -> None:
    """Commit the runs of one store together: every run appears, or none does.

    Each run's data is finished in its temporary folder first (where a full disk or a missing
    permission shows); then, under the store lock, the runs are renamed into place. When a
    rename fails, the runs already renamed go back and the replaced ones return, so the store
    is as it was. An exception aborts every writer.
    """
    if not writers:
        return
    store = writers[0].store
    try:
        for writer in writers:
            writer.prepare()
        published: list[RunWriter] = []
        with store.lock(), writing(store.runs_dir):
            try:
                for writer in writers:
                    writer._publish()
                    published.append(writer)
            except BaseException:
                for writer in reversed(published):
                    try:
                        writer._unpublish()
                    except OSError:
                        pass
                raise
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    for writer in writers:
        if writer._old is not None:
            shutil.rmtree(writer._old, ignore_errors=True)
            writer._old = None
        writer._done = True
