"""Exceptions raised by entropylens.

Every error caused by bad input is an :class:`EntropylensError`; the CLI turns it into a
one-line message and exit code 1. The message names the file and the line or record
whenever they are known.
"""

from __future__ import annotations

from pathlib import Path


class EntropylensError(Exception):
    """A user-facing error: bad data, a bad store or a bad request.

    Parameters
    ----------
    message : str
        What went wrong, in plain words.
    path : str or Path, optional
        The file the problem was found in.
    line : int, optional
        1-based line (text formats) or record number (binary formats).
    field : str, optional
        The field or column concerned.
    """

    def __init__(self, message: str, *, path: str | Path | None = None,
                 line: int | None = None, field: str | None = None):
        self.message = message
        self.path = str(path) if path is not None else None
        self.line = line
        self.field = field
        super().__init__(self.__str__())

    def __reduce__(self):
        # keep the fields across processes (the local engine's workers, Ray tasks)
        return (type(self), (self.message,), {"path": self.path, "line": self.line,
                                              "field": self.field, "args": self.args})

    def __str__(self) -> str:
        where = ""
        if self.path is not None:
            where = self.path
            if self.line is not None:
                where += f":{self.line}"
            where += ": "
        elif self.line is not None:
            where = f"record {self.line}: "
        field = f"field '{self.field}': " if self.field else ""
        return f"{where}{field}{self.message}"


class SchemaError(EntropylensError):
    """A table does not fit a canonical schema."""


class StoreError(EntropylensError):
    """A store or run cannot be opened, read or written."""


class RunExistsError(StoreError):
    """A run of that name already exists and replacing it was not asked for."""


class FormatError(EntropylensError):
    """A file cannot be read as the requested (or detected) format."""


class StoreReadError(OSError):
    """A file or folder of a store cannot be read: no permission, a truncated or damaged
    Parquet file, a token part of another schema.

    An :class:`OSError` and not an :class:`EntropylensError` on purpose: analyses and report
    sections treat an ``EntropylensError`` as "this run lacks that data" and carry on with a
    note, which would hide a damaged store behind a partial result. The CLI reports it like
    any ``OSError``: one line naming the path, exit code 1.

    Parameters
    ----------
    message : str
        What went wrong, in plain words.
    path : str or Path
        The file or folder that cannot be read.
    """

    def __init__(self, message: str, path: str | Path):
        super().__init__(message)
        self.message = message
        self.path = self.filename = str(path)
        self.strerror = message

    def __reduce__(self):  # across processes (the local engine's workers, Ray tasks)
        return (type(self), (self.message, self.path))

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"
