"""Helpers shared by the per-token readers: JSON records, column builders, byte decoding.

Per-token sources (OpenAI-style responses, vLLM and SGLang outputs, trainer token exports)
are JSON records holding one or a few sequences each. The readers here parse them one line
at a time and append whole sequences to a :class:`TokenColumns` builder, which hands the
driver an Arrow table every :data:`CHUNK_TOKENS` tokens, so memory stays bounded whatever the
file size. A file that is one JSON document (a single response, or an array of them, as an
API call saved with ``json.dump``) is read whole; JSON Lines files are streamed.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterator

import msgspec
import numpy as np
import pyarrow as pa

from ..schema import SEQUENCE_SCHEMA
from ._io import numbered_lines, read_document

#: The one fast JSON parser (msgspec also decodes the OpenAI responses into typed structs).
_fast_loads = msgspec.json.decode

#: Tokens per chunk handed to the driver.
CHUNK_TOKENS = 64 * 1024
#: Logged alternatives per chunk: with top-20 lists a chunk holds about 13k tokens, which
#: keeps the Python objects buffered before conversion to Arrow at a few tens of MB.
CHUNK_ALTERNATIVES = 256 * 1024
#: Completions per sequences chunk.
CHUNK_SEQUENCES = 4096


def loads(data: bytes | str) -> Any:
    """Parse one JSON value; NaN and +-Infinity (as Python's ``json.dumps`` writes them) are
    accepted, which strict fast parsers reject."""
    try:
        return _fast_loads(data)
    except msgspec.DecodeError:
        return json.loads(data)


def first_record(sample) -> Any:
    """The first JSON record of a sniff sample: the first line of JSON Lines, else the
    document itself when it is complete within the sample, else None."""
    lines = sample.lines(1)
    if not lines:
        return None
    line = lines[0].strip()
    if line.startswith("data:"):
        line = line[5:].strip()
    try:
        return loads(line)
    except ValueError:
        pass
    try:
        return loads(sample.text)
    except ValueError:
        return None


def first_mapping(value: Any) -> dict | None:
    """The first object of a record, unwrapping a JSON array of records."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, dict) else None


def head_json_prefix(sample) -> str:
    """The first bytes of a sample with whitespace removed, for cheap key checks on
    pretty-printed documents that the sniff head cuts short."""
    return "".join(sample.text[:8192].split())


def iter_json_records(fh, ctx) -> Iterator[tuple[int, Any]]:
    """Yield ``(number, record)`` for every record of a JSON Lines or JSON document file.

    JSON Lines are streamed (number = line); Server-Sent-Events lines ``data: {...}`` are
    accepted and ``data: [DONE]`` skipped; a line holding an array yields its elements. A
    file whose first line is not a complete JSON value is read whole as one document (see
    :func:`_split_document`): an array yields its elements (number = element, from 1), an
    object yields itself. Unparsable lines go to ``ctx.reject``.
    """
    lines = _Lines(fh)
    for number, line in lines:
        try:
            record = loads(line)
        except ValueError as exc:
            if number > 0 and _starts_document(line, lines):
                yield from _document_records(read_document(fh, lines.taken(line)), ctx,
                                             number)
                return
            ctx.reject(abs(number), f"not valid JSON: {_short(exc)}")
            continue
        if isinstance(record, list):
            for item in record:
                yield abs(number), item
        else:
            yield abs(number), record


class _Lines:
    """``(number, payload)`` lines that can put one line back, for a look ahead.

    The first line comes with its number, later ones with the number negated, so that a
    reader can tell the first line (the only one that may open a whole JSON document)."""

    def __init__(self, fh):
        self._lines = _raw_payload_lines(fh)
        self._back: list[tuple[int, bytes]] = []
        self._first = True

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, bytes]:
        number, line = self._back.pop() if self._back else next(self._lines)
        if self._first:
            self._first = False
            return number, line
        return -number, line

    def peek(self) -> tuple[int, bytes] | None:
        """The next line without taking it (None at the end)."""
        if not self._back:
            try:
                self._back.append(next(self._lines))
            except StopIteration:
                return None
        return self._back[-1]

    def taken(self, first: bytes) -> bytes:
        """``first`` and the looked-ahead line, as the head of a document read whole."""
        return b"\n".join([first, *(line for _, line in reversed(self._back))]) + b"\n"


