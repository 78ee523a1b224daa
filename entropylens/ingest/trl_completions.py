"""TRL completion logs: ``<output_dir>/completions/completions_<step>.parquet``.

With ``log_completions=True``, TRL's ``GRPOTrainer.log`` (``trl/trainer/grpo_trainer.py``)
writes at every logging step ``pd.DataFrame(table).to_parquet(...)`` with the columns
``step``, ``prompt``, ``completion``, then one column per reward function (named after
it), any columns logged with ``log_extra``, and ``advantage``. Prompts and completions are
text, or lists of chat messages for conversational datasets. Some versions and forks add a
``mode`` column (``train``/``eval``) or write under ``completions/<mode>/``.

These files hold text only: they fill the sequences table; the rescoring feature turns them
into token data. ``reward`` is the sum of the reward-function columns (the numeric columns
between ``completion`` and ``advantage``), NaN-skipping, as TRL sums them with its default
weights of 1; the per-function values are kept in ``extra`` and, with two or more reward
functions that all scored the completion, as ``reward_vector`` (file column order). Conversational completions
are stored as the concatenated message contents, conversational prompts as JSON.
``sample_id`` is the row index in the file, ``group_id`` the first row index of the same
prompt (TRL logs the G completions of a prompt as G rows with that prompt).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from ..errors import FormatError
from ._io import iter_parquet_batches, parquet_columns, parquet_file
from ._records import SequenceRows
from .registry import Chunk, Sample

_NAME = re.compile(r"^completions_\d+\.parquet$")
_NOT_REWARDS = {"step", "prompt", "completion", "advantage", "mode", "image", "images"}
_EVAL = {"eval", "val", "validation", "test"}


def _text(value, join: bool) -> str | None:
    """Plain text, or the text of a chat-message list."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        if join:
            return "".join(str(m.get("content") or "") for m in value)
        return json.dumps(value, ensure_ascii=False, default=str)
    return json.dumps(value, ensure_ascii=False, default=str)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _reward_columns(schema: pa.Schema) -> tuple[list[str], list[str]]:
    """(reward columns, other extra columns) of a completions file."""
    names = schema.names
    start = names.index("completion") + 1
    end = names.index("advantage") if "advantage" in names else len(names)
    rewards, extras = [], []
    for name in names:
        if name in _NOT_REWARDS:
            continue
        field = schema.field(name)
        between = start <= names.index(name) < end
        numeric = pa.types.is_floating(field.type) or pa.types.is_integer(field.type)
        (rewards if between and numeric else extras).append(name)
    return rewards, extras


def read(path: Path, ctx) -> Iterator[Chunk]:
    """Read one completions parquet file into sequence rows."""
    parquet = parquet_file(path)
    schema = parquet.schema_arrow
    missing = [c for c in ("prompt", "completion") if c not in schema.names]
    if missing:
        raise FormatError(f"column '{missing[0]}' is missing (columns: "
                          f"{', '.join(schema.names)})", path=path, field=missing[0])
    rewards, extras = _reward_columns(schema)
    ctx.note(reward_columns=rewards)
    folder_split = "val" if path.resolve().parent.name.lower() in _EVAL else "train"
    digits = re.findall(r"\d+", path.stem)
    file_step = int(digits[-1]) if digits else None
    sequences = SequenceRows()
    groups: dict[str, str] = {}
    row = 0
    for batch in iter_parquet_batches(path, parquet=parquet):
        for record in batch.to_pylist():
            number = row + 1
            step = record.get("step", file_step)
            if isinstance(step, str) and step.strip().lstrip("-").isdigit():
                step = int(step)  # older TRL logged the step as text
            if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
                ctx.reject(number, f"step {step!r} is not an integer", field="step")
                row += 1
                continue
            prompt = _text(record.get("prompt"), join=False)
            values = [_finite(record.get(name)) for name in rewards]
            present = [v for v in values if v is not None]
            reward = float(sum(present)) if present else None
            mode = record.get("mode")
            split = ("val" if str(mode).lower() in _EVAL else "train") if mode is not None \
                else folder_split
            group = groups.setdefault(prompt if prompt is not None else f"#{row}", str(row))
            extra = {name: _finite(record.get(name)) for name in rewards}
            extra.update({name: record.get(name) for name in extras})
            advantage = _finite(record.get("advantage"))
            # several reward functions are a reward vector (one entry per function, in the
            # file's column order), as Vector Policy Optimization reads them
            vector = values if len(values) > 1 and len(present) == len(values) else None
            sequences.add(step=step, split=split, sample_id=str(row), group_id=group,
                          prompt=prompt, completion=_text(record.get("completion"), join=True),
                          reward=reward, advantage=advantage, extra=extra or None,
                          reward_vector=vector)
            row += 1
        if sequences.full:
            yield Chunk("sequences", *sequences.take())
    taken = sequences.take()
    if taken is not None:
        yield Chunk("sequences", *taken)


def sniff(sample: Sample) -> float:
    if sample.head[:4] != b"PAR1" and sample.suffix != ".parquet":
        return 0.0
    try:
        names = parquet_columns(sample.path)
    except Exception:
        return 0.0
    if not {"prompt", "completion"} <= set(names):
        return 0.0
    # TRL builds the table from a dict: step, prompt, completion first (after an optional
    # mode), the reward columns, and advantage last
    lead = names[1:4] if names[:1] == ["mode"] else names[:3]
    if lead == ["step", "prompt", "completion"] and "advantage" in names[-2:]:
        return 0.9
    if _NAME.match(sample.path.name):
        return 0.85
    return 0.0
