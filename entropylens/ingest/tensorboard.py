"""TensorBoard event files and folders of them.

Events are read with TensorBoard's own record reader (``EventFileLoader``, the loader under
``EventAccumulator``), one event at a time, so every point is kept: nothing goes through
the accumulator's reservoir, which by default keeps 10,000 scalars per tag. Scalars written
by ``torch.utils.tensorboard``, tensorboardX and TF1 (``simple_value``) and by TF2 /
``tensorboard.summary.Writer`` (scalar tensors of the ``scalars`` plugin) are read; images,
histograms and text are skipped.

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
from pathlib import Path
from typing import Iterator

from ..errors import FormatError
from ._tracking import metric_table
from .registry import Chunk, Format, Sample, register

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


def _loader():
    try:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
        from tensorboard.util import tensor_util
    except ImportError:  # pragma: no cover - tensorboard is a core dependency
        raise FormatError("reading TensorBoard files needs the 'tensorboard' package "
                          "(pip install tensorboard)") from None
    return EventFileLoader, tensor_util


def _scalars(file: Path, EventFileLoader, tensor_util) -> Iterator[tuple[int, str, float]]:
    """``(step, tag, value)`` of every scalar event of one file, in file order."""
    scalar_tags: set[str] = set()
    for event in EventFileLoader(str(file)).Load():
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
    EventFileLoader, tensor_util = _loader()
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
            for step, tag, value in _scalars(file, EventFileLoader, tensor_util):
                steps.append(step)
                keys.append(tag)
                values.append(value)
        except Exception as exc:  # the record reader raises its own error types
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


register(Format(
    name="tensorboard",
    description="TensorBoard event files, or a folder of them (one run per subfolder): "
                "step metrics",
    sniff=sniff,
    read=read,
    produces=("metrics",),
    folders=True,
))
