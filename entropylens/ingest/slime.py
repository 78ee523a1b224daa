"""slime debug rollout dumps: ``rollout_data_{rollout_id}.pt``.

slime (THUDM's SGLang + Megatron RL framework) run with ``--save-debug-rollout-data PATH``
saves every rollout with ``torch.save(dict(rollout_id=..., samples=[s.to_dict() ...]), PATH)``
(``slime/ray/rollout.py``, ``_save_debug_rollout_data``; evaluation rollouts go to the path
formatted with ``eval_<id>``). Each sample is ``Sample.to_dict()`` of ``slime/utils/types.py``:
``group_index``, ``index``, ``prompt``, ``tokens`` (prompt and response token ids),
``response``, ``response_length`` (the response is the last ``response_length`` tokens),
``reward`` (a number or a dict of rewards), ``loss_mask`` and ``rollout_log_probs`` (one per
response token), ``status`` (``completed``, ``truncated``, ``aborted``...), ``label`` and
``metadata``.

Files are loaded with ``torch.load(..., weights_only=True)``: tensors and plain containers
only, never arbitrary unpickling (a file holding other Python objects is refused). PyTorch is
an optional dependency (``pip install 'entropylens[slime]'``), imported only to read.

Stored: one token row per response token the policy generated (``loss_mask`` 1; tool output
in multi-turn rollouts has 0), ``position`` counting them from 0; ``logprob`` the rollout
(SGLang) logprob, ``token_id`` the token; ``step`` the rollout id; ``split`` ``train``, or
``val`` for the ``eval_`` files; ``sample_id`` the sample ``index`` (else its place in the
file) and ``group_id`` its ``group_index``. Each sample also gives a sequences row: prompt
(chat messages as JSON), response, reward (the number; a dict of rewards goes to ``extra``),
token count and finish reason from the status. Whether SGLang's logprobs were taken after the
temperature is not in the file: the logprob basis stays ``unknown`` unless given.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Iterator

from ..errors import FormatError
from ._records import SequenceRows, TokenColumns
from .registry import Chunk, Sample

_EVAL_NAME = re.compile(r"(^|[^A-Za-z0-9])eval_\d+\.pt$", re.IGNORECASE)
_FINISH = {"completed": "stop", "truncated": "length", "aborted": "abort", "failed": "error"}
EXTRA = "slime"


def sniff(sample: Sample) -> float:
    """A ``.pt`` file in torch's zip layout (``<name>/data.pkl``), named like slime's dumps
    (``rollout..._<id>.pt``) or not; the pickle head must mention the sample fields."""
    if sample.is_dir or sample.suffix != ".pt" or not sample.head.startswith(b"PK"):
        return 0.0
    try:
        with zipfile.ZipFile(sample.path) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
            if not pickles:
                return 0.0
            head = archive.open(pickles[0]).read(64 * 1024)
    except (OSError, zipfile.BadZipFile, KeyError, RuntimeError):
        return 0.0
    if b"rollout_id" not in head or b"samples" not in head:
        return 0.0
    return 0.9 if b"response_length" in head or b"rollout_log_probs" in head else 0.6


def _torch():
    try:
        import torch
    except ImportError:
        raise FormatError("reading slime rollout dumps needs PyTorch: pip install "
                          f"'entropylens[{EXTRA}]'") from None
    return torch


def _load(path: Path) -> dict:
    torch = _torch()
    import pickle
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "Unsupported" in line or "global" in line),
                      first[0] if first else "")
        raise FormatError("refused: the file holds Python objects beyond tensors and plain "
                          "containers, and is only read with weights_only=True"
                          + (f" ({detail.strip()[:160]})" if detail else ""),
                          path=path) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:  # a damaged archive
        detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise FormatError(f"cannot read as a torch file: {type(exc).__name__}"
                          + (f": {detail}" if detail else ""), path=path) from None
    if not isinstance(data, dict) or not isinstance(data.get("samples"), list):
        raise FormatError("not a slime rollout dump: expected a dict with 'rollout_id' and a "
                          "'samples' list", path=path)
    return data


def _plain(value):
    """Tensors to Python lists and numbers (``tolist``), everything else as it is."""
    return value.tolist() if hasattr(value, "tolist") and not isinstance(value, (list, str)) \
        else value


def read(path: Path, ctx) -> Iterator[Chunk]:
    data = _load(path)
    rollout_id = _plain(data.get("rollout_id"))
    if not isinstance(rollout_id, int) or isinstance(rollout_id, bool):
        raise FormatError(f"'rollout_id' must be an integer, got {rollout_id!r}"[:200],
                          path=path, field="rollout_id")
    split = "val" if _EVAL_NAME.search(path.name) else "train"
    tokens = TokenColumns(split=split)
    sequences = SequenceRows()
    masked = 0
    for number, sample in enumerate(data["samples"]):
        if not isinstance(sample, dict):
            ctx.reject(number, "sample is not a dict (Sample.to_dict())")
            continue
        try:
            row = _sample_rows(sample, number)
        except ValueError as exc:
            ctx.reject(number, str(exc), field=getattr(exc, "field", None))
            continue
        sample_id, group_id, ids, logprobs, keep, sequence = row
        masked += len(keep) - sum(keep)
        ids = [t for t, k in zip(ids, keep) if k]
        logprobs = [v for v, k in zip(logprobs, keep) if k] if logprobs is not None else None
        if ids:
            tokens.add(sample_id, len(ids), step=rollout_id, group_id=group_id,
                       token_id=ids, logprob=logprobs)
        sequences.add(step=rollout_id, split=split, sample_id=sample_id, group_id=group_id,
                      **sequence)
        if tokens.full:
            yield Chunk("tokens", *tokens.take())
        if sequences.full:
            yield Chunk("sequences", *sequences.take())
    if masked:
        ctx.note(loss_masked_tokens_skipped=masked)
    ctx.note(framework="slime")
    for builder, kind in ((tokens, "tokens"), (sequences, "sequences")):
        taken = builder.take()
        if taken is not None:
            yield Chunk(kind, *taken)


class _FieldError(ValueError):
    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def _sample_rows(sample: dict, number: int):
    """The token and sequence values of one ``Sample.to_dict()``."""
    all_ids = _plain(sample.get("tokens"))
    n = _plain(sample.get("response_length"))
    if not isinstance(all_ids, list) or not all(isinstance(t, int) for t in all_ids):
        raise _FieldError("'tokens' must be a list of token ids", "tokens")
    if not isinstance(n, int) or not 0 <= n <= len(all_ids):
        raise _FieldError(f"'response_length' {n!r} does not fit the {len(all_ids)} tokens",
                          "response_length")
    ids = all_ids[len(all_ids) - n:]
    logprobs = _plain(sample.get("rollout_log_probs"))
    if logprobs is not None:
        if not isinstance(logprobs, list) or len(logprobs) != n:
            raise _FieldError(f"'rollout_log_probs' must hold one value per response token "
                              f"({n})", "rollout_log_probs")
        logprobs = [float(v) if v is not None else None for v in logprobs]
    mask = _plain(sample.get("loss_mask"))
    if mask is None:
        keep = [True] * n
    elif isinstance(mask, list) and len(mask) == n:
        keep = [bool(v) for v in mask]
    else:
        raise _FieldError(f"'loss_mask' must hold one value per response token ({n})",
                          "loss_mask")
    index = sample.get("index")
    sample_id = str(index) if index is not None else f"sample{number}"
    group = sample.get("group_index")
    group_id = str(group) if group is not None else None
    reward = _plain(sample.get("reward"))
    extra = {"status": sample.get("status"), "label": sample.get("label")}
    if isinstance(reward, dict):
        extra["reward"] = reward
        reward = None
    elif reward is not None and not isinstance(reward, (int, float)):
        raise _FieldError("'reward' must be a number or a dict of numbers", "reward")
    if sample.get("metadata"):
        extra["metadata"] = sample["metadata"]
    prompt = sample.get("prompt")
    if not isinstance(prompt, str) and prompt is not None:
        prompt = json.dumps(prompt, ensure_ascii=False, default=str)
    status = sample.get("status")
    sequence = {"prompt": prompt, "completion": sample.get("response"),
                "reward": float(reward) if reward is not None else None, "num_tokens": n,
                "finish_reason": _FINISH.get(status, status) if isinstance(status, str)
                else None, "extra": extra}
    return sample_id, group_id, ids, logprobs, keep, sequence