def _starts_document(first: bytes, lines: _Lines) -> bool:
    """Whether an unparsable first line opens one JSON document spread over lines, rather
    than being a broken first record of JSON Lines.

    A document opens with a lone ``[`` or ``{`` or continues on a line that is no complete
    JSON value either (``"key": 1,``); JSON Lines go on with a complete record, and then
    only the first line is bad: it is rejected alone and the file is still streamed.
    """
    if first in (b"[", b"{"):
        return True
    following = lines.peek()
    return following is None or not _is_complete_json(following[1])


def _raw_payload_lines(fh) -> Iterator[tuple[int, bytes]]:
    """``(line number, payload)`` of every non-blank line; Server-Sent-Events ``data:``
    prefixes are removed and ``data: [DONE]`` is skipped."""
    for number, line in numbered_lines(fh):
        line = line.strip()
        if not line:
            continue
        if line.startswith(b"data:"):
            line = line[5:].strip()
            if line == b"[DONE]":
                continue
        yield number, line


def _document_records(data: bytes, ctx, line: int) -> Iterator[tuple[int, Any]]:
    try:
        document = loads(data)
    except ValueError as exc:
        ctx.reject(line, f"not valid JSON or JSON Lines: {_short(exc)}")
        return
    if isinstance(document, list):
        for index, item in enumerate(document, start=1):
            yield index, item
    else:
        yield line, document


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200]


def decode_bytes(pieces) -> str | None:
    """Decode the concatenated bytes of a run of tokens as UTF-8.

    A token's bytes may be part of a multi-byte character (``[230, 149]`` alone is not valid
    UTF-8); concatenating the run first decodes such characters correctly. Bytes that stay
    invalid are replaced by U+FFFD. Returns None when any token has no bytes.
    """
    buffer = bytearray()
    for piece in pieces:
        if piece is None:
            return None
        buffer.extend(piece)
    return buffer.decode("utf-8", errors="replace")


