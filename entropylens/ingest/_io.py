"""File helpers shared by the readers: transparent decompression, numbered lines, hashing,
and the limits that keep memory bounded on hostile input.

Limits (environment variables, read at each use so that a test or a user can change them):

- ``ENTROPYLENS_MAX_RECORD_MB`` (default 64): the longest line or record read into memory;
  a longer one stops the ingest naming the file and line.
- ``ENTROPYLENS_MAX_DOCUMENT_MB`` (default 256): the largest file read whole (a JSON document
  rather than JSON Lines).
- ``ENTROPYLENS_MAX_EXPANSION`` (default 200): how many times its size a compressed file or
  a Parquet file may grow when decompressed (never refused below 1 GiB): more is a
  decompression bomb, refused before it fills memory.
- ``ENTROPYLENS_MAX_COLUMNS`` (default 20000): columns of a table file (CSV header, Parquet
  schema), checked before the file is parsed.

Parquet inputs are read only through :func:`parquet_file`, :func:`iter_parquet_batches` and
:func:`read_parquet`: Parquet's dictionary and run-length encodings let a file of kilobytes
decode to gigabytes (one long string repeated, or a constant column of 10^9 rows), which the
compressed size says nothing about. So the decoded size is estimated from the file metadata
(uncompressed column chunk sizes, rows times value widths) before anything is read, text
columns are read dictionary-encoded and measured before they are expanded, and batches are
cut to a bounded number of bytes.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import lzma
import os
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import FormatError

_HASH_CHUNK = 4 * 1024 * 1024
_MIB = 1024 * 1024
#: Decompressed sizes below this are never called a bomb, whatever the ratio.
_EXPANSION_FLOOR = 1024 * _MIB


def _env_number(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        number = float(value)
    except ValueError:
        raise FormatError(f"environment variable {name}={value!r} is not a number") from None
    if not number > 0:
        raise FormatError(f"environment variable {name} must be positive, got {value!r}")
    return number


def max_record_bytes() -> int:
    """The longest line or record read into memory (``ENTROPYLENS_MAX_RECORD_MB``)."""
    return int(_env_number("ENTROPYLENS_MAX_RECORD_MB", 64) * _MIB)


def max_document_bytes() -> int:
    """The largest file read whole (``ENTROPYLENS_MAX_DOCUMENT_MB``)."""
    return int(_env_number("ENTROPYLENS_MAX_DOCUMENT_MB", 256) * _MIB)


def max_expanded_bytes(stored_bytes: int) -> int:
    """The most a file of ``stored_bytes`` may grow to when decompressed
    (``ENTROPYLENS_MAX_EXPANSION`` times its size, at least 1 GiB)."""
    return max(_EXPANSION_FLOOR, int(_env_number("ENTROPYLENS_MAX_EXPANSION", 200)
                                     * stored_bytes))


def max_columns() -> int:
    """The most columns a table file may have (``ENTROPYLENS_MAX_COLUMNS``)."""
    return int(_env_number("ENTROPYLENS_MAX_COLUMNS", 20000))


def _mib(n: int) -> str:
    return f"{n / _MIB:,.0f} MiB"


def _too_many_columns(count: int) -> FormatError:
    return FormatError(f"{count:,} columns, more than {max_columns():,}; raise "
                       "ENTROPYLENS_MAX_COLUMNS to read it")


def check_header_columns(path: str | Path, delimiter: str = ",") -> None:
    """Refuse a CSV/TSV file whose header line has more than :func:`max_columns` fields,
    before a parser builds a column for each (a 10^6-column file took gigabytes).

    Only the first line is read (bounded by :func:`max_record_bytes`); the count is of
    delimiters, an upper bound on the fields that quoting can only lower.
    """
    path = Path(path)
    with open_binary(path) as fh:
        try:
            _, header = next(numbered_lines(fh), (1, b""))
        except FormatError as exc:
            raise FormatError(exc.message, path=path, line=exc.line) from None
    count = header.count(delimiter.encode()) + 1
    if count > max_columns():
        fields = len(next(csv.reader([header.decode("utf-8", "replace")],
                                     delimiter=delimiter)))
        if fields > max_columns():
            exc = _too_many_columns(fields)
            raise FormatError(exc.message, path=path, line=1) from None


class _ExpansionLimit(io.RawIOBase):
    """A decompressing stream that stops once it has produced more than ``limit`` bytes."""

    def __init__(self, raw: BinaryIO, path: Path, limit: int):
        self._raw = raw
        self._path = path
        self._limit = limit
        self._produced = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._raw.read(len(buffer))
        n = len(data)
        self._produced += n
        if self._produced > self._limit:
            raise FormatError(
                f"decompresses to more than {_mib(self._limit)} (a decompression bomb?); "
                "raise ENTROPYLENS_MAX_EXPANSION to read it", path=self._path)
        buffer[:n] = data
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_binary(path: str | Path) -> BinaryIO:
    """Open ``path`` for binary reading, decompressing ``.gz``, ``.bz2``, ``.xz`` and ``.zst``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".gz":
        raw = gzip.open(path, "rb")
    elif suffix == ".bz2":
        raw = bz2.open(path, "rb")
    elif suffix == ".xz":
        raw = lzma.open(path, "rb")
    elif suffix == ".zst":
        raw = pa.CompressedInputStream(pa.OSFile(str(path)), "zstd")
    else:
        return open(path, "rb")
    limit = max_expanded_bytes(path.stat().st_size)
    return io.BufferedReader(_ExpansionLimit(raw, path, limit), buffer_size=1 << 20)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of the file's bytes as stored (compressed files are hashed compressed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ProgressReader(io.RawIOBase):
    """Wraps a binary file and reports the bytes read to a callback (for progress bars)."""

    def __init__(self, raw: BinaryIO, advance: Callable[[int], None]):
        self._raw = raw
        self._advance = advance

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        if n:
            self._advance(n)
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def numbered_lines(fh: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, line)`` for every line, numbers from 1, as read (not stripped).

    A line longer than :func:`max_record_bytes` raises a :class:`FormatError` naming its
    number (the reader's caller adds the file) once that many bytes are read, instead of
    reading gigabytes of one unterminated line into memory.
    """
    limit = max_record_bytes()
    number = 0
    while True:
        line = fh.readline(limit + 1)
        if not line:
            return
        number += 1
        if len(line) > limit and not line.endswith(b"\n"):
            raise FormatError(f"line is longer than {_mib(limit)}; raise "
                              "ENTROPYLENS_MAX_RECORD_MB to read it", line=number)
        yield number, line


def iter_lines(fh: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, line)`` for each non-blank line, numbers from 1, bytes stripped
    (lines are bounded as in :func:`numbered_lines`)."""
    for number, line in numbered_lines(fh):
        line = line.strip()
        if line:
            yield number, line


def read_document(fh: BinaryIO, head: bytes = b"") -> bytes:
    """The rest of ``fh`` after ``head``, for a file read whole; a :class:`FormatError` when
    it exceeds :func:`max_document_bytes`."""
    limit = max_document_bytes()
    rest = fh.read(max(0, limit + 1 - len(head)))
    if len(head) + len(rest) > limit:
        raise FormatError(f"a single JSON document larger than {_mib(limit)}; write JSON "
                          "Lines, or raise ENTROPYLENS_MAX_DOCUMENT_MB to read it")
    return head + rest


# -- Parquet: bounded decoding -----------------------------------------------------------------

#: Decoded bytes per batch handed to a reader.
PARQUET_BATCH_BYTES = 64 * _MIB
#: Most rows per batch (small rows).
PARQUET_BATCH_ROWS = 256 * 1024
_PARQUET_WIDTHS = {"BOOLEAN": 1, "INT32": 4, "INT64": 8, "INT96": 12, "FLOAT": 4,
                   "DOUBLE": 8, "BYTE_ARRAY": 4}  # BYTE_ARRAY: Arrow's offset per value


def _parquet_error(path: Path, exc: Exception) -> FormatError:
    return FormatError(f"cannot read as parquet: {str(exc).splitlines()[0]}", path=path)


def _footer_length(path: Path, source: io.BytesIO | None = None) -> int:
    """Length of the Parquet footer (the file's last 8 bytes), read before the footer is
    parsed: a schema of 10^6 columns is a footer of hundreds of MB."""
    if source is not None:
        tail = bytes(source.getbuffer()[-8:])
    else:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - 8))
            tail = fh.read(8)
    if len(tail) < 8:
        raise FormatError("cannot read as parquet: file too small", path=path)
    if tail[4:] != b"PAR1":
        raise FormatError("cannot read as parquet: no Parquet footer (truncated file?)",
                          path=path)
    return int.from_bytes(tail[:4], "little")


