"""The ingest driver: resolve sources, detect formats, stream readers into the store.

Readers yield canonical columns; the driver cleans sentinel values, conforms the data to the
canonical schema, stamps provenance on the manifest, and commits every run atomically. When
anything fails, nothing is written: runs already in the store are untouched and a store
folder created by this call is removed again.
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import EntropylensError, FormatError, StoreError
from ..schema import SENTINEL_LOGPROB
from ..store import RunWriter, Store, commit_runs, validate_run_name
from . import registry
from ._io import ProgressReader, open_binary, sha256_file

ON_ERROR = ("stop", "skip")
#: The largest float32: logprobs and entropies are stored as float32.
_FLOAT32_MAX = float(np.finfo(np.float32).max)
LOGPROB_BASES = ("tempered", "raw", "unknown")
#: File stems too generic to name a run: the parent folder names it instead.
_GENERIC_STEMS = {"tokens", "sequences", "metrics", "history", "logging", "log", "train",
                  "events", "events.out", "trainer_state", "step_logs", "output", "outputs", "data",
                  "completions", "responses", "results"}
#: Files inside a folder that are never data.
_SKIP_NAMES = re.compile(r"^(readme.*|license.*|\..*|.*\.(md|py|sh|yaml|yml|toml|png|jpg|pdf))$",
                         re.IGNORECASE)


@dataclass
class IngestOptions:
    """Options of one ingest call that readers may consult."""

    mapping: dict[str, str] = field(default_factory=dict)
    temperature: float | None = None
    vocab_size: int | None = None
    on_error: str = "stop"
    aliases: dict[str, str] = field(default_factory=dict)


class IngestContext:
    """What a reader gets besides the path: options, error handling, notes, progress.

    Readers call :meth:`reject` for a bad record (it raises under ``--on-error stop`` and
    counts the record under ``skip``), :meth:`note` to record facts the file states
    (temperature, logprob basis, vocabulary size, top-k), and :meth:`open` to read the file
    with a progress bar.
    """

    def __init__(self, path: Path, options: IngestOptions, format_name: str, progress=None):
        self.path = path
        self.options = options
        self.format = format_name
        self.notes: dict = {}
        self.rejected: list[dict] = []
        self.rejected_count = 0
        self._progress = progress

    def reject(self, line: int | None, message: str, *, field: str | None = None) -> None:
        """Report a bad record at ``line`` (1-based line or record number)."""
        if self.options.on_error == "stop":
            raise FormatError(message + " (use --on-error skip to skip such records)",
                              path=self.path, line=line, field=field)
        self.rejected_count += 1
        if len(self.rejected) < 20:
            where = f"field '{field}': " if field else ""
            self.rejected.append({"file": str(self.path), "line": line,
                                  "message": where + message})

    def note(self, **facts) -> None:
        """Record facts the source states about itself (first value wins)."""
        for key, value in facts.items():
            if value is not None:
                self.notes.setdefault(key, value)

    @contextmanager
    def open(self):
        """Open the source for binary reading (decompressing), with a progress bar."""
        fh = open_binary(self.path)
        try:
            if self._progress is not None:
                task = self._progress.start_file(self.path)
                fh = ProgressReader(fh, task)
                import io
                fh = io.BufferedReader(fh, buffer_size=1 << 20)
            yield fh
        finally:
            fh.close()


class _Progress:
    """A rich progress bar on stderr, shown only on a terminal and once a file takes > 1 s."""

    def __init__(self):
        self._bar = None
        self._task = None
        self._started = 0.0
        self._pending = 0

    def start_file(self, path: Path):
        self._started = time.monotonic()
        total = path.stat().st_size if path.suffix.lower() not in (".gz", ".bz2", ".xz",
                                                                   ".zst") else None
        name = path.name

        def advance(n: int) -> None:
            self._pending += n
            if self._bar is None:
                if time.monotonic() - self._started < 1.0:
                    return
                from rich.progress import (BarColumn, DownloadColumn, Progress,
                                           TimeRemainingColumn, TransferSpeedColumn)
                self._bar = Progress("[progress.description]{task.description}", BarColumn(),
                                     DownloadColumn(), TransferSpeedColumn(),
                                     TimeRemainingColumn(), transient=True,
                                     console=_stderr_console())
                self._bar.start()
            if self._task is None:
                self._task = self._bar.add_task(name, total=total)
            self._bar.advance(self._task, self._pending)
            self._pending = 0

        self._task = None
        return advance

    def close(self):
        if self._bar is not None:
            self._bar.stop()


def _stderr_console():
    from rich.console import Console
    return Console(stderr=True)


def _default_run_name(path: Path) -> str:
    stem = path.name
    if not path.is_dir():
        # drop data and compression suffixes only: "run-0.640.log" keeps its "0.640"
        while re.search(r"\.(gz|bz2|xz|zst|jsonl|ndjson|json|csv|tsv|parquet|log|txt|"
                        r"tfevents.*)$", stem, re.IGNORECASE):
            stem = stem.rsplit(".", 1)[0]
    if stem.lower() in _GENERIC_STEMS or re.fullmatch(r"(part|rank|step)[-_]?\d*", stem.lower()):
        stem = path.resolve().parent.name or stem
    name = re.sub(r"[^A-Za-z0-9._+=@-]+", "-", stem).strip("-.") or "run"
    if not name[0].isalnum():
        name = "run-" + name
    return name[:200]


def resolve_sources(sources: Sequence[str | Path], format: str | None = None,
                    mapping: Mapping[str, str] | None = None
                    ) -> list[tuple[Path, registry.Format]]:
    """Expand folders and detect each file's format.

    A folder is read whole when a folder format claims it (``--format`` or detection);
    otherwise its files are taken one by one, skipping files no format recognises.
    Files named explicitly must be recognised.
    """
    resolved: list[tuple[Path, registry.Format]] = []
    forced = registry.get_format(format) if format else None
    for source in sources:
        path = Path(source)
        if not path.exists():
            raise FormatError("no such file or folder", path=path)
        if path.is_dir():
            if forced is not None and forced.folders:
                resolved.append((path, forced))
                continue
            if forced is None:
                fmt = registry.detect(path, required=False, mapping=mapping)
                if fmt is not None:
                    resolved.append((path, fmt))
                    continue
            found = False
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                if any(part.startswith(".") for part in child.relative_to(path).parts) \
                        or _SKIP_NAMES.match(child.name):
                    continue
                fmt = forced or registry.detect(child, required=False, mapping=mapping)
                if fmt is not None:
                    resolved.append((child, fmt))
                    found = True
            if not found:
                raise FormatError("no file in this folder is in a known format", path=path)
        else:
            resolved.append((path, forced or registry.detect(path, mapping=mapping)))
    return resolved


def _clean_tokens(table: pa.Table) -> tuple[pa.Table, dict[str, int]]:
    """Turn sentinel and non-finite logprobs and entropies into nulls, and count them."""
    counts = {}
    for name, low in (("logprob", SENTINEL_LOGPROB), ("entropy", None)):
        if name not in table.column_names:
            continue
        column = table.column(name)
        if not pa.types.is_floating(column.type):
            column = column.cast(pa.float64())
        # beyond float32's range a value would be stored as an infinity
        bad = pc.or_(pc.invert(pc.is_finite(column)),
                     pc.greater(pc.abs(column), _FLOAT32_MAX))
        if low is not None:
            bad = pc.or_(bad, pc.less_equal(column, low))
        if name == "entropy":
            bad = pc.or_(bad, pc.less(column, -1e-4))
        bad = pc.fill_null(bad, False)
        n = pc.sum(bad).as_py() or 0
        if n:
            counts[f"sentinel_{name}s"] = n
            table = table.set_column(table.column_names.index(name), name,
                                     pc.if_else(bad, pa.scalar(None, column.type), column))
    if "top_logprobs" in table.column_names:
        column = table.column("top_logprobs").combine_chunks()
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type) \
                or pa.types.is_fixed_size_list(column.type):
            values = column.flatten()
            if not pa.types.is_floating(values.type):
                values = values.cast(pa.float64())
            bad = pc.fill_null(pc.or_(pc.or_(pc.invert(pc.is_finite(values)),
                                             pc.greater(pc.abs(values), _FLOAT32_MAX)),
                                      pc.less_equal(values, SENTINEL_LOGPROB)), False)
            n = pc.sum(bad).as_py() or 0
            if n:
                counts["sentinel_top_logprobs"] = n
                values = pc.if_else(bad, pa.scalar(None, values.type), values)
                column = column.cast(pa.list_(values.type))
                column = pa.ListArray.from_arrays(column.offsets, values,
                                                  mask=column.is_null())
                table = table.set_column(table.column_names.index("top_logprobs"),
                                         "top_logprobs", column)
    return table, counts


def _split_runs(data: pa.Table, base: str | None, explicit: bool,
                names: dict[str, str]) -> Iterator[tuple[str | None, str | None, pa.Table]]:
    """Split rows by a ``_run`` column into (run name, source run, rows); a None name means
    the default run.

    ``names`` maps each source run seen so far in this ingest to its run name, so that two
    source runs whose safe folder names coincide (``exp/1`` and ``exp:1`` both make
    ``exp-1``) stay two runs: the later one gets a suffix from a hash of its name.
    """
    if "_run" not in data.column_names:
        yield None, None, data
        return
    keys = data.column("_run")
    for key in pc.unique(keys).to_pylist():
        rows = data.filter(pc.equal(keys, key) if key is not None else pc.is_null(keys))
        rows = rows.drop_columns(["_run"])
        if key is None:
            yield None, None, rows
            continue
        key = str(key)
        if key not in names:
            names[key] = _unique_run_name(key, base, explicit, set(names.values()))
        yield names[key], key, rows


def _unique_run_name(key: str, base: str | None, explicit: bool, taken: set[str]) -> str:
    """A safe run name for source run ``key`` that no other source run of the call has."""
    sub = re.sub(r"[^A-Za-z0-9._+=@-]+", "-", key).strip("-.") or "run"
    name = f"{base}-{sub}" if explicit and base else sub
    if not name[0].isalnum():
        name = "run-" + name
    name = name[:200]
    if name in taken:
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        name = f"{name[:191]}-{digest}"
    return name


def ingest(sources: str | Path | Sequence[str | Path], out: str | Path | Store, *,
           run: str | None = None, format: str | None = None,
           mapping: Mapping[str, str] | None = None, temperature: float | None = None,
           vocab_size: int | None = None, logprob_basis: str | None = None,
           on_error: str = "stop", replace: bool = False,
           aliases: Mapping[str, str] | None = None, progress: bool | None = None,
           append: bool = False) -> list[str]:
    """Read log files into a store.

    Parameters
    ----------
    sources : path or sequence of paths
        Files or folders. All of them go into one run (unless a file holds several runs).
    out : path or Store
        The store; created when missing.
    run : str, optional
        Run name (default: from the first source's name).
    format : str, optional
        Force a format instead of auto-detection (see :func:`formats`).
    mapping : mapping of str to str, optional
        ``{canonical: source}`` column renames for table-like formats; a source ``a+b``
        joins columns ``a`` and ``b`` with ``:``.
    temperature : float, optional
        Sampling temperature; overrides what the file says.
    vocab_size : int, optional
        Vocabulary size V, used by the top-k entropy bounds.
    logprob_basis : {"tempered", "raw", "unknown"}, optional
        Whether logprobs were computed from logits/T; overrides what the format implies.
    on_error : {"stop", "skip"}
        Stop at the first bad record, or skip bad records and count them in the manifest.
    replace : bool
        Overwrite runs that already exist.
    aliases : mapping of str to str, optional
        Extra metric aliases ``{raw_key: canonical}``.
    progress : bool, optional
        Show progress bars (default: when stderr is a terminal).
    append : bool
        Add what is new in the sources since the last ingest to the run (created when
        missing), without rewriting its earlier part files (see
        :mod:`entropylens.ingest.append`).

    Returns
    -------
    list of str
        The runs written.

    Raises
    ------
    EntropylensError
        Naming the file and line or record; nothing is written then.
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        raise EntropylensError("no sources given")
    if on_error not in ON_ERROR:
        raise EntropylensError(f"--on-error must be one of {', '.join(ON_ERROR)}")
    if logprob_basis is not None and logprob_basis not in LOGPROB_BASES:
        raise EntropylensError(f"logprob basis must be one of {', '.join(LOGPROB_BASES)}")
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise EntropylensError(f"temperature must be positive, got {temperature}")
    if vocab_size is not None and vocab_size <= 1:
        raise EntropylensError(f"vocabulary size must be above 1, got {vocab_size}")
    if run is not None:
        validate_run_name(run)
    resolved = resolve_sources(sources, format, mapping)
    base = run or _default_run_name(Path(sources[0]))
    options = IngestOptions(mapping=dict(mapping or {}), temperature=temperature,
                            vocab_size=vocab_size, on_error=on_error,
                            aliases=dict(aliases or {}))

    if append:
        return _append_call(resolved, out, base, options, replace=replace,
                            temperature=temperature, vocab_size=vocab_size,
                            logprob_basis=logprob_basis)
    created_store = False
    if isinstance(out, Store):
        store = out
    else:
        store = Store.create(out)
        created_store = True  # discard_if_unused knows whether this call made it
    writers: dict[str, RunWriter] = {}
    run_names: dict[str, str] = {}
    show = sys.stderr.isatty() if progress is None else progress
    bar = _Progress() if show else None

    def writer_for(name: str | None) -> RunWriter:
        name = name or base
        if name not in writers:
            writers[name] = store.write_run(name, replace=replace)
        return writers[name]

    try:
        contexts = []
        for path, fmt in resolved:
            ctx = IngestContext(path, options, fmt.name, bar)
            contexts.append(ctx)
            used: set[str] = set()
            for chunk in _read_chunks(fmt, path, ctx):
                chunk = registry.Chunk(*chunk) if not isinstance(chunk, registry.Chunk) else chunk
                data = chunk.data
                if isinstance(data, pa.RecordBatch):
                    data = pa.Table.from_batches([data])
                for name, source_run, rows in _split_runs(data, base, run is not None,
                                                          run_names):
                    writer = writer_for(name)
                    used.add(writer.name)
                    if source_run is not None:  # the run's name in the file, unsanitised
                        writer.manifest.setdefault("source_run", source_run)
                    if chunk.kind == "tokens":
                        rows, sentinels = _clean_tokens(rows)
                        counts = writer.manifest["counts"]
                        for key, n in sentinels.items():
                            counts[key] = counts.get(key, 0) + n
                        writer.write_tokens(rows, path=path, row_offset=chunk.row_offset)
                    elif chunk.kind == "sequences":
                        writer.write_sequences(rows, path=path, row_offset=chunk.row_offset)
                    elif chunk.kind == "metrics":
                        writer.write_metrics(rows, path=path, row_offset=chunk.row_offset)
                    else:
                        raise FormatError(f"reader yielded unknown table kind {chunk.kind!r}",
                                          path=path)
            if not used:
                used.add(writer_for(None).name)
            for name in used:
                _stamp(writers[name], path, fmt, ctx)
        if not writers:
            raise FormatError("no data found", path=resolved[0][0])
        for writer in writers.values():
            _finish_provenance(writer, options, temperature, vocab_size, logprob_basis)
            if not any(writer.counts[k] for k in ("tokens", "sequences", "metrics")):
                files = [s["path"] for s in writer.manifest["sources"]]
                raise FormatError("no tokens, sequences or metrics found"
                                  + (f" (also read: {', '.join(files[1:])})"
                                     if len(files) > 1 else ""),
                                  path=files[0] if files else resolved[0][0])
        for writer in writers.values():
            if writer.final.exists() and not replace:
                raise StoreError(f"run {writer.name!r} already exists (use --replace)",
                                 path=store.path)
        # all runs of one call appear together or not at all
        commit_runs(list(writers.values()))
    except BaseException:
        for writer in writers.values():
            writer.abort()
        if created_store:
            store.discard_if_unused()
        raise
    finally:
        if bar is not None:
            bar.close()
    return sorted(writers)


def _append_call(resolved, out, run: str, options: IngestOptions, *, replace: bool,
                 **provenance) -> list[str]:
    """:func:`ingest` with ``append``: one run, new steps only."""
    from .append import append as append_sources

    if replace:
        raise EntropylensError("--append and --replace exclude each other")
    store = out if isinstance(out, Store) else Store.create(out)
    try:
        append_sources(resolved, store, run, options=options, **provenance)
    except BaseException:
        if not isinstance(out, Store):
            store.discard_if_unused()
        raise
    return [run]


#: Errors a reader's parsing libraries raise on damaged files (corrupt Parquet pages, broken
#: compression streams, values of the wrong type deep inside a record). They become a
#: FormatError naming the file, so bad data never ends in a traceback.
_DATA_ERRORS = (pa.ArrowException, OSError, ValueError, TypeError, KeyError, IndexError,
                AttributeError, EOFError, OverflowError, RecursionError, UnicodeError)


def _read_chunks(fmt: registry.Format, path: Path, ctx: IngestContext) -> Iterator:
    """``fmt.read(path, ctx)``, with library errors on damaged input turned into a
    :class:`FormatError` naming the file (readers name the line where they can)."""
    try:
        yield from fmt.read(path, ctx)
    except EntropylensError as exc:
        if exc.path is None:  # shared helpers (line limits) know the line, not the file
            exc.path = str(path)
            exc.args = (str(exc),)
        raise
    except FileNotFoundError as exc:
        raise FormatError(f"cannot read: {exc.strerror or exc}", path=path) from None
    except _DATA_ERRORS as exc:
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise FormatError(f"cannot read as {fmt.name}: {type(exc).__name__}"
                          + (f": {detail}" if detail else ""), path=path) from None


def _stamp(writer: RunWriter, path: Path, fmt: registry.Format, ctx: IngestContext) -> None:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        writer.add_source(file.resolve(), format=fmt.name, size=file.stat().st_size,
                          sha256=sha256_file(file))
    _apply_notes(writer, ctx)


def _apply_notes(writer: RunWriter, ctx: IngestContext) -> None:
    """Record a source's rejected records and the facts it states on the run's manifest."""
    for example in ctx.rejected:
        writer.reject(path=example["file"], line=example["line"], message=example["message"])
    # the manifest counts every rejected record, not only the kept examples
    writer.manifest["rejected"]["count"] += ctx.rejected_count - len(ctx.rejected)
    for key, value in ctx.notes.items():
        if key in ("temperature", "logprob_basis", "vocab_size", "top_k"):
            if writer.manifest.get(key) in (None, "unknown"):
                writer.manifest[key] = value
        else:
            writer.manifest.setdefault("notes", {}).setdefault(key, value)


def _finish_provenance(writer: RunWriter, options: IngestOptions, temperature, vocab_size,
                       logprob_basis) -> None:
    if temperature is not None:
        writer.manifest["temperature"] = temperature
    if vocab_size is not None:
        writer.manifest["vocab_size"] = vocab_size
    if logprob_basis is not None:
        writer.manifest["logprob_basis"] = logprob_basis
    if options.mapping:
        writer.manifest["mapping"] = dict(options.mapping)
