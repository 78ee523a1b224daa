"""NeMo-RL per-step training data: ``train_data_step<N>.jsonl`` (and ``val_data_step<N>``).

NeMo-RL's GRPO loop logs its batch with ``Logger.log_batched_dict_as_jsonl(log_data,
f"train_data_step{step}.jsonl")`` (``nemo_rl/algorithms/grpo.py``, ``nemo_rl/utils/logger.py``):
one line per sample, written from a micro-batch of size one, so every field keeps a leading
batch dimension of one (``"rewards": [0.5]``, ``"token_ids": [[...]]``), plus ``"idx"``.
Fields: ``content``, ``rewards``, ``input_lengths``, ``token_ids``, ``token_loss_mask``,
``sample_loss_mask``, ``advantages``, ``generation_logprobs``, ``prev_logprobs`` (and
``agent_ref``, ``filtered_rewards`` in some configurations). Token arrays cover prompt and
response, padded to the batch's longest sequence; ``input_lengths`` gives the real length.

Stored: one token row per ``token_loss_mask`` token within ``input_lengths``, ``position``
counting them from 0; ``logprob`` is ``generation_logprobs`` (the sampling policy's, from
logits/T: basis ``tempered``), ``advantage`` per token, ``step`` from the file name,
``split`` train (val for ``val_data_step``), ``sample_id`` the line's ``idx``. Each line
also gives a sequences row (reward, token count, and the logged ``content`` in ``extra``).
Older versions logged no token ids or masks; their files give sequences only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

from ._records import (SequenceRows, TokenColumns, as_float, first_mapping, first_record,
                       iter_json_records)
from .registry import Chunk, Sample

_NAME = re.compile(r"^(train|val)_data_step(\d+)\.jsonl(\.gz|\.zst)?$")
_TOKEN_FIELDS = ("token_ids", "token_loss_mask", "generation_logprobs", "advantages",
                 "prev_logprobs")


def _unbatch(value):
    """Drop the leading batch dimension of one that the micro-batch iterator leaves."""
    if isinstance(value, list) and len(value) == 1:
        return value[0]
    return value


def _content_text(content) -> str | None:
    if content is None:
        return None
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(c, str) for c in content):
        return "".join(content)
    return json.dumps(content, ensure_ascii=False, default=str)


class _FieldError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _add_record(record: dict, number: int, step: int | None, split: str,
                tokens: TokenColumns, sequences: SequenceRows) -> bool:
    """Append one sample; returns whether it had token data."""
    idx = record.get("idx")
    sample_id = str(idx) if idx is not None else f"line{number}"
    reward = as_float(_unbatch(record.get("rewards")))
    length = _unbatch(record.get("input_lengths"))
    token_ids = _unbatch(record.get("token_ids"))
    mask = _unbatch(record.get("token_loss_mask"))
    kept = 0
    has_tokens = isinstance(token_ids, list) and isinstance(mask, list)
    if has_tokens:
        n = len(token_ids)
        if length is not None:
            if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= n:
                raise _FieldError("input_lengths", f"{length!r} is not a length within the "
                                  f"{n} logged tokens")
            n = length
        arrays = {}
        for name in _TOKEN_FIELDS:
            values = _unbatch(record.get(name))
            if values is None:
                continue
            if not isinstance(values, list) or len(values) < n:
                got = len(values) if isinstance(values, list) else type(values).__name__
                raise _FieldError(name, f"has {got} values for {n} tokens")
            arrays[name] = values
        keep = [i for i in range(n) if mask[i]]
        kept = len(keep)

        def column(name):
            values = arrays.get(name)
            return [as_float(values[i]) for i in keep] if values is not None else None

        tokens.add(sample_id, kept, step=step, split=split,
                   token_id=[token_ids[i] for i in keep], logprob=column("generation_logprobs"),
                   advantage=column("advantages"))
    extra = {"content": _content_text(_unbatch(record.get("content")))}
    for key in ("sample_loss_mask", "filtered_rewards", "agent_ref"):
        if record.get(key) is not None:
            extra[key] = _unbatch(record.get(key))
    advantages = _unbatch(record.get("advantages"))
    advantage = None
    if has_tokens and isinstance(advantages, list):
        advantage = next((as_float(advantages[i]) for i in range(len(mask))
                          if i < len(advantages) and mask[i]), None)
    sequences.add(step=step, split=split, sample_id=sample_id, reward=reward,
                  advantage=advantage, num_tokens=kept if has_tokens else None, extra=extra)
    return has_tokens


def read(path: Path, ctx) -> Iterator[Chunk]:
    """Stream one ``train_data_step<N>.jsonl`` file."""
    ctx.note(logprob_basis="tempered", logprob_source="generation_logprobs")
    match = _NAME.match(path.name)
    split = "val" if match and match.group(1) == "val" else "train"
    step = int(match.group(2)) if match else None
    if step is None:
        digits = re.findall(r"\d+", path.name)
        step = int(digits[-1]) if digits else None
    tokens = TokenColumns(split=split)
    sequences = SequenceRows()
    without_tokens = 0
    with ctx.open() as fh:
        for number, record in iter_json_records(fh, ctx):
            if not isinstance(record, dict):
                ctx.reject(number, "expected a JSON object (one logged sample)")
                continue
            try:
                if not _add_record(record, number, step, split, tokens, sequences):
                    without_tokens += 1
            except _FieldError as exc:
                ctx.reject(number, str(exc), field=exc.field)
                continue
            except (ValueError, TypeError, IndexError) as exc:
                ctx.reject(number, str(exc))
                continue
            if tokens.full:
                yield Chunk("tokens", *tokens.take())
            if sequences.full:
                yield Chunk("sequences", *sequences.take())
    if without_tokens:
        ctx.note(samples_without_token_data=without_tokens)
    for builder, kind in ((tokens, "tokens"), (sequences, "sequences")):
        taken = builder.take()
        if taken is not None:
            yield Chunk(kind, *taken)


def sniff(sample: Sample) -> float:
    named = bool(_NAME.match(sample.path.name))
    record = first_mapping(first_record(sample))
    if record is not None:
        if "generation_logprobs" in record and ("token_loss_mask" in record
                                                or "input_lengths" in record):
            return 0.95
        if named and ("rewards" in record or "content" in record):
            return 0.85
        return 0.0
    head = sample.text[:8192]
    if named and head.startswith("{") and ('"generation_logprobs":' in head
                                           or '"content":' in head):
        return 0.85
    return 0.0
