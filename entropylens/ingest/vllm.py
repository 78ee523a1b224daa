"""vLLM offline inference: ``RequestOutput`` objects, their JSON dump, and their printed repr.

``LLM.generate(prompts, SamplingParams(logprobs=k))`` returns ``RequestOutput`` objects whose
``outputs[j].logprobs`` is a list with one ``dict[token_id, Logprob(logprob, rank,
decoded_token)]`` per generated token. vLLM puts the sampled token first in each dict and
then the top k by rank, so a position holds k entries when the sampled token is among the
top k and k+1 when it is not. entropylens keeps the sampled token's logprob and the true
top k only, sorted by rank (by logprob for old vLLM versions that logged bare floats).

Three ways in:

- :func:`from_vllm` ingests the objects straight from Python (vLLM need not be installed:
  any objects with the same attributes work).
- ``vllm_offline`` JSON Lines: one object per ``RequestOutput``, as written by
  :func:`dump_request_outputs`::

      {"request_id": "0", "prompt": "...", "prompt_token_ids": [...],
       "outputs": [{"index": 0, "text": "...", "token_ids": [785, 4462],
                    "cumulative_logprob": -0.1, "finish_reason": "stop",
                    "logprobs": [{"785": {"logprob": 0.0, "rank": 1, "decoded_token": "The"},
                                  "2": {"logprob": -Infinity, "rank": 2, "decoded_token": "#"}},
                                 ...]}],
       "step": 3}

  Keys are token ids as strings (JSON keys), ``-Infinity`` is Python's ``json`` spelling of
  -inf, and ``step`` (optional) is the training step. A ``Logprob`` may also be a bare float.
- the printed repr of ``outputs[j].logprobs`` (``[{785: Logprob(logprob=0.0, rank=1,
  decoded_token='The'), ...}, ...]``), one list per line, as pasted into bug reports; each
  line becomes one sample and the first key of each position is taken as the emitted token.

What is stored: ``sample_id`` ``<request_id>:<index>`` and ``group_id`` ``<request_id>`` (the
n samples of one prompt), ``token`` is vLLM's ``decoded_token`` as given, -inf logprobs
become nulls counted in the manifest, and the logprob basis is ``raw`` (vLLM's default
``logprobs_mode`` returns logprobs before temperature) unless told otherwise.
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from ..errors import EntropylensError, FormatError
from ._io import numbered_lines
from ._records import (SequenceRows, TokenColumns, first_mapping, first_record,
                       head_json_prefix, iter_json_records)
from .registry import Chunk, Sample, read_sample


# -- one request output -> rows ----------------------------------------------------------------

def _entry(value) -> tuple[float | None, int | None, str | None]:
    """``(logprob, rank, decoded_token)`` of a Logprob object, its JSON dict, or a float."""
    if value is None:
        return None, None, None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), None, None
    if isinstance(value, Mapping):
        return value.get("logprob"), value.get("rank"), value.get("decoded_token")
    return (getattr(value, "logprob", None), getattr(value, "rank", None),
            getattr(value, "decoded_token", None))


def _top_k(positions: list) -> int:
    """k of a sequence: positions hold k entries, or k+1 when the sampled token was added."""
    sizes = [len(p) for p in positions if p]
    if not sizes or max(sizes) <= 1:
        return 0  # logprobs=0: only the sampled token, no alternatives
    return min(sizes)


def _position_rows(positions: list, sampled_ids: list | None):
    """Per-token values of one sequence from its list of per-position dicts."""
    k = _top_k(positions)
    ids, texts, logprobs, lengths = [], [], [], []
    top_ids, top_texts, top_logprobs = [], [], []
    for i, entries in enumerate(positions):
        if not entries:
            ids.append(sampled_ids[i] if sampled_ids is not None else None)
            texts.append(None)
            logprobs.append(None)
            lengths.append(None)
            continue
        items = [(int(key), *_entry(value)) for key, value in entries.items()]
        sampled = sampled_ids[i] if sampled_ids is not None else items[0][0]
        ids.append(sampled)
        chosen = next((item for item in items if item[0] == sampled), None)
        logprobs.append(chosen[1] if chosen else None)
        texts.append(chosen[3] if chosen else None)
        if not k:
            lengths.append(None)
            continue
        if all(item[2] is not None for item in items):
            ranked = sorted((item for item in items if item[2] <= k), key=lambda item: item[2])
        else:  # bare floats (old vLLM): the k most likely
            ranked = sorted(items, key=lambda item: -(item[1] if item[1] is not None
                                                      else -math.inf))[:k]
        lengths.append(len(ranked))
        top_ids.extend(item[0] for item in ranked)
        top_logprobs.extend(item[1] for item in ranked)
        top_texts.extend(item[3] for item in ranked)
    has_text = any(t is not None for t in top_texts)
    return dict(token_id=ids, token=texts, logprob=logprobs, top_lengths=lengths,
                top_ids=top_ids, top_tokens=top_texts if has_text else None,
                top_logprobs=top_logprobs, k=k)


def _get(obj, name, default=None):
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _add_request(request, tokens: TokenColumns, sequences: SequenceRows, *, step=None,
                 split: str = "inference", fallback_id: str = "0") -> list[int]:
    """Append every completion of one RequestOutput (object or JSON dict); returns the k of
    each completion that logged alternatives."""
    request_id = _get(request, "request_id")
    request_id = str(request_id) if request_id is not None else fallback_id
    step = _get(request, "step", step) if isinstance(request, Mapping) else step
    ks = []
    outputs = _get(request, "outputs")
    if outputs is None:
        raise ValueError("no 'outputs'")
    for j, output in enumerate(outputs):
        index = _get(output, "index", j)
        sample_id = f"{request_id}:{index}"
        token_ids = _get(output, "token_ids")
        token_ids = [int(t) for t in token_ids] if token_ids is not None else None
        positions = _get(output, "logprobs")
        n = 0
        if positions is not None:
            positions = list(positions)
            if token_ids is not None and len(token_ids) != len(positions):
                raise ValueError(f"output {index}: {len(token_ids)} token_ids but "
                                 f"{len(positions)} logprob positions")
            rows = _position_rows(positions, token_ids)
            k = rows.pop("k")
            if k:
                ks.append(k)
            n = len(positions)
            tokens.add(sample_id, n, step=step, split=split, group_id=request_id, **rows)
        elif token_ids is not None:
            n = len(token_ids)
            tokens.add(sample_id, n, step=step, split=split, group_id=request_id,
                       token_id=token_ids)
        finish = _get(output, "finish_reason")
        cumulative = _get(output, "cumulative_logprob")
        extra = {"request_id": request_id, "index": index}
        if cumulative is not None and math.isfinite(float(cumulative)):
            extra["cumulative_logprob"] = float(cumulative)
        sequences.add(step=step, split=split, sample_id=sample_id, group_id=request_id,
                      prompt=_get(request, "prompt"), completion=_get(output, "text"),
                      num_tokens=n or (len(token_ids) if token_ids is not None else None),
                      finish_reason=str(finish) if finish is not None else None, extra=extra)
    return ks


# -- JSON dump and repr files ------------------------------------------------------------------

def _json_records(path: Path, ctx) -> Iterator[Chunk]:
    tokens = TokenColumns(split="inference")
    sequences = SequenceRows()
    ks: set[int] = set()
    with ctx.open() as fh:
        for number, record in iter_json_records(fh, ctx):
            if not isinstance(record, dict):
                ctx.reject(number, "expected a JSON object (one RequestOutput)")
                continue
            try:
                ks.update(_add_request(_keys_as_ids(record, number), tokens, sequences,
                                       fallback_id=f"line{number}"))
            except (ValueError, TypeError, AttributeError) as exc:
                ctx.reject(number, str(exc), field="outputs")
                continue
            yield from _full_chunks(tokens, sequences)
    _note_k(ctx, ks)
    yield from _last_chunks(tokens, sequences)


def _keys_as_ids(record: dict, number: int) -> dict:
    """Check that logprob dict keys are token ids (JSON object keys are strings)."""
    for output in record.get("outputs") or ():
        for position in (output.get("logprobs") or ()) if isinstance(output, dict) else ():
            if position is None:
                continue
            if not isinstance(position, dict):
                raise ValueError("each logprobs position must be an object {token_id: ...}")
            for key in position:
                if not str(key).lstrip("-").isdigit():
                    raise ValueError(f"logprobs key {key!r} is not a token id")
    return record


def _repr_records(path: Path, ctx) -> Iterator[Chunk]:
    tokens = TokenColumns(split="inference")
    sequences = SequenceRows()
    ks: set[int] = set()
    with ctx.open() as fh:
        for number, line in numbered_lines(fh):
            text = line.decode("utf-8", errors="replace").strip()
            if not text or text.startswith("#"):
                continue
            try:
                positions = _literal(ast.parse(text, mode="eval").body)
            except (SyntaxError, ValueError) as exc:
                ctx.reject(number, f"not a vLLM logprobs repr: {exc}")
                continue
            if not isinstance(positions, list) or not all(
                    p is None or isinstance(p, dict) for p in positions):
                ctx.reject(number, "expected a list of {token_id: Logprob(...)} per position")
                continue
            request = {"request_id": f"line{number}",
                       "outputs": [{"index": 0, "logprobs": positions}]}
            ks.update(_add_request(request, tokens, sequences))
            yield from _full_chunks(tokens, sequences)
    _note_k(ctx, ks)
    yield from _last_chunks(tokens, sequences)


_NAMES = {"inf": math.inf, "nan": math.nan, "None": None, "True": True, "False": False}


def _literal(node):
    """Evaluate a repr made of literals, ``inf``/``nan`` and ``Logprob(...)`` calls only."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Name) and node.id in _NAMES:
        return _NAMES[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
            and node.func.id == "Logprob" and not node.args:
        return {kw.arg: _literal(kw.value) for kw in node.keywords}
    raise ValueError(f"unexpected {type(node).__name__} in the repr")


def _full_chunks(tokens: TokenColumns, sequences: SequenceRows) -> Iterator[Chunk]:
    if tokens.full:
        yield Chunk("tokens", *tokens.take())
    if sequences.full:
        yield Chunk("sequences", *sequences.take())


def _last_chunks(tokens: TokenColumns, sequences: SequenceRows) -> Iterator[Chunk]:
    for builder, kind in ((tokens, "tokens"), (sequences, "sequences")):
        taken = builder.take()
        if taken is not None:
            yield Chunk(kind, *taken)


def _note_k(ctx, ks: set[int]) -> None:
    if ks:
        ctx.note(top_k=max(ks))


def _is_repr(sample: Sample) -> bool:
    text = sample.text
    return "Logprob(logprob=" in text or any(
        line.lstrip().startswith("[{") and ": Logprob(" in line for line in sample.lines(5))


def read(path: Path, ctx) -> Iterator[Chunk]:
    """Read a vLLM JSON dump (JSON Lines or one document) or a logprobs repr file."""
    ctx.note(logprob_basis="raw")
    if _is_repr(read_sample(path)):
        yield from _repr_records(path, ctx)
    else:
        yield from _json_records(path, ctx)


def sniff(sample: Sample) -> float:
    if _is_repr(sample):
        return 0.9
    record = first_mapping(first_record(sample))
    if record is None:
        # a first record longer than the sniff head
        prefix = head_json_prefix(sample)
        if prefix.startswith("{") and '"outputs":[{' in prefix and '"token_ids":[' in prefix \
                and ('"request_id":' in prefix or '"logprobs":' in prefix):
            return 0.85
        return 0.0
    outputs = record.get("outputs")
    if isinstance(outputs, list) and outputs and isinstance(outputs[0], dict):
        output = outputs[0]
        if "token_ids" in output and ("logprobs" in output or "text" in output):
            return 0.9
    return 0.0




# -- Python API ------------------------------------------------------------------------------

def _plain(value):
    """JSON-ready copy of a Logprob (dict) or number."""
    logprob, rank, decoded = _entry(value)
    if rank is None and decoded is None:
        return logprob
    return {"logprob": logprob, "rank": rank, "decoded_token": decoded}


def request_output_to_dict(request, *, step: int | None = None) -> dict:
    """One ``RequestOutput`` as the JSON shape ``vllm_offline`` reads (see the module doc)."""
    outputs = []
    for j, output in enumerate(_get(request, "outputs") or ()):
        positions = _get(output, "logprobs")
        token_ids = _get(output, "token_ids")
        outputs.append({
            "index": _get(output, "index", j),
            "text": _get(output, "text"),
            "token_ids": [int(t) for t in token_ids] if token_ids is not None else None,
            "cumulative_logprob": _get(output, "cumulative_logprob"),
            "finish_reason": _get(output, "finish_reason"),
            "logprobs": None if positions is None else [
                None if p is None else {str(int(k)): _plain(v) for k, v in p.items()}
                for p in positions],
        })
    record = {"request_id": _get(request, "request_id"), "prompt": _get(request, "prompt"),
              "prompt_token_ids": _get(request, "prompt_token_ids"), "outputs": outputs}
    if step is not None:
        record["step"] = step
    prompt_ids = record["prompt_token_ids"]
    if prompt_ids is not None:
        record["prompt_token_ids"] = [int(t) for t in prompt_ids]
    return record


def dump_request_outputs(outputs: Iterable, path: str | Path, *,
                         step: int | None = None) -> Path:
    """Write ``RequestOutput`` objects as ``vllm_offline`` JSON Lines (one per request).

    -inf logprobs are written as ``-Infinity`` (what Python's ``json`` writes), which the
    reader turns into null logprobs counted in the manifest.
    """
    path = Path(path)
    with open(path, "w", encoding="utf-8") as fh:
        for request in outputs:
            fh.write(json.dumps(request_output_to_dict(request, step=step),
                                ensure_ascii=False) + "\n")
    return path


def from_vllm(outputs: Iterable, out, *, run: str, step: int | None = None,
              temperature: float | None = None, split: str = "inference",
              logprob_basis: str = "raw", vocab_size: int | None = None,
              replace: bool = False) -> str:
    """Ingest vLLM ``RequestOutput`` objects (from ``LLM.generate``) into a store.

    Duck-typed: any objects with ``request_id``, ``prompt`` and ``outputs`` (each with
    ``index``, ``text``, ``token_ids``, ``logprobs``, ``finish_reason``) work, so vLLM need
    not be installed.

    Parameters
    ----------
    outputs : iterable of RequestOutput
        Consumed once; memory stays bounded by one chunk of tokens.
    out : path or Store
        The store (created when missing).
    run : str
        Run name.
    step : int, optional
        Training step of these generations (null for pure inference).
    temperature : float, optional
        The ``SamplingParams.temperature`` used (RequestOutput does not carry it).
    split : {"inference", "train", "val"}
    logprob_basis : {"raw", "tempered", "unknown"}
        ``raw`` for vLLM's default ``logprobs_mode``; ``tempered`` when vLLM ran with
        ``logprobs_mode="processed_logprobs"``.
    vocab_size : int, optional
        Vocabulary size V for the top-k entropy bounds.
    replace : bool
        Overwrite an existing run of that name.

    Returns
    -------
    str
        The run written.
    """
    from ..store import Store
    from .driver import LOGPROB_BASES, _clean_tokens

    if logprob_basis not in LOGPROB_BASES:
        raise EntropylensError(f"logprob basis must be one of {', '.join(LOGPROB_BASES)}")
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise EntropylensError(f"temperature must be positive, got {temperature}")
    store = out if isinstance(out, Store) else Store.create(out)
    writer = store.write_run(run, replace=replace)
    source = "python:vllm.RequestOutput"
    try:
        tokens = TokenColumns(split=split)
        sequences = SequenceRows()
        ks: set[int] = set()
        counts = writer.manifest["counts"]

        def flush(chunks):
            for kind, table, offset in chunks:
                if kind == "tokens":
                    table, sentinels = _clean_tokens(table)
                    for key, n in sentinels.items():
                        counts[key] = counts.get(key, 0) + n
                    writer.write_tokens(table, path=source, row_offset=offset)
                else:
                    writer.write_sequences(table, path=source, row_offset=offset)

        for number, request in enumerate(outputs, start=1):
            try:
                ks.update(_add_request(request, tokens, sequences, step=step, split=split,
                                       fallback_id=str(number - 1)))
            except (ValueError, TypeError, AttributeError) as exc:
                raise FormatError(f"request output {number}: {exc}", path=source) from None
            flush(_full_chunks(tokens, sequences))
        flush(_last_chunks(tokens, sequences))
        if not writer.counts["sequences"]:
            raise FormatError("no request outputs given", path=source)
        writer.add_source(source, format="vllm_offline")
        writer.manifest.update(temperature=temperature, logprob_basis=logprob_basis,
                               vocab_size=vocab_size)
        if ks:
            writer.manifest["top_k"] = max(ks)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return run


__all__ = ["dump_request_outputs", "from_vllm", "request_output_to_dict"]