def parquet_decoded_estimate(metadata: pq.FileMetaData) -> int:
    """Bytes the file decodes to at least, from its metadata: per column chunk the larger of
    its uncompressed size and its values times their width (run-length encoded constants
    are tiny uncompressed and still take their full width once decoded)."""
    total = 0
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for index in range(row_group.num_columns):
            chunk = row_group.column(index)
            width = _PARQUET_WIDTHS.get(chunk.physical_type)
            if width is None:  # FIXED_LEN_BYTE_ARRAY
                width = max(1, metadata.schema.column(index).length or 1)
            total += max(chunk.total_uncompressed_size, chunk.num_values * width)
    return total


def _max_footer_bytes() -> int:
    """Largest Parquet footer parsed: about 1 KiB per allowed column (a column chunk takes
    about 200 bytes of it per row group; parsing takes some 20 times the footer's size)."""
    return max(16 * _MIB, max_columns() * 1024)


def parquet_columns(path: str | Path) -> list[str]:
    """Column names of a Parquet file, for sniffing: its footer is parsed only when it is
    within the limit of :func:`parquet_file`."""
    path = Path(path)
    if _footer_length(path) > _max_footer_bytes():
        raise FormatError("Parquet metadata too large", path=path)
    return pq.read_schema(path).names


def _stored_size(path: Path, source: io.BytesIO | None) -> int:
    return path.stat().st_size if source is None else len(source.getbuffer())