def as_float(value) -> float | None:
    """A float or None (None, booleans and non-numbers give None; NaN stays NaN)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _check_lengths(n: int, **arrays) -> None:
    """Raise ValueError when a per-token array of a sequence has not ``n`` values: appending
    it would shift every later row of the chunk against the other columns."""
    for name, values in arrays.items():
        if values is not None and len(values) != n:
            raise ValueError(f"field '{name}' has {len(values)} values for {n} tokens")


_NUMBER_TYPES = (int, float, np.integer, np.floating)
#: Integer columns and their Arrow range (positions are int32).
_INTEGER_FIELDS = {"token_id": (-2 ** 63, 2 ** 63), "top_ids": (-2 ** 63, 2 ** 63),
                   "positions": (0, 2 ** 31)}


def _check_numbers(**arrays) -> None:
    """Raise ValueError naming the field when a numeric array holds a non-number (a string,
    a list, a dict): found here, the reader can name the record; found when the chunk is
    converted to Arrow, nobody could."""
    for name, values in arrays.items():
        if values is None:
            continue
        integral = name in _INTEGER_FIELDS
        low, high = _INTEGER_FIELDS.get(name, (None, None))
        for value in values:
            if value is None:
                continue
            if integral:
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                if not isinstance(value, (int, np.integer)) or not low <= value < high:
                    raise ValueError(f"field '{name}' holds {type(value).__name__} "
                                     f"{str(value)[:40]!r} where an integer id belongs")
            elif not isinstance(value, _NUMBER_TYPES) or (
                    isinstance(value, int) and abs(value) > 1e300):
                raise ValueError(f"field '{name}' holds {type(value).__name__} "
                                 f"{str(value)[:40]!r} where a number belongs")


class TokenColumns:
    """Column-wise builder of canonical token rows, filled one sequence at a time.

    Parameters
    ----------
    split : str, optional
        Split of every row unless :meth:`add` says otherwise.
    """

    def __init__(self, split: str | None = None):
        self.split = split
        self.emitted = 0
        self._reset()

    def _reset(self) -> None:
        self.step: list = []
        self.split_values: list = []
        self.sample_id: list = []
        self.group_id: list = []
        self.position: list = []
        self.token_id: list = []
        self.token: list = []
        self.logprob: list = []
        self.entropy: list = []
        self.advantage: list = []
        self.top_lengths: list = []
        self.top_ids: list = []
        self.top_tokens: list = []
        self.top_logprobs: list = []
        self.run: list = []
        self._has_run = False
        self._has_top_ids = False
        self._has_top_tokens = False
        self.rows = 0

    def add(self, sample_id: str, n: int, *, position_start: int = 0, positions=None,
            step: int | None = None, split: str | None = None, group_id: str | None = None,
            token=None, token_id=None, logprob=None, entropy=None, advantage=None,
            top_lengths=None, top_ids=None, top_tokens=None, top_logprobs=None,
            run: str | None = None) -> None:
        """Append one sequence of ``n`` tokens.

        Per-token arguments are sequences of length ``n`` (or None for "not logged");
        ``advantage`` may also be one number for the whole sequence. The alternatives are
        flat: ``top_lengths[i]`` of them belong to token ``i`` (None: no alternatives
        logged at that position), and ``top_ids``/``top_tokens``/``top_logprobs`` hold them
        one after another, most likely first.
        """
        if n <= 0:
            return
        _check_lengths(n, positions=positions, token=token, token_id=token_id,
                       logprob=logprob, entropy=entropy, top_lengths=top_lengths,
                       advantage=None if advantage is None or isinstance(advantage, (int, float))
                       else advantage)
        _check_numbers(token_id=token_id, logprob=logprob, entropy=entropy, positions=positions,
                       top_ids=top_ids, top_logprobs=top_logprobs,
                       advantage=[advantage] if isinstance(advantage, (int, float))
                       or advantage is None else advantage)
        none = [None] * n
        self.step.extend([step] * n)
        self.split_values.extend([split or self.split] * n)
        self.sample_id.extend([sample_id] * n)
        self.group_id.extend([group_id] * n)
        if positions is not None:
            self.position.extend(positions)
        else:
            self.position.extend(range(position_start, position_start + n))
        self.token_id.extend(token_id if token_id is not None else none)
        self.token.extend(token if token is not None else none)
        self.logprob.extend(logprob if logprob is not None else none)
        self.entropy.extend(entropy if entropy is not None else none)
        if advantage is None or isinstance(advantage, (int, float)):
            self.advantage.extend([advantage] * n)
        else:
            self.advantage.extend(advantage)
        if top_lengths is None:
            self.top_lengths.extend(none)
        else:
            total = len(top_logprobs) if top_logprobs is not None else len(top_ids)
            self.top_lengths.extend(top_lengths)
            self.top_logprobs.extend(top_logprobs if top_logprobs is not None
                                     else [None] * total)
            self.top_ids.extend(top_ids if top_ids is not None else [None] * total)
            self.top_tokens.extend(top_tokens if top_tokens is not None else [None] * total)
            self._has_top_ids = self._has_top_ids or top_ids is not None
            self._has_top_tokens = self._has_top_tokens or top_tokens is not None
        self.run.extend([run] * n)
        self._has_run = self._has_run or run is not None
        self.rows += n

    @property
    def full(self) -> bool:
        """Whether a chunk's worth of tokens (or of alternatives) is buffered."""
        return self.rows >= CHUNK_TOKENS or len(self.top_logprobs) >= CHUNK_ALTERNATIVES

    def take(self) -> tuple[pa.Table, int] | None:
        """The buffered rows as an Arrow table and their row offset (None when empty)."""
        if not self.rows:
            return None
        lengths = self.top_lengths
        valid = np.array([x is not None for x in lengths], dtype=bool)
        counts = np.array([x if x is not None else 0 for x in lengths], dtype=np.int64)
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        mask = pa.array(~valid)

        def listed(values, value_type, present=True):
            if not present:  # never logged: the whole column is null, not lists of nulls
                return pa.nulls(self.rows, pa.list_(value_type))
            flat = pa.array(values, value_type)
            return pa.ListArray.from_arrays(offsets, flat, mask=mask)

        columns = {
            "step": pa.array(self.step, pa.int64()),
            "split": pa.array(self.split_values, pa.string()),
            "sample_id": pa.array(self.sample_id, pa.string()),
            "group_id": pa.array(self.group_id, pa.string()),
            "position": pa.array(self.position, pa.int32()),
            "token_id": pa.array(self.token_id, pa.int64()),
            "token": pa.array(self.token, pa.string()),
            "logprob": pa.array(self.logprob, pa.float64()),
            "entropy": pa.array(self.entropy, pa.float64()),
            "top_ids": listed(self.top_ids, pa.int64(), self._has_top_ids),
            "top_tokens": listed(self.top_tokens, pa.string(), self._has_top_tokens),
            "top_logprobs": listed(self.top_logprobs, pa.float64()),
            "advantage": pa.array(self.advantage, pa.float64()),
        }
        if self._has_run:
            columns["_run"] = pa.array(self.run, pa.string())
        table = pa.table(columns)
        offset = self.emitted
        self.emitted += self.rows
        self._reset()
        return table, offset


