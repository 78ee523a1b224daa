"""verl rollout dumps: ``trainer.rollout_data_dir/{step}.jsonl`` (and validation dumps).

``RayPPOTrainer._dump_generations`` (``verl/trainer/ppo/ray_trainer.py``) writes one
``json.dumps(entry, ensure_ascii=False)`` line per sample with ``input`` (decoded prompt),
``output`` (decoded response), ``gts`` (ground truth, newer versions), ``score`` (sequence
reward), ``step``, and every reward-function extra whose list has one value per sample
(``acc``, ``pred``, ...). ``trainer.validation_data_dir`` receives the same shape.

These files hold text only: they fill the sequences table (``prompt``, ``completion``,
``reward``, ``step``; the rest as JSON in ``extra``); the rescoring feature turns them into
token data. ``sample_id`` is the line's index in its file (from 0), ``group_id`` verl's
``uid`` where a reward extra logged it, and ``split`` is ``val`` when the file's folder is
named like a validation folder, else ``train``. ``final_answer`` is the reward extra
``pred`` (the answer ``verl.utils.reward_score.math_dapo.compute_score`` extracted).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from ._records import SequenceRows, as_float, first_mapping, first_record, iter_json_records
from .registry import Chunk, Sample

_KNOWN = ("input", "output", "score", "step")
_VAL_FOLDER = re.compile(r"(^|[_\-.])(val|valid|validation|eval|test)([_\-.]|$)",
                         re.IGNORECASE)


def _split_of(path: Path) -> str:
    return "val" if _VAL_FOLDER.search(path.resolve().parent.name) else "train"


def read(path: Path, ctx) -> Iterator[Chunk]:
    """Stream one verl rollout dump into sequence rows."""
    split = _split_of(path)
    stem = path.name.split(".")[0]
    file_step = int(stem) if stem.isdigit() else None
    sequences = SequenceRows()
    index = 0
    with ctx.open() as fh:
        for number, record in iter_json_records(fh, ctx):
            if not isinstance(record, dict):
                ctx.reject(number, "expected a JSON object (one dumped sample)")
                continue
            if "output" not in record:
                ctx.reject(number, "no 'output' (the decoded response)", field="output")
                continue
            step = record.get("step", file_step)
            if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
                ctx.reject(number, f"step {step!r} is not an integer", field="step")
                continue
            score = record.get("score")
            reward = as_float(score)
            if score is not None and reward is None:
                ctx.reject(number, f"score {score!r} is not a number", field="score")
                continue
            extra = {k: v for k, v in record.items() if k not in _KNOWN}
            uid = record.get("uid")
            sequences.add(step=step, split=split, sample_id=str(index),
                          group_id=str(uid) if uid is not None else None,
                          prompt=_text(record.get("input")), completion=_text(record["output"]),
                          reward=reward, extra=extra or None, final_answer=_answer(record))
            index += 1
            if sequences.full:
                yield Chunk("sequences", *sequences.take())
    taken = sequences.take()
    if taken is not None:
        yield Chunk("sequences", *taken)


def _answer(record: dict) -> str | None:
    """The reward function's extracted answer: ``pred`` of ``math_dapo.compute_score``
    (``{"score", "acc", "pred"}``, ``"[INVALID]"`` when it found none)."""
    pred = record.get("pred")
    if pred is None or pred == "[INVALID]" or isinstance(pred, (dict, list)):
        return None
    return str(pred)


def _text(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    import json
    return json.dumps(value, ensure_ascii=False, default=str)


def sniff(sample: Sample) -> float:
    record = first_mapping(first_record(sample))
    if record is None or not isinstance(record.get("output"), (str, type(None))):
        return 0.0
    if "input" in record and "output" in record and ("score" in record or "step" in record):
        return 0.9 if sample.path.name.split(".")[0].isdigit() else 0.85
    return 0.0
