"""verl training logs: console output and the FileLogger JSONL.

**Console** (format ``verl_console``; ``trainer.logger=['console']``): one line per step,
``step:N - key:value - key:value ...``, usually behind a Ray prefix such as
``(TaskRunner pid=222265)`` or ``(main_task pid=54569)`` and ANSI colour codes, plus
``Initial validation metrics: {...}`` and ``Final validation metrics: {...}`` lines (a
Python dict). Console logs copied from terminals are often wrapped or cut: a line that
continues a wrapped step line, and items cut short (``prom`` instead of
``prompt_length/min:52.0``), are skipped and counted in the manifest notes
(``malformed_lines``, with the first examples) instead of stopping the ingest; a file with no
step line at all is an error.

The initial validation belongs to the step before the first training step (verl logs it at
``global_steps`` before incrementing: step 0 in current verl, where training starts at 1; in
early verl, where training also starts at step 0, it shares step 0); the final validation to
the last step. Where a validation value appears both in a step line (rounded to 3 decimals
by early verl) and in a validation dict line, the dict's full-precision value is kept.

**FileLogger** (format ``verl_jsonl``; ``trainer.logger=['file']``): JSON lines
``{"step": N, "data": {...}}``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

from ..errors import FormatError
from ._io import iter_lines
from ._tracking import metric_table, python_literal, text_lines, to_float
from .registry import Chunk, Sample

_ANSI = re.compile(r"(?:\x1b)?\[[0-9;]*m")
_RAY_PREFIX = re.compile(r"^\s*\([\w.-]+ pid=\d+(?:, ip=[\d.]+)?\)\s*")
_STEP_LINE = re.compile(r"(?:^|\s)step:(\d+) - (.*)$")
_VALIDATION = re.compile(r"(Initial|Final) validation metrics: (\{.*\})")
#: A fragment of a wrapped step line: at least one ``key:number`` item joined by `` - ``.
_CONTINUATION = re.compile(r"(^|\s-\s)[\w/@().-]+:-?[\d.]+(e[-+]?\d+)?(\s-\s|\s*-?\s*$)")
_SNIFF = re.compile(r"step:\d+ - [\w/@().-]+:")
#: Examples of malformed lines kept in the manifest.
_EXAMPLES = 5


def clean_line(text: str) -> str:
    """A console line without ANSI codes and without the Ray actor prefix."""
    return _RAY_PREFIX.sub("", _ANSI.sub("", text)).strip()


def parse_items(body: str) -> tuple[dict[str, float], int]:
    """``key:value`` items of a step line (the part after ``step:N - ``).

    Returns the numeric items (a key repeated on one line keeps its last value) and the
    number of items that could not be read (cut keys or values).
    """
    items, bad = {}, 0
    for item in body.split(" - "):
        item = item.strip()
        if not item or item == "-":
            continue
        key, sep, value = item.partition(":")
        number = to_float(value.strip().rstrip(" -")) if sep else None
        if not sep or not key or number is None:
            if value.strip().lower() in ("nan", "inf", "-inf"):
                continue  # logged, but not a finite number
            bad += 1
            continue
        items[key.strip()] = number
    return items, bad


# -- console --------------------------------------------------------------------------------
def sniff_console(sample: Sample) -> float:
    found = text_lines(sample, _SNIFF)
    if not found:
        return 0.0
    return 0.9 if any(_STEP_LINE.search(clean_line(line)) for line in found) else 0.4


def read_console(path: Path, ctx) -> Iterator[Chunk]:
    steps, keys, values, ranks = [], [], [], []
    validations: list[tuple[str, int, dict]] = []  # (kind, line number, values)
    malformed, examples = 0, []
    first_step = last_step = None
    finals_after: list[int] = []

    def bad(number: int, text: str, why: str) -> None:
        nonlocal malformed
        malformed += 1
        if len(examples) < _EXAMPLES:
            examples.append({"line": number, "problem": why, "text": text[:120]})

    with ctx.open() as fh:
        for number, raw in iter_lines(fh):
            text = clean_line(raw.decode("utf-8", errors="replace"))
            if not text:
                continue
            step_line = _STEP_LINE.search(text)
            if step_line:
                step = int(step_line.group(1))
                items, cut = parse_items(step_line.group(2))
                if cut:
                    bad(number, text, f"{cut} cut or unreadable item(s)")
                for key, value in items.items():
                    steps.append(step)
                    keys.append(key)
                    values.append(value)
                    ranks.append(0)
                first_step = step if first_step is None else first_step
                last_step = step
                continue
            validation = _VALIDATION.search(text)
            if validation:
                try:
                    data = python_literal(validation.group(2))
                except ValueError:
                    bad(number, text, "unreadable validation dict")
                    continue
                if not isinstance(data, dict):
                    bad(number, text, "validation metrics are not a dict")
                    continue
                validations.append((validation.group(1), number, data))
                if validation.group(1) == "Final":
                    finals_after.append(last_step if last_step is not None else -1)
                continue
            if _CONTINUATION.search(text):
                bad(number, text, "continuation of a wrapped step line")

    if first_step is None and not validations:
        raise FormatError("no verl step lines ('step:N - key:value - ...') found", path=path)
    initial_step = max((first_step or 0) - 1, 0)
    finals = iter(finals_after)
    for kind, _, data in validations:
        if kind == "Initial":
            step = initial_step
        else:
            step = next(finals)
            step = step if step >= 0 else (last_step or 0)
        for key, value in data.items():
            number = to_float(value)
            if number is not None:
                steps.append(step)
                keys.append(str(key))
                values.append(number)
                ranks.append(1)
    if malformed:
        ctx.note(malformed_lines=malformed, malformed_examples=examples)
    ctx.note(framework="verl")
    yield Chunk("metrics", metric_table(steps, keys, values, path=path, ctx=ctx, ranks=ranks))


# -- FileLogger JSONL -----------------------------------------------------------------------
def sniff_jsonl(sample: Sample) -> float:
    record = sample.first_json()
    if isinstance(record, dict) and "step" in record and isinstance(record.get("data"), dict):
        return 0.95
    return 0.0


def _flatten(data: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def read_jsonl(path: Path, ctx) -> Iterator[Chunk]:
    steps, keys, values = [], [], []
    with ctx.open() as fh:
        for number, line in iter_lines(fh):
            try:
                record = json.loads(line)
            except ValueError:
                ctx.reject(number, "not a JSON record (a line cut short?)")
                continue
            step = to_float(record.get("step")) if isinstance(record, dict) else None
            if step is None or not isinstance(record.get("data"), dict):
                ctx.reject(number, "expected {\"step\": N, \"data\": {...}}", field="step")
                continue
            for key, value in _flatten(record["data"]):
                number_value = to_float(value)
                if number_value is not None:
                    steps.append(int(step))
                    keys.append(key)
                    values.append(number_value)
    ctx.note(framework="verl")
    yield Chunk("metrics", metric_table(steps, keys, values, path=path, ctx=ctx))
