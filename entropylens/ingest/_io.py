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
- ``ENTROPYLENS_MAX_COLUMNS`` (default 20000): columns of a table file.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import pyarrow as pa

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
