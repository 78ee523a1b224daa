"""TensorBoard event files and folders of them.

Events are read one record at a time, so every point is kept: nothing goes through
TensorBoard's accumulator reservoir, which by default keeps 10,000 scalars per tag. Records
are read here rather than with TensorBoard's ``EventFileLoader``, which stops silently at
the first damaged record: each record's length and data CRCs are checked, and a damaged or
truncated record stops the ingest naming the file and record, or, with ``--on-error skip``,
is counted and skipped (after a damaged length, reading resumes at the next valid record).
Scalars written by ``torch.utils.tensorboard``, tensorboardX and TF1 (``simple_value``) and by
TF2 / ``tensorboard.summary.Writer`` (scalar tensors of the ``scalars`` plugin) are read;
images, histograms and text are skipped.

A folder may hold several runs, each in its own subfolder (``logs/run_a/events...``,
``logs/run_b/events...``, as verl, OpenRLHF and the Hugging Face Trainer lay them out):
each folder that holds event files is a run, named by its path under the given folder. A
step logged twice (a run restarted from a checkpoint) keeps the later value: files are read
in name order, which is creation order; how many points were replaced is noted
(``notes.repeated_steps``) and printed at ingest.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import Iterator

from ..errors import FormatError
from ._io import max_record_bytes
from ._tracking import metric_table
from .registry import Chunk, Sample

_EVENT_FILE = re.compile(r"(^|\.)tfevents\.")
#: Folder entries a sniffer looks at before giving up.
_SNIFF_ENTRIES = 5000


def _is_event_file(path: Path) -> bool:
    return bool(_EVENT_FILE.search(path.name)) and path.is_file()


def _event_files(root: Path) -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(Path(folder) / name for name in sorted(names)
                     if _EVENT_FILE.search(name))
    return files


def sniff(sample: Sample) -> float:
    path = sample.path
    if sample.is_dir:
        seen = 0
        for folder, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in names:
                if _EVENT_FILE.search(name):
                    return 0.9
                seen += 1
            seen += len(dirs)
            if seen > _SNIFF_ENTRIES:
                break
        return 0.0
    return 0.95 if _EVENT_FILE.search(path.name) else 0.0


#: The message when the optional TensorBoard reader is not installed.
MISSING_EXTRA = ("reading TensorBoard event files needs the [tensorboard] extra: "
                 "pip install 'entropylens[tensorboard]'")


def _loader(path: Path):
    # an extra, not a core dependency: tensorboard and grpcio weigh about 55 MB
    try:
        from tensorboard.compat.proto import event_pb2
        from tensorboard.util import tensor_util
    except ImportError:
        raise FormatError(MISSING_EXTRA, path=path) from None
    return event_pb2, tensor_util


try:  # C implementation; TensorBoard's own is pure Python (about 5 MB/s)
    import google_crc32c

    def _crc32c(data: bytes) -> int:
        return google_crc32c.value(data)
except ImportError:  # pragma: no cover - google-crc32c is a core dependency
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c as _crc32c_stub

    def _crc32c(data: bytes) -> int:
        return _crc32c_stub(data)


def _masked_crc(data: bytes) -> int:
    """The TFRecord checksum: CRC-32C, rotated right by 15 bits, plus a constant."""
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


_HEADER = struct.Struct("<QI")  # record length, masked CRC of the length
_FOOTER = struct.Struct("<I")  # masked CRC of the data
_RESYNC_WINDOW = 1 << 20


def _damaged(ctx, file: Path, number: int, message: str) -> None:
    """A damaged record: stop naming the file and record, or count it under skip."""
    if ctx.options.on_error == "stop":
        raise FormatError(message + " (use --on-error skip to skip damaged records)",
                          path=file, line=number)
    ctx.reject(number, f"{file.name}: {message}")


def _resync(fh, start: int) -> bool:
    """Move ``fh`` to the first offset from ``start`` where a record header checks out."""
    position = start
    while True:
        fh.seek(position)
        window = fh.read(_RESYNC_WINDOW + _HEADER.size)
        if len(window) < _HEADER.size:
            return False
        for i in range(len(window) - _HEADER.size + 1):
            if _masked_crc(window[i:i + 8]) == _HEADER.unpack_from(window, i)[1]:
                fh.seek(position + i)
                return True
        position += len(window) - _HEADER.size + 1


def _records(file: Path, ctx) -> Iterator[tuple[int, bytes]]:
    """``(record number, data)`` of every intact record of a TFRecord file, from 1."""
    limit = max_record_bytes()
    number = 0
    with open(file, "rb") as fh:
        while True:
            start = fh.tell()
            header = fh.read(_HEADER.size)
            if not header:
                return
            number += 1
            if len(header) < _HEADER.size:
                _damaged(ctx, file, number, "truncated record (the file ends inside it)")
                return
            length, length_crc = _HEADER.unpack(header)
            if _masked_crc(header[:8]) != length_crc:
                _damaged(ctx, file, number, "damaged record: its length fails the CRC check")
                if not _resync(fh, start + 1):
                    return
                continue
            if length > limit:
                raise FormatError(f"record of {length} bytes, more than the limit of "
                                  f"{limit} (ENTROPYLENS_MAX_RECORD_MB)", path=file,
                                  line=number)
            data = fh.read(length)
            footer = fh.read(_FOOTER.size)
            if len(data) < length or len(footer) < _FOOTER.size:
                _damaged(ctx, file, number, "truncated record (the file ends inside it)")
                return
            if _masked_crc(data) != _FOOTER.unpack(footer)[0]:
                _damaged(ctx, file, number, "damaged record: its data fails the CRC check")
                continue
            yield number, data


def _scalars(file: Path, ctx, event_pb2, tensor_util) -> Iterator[tuple[int, str, float]]:
    """``(step, tag, value)`` of every scalar event of one file, in file order."""
    from google.protobuf.message import DecodeError

    scalar_tags: set[str] = set()
    for number, data in _records(file, ctx):
        try:
            event = event_pb2.Event.FromString(data)
        except DecodeError as exc:
            _damaged(ctx, file, number, f"not a TensorBoard event: {exc}")
            continue
        if not event.HasField("summary"):
            continue
        for value in event.summary.value:
            kind = value.WhichOneof("value")
            if kind == "simple_value":
                yield event.step, value.tag, value.simple_value
            elif kind == "tensor":
                # TF2 writes the plugin name only with the first point of a tag
                if value.HasField("metadata") and \
                        value.metadata.plugin_data.plugin_name == "scalars":
                    scalar_tags.add(value.tag)
                if value.tag not in scalar_tags:
                    continue
                array = tensor_util.make_ndarray(value.tensor)
                if array.size == 1:
                    yield event.step, value.tag, float(array.reshape(()))


def read(path: Path, ctx) -> Iterator[Chunk]:
    event_pb2, tensor_util = _loader(path)
    if path.is_dir():
        files = _event_files(path)
        if not files:
            raise FormatError("no TensorBoard event files in this folder", path=path)
        run_of = {f: f.parent.relative_to(path).as_posix() for f in files}
    else:
        files, run_of = [path], {path: "."}
    several = len(set(run_of.values())) > 1
    steps, keys, values, runs = [], [], [], []
    for file in files:
        run = run_of[file]
        before = len(steps)
        try:
            for step, tag, value in _scalars(file, ctx, event_pb2, tensor_util):
                steps.append(step)
                keys.append(tag)
                values.append(value)
        except FormatError:
            raise
        except Exception as exc:  # tensor decoding raises its own error types
            raise FormatError(f"cannot read as a TensorBoard event file: {exc}",
                              path=file) from None
        runs.extend([None if run == "." else run] * (len(steps) - before))
    ctx.note(event_files=len(files))
    repeated = _repeated_steps(steps, keys, runs)
    if repeated:
        ctx.note(repeated_steps=repeated)
    if not steps:
        raise FormatError("no scalar summaries found in the TensorBoard events", path=path)
    yield Chunk("metrics", metric_table(steps, keys, values, path=path, ctx=ctx,
                                        runs=runs if several else None))


def _repeated_steps(steps: list, keys: list, runs: list) -> dict:
    """Points logged again at a step their tag already had (a run resumed from a checkpoint
    rewrites the steps since it), per run folder (``"."`` for a lone file): the later value
    is kept, the count is told."""
    seen: set = set()
    out: dict = {}
    for step, key, run in zip(steps, keys, runs):
        point = (run, key, step)
        if point not in seen:
            seen.add(point)
            continue
        entry = out.setdefault(run or ".", {"points": 0, "kept": "later", "examples": []})
        entry["points"] += 1
        if len(entry["examples"]) < 5:
            entry["examples"].append({"tag": key, "step": step})
    return out
