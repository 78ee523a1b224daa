"""File helpers shared by the readers: transparent decompression, numbered lines, hashing."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import pyarrow as pa

_HASH_CHUNK = 4 * 1024 * 1024


def open_binary(path: str | Path) -> BinaryIO:
    """Open ``path`` for binary reading, decompressing ``.gz``, ``.bz2``, ``.xz`` and ``.zst``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    if suffix == ".xz":
        return lzma.open(path, "rb")
    if suffix == ".zst":
        return io.BufferedReader(pa.CompressedInputStream(pa.OSFile(str(path)), "zstd"))
    return open(path, "rb")


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


def iter_lines(fh: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, line)`` for each non-blank line, numbers from 1, bytes stripped."""
    for number, line in enumerate(fh, start=1):
        line = line.strip()
        if line:
            yield number, line
