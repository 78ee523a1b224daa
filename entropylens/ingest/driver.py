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
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .._safe_text import plain
from ..errors import EntropylensError, FormatError, StoreError
from ..schema import SENTINEL_LOGPROB
from ..store import RunWriter, Store, commit_runs, validate_run_name
from . import registry
from ._io import ProgressReader, open_binary, sha256_file
from .step_basis import STEP_BASES, source_step_basis

ON_ERROR = ("stop", "skip")
#: The largest float32: logprobs and entropies are stored as float32.
_FLOAT32_MAX = float(np.finfo(np.float32).max)
#: What to do with token rows repeating a (step, sample_id, position) of the same run.
ON_DUPLICATE = ("error", "keep-first", "keep-last")
LOGPROB_BASES = ("tempered", "raw", "unknown")
#: File stems too generic to name a run: the parent folder names it instead.
_GENERIC_STEMS = {"tokens", "sequences", "metrics", "history", "logging", "log", "train",
                  "events", "events.out", "trainer_state", "step_logs", "output", "outputs", "data",
                  "completions", "responses", "results"}
#: Subfolders that hold one part or split of a run (verl's ``rollout/`` and ``validation/``
#: dumps), never a run of their own.
_PART_FOLDERS = _GENERIC_STEMS | {"rollout", "rollouts", "validation", "val", "eval",
                                  "evaluation", "test", "inference", "generations", "parts",
                                  "chunks", "shards"}
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
    return [(path, fmt) for path, fmt, _ in _resolve(sources, format, mapping)]


def _resolve(sources: Sequence[str | Path], format: str | None = None,
             mapping: Mapping[str, str] | None = None
             ) -> list[tuple[Path, registry.Format, str | None]]:
    """:func:`resolve_sources` with the run folder of each file: in a folder of runs (files
    in two or more subfolders, as ``sample_logs/`` holds ``vanilla/`` and ``top20/``), each
    subfolder is a run of its own, named after it; None means the default run."""
    resolved: list[tuple[Path, registry.Format, str | None]] = []
    forced = registry.get_format(format) if format else None
    for source in sources:
        path = Path(source)
        if not path.exists():
            raise FormatError("no such file or folder", path=path)
        if path.is_dir():
            if forced is not None and forced.folders:
                resolved.append((path, forced, None))
                continue
            if forced is None:
                fmt = registry.detect(path, required=False, mapping=mapping)
                if fmt is not None:
                    resolved.append((path, fmt, None))
                    continue
            found = []
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                if any(part.startswith(".") for part in child.relative_to(path).parts) \
                        or _SKIP_NAMES.match(child.name):
                    continue
                fmt = forced or registry.detect(child, required=False, mapping=mapping)
                if fmt is not None:
                    found.append((child, fmt))
            if not found:
                raise FormatError("no file in this folder is in a known format", path=path)
            resolved.extend(_run_folders(path, found))
        else:
            resolved.append((path, forced or registry.detect(path, mapping=mapping), None))
    return resolved


def _run_folders(folder: Path, found: list[tuple[Path, registry.Format]]
                 ) -> list[tuple[Path, registry.Format, str | None]]:
    """Files of one folder with their run: one run per subfolder when two or more
    subfolders hold data (subfolders named like a table, ``tokens/``, ``metrics/``, are
    parts of one run); files both at the top and in such subfolders are refused."""
    def top(child: Path) -> str | None:
        parts = child.relative_to(folder).parts
        return parts[0] if len(parts) > 1 else None

    subfolders = sorted({top(c) for c, _ in found} - {None})
    if len(subfolders) < 2 or any(name.lower() in _PART_FOLDERS
                                   or re.fullmatch(r"(part|rank|shard|step)?[-_]?\d+",
                                                   name.lower()) for name in subfolders):
        return [(child, fmt, None) for child, fmt in found]
    loose = [child.name for child, _ in found if top(child) is None]
    if loose:
        raise FormatError(
            f"holds runs in subfolders ({', '.join(subfolders[:4])}"
            f"{', ...' if len(subfolders) > 4 else ''}) and files beside them "
            f"({', '.join(loose[:3])}); ingest each run folder on its own", path=folder)
    return [(child, fmt, top(child)) for child, fmt in found]


def _run_folder_name(folder: str, run: str | None) -> str:
    name = re.sub(r"[^A-Za-z0-9._+=@-]+", "-", folder).strip("-.") or "run"
    if not name[0].isalnum():
        name = "run-" + name
    return f"{run}-{name}"[:200] if run else name[:200]
