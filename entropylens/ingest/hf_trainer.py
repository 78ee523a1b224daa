"""Hugging Face Trainer and TRL logs, and ms-swift's ``logging.jsonl``.

``hf_trainer`` reads ``trainer_state.json`` (its ``log_history``) and bare JSON lists of
``log_history`` records (what many training scripts save as ``step_logs.json``). Each record
holds its ``step``; evaluation records (``eval_loss``, ``eval_reward``) go to the val split
as ``val_*`` metrics, and the final ``train_runtime`` summary record is kept at its step.

``hf_console`` reads console output: the Trainer prints each ``log_history`` record as a
Python dict (``{'loss': 0.01, 'entropy': 0.4, ..., 'epoch': 0.03}``, not JSON) through its
progress bar. Those dicts carry no step. When the file also holds the progress bar's output,
the step of the k-th dict is the bar's position at the k-th time it was cleared to print a
dict (``tqdm.write``), which is exact even though stdout and stderr interleave out of order;
otherwise dicts are numbered 1, 2, 3... and the manifest says so
(``notes.step_source = "record_index"``). ms-swift's console dicts carry
``'global_step/max_steps': 'N/M'``, which gives the step directly. Dict lines cut short are
skipped and counted (``notes.malformed_lines``).

``ms_swift`` reads ms-swift's ``logging.jsonl``, 3.x and 2.x. 3.x records hold TRL-compatible
keys plus ``global_step/max_steps`` (``"2/4389"``), ``percentage``, ``elapsed_time`` and
friends; 2.x records hold an integer ``global_step`` and are each written twice (the copies
differ only in timing keys such as ``train_speed(iter/s)``), so a record repeating the
previous one of its step is counted (``notes.duplicate_records``) and kept once. Both end
with a summary record (``last_model_checkpoint``, ``best_metric``, the whole
``log_history`` again): its scalar fields become run metadata (``notes.swift_summary``),
its log history is not read a second time.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

from ..aliases import canonical_metric
from ..errors import FormatError
from ._io import iter_lines, read_document
from ._tracking import metric_table, python_literal, text_lines, to_float
from .registry import Chunk, Sample, appended_run

#: Keys that make a dict a Trainer log record.
_TRAINER_KEYS = {"loss", "learning_rate", "grad_norm", "epoch", "eval_loss", "train_runtime",
                 "train_loss", "reward", "entropy", "global_step/max_steps"}
_SWIFT_STEP = "global_step/max_steps"
_SUMMARY_KEY = "train_runtime"
_DICT_LINE = re.compile(r"\{'[^']+': ")
#: tqdm clearing its bar to print a message: ``N/T [elapsed...]`` then a blank-out.
_TQDM_CLEAR = re.compile(r"(\d+)/(\d+) \[[^\]\r\n]*\]\r[ \t]+\r")
_EXAMPLES = 5


def _is_record(record) -> bool:
    if not isinstance(record, dict) or not record:
        return False
    if _TRAINER_KEYS & set(record):
        return True
    return any(canonical_metric(str(k)).priority < (1 << 30) for k in record)


def _step_of(record: dict) -> int | None:
    step = to_float(record.get("step"))
    if step is not None:
        return int(step)
    if isinstance(record.get("global_step"), int):  # ms-swift 2.x
        return record["global_step"]
    swift = record.get(_SWIFT_STEP)
    if isinstance(swift, str) and "/" in swift:
        step = to_float(swift.split("/", 1)[0])
        return int(step) if step is not None else None
    return None


def _points(records: list[tuple[int, dict]]) -> tuple[list, list, list]:
    steps, keys, values = [], [], []
    for step, record in records:
        for key, value in record.items():
            if key in ("step", "global_step", _SWIFT_STEP):
                continue
            number = to_float(value)
            if number is not None:
                steps.append(step)
                keys.append(str(key))
                values.append(number)
    return steps, keys, values


# -- trainer_state.json and bare log_history lists ------------------------------------------
def _json_head(sample: Sample):
    try:
        return json.loads(sample.text)
    except ValueError:
        return None


def sniff_state(sample: Sample) -> float:
    if sample.suffix not in (".json", "") or sample.is_dir:
        return 0.0
    head = sample.text.lstrip()
    data = _json_head(sample)
    if head.startswith("{"):
        if isinstance(data, dict):
            return 0.95 if isinstance(data.get("log_history"), list) else 0.0
        return 0.9 if re.search(r'"log_history"\s*:\s*\[', head) else 0.0
    if head.startswith("["):
        if isinstance(data, list):
            first = data[0] if data else None
        else:  # longer than the head: judge by the first record
            found = re.match(r"\[\s*(\{[^{}]*\})", head)
            try:
                first = json.loads(found.group(1)) if found else None
            except ValueError:
                first = None
        # W&B history rows carry '_step'; log_history records never do
        if isinstance(first, dict) and "step" in first and "_step" not in first \
                and _is_record(first):
            return 0.85
    return 0.0


def read_state(path: Path, ctx) -> Iterator[Chunk]:
    try:
        with ctx.open() as fh:
            data = json.loads(read_document(fh))
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"not valid JSON: {exc}", path=path,
                          line=getattr(exc, "lineno", None)) from None
    history = data.get("log_history") if isinstance(data, dict) else data
    if not isinstance(history, list):
        raise FormatError("expected a trainer_state.json with 'log_history' or a JSON list "
                          "of log records", path=path)
    records = []
    for number, record in enumerate(history, start=1):
        if not isinstance(record, dict):
            ctx.reject(number, "log record is not an object")
            continue
        step = _step_of(record)
        if step is None:
            ctx.reject(number, "log record has no 'step'", field="step")
            continue
        records.append((step, record))
    if isinstance(data, dict):
        for key in ("global_step", "max_steps", "logging_steps", "eval_steps"):
            if isinstance(data.get(key), int):
                ctx.note(**{f"trainer_{key}": data[key]})
    ctx.note(framework="hf-trainer", step_source="logged")
    steps, keys, values = _points(records)
    yield Chunk("metrics", metric_table(steps, keys, values, path=path, ctx=ctx))


# -- console dicts --------------------------------------------------------------------------
def _dict_candidates(line: str, *, leading: bool = False) -> Iterator[str]:
    """Python-dict texts on one physical line (segments split by tqdm's carriage returns);
    with ``leading``, only dicts that start their segment, as the Trainer prints them."""
    for segment in line.split("\r"):
        segment = segment.strip()
        start = segment.find("{'")
        if start == 0 or (start > 0 and not leading):
            end = segment.rfind("}")
            yield segment[start:end + 1] if end > start else segment[start:]


def sniff_console(sample: Sample) -> float:
    for line in text_lines(sample, _DICT_LINE)[:50]:
        for text in _dict_candidates(line, leading=True):
            try:
                record = python_literal(text)
            except ValueError:
                continue
            if _is_record(record):
                return 0.85
    return 0.0


#: A tqdm bar position (``10/43 [``) and tqdm clearing its bar to print a message.
_BAR_OR_CLEAR = re.compile(r"(?P<n>\d+)/(?P<total>\d+) \[|(?P<clear>\r[ \t]+\r)")
#: ``logging_steps`` as printed with the training arguments (``logging_steps=10``).
_LOGGING_STEPS = re.compile(r"""\blogging_steps['"]?\s*[=:]\s*(\d+)""")
#: How many lines a dict wrapped over several lines may span.
_WRAP_LINES = 20


def _bar_clears(line: str, last_bar: int | None) -> tuple[list[int], int | None]:
    """Bar positions at which tqdm cleared its bar on this line: each clear is at the bar's
    last position shown before it, on this line or an earlier one (a script's own prints
    may come between the bar and the clear)."""
    clears = []
    for match in _BAR_OR_CLEAR.finditer(line):
        if match.group("clear"):
            if last_bar is not None:
                clears.append(last_bar)
        else:
            last_bar = int(match.group("n"))
    return clears, last_bar


def read_console(path: Path, ctx) -> Iterator[Chunk]:
    records: list[tuple[int | None, dict, int]] = []
    clears: list[int] = []
    last_bar: int | None = None
    logging_steps: int | None = None
    malformed, examples, joined = 0, [], 0
    pending: tuple[int, str, int] | None = None   # a dict cut by a line break: start, text

    def bad(number: int, text: str) -> None:
        nonlocal malformed
        malformed += 1
        if len(examples) < _EXAMPLES:
            examples.append({"line": number, "text": text[:120]})

    with ctx.open() as fh:
        # lines unstripped: tqdm's clear (\r, blanks, \r) often opens the dict's line
        for number, raw in enumerate(fh, start=1):
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            if not line.strip():
                continue
            if logging_steps is None and "logging_steps" in line:
                found = _LOGGING_STEPS.search(line)
                logging_steps = int(found.group(1)) if found and int(found.group(1)) else None
            if pending is not None and (_DICT_LINE.match(line.strip("\r \t"))
                                        or _BAR_OR_CLEAR.search(line)):
                bad(pending[0], pending[1])  # a new dict or the bar: the old one was cut
                pending = None
            if pending is not None:
                # a dict wrapped over lines: join until it parses
                start, text, lines = pending
                text += line.strip()
                try:
                    record = python_literal(text[:text.rfind("}") + 1])
                except ValueError:
                    pending = (start, text, lines + 1) if lines + 1 < _WRAP_LINES else None
                    if pending is None:
                        bad(start, text)
                    continue
                pending = None
                if _is_record(record):
                    joined += 1
                    records.append((_step_of(record), record, start))
                continue
            if "\r" in line or "/" in line:
                found, last_bar = _bar_clears(line, last_bar)
                clears.extend(found)
            if "{'" not in line:
                continue
            for text in _dict_candidates(line):
                try:
                    record = python_literal(text)
                except ValueError:
                    if _DICT_LINE.match(text):
                        if "}" not in text:
                            pending = (number, text, 1)
                        else:
                            bad(number, text)
                    continue
                if _is_record(record):
                    records.append((_step_of(record), record, number))
    if pending is not None:
        bad(pending[0], pending[1])
    if not records:
        raise FormatError("no Trainer log dicts ({'loss': ..., 'epoch': ...}) found",
                          path=path)
    stepless = [i for i, (step, record, _) in enumerate(records)
                if step is None and _SUMMARY_KEY not in record]
    # the summary record is printed through the bar too, in some logs with its own clear
    written = [i for i, (step, _, _) in enumerate(records) if step is None]
    if not stepless:
        source = "logged"
    elif len(clears) in (len(stepless), len(written)):
        source = "progress_bar"
        for i, step in zip(stepless if len(clears) == len(stepless) else written, clears):
            records[i] = (step, *records[i][1:])
    elif logging_steps is not None:
        source = "logging_steps"
        for n, i in enumerate(stepless, start=1):
            records[i] = (n * logging_steps, *records[i][1:])
    else:
        source = "record_index"
        for n, i in enumerate(stepless, start=1):
            records[i] = (n, *records[i][1:])
    # the summary record closes training: the step of the record before it
    last = 0
    for i, (step, record, number) in enumerate(records):
        if step is None:
            records[i] = (last, record, number)
        else:
            last = step
    segments = _restarts(records)
    if malformed:
        ctx.note(malformed_lines=malformed, malformed_examples=examples)
    if joined:
        ctx.note(joined_wrapped_dicts=joined)
    if len(segments) > 1:
        ctx.note(appended_runs=[{"run": k + 1, "first_line": records[start][2]}
                                for k, start in enumerate(segments)])
    ctx.note(framework="hf-trainer", step_source=source)
    if logging_steps is not None:
        ctx.note(trainer_logging_steps=logging_steps)
    steps, keys, values, runs = [], [], [], []
    bounds = segments[1:] + [len(records)]
    for k, (start, end) in enumerate(zip(segments, bounds)):
        part = [(step, record) for step, record, _ in records[start:end]]
        s, key, value = _points(part)
        steps += s
        keys += key
        values += value
        # later runs appended to the same log become runs of their own: NAME-2, NAME-3...
        runs += [None if k == 0 else appended_run(k + 1)] * len(s)
    yield Chunk("metrics", metric_table(steps, keys, values, path=path, ctx=ctx,
                                        runs=runs if len(segments) > 1 else None))


def _restarts(records: list[tuple[int, dict, int]]) -> list[int]:
    """Indices where a run appended to the same log starts: the step goes back to the first
    step of the current run or below (the progress bar or the step count restarted). A step
    going back less far is a run resumed from a checkpoint: same run, later values win. The
    summary record, which repeats the last step, ends a run rather than starting one."""
    starts = [0]
    first = previous = None
    for i, (step, record, _) in enumerate(records):
        if _SUMMARY_KEY in record:
            continue
        if previous is not None and step < previous and step <= first:
            starts.append(i)
            first = None
        if first is None:
            first = step
        previous = step
    return starts


# -- ms-swift logging.jsonl -----------------------------------------------------------------
def _is_swift_record(record) -> bool:
    """A 3.x record (``global_step/max_steps``) or a 2.x one (integer ``global_step``)."""
    if not isinstance(record, dict):
        return False
    if _SWIFT_STEP in record:
        return True
    # a flat record: trainer_state.json also has an integer global_step, beside its lists
    flat = all(not isinstance(v, (list, dict)) for v in record.values())
    return (flat and isinstance(record.get("global_step"), int) and not isinstance(
        record.get("global_step"), bool) and "step" not in record and _is_record(record))


def sniff_swift(sample: Sample) -> float:
    record = sample.first_json()
    if not _is_swift_record(record):
        return 0.0
    return 0.95 if _SWIFT_STEP in record else 0.9


#: Keys that differ between the two copies of one ms-swift 2.x record.
_TIMING = re.compile(r"(speed|runtime|per_second|elapsed|remaining|memory|percentage)",
                     re.IGNORECASE)


def _same_record(a: dict, b: dict) -> bool:
    """Whether two records of one step agree on every key but timings."""
    if set(a) != set(b):
        return False
    return all(a[k] == b[k] for k in a if not _TIMING.search(str(k)))


def read_swift(path: Path, ctx) -> Iterator[Chunk]:
    records = []
    last_of_step: dict[tuple, dict] = {}
    duplicates = 0
    with ctx.open() as fh:
        for number, line in iter_lines(fh):
            try:
                record = json.loads(line)
            except ValueError:
                ctx.reject(number, "not a JSON record (a line cut short?)")
                continue
            if isinstance(record, dict) and isinstance(record.get("log_history"), list):
                # the end-of-training summary: run metadata, its history already read
                ctx.note(swift_summary={k: v for k, v in record.items()
                                        if k != "log_history" and (v is None or isinstance(
                                            v, (str, int, float, bool)))})
                continue
            step = _step_of(record) if isinstance(record, dict) else None
            if step is None:
                ctx.reject(number, "no 'global_step/max_steps' (N/M) or integer "
                           "'global_step' in the record", field=_SWIFT_STEP)
                continue
            key = (step, frozenset(record))
            previous = last_of_step.get(key)
            if previous is not None and _same_record(previous, record):
                duplicates += 1  # ms-swift 2.x writes every record twice
                continue
            last_of_step[key] = record
            records.append((step, record))
    if duplicates:
        ctx.note(duplicate_records=duplicates)
    ctx.note(framework="ms-swift", step_source="logged")
    steps, keys, values = _points(records)
    yield Chunk("metrics", metric_table(steps, keys, values, path=path, ctx=ctx))