def parquet_file(path: str | Path, limit: int | None = None, *,
                 source: io.BytesIO | None = None) -> pq.ParquetFile:
    """Open a Parquet input after the checks that need no decoding: footer size, column
    count (:func:`max_columns`) and the metadata estimate of the decoded size against
    ``limit`` (default :func:`max_expanded_bytes` of the file's size).

    ``source`` holds the file's bytes when they are not ``path``'s own (a compressed file
    already decompressed); ``path`` then only names it.

    Raises
    ------
    FormatError
        Naming the file, for a damaged file or one over a limit.
    """
    path = Path(path)
    try:
        footer = _footer_length(path, source)
        if footer > _max_footer_bytes():
            raise FormatError(f"Parquet metadata of {_mib(footer)} (thousands of columns "
                              f"or row groups), more than {_mib(_max_footer_bytes())}; raise "
                              "ENTROPYLENS_MAX_COLUMNS to read it", path=path)
        parquet = pq.ParquetFile(path if source is None else source)
    except (pa.ArrowException, OSError) as exc:
        raise _parquet_error(path, exc) from None
    metadata = parquet.metadata
    if metadata.num_columns > max_columns():
        raise FormatError(_too_many_columns(metadata.num_columns).message, path=path)
    limit = max_expanded_bytes(_stored_size(path, source)) if limit is None else limit
    estimate = parquet_decoded_estimate(metadata)
    if estimate > limit:
        raise FormatError(_bomb_message(estimate, limit, metadata.num_rows), path=path)
    return parquet


def _bomb_message(size: int, limit: int, rows: int | None = None) -> str:
    what = f"at least {_mib(size)}" + (f" in {rows:,} rows" if rows is not None else "")
    raise_ = ("ENTROPYLENS_MAX_DOCUMENT_MB" if limit < _EXPANSION_FLOOR
              else "ENTROPYLENS_MAX_EXPANSION")
    return (f"decodes to {what}, more than {_mib(limit)} (a decompression bomb?); "
            f"raise {raise_} to read it")


def _is_text(kind: pa.DataType) -> bool:
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_binary(kind) or pa.types.is_large_binary(kind))


def _row_bytes(batch: pa.RecordBatch) -> np.ndarray:
    """Decoded bytes of each row of ``batch`` once its dictionaries are expanded."""
    sizes = np.zeros(batch.num_rows, dtype=np.int64)
    for column in batch.columns:
        kind = column.type
        if pa.types.is_dictionary(kind) and _is_text(kind.value_type):
            lengths = pc.binary_length(column.dictionary).to_numpy(zero_copy_only=False)
            indices = column.indices.fill_null(0).to_numpy(zero_copy_only=False)
            sizes += lengths[indices] if len(lengths) else 0
            sizes += 4
        elif _is_text(kind):
            sizes += pc.binary_length(column).fill_null(0).to_numpy(zero_copy_only=False)
            sizes += 4
        elif (width := _fixed_width(kind)) is not None:
            sizes += width
        elif len(column):  # nested: already decoded, spread evenly
            sizes += column.get_total_buffer_size() // len(column) + 1
    return sizes


