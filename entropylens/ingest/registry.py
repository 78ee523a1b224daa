"""The format registry: every source format registers a name, a sniffer and a reader.

A **sniffer** is cheap: it looks at the file name and the first bytes or lines (a
:class:`Sample`) and returns a confidence between 0 and 1. A **reader** streams the file and
yields :class:`Chunk` objects, each an Arrow table of canonical columns for one of the three
tables of a run (``tokens``, ``sequences`` or ``metrics``). Readers never compute statistics
and never write: the ingest driver conforms, cleans and stores what they yield.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple

from ..errors import FormatError

if TYPE_CHECKING:
    import pyarrow as pa

#: Bytes a sniffer may look at.
SNIFF_BYTES = 64 * 1024
#: Confidence a format needs to be picked by auto-detection.
MIN_CONFIDENCE = 0.5
#: How far ahead the best format must be of the next one to be picked without doubt.
MIN_MARGIN = 0.15


#: ``_run`` values marking the k-th run appended to the same log (see :func:`appended_run`).
APPENDED_RUN = "\x00appended:"


def appended_run(k: int) -> str:
    """The ``_run`` value of the k-th run (k >= 2) appended to one log file: the driver names
    it ``<run>-<k>`` after the run the file goes to."""
    return f"{APPENDED_RUN}{k}"


class Chunk(NamedTuple):
    """A piece of one run table yielded by a reader.

    Attributes
    ----------
    kind : {"tokens", "sequences", "metrics"}
    data : pyarrow.Table or pyarrow.RecordBatch
        Canonical column names; extra columns are dropped. A ``_run`` string column splits
        the rows into several runs (a file that holds several runs).
    row_offset : int
        Rows of the same file yielded before, so that error messages give absolute rows.
    """

    kind: str
    data: pa.Table | pa.RecordBatch
    row_offset: int = 0


@dataclass
class Sample:
    """What a sniffer sees of a source: its path, first bytes (empty for a folder) and the
    user's ``--map`` column mapping."""

    path: Path
    head: bytes = b""
    mapping: dict = field(default_factory=dict)

    @property
    def is_dir(self) -> bool:
        return self.path.is_dir()

    @property
    def suffix(self) -> str:
        """Lower-case suffix without compression suffixes (``.jsonl.gz`` gives ``.jsonl``)."""
        suffixes = [s.lower() for s in self.path.suffixes]
        while suffixes and suffixes[-1] in (".gz", ".zst", ".bz2", ".xz"):
            suffixes.pop()
        return suffixes[-1] if suffixes else ""

    @property
    def text(self) -> str:
        """The head decoded as UTF-8 (undecodable bytes replaced)."""
        return self.head.decode("utf-8", errors="replace")

    def lines(self, n: int = 20) -> list[str]:
        """The first ``n`` complete, non-empty lines of the head."""
        text = self.text
        if len(self.head) >= SNIFF_BYTES:
            text = text.rsplit("\n", 1)[0]
        return [line for line in text.splitlines() if line.strip()][:n]

    def first_json(self):
        """The first JSONL record (or the whole head as JSON), or None when it is not JSON."""
        for line in self.lines(1):
            try:
                return json.loads(line)
            except ValueError:
                break
        try:
            return json.loads(self.text)
        except ValueError:
            return None


    def columns(self) -> list[str] | None:
        """Column names of a tabular file: Parquet schema, CSV/TSV header, or the keys of
        the first JSON record (of a JSONL file or a JSON list); None when not tabular."""
        suffix = self.suffix
        if self.head[:4] == b"PAR1" or suffix == ".parquet":
            try:
                from ._io import parquet_columns  # pyarrow: only for Parquet sniffing

                return parquet_columns(self.path)
            except Exception:
                return None
        if suffix in (".csv", ".tsv"):
            lines = self.lines(1)
            if not lines:
                return None
            return next(csv.reader([lines[0]], delimiter="\t" if suffix == ".tsv" else ","))
        if suffix in (".jsonl", ".ndjson", ".json"):
            record = self.first_json()
            if isinstance(record, list) and record and isinstance(record[0], dict):
                return list(record[0])
            if isinstance(record, dict):
                return list(record)
            # a JSON list too long for the head: look at its first record only
            found = re.match(rb"\s*\[\s*(\{[^{}]*\})", self.head)
            if found:
                try:
                    return list(json.loads(found.group(1)))
                except ValueError:
                    return None
        return None


