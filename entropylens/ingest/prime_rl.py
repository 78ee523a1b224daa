"""prime-rl token exports: ``token_exports/step_<s>/rank_<r>.jsonl``.

With ``enable_token_export`` the prime-rl trainer writes one JSON line per packed training
sequence (``src/prime_rl/trainer/rl/token_export.py``, ``TokenExporter``): sequence metadata
(``schema_version``, ``step``, ``export_step``, ``rank``, ``micro_step``,
``micro_sequence_idx``, ``export_sequence_idx``, ``run_id``, ``env_name``, and in schema 2
``sample_id``) and aligned per-token arrays over prompt and completion: ``token_ids``,
``position_ids``, ``loss_mask``, ``advantages``, ``rewards``, ``inference_logprobs``,
``trainer_logprobs``, ``entropy``, ``mismatch_kl``, ... (schema 2 adds ``temperatures``).
Non-finite values are written as null (``_json_float``). Multi-run trainers write under
``<output_dir>/<run_id>/token_exports``, and a step folder gets a ``STABLE`` marker once every
rank has flushed.

Stored: one token row per ``loss_mask`` token (the generated tokens that are trained on),
``position`` counting them from 0 within the sequence; ``entropy`` is the trainer's exact
entropy, ``logprob`` the inference (sampling) logprob, ``advantage`` per token, ``step`` the
``export_step`` (the run's own step), ``split`` train, ``sample_id`` the exported
``sample_id`` or ``<rank>-<export_sequence_idx>``; rows of different ``run_id`` go to
separate runs. The logprobs are computed from logits/T (basis ``tempered``); the
temperature is read from ``temperatures`` where exported. Each sequence also gives a
sequences row (reward, advantage, token count, environment).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from ..errors import FormatError
from ._records import (SequenceRows, TokenColumns, as_float, first_mapping, first_record,
                       iter_json_records)
from .registry import Chunk, Sample

_ARRAYS = ("token_ids", "loss_mask", "inference_logprobs", "trainer_logprobs", "entropy",
           "advantages", "rewards", "temperatures")
_STEP_DIR = re.compile(r"^step_(\d+)$")
_RANK_FILE = re.compile(r"^rank_(\d+)\.jsonl(\.gz|\.zst)?$")


def _first_value(values, indices):
    for i in indices:
        value = values[i]
        if value is not None:
            return value
    return None


def _add_record(record: dict, tokens: TokenColumns, sequences: SequenceRows, ctx,
                number: int, state: dict) -> None:
    token_ids = record.get("token_ids")
    mask = record.get("loss_mask")
    if not isinstance(token_ids, list) or not isinstance(mask, list):
        raise ValueError("'token_ids' and 'loss_mask' must be lists")
    n = len(token_ids)
    arrays = {}
    for name in _ARRAYS:
        values = record.get(name)
        if values is None:
            continue
        if not isinstance(values, list) or len(values) != n:
            got = len(values) if isinstance(values, list) else type(values).__name__
            raise _FieldError(name, f"has {got} values for {n} tokens")
        arrays[name] = values
    keep = [i for i, m in enumerate(mask) if m]
    step = record.get("export_step")
    if step is None:
        step = record.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise _FieldError("step", f"{step!r} is not an integer")
    rank = record.get("rank", 0)
    sample_id = record.get("sample_id")
    if not sample_id:
        index = record.get("export_sequence_idx")
        if index is None:
            index = f"{record.get('micro_step')}-{record.get('micro_sequence_idx')}"
        sample_id = f"{rank}-{index}"
    run_id = record.get("run_id")

    def column(name, convert=None):
        values = arrays.get(name)
        if values is None:
            return None
        picked = [values[i] for i in keep]
        return [convert(v) for v in picked] if convert else picked

    temperatures = arrays.get("temperatures")
    if temperatures is not None and keep and "temperature" not in state:
        value = as_float(temperatures[keep[0]])
        if value is not None:
            state["temperature"] = value
    advantages = column("advantages", as_float)
    tokens.add(str(sample_id), len(keep), step=step, token_id=column("token_ids"),
               logprob=column("inference_logprobs", as_float),
               entropy=column("entropy", as_float), advantage=advantages, run=run_id)
    rewards = arrays.get("rewards")
    extra = {k: record.get(k) for k in ("env_name", "rank", "micro_step", "micro_sequence_idx",
                                        "export_sequence_idx", "schema_version")
             if record.get(k) is not None}
    sequences.add(step=step, split="train", sample_id=str(sample_id),
                  reward=as_float(_first_value(rewards, keep)) if rewards else None,
                  advantage=_first_value(advantages, range(len(advantages)))
                  if advantages else None,
                  num_tokens=len(keep), extra=extra, _run=run_id)


class _FieldError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _read_file(ctx, tokens: TokenColumns, sequences: SequenceRows,
               state: dict) -> Iterator[Chunk]:
    """Read the file at ``ctx.path`` (with a progress bar; rejections name that file)."""
    with ctx.open() as fh:
        for number, record in iter_json_records(fh, ctx):
            if not isinstance(record, dict):
                ctx.reject(number, "expected a JSON object (one exported sequence)")
                continue
            try:
                _add_record(record, tokens, sequences, ctx, number, state)
            except _FieldError as exc:
                ctx.reject(number, str(exc), field=exc.field)
                continue
            except (ValueError, TypeError) as exc:
                ctx.reject(number, str(exc))
                continue
            if tokens.full:
                yield Chunk("tokens", *tokens.take())
            if sequences.full:
                yield Chunk("sequences", *sequences.take())


def _export_files(folder: Path) -> list[tuple[int, int, Path]]:
    """``(step, rank, file)`` of every rank file below ``folder``, in step and rank order."""
    root = folder / "token_exports" if (folder / "token_exports").is_dir() else folder
    files = []
    step_dirs = [root] if _STEP_DIR.match(root.name) else list(root.iterdir())
    for step_dir in step_dirs:
        match = _STEP_DIR.match(step_dir.name)
        if not match or not step_dir.is_dir():
            continue
        for file in step_dir.iterdir():
            rank = _RANK_FILE.match(file.name)
            if rank and file.is_file():
                files.append((int(match.group(1)), int(rank.group(1)), file))
    return sorted(files)


def read(path: Path, ctx) -> Iterator[Chunk]:
    """Read one rank file, or a whole ``token_exports`` folder in step and rank order."""
    ctx.note(logprob_basis="tempered", logprob_source="inference_logprobs",
             entropy_source="trainer forward pass (exact)")
    tokens = TokenColumns(split="train")
    sequences = SequenceRows()
    state: dict = {}
    if path.is_dir():
        files = _export_files(path)
        if not files:
            raise FormatError("no step_<s>/rank_<r>.jsonl files in this folder", path=path)
        steps = sorted({step for step, _, _ in files})
        stable = [s for s in steps if any((f.parent / "STABLE").exists()
                                          for st, _, f in files if st == s)]
        if stable and len(stable) < len(steps):
            ctx.note(steps_without_stable_marker=[s for s in steps if s not in stable])
        try:
            for _, _, file in files:
                ctx.path = file  # progress and error messages name the rank file
                yield from _read_file(ctx, tokens, sequences, state)
        finally:
            ctx.path = path
    else:
        yield from _read_file(ctx, tokens, sequences, state)
    if "temperature" in state:
        ctx.note(temperature=state["temperature"])
    for builder, kind in ((tokens, "tokens"), (sequences, "sequences")):
        taken = builder.take()
        if taken is not None:
            yield Chunk(kind, *taken)


def _looks_like_export(record) -> bool:
    record = first_mapping(record)
    return record is not None and "loss_mask" in record and "token_ids" in record and (
        "inference_logprobs" in record or "entropy" in record)


def sniff(sample: Sample) -> float:
    if sample.is_dir:
        path = sample.path
        root = path / "token_exports" if (path / "token_exports").is_dir() else path
        step_dirs = [root] if _STEP_DIR.match(root.name) else list(root.glob("step_*"))[:50]
        for step_dir in step_dirs:
            if _STEP_DIR.match(step_dir.name) and any(
                    _RANK_FILE.match(f.name) for f in step_dir.glob("rank_*")):
                return 0.9
        return 0.0
    if _looks_like_export(first_record(sample)):
        return 0.95
    # a first line longer than the sniff head: recognise the fixed leading keys
    head = sample.text[:4096]
    if head.startswith('{"schema_version":') and '"export_step":' in head \
            and '"micro_sequence_idx":' in head:
        return 0.9
    return 0.0