class SequenceRows:
    """Builder of canonical sequence rows (one per completion); ``extra`` is JSON text."""

    def __init__(self):
        self.rows: list[dict] = []
        self.emitted = 0

    def add(self, **row) -> None:
        extra = row.get("extra")
        if extra is not None and not isinstance(extra, str):
            row["extra"] = json.dumps(extra, ensure_ascii=False, default=_json_default)
        self.rows.append(row)

    @property
    def full(self) -> bool:
        return len(self.rows) >= CHUNK_SEQUENCES

    def take(self) -> tuple[pa.Table, int] | None:
        if not self.rows:
            return None
        names = [f.name for f in SEQUENCE_SCHEMA] + ["_run"]
        present = [n for n in names if any(n in r for r in self.rows)]
        columns = {}
        for name in present:
            values = [r.get(name) for r in self.rows]
            if name == "_run":
                columns[name] = pa.array(values, pa.string())
            else:
                columns[name] = pa.array(values, SEQUENCE_SCHEMA.field(name).type)
        table = pa.table(columns)
        offset = self.emitted
        self.emitted += len(self.rows)
        self.rows = []
        return table, offset


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def iter_raw_records(fh, ctx) -> Iterator[tuple[int, bytes]]:
    """Like :func:`iter_json_records` but yields each record's JSON text, for readers that
    decode records straight into typed structs. Records of a whole-document file and lines
    with NaN or Infinity (which typed decoders reject) are re-encoded as standard JSON, with
    non-finite numbers replaced: -Infinity by the API sentinel -9999.0 (so that the driver
    counts it as a sentinel), NaN and +Infinity by null."""

    lines = _Lines(fh)
    for number, line in lines:
        if number > 0 and not _is_complete_json(line):
            if _starts_document(line, lines):
                document = read_document(fh, lines.taken(line))
                for index, record in _document_records(document, ctx, number):
                    yield index, msgspec.json.encode(finite_json(record))
                return
            ctx.reject(number, "not valid JSON: the first line is no complete JSON record")
            continue
        number = abs(number)
        if line[:1] == b"[":
            # a line holding an array of records (a batch response saved as one line)
            try:
                records = loads(line)
            except ValueError as exc:
                ctx.reject(number, f"not valid JSON: {_short(exc)}")
                continue
            for record in records:
                yield number, msgspec.json.encode(finite_json(record))
            continue
        yield number, line


def _is_complete_json(line: bytes) -> bool:
    try:
        loads(line)
    except ValueError:
        return False
    return True


def standard_json(raw: bytes) -> bytes:
    """Re-encode one JSON text that holds NaN or Infinity as standard JSON (see
    :func:`iter_raw_records`); raises ValueError when it is not JSON at all."""

    return msgspec.json.encode(finite_json(json.loads(raw)))


def finite_json(value):
    """Replace non-finite floats in a JSON value: -inf by -9999.0, NaN and +inf by None."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return -9999.0 if value < 0 else None
    if isinstance(value, list):
        return [finite_json(v) for v in value]
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    return value


def validation_field(message: str) -> str | None:
    """The JSON path a msgspec validation message names (``... - at `$.a[0].b```)."""
    marker = "- at `"
    if marker in message:
        return message.rsplit(marker, 1)[1].rstrip("`")
    return None