@dataclass(frozen=True)
class Format:
    """A registered source format.

    Attributes
    ----------
    name : str
        What ``--format`` accepts.
    description : str
        One line for ``entropylens formats``.
    sniff : callable or str
        ``sniff(sample) -> float`` confidence in [0, 1]; or ``"module:function"`` naming a
        function of a module of this package, imported when first called.
    read : callable or str
        ``read(path, ctx) -> Iterator[Chunk]``; or ``"module:function"`` as for ``sniff``.
    produces : tuple of str
        Which run tables it can fill.
    folders : bool
        Whether the format reads whole folders (TensorBoard log folders, token exports).
    """

    name: str
    description: str
    sniff: Callable[[Sample], float] | str
    read: Callable[..., Iterator[Chunk]] | str
    produces: tuple[str, ...] = ("tokens",)
    folders: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for role in ("sniff", "read"):
            target = getattr(self, role)
            if isinstance(target, str):
                object.__setattr__(self, role, ReaderFunction(target))


class ReaderFunction:
    """A function of a reader module named ``"module:function"``, imported when first called:
    listing or choosing formats by name does not import every reader (and pandas with them).
    """

    def __init__(self, target: str):
        module, sep, function = target.partition(":")
        if not sep or not module or not function:
            raise ValueError(f"expected 'module:function', got {target!r}")
        self.target = target
        self._function: Callable | None = None

    def resolve(self) -> Callable:
        """The function itself (importing its module)."""
        if self._function is None:
            import importlib

            module, _, function = self.target.partition(":")
            package = __name__.rsplit(".", 1)[0]
            self._function = getattr(importlib.import_module(f"{package}.{module}"), function)
        return self._function

    def __call__(self, *args, **kwargs):
        return self.resolve()(*args, **kwargs)

    def __getstate__(self):  # the imported function is found again on the other side
        return {"target": self.target, "_function": None}

    def __repr__(self) -> str:
        return f"<reader function {self.target}>"


_REGISTRY: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    """Add a format to the registry (replacing one of the same name)."""
    _REGISTRY[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format:
    """The format called ``name``; raises :class:`FormatError` naming the known ones."""
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise FormatError(f"unknown format {name!r} (known: {', '.join(sorted(_REGISTRY))})") \
            from None


def formats() -> list[Format]:
    """Every registered format, by name."""
    _load_builtin()
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def read_sample(path: Path, mapping: dict | None = None) -> Sample:
    """The sniffable head of a file (transparently decompressed), or an empty one for a folder."""
    if path.is_dir():
        return Sample(path, mapping=dict(mapping or {}))
    from ._io import open_binary
    try:
        with open_binary(path) as fh:
            return Sample(path, fh.read(SNIFF_BYTES), dict(mapping or {}))
    except OSError as exc:
        raise FormatError(f"cannot read: {exc.strerror or exc}", path=path) from None


def scores(path: Path, mapping: dict | None = None) -> list[tuple[float, Format]]:
    """Every format's confidence for ``path``, best first."""
    sample = read_sample(path, mapping)
    ranked = []
    for fmt in formats():
        if sample.is_dir and not fmt.folders:
            continue
        try:
            score = float(fmt.sniff(sample))
        except Exception:  # a sniffer must never break detection of other formats
            score = 0.0
        if score > 0:
            ranked.append((score, fmt))
    ranked.sort(key=lambda item: (-item[0], item[1].name))
    return ranked


def detect(path: str | Path, *, required: bool = True,
           mapping: dict | None = None) -> Format | None:
    """Pick the format of ``path`` by sniffing.

    Parameters
    ----------
    path : str or Path
    required : bool
        Raise when nothing fits (otherwise return None).
    mapping : dict, optional
        The user's ``--map`` column mapping, which table-like formats take into account.

    Raises
    ------
    FormatError
        When no format fits, or when two fit about equally well (the message names the
        candidates so that the user can pass ``--format``).
    """
    path = Path(path)
    ranked = scores(path, mapping)
    good = [(s, f) for s, f in ranked if s >= MIN_CONFIDENCE]
    if not good:
        if not required:
            return None
        near = ", ".join(f"{f.name} ({s:.2f})" for s, f in ranked[:3]) or "none"
        raise FormatError(f"cannot detect the format (closest: {near}); pass --format NAME "
                          "(see 'entropylens formats')", path=path)
    if len(good) > 1 and good[0][0] - good[1][0] < MIN_MARGIN:
        names = ", ".join(f"{f.name} ({s:.2f})" for s, f in good[:4])
        raise FormatError(f"ambiguous format, candidates: {names}; pass --format NAME",
                          path=path)
    return good[0][1]


_BUILTIN_LOADED = False


def _load_builtin() -> None:
    """Register the built-in formats (:mod:`.catalogue`) under any registered before them."""
    global _BUILTIN_LOADED
    if _BUILTIN_LOADED:
        return
    _BUILTIN_LOADED = True
    from .catalogue import BUILTIN_FORMATS

    for fields in BUILTIN_FORMATS:
        _REGISTRY.setdefault(fields["name"], Format(**fields))  # a user's format wins