#: A token entropy above this many nats is no entropy (log V is under 26 for any vocabulary
#: below 10^11 tokens): a sentinel or a logging bug, stored as null and counted, since one
#: such value (1e38 fits float32) swamps every step mean it enters.
MAX_TOKEN_ENTROPY = 1000.0


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
        if name == "entropy":  # an entropy is in [0, log V]: outside, it is no entropy
            bad = pc.or_(bad, pc.or_(pc.less(column, -1e-4),
                                     pc.greater(column, MAX_TOKEN_ENTROPY)))
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
        if key.startswith(registry.APPENDED_RUN):
            # a run appended to the same log as the default run: NAME-2, NAME-3...
            yield f"{(base or 'run')[:190]}-{key[len(registry.APPENDED_RUN):]}", None, rows
            continue
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


def prepare(sources, *, run: str | None = None, format: str | None = None,
            mapping: Mapping[str, str] | None = None, temperature: float | None = None,
            vocab_size: int | None = None, logprob_basis: str | None = None,
            on_error: str = "stop", on_duplicate: str = "error",
            step_basis: str | None = None, aliases: Mapping[str, str] | None = None):
    """Check :func:`ingest`'s arguments and find the sources' formats.

    Returns
    -------
    resolved : list of (Path, Format, run folder or None)
    base : str
        The run name (given, or from the first source).
    options : IngestOptions
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        raise EntropylensError("no sources given")
    if on_error not in ON_ERROR:
        raise EntropylensError(f"--on-error must be one of {', '.join(ON_ERROR)}")
    if on_duplicate not in ON_DUPLICATE:
        raise EntropylensError(f"--on-duplicate must be one of {', '.join(ON_DUPLICATE)}")
    if logprob_basis is not None and logprob_basis not in LOGPROB_BASES:
        raise EntropylensError(f"logprob basis must be one of {', '.join(LOGPROB_BASES)}")
    if step_basis is not None and step_basis not in STEP_BASES:
        raise EntropylensError(f"step basis must be one of {', '.join(STEP_BASES)}")
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise EntropylensError(f"temperature must be positive, got {temperature}")
    if vocab_size is not None and vocab_size <= 1:
        raise EntropylensError(f"vocabulary size must be above 1, got {vocab_size}")
    if run is not None:
        validate_run_name(run)
    resolved = _resolve(sources, format, mapping)
    base = run or _default_run_name(Path(sources[0]))
    options = IngestOptions(mapping=dict(mapping or {}), temperature=temperature,
                            vocab_size=vocab_size, on_error=on_error,
                            aliases=dict(aliases or {}))

    return resolved, base, options


def ingest(sources: str | Path | Sequence[str | Path], out: str | Path | Store, *,
           run: str | None = None, format: str | None = None,
           mapping: Mapping[str, str] | None = None, temperature: float | None = None,
           vocab_size: int | None = None, logprob_basis: str | None = None,
           on_error: str = "stop", replace: bool = False,
           aliases: Mapping[str, str] | None = None, progress: bool | None = None,
           on_duplicate: str = "error", step_basis: str | None = None,
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
    on_duplicate : {"error", "keep-first", "keep-last"}
        Token rows repeating a (step, sample_id, position) anywhere in one run (two runs
        given as one, a record logged twice) are an error, or keep the row ingested first
        or last; the manifest counts the rows dropped (``counts.duplicates_dropped``).
    step_basis : {"policy_version", "logged_step", "unknown"}, optional
        What the sources' steps count (see :mod:`entropylens.ingest.step_basis`); overrides
        what the formats imply. Recorded per source in the manifest.
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
    if append:
        raise EntropylensError("append through entropylens.ingest(..., append=True) or "
                               "entropylens.ingest.append.ingest_appending")
    resolved, base, options = prepare(
        sources, run=run, format=format, mapping=mapping, temperature=temperature,
        vocab_size=vocab_size, logprob_basis=logprob_basis, on_error=on_error,
        on_duplicate=on_duplicate, step_basis=step_basis, aliases=aliases)
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

    def writer_for(name: str | None, default: str = base) -> RunWriter:
        name = name or default
        if name not in writers:
            writers[name] = store.write_run(name, replace=replace)
        return writers[name]

    try:
        contexts = []
        for path, fmt, run_folder in resolved:
            ctx = IngestContext(path, options, fmt.name, bar)
            ctx.note(format_reason=_format_reason(path, fmt, format, mapping))
            contexts.append(ctx)
            used: set[str] = set()
            # a subfolder of a folder of runs is a run of its own: <run>-<folder> or <folder>
            default = base if run_folder is None else _run_folder_name(run_folder, run)
            stepped: dict[str, set[str]] = {}   # run -> tables that got rows with a step
            first_train: dict[str, float] = {}  # run -> first step of a training row
            for chunk in _read_chunks(fmt, path, ctx):
                chunk = registry.Chunk(*chunk) if not isinstance(chunk, registry.Chunk) else chunk
                data = chunk.data
                if isinstance(data, pa.RecordBatch):
                    data = pa.Table.from_batches([data])
                for name, source_run, rows in _split_runs(data, default, run is not None,
                                                          run_names):
                    writer = writer_for(name, default)
                    used.add(writer.name)
                    if source_run is not None:  # the run's name in the file, unsanitised
                        writer.manifest.setdefault("source_run", source_run)
                    if "step" in rows.column_names and rows.num_rows \
                            and rows.column("step").null_count < rows.num_rows:
                        stepped.setdefault(writer.name, set()).add(chunk.kind)
                        first_train[writer.name] = min(first_train.get(writer.name, math.inf),
                                                       _first_train_step(rows))
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
                    elif chunk.kind == "nodes":
                        writer.write_nodes(rows, path=path, row_offset=chunk.row_offset)
                    else:
                        raise FormatError(f"reader yielded unknown table kind {chunk.kind!r}",
                                          path=path)
            if not used:
                used.add(writer_for(None, default).name)
            for name in used:
                _stamp(writers[name], path, fmt, ctx, stepped.get(name, set()), step_basis,
                       first_train.get(name))
        if not writers:
            raise FormatError("no data found", path=resolved[0][0])
        for writer in writers.values():
            _require_known_metrics(writer, options)
            _resolve_duplicates(writer, on_duplicate)
            _finish_provenance(writer, options, temperature, vocab_size, logprob_basis)
            _summarise_step_basis(writer)
            if not any(writer.counts[k] for k in ("tokens", "sequences", "metrics", "nodes")):
                files = [s["path"] for s in writer.manifest["sources"]]
                raise FormatError("no tokens, sequences, metrics or search-tree nodes found"
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


def _first_train_step(rows: pa.Table) -> float:
    """The smallest step of the rows not in the val split (inf when none has a step, or
    when the steps are not numbers yet: conforming the rows names the bad one)."""
    step = rows.column("step")
    if not (pa.types.is_integer(step.type) or pa.types.is_floating(step.type)):
        return math.inf
    if "split" in rows.column_names:
        step = step.filter(pc.fill_null(pc.not_equal(rows.column("split"), "val"), True))
    low = pc.min(step).as_py() if len(step) else None
    return math.inf if low is None or not math.isfinite(low) else float(low)


def _stamp(writer: RunWriter, path: Path, fmt: registry.Format, ctx: IngestContext,
           stepped: set[str], step_basis: str | None, first_train: float | None) -> None:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    reason = ctx.notes.get("format_reason")
    # the basis matters only for tables whose rows carry a training step
    basis = source_step_basis(fmt.name, ctx.notes, step_basis,
                              first_train_step=first_train) if stepped else None
    extra = {"step_basis": basis, "stepped_tables": sorted(stepped)} if basis else {}
    if reason:
        extra["reason"] = reason
    for file in files:
        writer.add_source(file.resolve(), format=fmt.name, size=file.stat().st_size,
                          sha256=sha256_file(file), **extra)
    _apply_notes(writer, ctx)


def _apply_notes(writer: RunWriter, ctx: IngestContext) -> None:
    """Record a source's rejected records and the facts it states on the run's manifest."""
    for example in ctx.rejected:
        writer.reject(path=example["file"], line=example["line"], message=example["message"])
    # the manifest counts every rejected record, not only the kept examples
    writer.manifest["rejected"]["count"] += ctx.rejected_count - len(ctx.rejected)
    for key, value in ctx.notes.items():
        if key == "format_reason":
            continue  # kept on each source
        if key in ("temperature", "logprob_basis", "vocab_size", "top_k"):
            if writer.manifest.get(key) in (None, "unknown"):
                writer.manifest[key] = value
        else:
            writer.manifest.setdefault("notes", {}).setdefault(key, value)


#: Formats that take any column: a run of theirs needs at least one metric entropylens knows.
_GENERIC_FORMATS = {"table"}


def _format_reason(path: Path, fmt: registry.Format, forced: str | None, mapping) -> str:
    """Why ``fmt`` reads ``path``: the user's ``--format``, or the sniffers' scores."""
    if forced:
        return "--format"
    ranked = [(score, other.name) for score, other in registry.scores(path, mapping)
              if other.name != fmt.name]
    mine = next((score for score, other in registry.scores(path, mapping)
                 if other.name == fmt.name), None)
    text = f"detected ({fmt.name} {mine:.2f}" if mine is not None else "detected ("
    return text + (f", next {ranked[0][1]} {ranked[0][0]:.2f})" if ranked else ")")


def _require_known_metrics(writer: RunWriter, options: IngestOptions) -> None:
    """Refuse a metrics-only run from a generic table none of whose columns is a metric
    entropylens knows: "1 metric points" of unknown columns is not a result."""
    counts = writer.counts
    formats = {s["format"] for s in writer.manifest["sources"]}
    if counts["tokens"] or counts["sequences"] or not formats <= _GENERIC_FORMATS:
        return
    from ..aliases import canonical_metric
    keys = sorted({key for table in writer._metrics
                   for key in pc.unique(table.column("raw_key")).to_pylist() if key})
    if any(canonical_metric(key, options.aliases).priority < (1 << 30) for key in keys):
        return
    raise FormatError(
        f"no metric entropylens knows among the columns ({', '.join(keys[:6])}"
        f"{', ...' if len(keys) > 6 else ''}): name one with --alias KEY=CANONICAL, e.g. "
        f"--alias {keys[0] if keys else 'KEY'}=policy_entropy",
        path=writer.manifest["sources"][0]["path"] if writer.manifest["sources"] else None)


def _resolve_duplicates(writer: RunWriter, on_duplicate: str) -> None:
    """Refuse, or resolve, token keys repeated anywhere in the run (across files and parts)."""
    found, first = writer.find_duplicates()
    if not found:
        return
    # the files that gave tokens: a run's metrics file cannot hold a repeated token
    sources = [s for s in writer.manifest["sources"]
               if "tokens" in registry.get_format(s["format"]).produces] \
        or writer.manifest["sources"]
    files = [Path(s["path"]).name for s in sources]
    if on_duplicate == "error":
        where = (f"first at step {_step_text(first.get('step'))}, sample "
                 f"{first.get('sample_id')!r}, position {first.get('position')}") if first \
            else ""
        raise FormatError(
            f"run {writer.name!r}: {found} token rows repeat a (step, sample_id, position) "
            f"already read, {where} (read from {', '.join(files[:4])}"
            f"{', ...' if len(files) > 4 else ''}); ingest separate runs separately, or pass "
            "--on-duplicate keep-last or keep-first",
            path=sources[0]["path"] if sources else None)
    dropped = writer.drop_duplicates(on_duplicate.split("-", 1)[1])
    counts = writer.manifest["counts"]
    counts["duplicates_dropped"] = counts.get("duplicates_dropped", 0) + dropped
    writer.manifest["on_duplicate"] = on_duplicate


def _step_text(step) -> str:
    return "none (inference)" if step is None else str(step)


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


def ingest_report(store: Store, run: str) -> list[str]:
    """What one ingest did to ``run``, as lines for the terminal: the format of each source
    and why, the metric keys mapped (raw -> canonical) and those left unmapped, how steps
    were found where the source did not state them, and what was cleaned, merged or
    dropped. Control characters from the data are escaped."""
    from ..aliases import canonical_metric

    manifest = store.manifest(run)
    counts, notes = manifest["counts"], manifest.get("notes", {})
    lines = [f"{run}: {counts['tokens']} tokens, {counts['sequences']} sequences, "
             f"{counts['metrics']} metric points"
             + (f", {counts['nodes']} search-tree nodes in {counts['trees']} trees"
                if counts.get("nodes") else "")]
    by_format: dict[tuple, list[str]] = {}
    for source in manifest["sources"]:
        by_format.setdefault((source["format"], source.get("reason", "")), []).append(
            Path(source["path"]).name)
    for (name, reason), files in by_format.items():
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        lines.append(f"  read {shown} as {name}" + (f": {reason}" if reason else ""))
    if counts["metrics"]:
        metrics = store.read_metrics(run)
        pairs = metrics[["raw_key", "metric"]].drop_duplicates()
        mapped = [f"{r.raw_key} -> {r.metric}" for r in pairs.itertuples()
                  if r.raw_key and (r.raw_key != r.metric or canonical_metric(
                      r.raw_key).priority < (1 << 30))]
        unmapped = [r.raw_key for r in pairs.itertuples() if r.raw_key
                    and r.raw_key == r.metric
                    and canonical_metric(r.raw_key).priority >= (1 << 30)]
        lines.append(f"  metrics mapped ({len(mapped)}): "
                     + (_listed(sorted(mapped)) if mapped else "none"))
        if unmapped:
            lines.append(f"  kept under their raw names ({len(unmapped)}): "
                         + _listed(sorted(unmapped)))
    step_source = notes.get("step_source")
    if step_source in ("progress_bar", "logging_steps", "record_index"):
        why = {"progress_bar": "from the progress bar shown after each dict",
               "logging_steps": f"every logging_steps={notes.get('trainer_logging_steps')}",
               "record_index": "numbered 1, 2, 3... (no step, bar or logging_steps in the "
                               "log): steps are guesses"}[step_source]
        lines.append(f"  steps not in the records: {why}")
    if notes.get("appended_runs"):
        starts = ", ".join(f"line {r['first_line']}" for r in notes["appended_runs"][1:])
        lines.append(f"  the log holds {len(notes['appended_runs'])} runs appended one after "
                     f"another (restarts at {starts}): each is a run of its own")
    if notes.get("joined_wrapped_dicts"):
        lines.append(f"  {notes['joined_wrapped_dicts']} metric dicts wrapped over lines "
                     "joined")
    if notes.get("malformed_lines"):
        lines.append(f"  {notes['malformed_lines']} metric lines cut short skipped")
    sentinels = {k: v for k, v in counts.items() if k.startswith("sentinel_") and v}
    if sentinels:
        lines.append("  sentinel or non-finite values stored as null: " + ", ".join(
            f"{v} {k[len('sentinel_'):]}" for k, v in sorted(sentinels.items())))
    if counts.get("duplicates_dropped"):
        lines.append(f"  {counts['duplicates_dropped']} repeated token rows dropped "
                     f"({manifest.get('on_duplicate')})")
    if notes.get("duplicate_records"):
        lines.append(f"  {notes['duplicate_records']} records written twice kept once")
    for run_folder, repeated in (notes.get("repeated_steps") or {}).items():
        if run_folder in (".", run) or run.endswith(run_folder):
            lines.append(f"  {repeated['points']} points logged again at a step (a resumed "
                         "run): the later value kept")
    if notes.get("loss_masked_tokens_skipped"):
        lines.append(f"  {notes['loss_masked_tokens_skipped']} response tokens with loss_mask 0 "
                     "(not generated by the policy) skipped")
    if notes.get("dropped_sampled_alternatives"):
        lines.append(f"  {notes['dropped_sampled_alternatives']} sampled tokens added beyond "
                     "the top k dropped from the alternatives")
    rejected = manifest["rejected"]
    if rejected["count"]:
        first = rejected["examples"][0] if rejected["examples"] else None
        where = (f" (first: {Path(first['file']).name if first['file'] else ''}"
                 f":{first['line']}: {first['message']})") if first else ""
        lines.append(f"  {rejected['count']} bad records skipped{where}")
    if notes.get("swift_summary"):
        lines.append("  end-of-training summary record kept as run metadata")
    # keys and file names come from the data: no control character reaches the terminal
    return [plain(line) for line in lines]


def _listed(items: list[str], limit: int = 12) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more"
                                       if len(items) > limit else "")
def _summarise_step_basis(writer: RunWriter) -> None:
    """Record the run's step basis per table (``manifest["step_basis"]``) and warn when it
    is unknown or mixed, so that no analysis pairs steps on a silent guess."""
    by_table: dict[str, set[str]] = {}
    for source in writer.manifest["sources"]:
        for table in source.get("stepped_tables", ()):
            by_table.setdefault(table, set()).add(source["step_basis"])
    summary = {table: (bases.pop() if len(bases) == 1 else "mixed")
               for table, bases in sorted(by_table.items())}
    if not summary:
        return
    writer.manifest["step_basis"] = summary
    unclear = sorted(table for table, basis in summary.items() if basis in ("unknown", "mixed"))
    if unclear:
        message = (f"run {writer.name!r}: the step basis of its {' and '.join(unclear)} is "
                   f"{' / '.join(sorted({summary[t] for t in unclear}))}: steps are paired as "
                   "logged (say --step-basis policy_version or logged_step at ingest)")
        writer.manifest.setdefault("warnings", []).append(message)
        warnings.warn(message, StepBasisWarning, stacklevel=3)


class StepBasisWarning(UserWarning):
    """A run's steps could not be placed on a known basis (see
    :mod:`entropylens.ingest.step_basis`)."""