def _fixed_width(kind: pa.DataType) -> int | None:
    """Bytes per value of a fixed-width type (booleans count one), else None."""
    try:
        return max(1, kind.bit_width // 8)
    except ValueError:  # pyarrow: "Non-fixed width type"
        return None


def _expand(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``batch`` with the dictionaries read for measuring turned back into plain columns
    (columns that were dictionaries in the file stay dictionaries)."""
    columns = []
    for column, field in zip(batch.columns, batch.schema):
        wanted = schema.field(field.name).type if field.name in schema.names else field.type
        if pa.types.is_dictionary(column.type) and not pa.types.is_dictionary(wanted):
            column = column.dictionary_decode()
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


def iter_parquet_batches(path: str | Path, columns: list[str] | None = None, *,
                         limit: int | None = None, parquet: pq.ParquetFile | None = None,
                         source: io.BytesIO | None = None,
                         batch_rows: int | None = None) -> Iterator[pa.RecordBatch]:
    """Yield the record batches of a Parquet input with memory bounded whatever it holds.

    Parameters
    ----------
    path : str or Path
        The file.
    columns : list of str, optional
        Columns to read (default: all).
    limit : int, optional
        Most decoded bytes for the whole file (default :func:`max_expanded_bytes` of its
        size), checked on the metadata first and again as batches are decoded.
    parquet : ParquetFile, optional
        The file as opened by :func:`parquet_file` (opened here otherwise).
    source : BytesIO, optional
        The file's bytes, as for :func:`parquet_file`.
    batch_rows : int, optional
        At most this many rows a batch (a reader's own streaming size); batches are also cut
        at about 64 MiB decoded.

    Raises
    ------
    FormatError
        Naming the file (and the row, for a single row over :func:`max_record_bytes`).
    """
    path = Path(path)
    limit = max_expanded_bytes(_stored_size(path, source)) if limit is None else limit
    parquet = parquet or parquet_file(path, limit, source=source)
    schema = parquet.schema_arrow
    wanted = [field for field in schema if columns is None or field.name in columns]
    text = [field.name for field in wanted if _is_text(field.type)]
    metadata = parquet.metadata
    per_row = parquet_decoded_estimate(metadata) / max(1, metadata.num_rows)
    rows = int(max(1, min(batch_rows or PARQUET_BATCH_ROWS,
                          PARQUET_BATCH_BYTES // max(1.0, per_row))))
    record_limit = max_record_bytes()
    decoded = 0
    first_row = 0
    try:
        # text read as dictionaries: measured before expanding (one 100 KB string repeated
        # 70,000 times is 200 KB on disk and 7 GB decoded)
        handle = pq.ParquetFile(path if source is None else source, read_dictionary=text)
        for batch in handle.iter_batches(batch_size=rows, columns=columns, use_threads=False):
            sizes = _row_bytes(batch)
            decoded += int(sizes.sum())
            if decoded > limit:
                raise FormatError(_bomb_message(decoded, limit), path=path)
            over = np.flatnonzero(sizes > record_limit)
            if over.size:
                raise FormatError(f"a row of {_mib(int(sizes[over[0]]))}, more than "
                                  f"{_mib(record_limit)}; raise ENTROPYLENS_MAX_RECORD_MB "
                                  "to read it", path=path, line=first_row + int(over[0]) + 1)
            # cut where the running size crosses each multiple of the batch budget
            ends = np.searchsorted(np.cumsum(sizes), np.arange(
                PARQUET_BATCH_BYTES, int(sizes.sum()) + PARQUET_BATCH_BYTES,
                PARQUET_BATCH_BYTES), side="right")
            start = 0
            for end in [*ends.tolist(), batch.num_rows]:
                end = max(end, start + 1)
                if start >= batch.num_rows:
                    break
                yield _expand(batch.slice(start, end - start), schema)
                start = end
            first_row += batch.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise _parquet_error(path, exc) from None


def read_parquet(path: str | Path, columns: list[str] | None = None, *,
                 source: io.BytesIO | None = None) -> pa.Table:
    """A whole Parquet input as one table, for readers that need every row at once; bounded
    by :func:`max_document_bytes` decoded (like any file read whole)."""
    path = Path(path)
    limit = max_document_bytes()
    parquet = parquet_file(path, limit, source=source)
    batches = list(iter_parquet_batches(path, columns, limit=limit, parquet=parquet,
                                        source=source))
    schema = pa.schema([f for f in parquet.schema_arrow
                        if columns is None or f.name in columns])
    if not batches:
        return schema.empty_table()
    return pa.Table.from_batches(batches)
