"""SGLang native ``/generate`` responses with ``return_logprob=True``.

Each response is ``{"text", "output_ids", "meta_info": {...}}`` (a list of them for batched
prompts or ``n > 1``), saved one per line or as one JSON document. ``meta_info`` holds
``output_token_logprobs``, one ``[logprob, token_id, text]`` triple per generated token
(``text`` is null unless ``return_text_in_logprobs`` was set) and ``output_top_logprobs``,
one list of such triples per token (null where ``top_logprobs_num`` was 0). The
``input_token_logprobs`` of the prompt (whose first entry has a null logprob) are not
generated tokens and are not stored. Source: ``python/sglang/srt/managers/
tokenizer_manager.py`` (``convert_logprob_style`` / ``detokenize_logprob_tokens``).

Stored: ``sample_id`` is ``meta_info.id`` (line and position in the line where absent),
``split`` ``inference``; SGLang's logprobs are computed after temperature scaling unless
the server ran with ``SGLANG_RETURN_ORIGINAL_LOGPROB``, so the basis is ``tempered``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

from ._records import (SequenceRows, TokenColumns, as_float, first_mapping, first_record,
                       head_json_prefix, iter_json_records)
from .registry import Chunk, Sample


def _triple(entry, where: str):
    """``(logprob, token_id, text)`` of one ``[logprob, token_id, text]`` entry."""
    if not isinstance(entry, (list, tuple)) or len(entry) < 2:
        raise ValueError(f"{where}: expected [logprob, token_id, text], got {entry!r:.80}")
    text = entry[2] if len(entry) > 2 else None
    token_id = entry[1]
    if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int)):
        raise ValueError(f"{where}: token id {token_id!r} is not an integer")
    return as_float(entry[0]), token_id, text


def _add_response(response: dict, sample_id: str, tokens: TokenColumns) -> int:
    meta = response.get("meta_info")
    if not isinstance(meta, dict):
        raise ValueError("no 'meta_info' object")
    sampled = meta.get("output_token_logprobs")
    if sampled is None:
        ids = response.get("output_ids")
        if isinstance(ids, list) and ids:
            tokens.add(sample_id, len(ids), token_id=ids)
            return len(ids)
        return 0
    if not isinstance(sampled, list):
        raise ValueError("'output_token_logprobs' is not a list")
    tops = meta.get("output_top_logprobs")
    if tops is not None and (not isinstance(tops, list) or len(tops) != len(sampled)):
        raise ValueError("'output_top_logprobs' does not have one entry per token")
    n = len(sampled)
    ids, texts, logprobs = [], [], []
    for i, entry in enumerate(sampled):
        logprob, token_id, text = _triple(entry, f"output_token_logprobs[{i}]")
        logprobs.append(logprob)
        ids.append(token_id)
        texts.append(text)
    lengths, top_ids, top_texts, top_lps = [], [], [], []
    if tops is not None:
        for i, position in enumerate(tops):
            if not position:
                lengths.append(None)
                continue
            entries = [_triple(e, f"output_top_logprobs[{i}]") for e in position]
            entries.sort(key=lambda e: -(e[0] if e[0] is not None and not math.isnan(e[0])
                                         else -math.inf))
            lengths.append(len(entries))
            top_lps.extend(e[0] for e in entries)
            top_ids.extend(e[1] for e in entries)
            top_texts.extend(e[2] for e in entries)
    has_text = any(t is not None for t in texts)
    tokens.add(sample_id, n, token_id=ids, token=texts if has_text else None,
               logprob=logprobs, top_lengths=lengths if tops is not None else None,
               top_ids=top_ids if tops is not None else None,
               top_tokens=top_texts if tops is not None and any(
                   t is not None for t in top_texts) else None,
               top_logprobs=top_lps if tops is not None else None)
    return n


def read(path: Path, ctx) -> Iterator[Chunk]:
    """Stream SGLang ``/generate`` responses into token and sequence chunks."""
    ctx.note(logprob_basis="tempered")
    tokens = TokenColumns(split="inference")
    sequences = SequenceRows()
    ks: set[int] = set()
    last_number, within = None, 0
    with ctx.open() as fh:
        for number, response in iter_json_records(fh, ctx):
            within = within + 1 if number == last_number else 0
            last_number = number
            if not isinstance(response, dict):
                ctx.reject(number, "expected a JSON object (one /generate response)")
                continue
            meta = response.get("meta_info")
            rid = meta.get("id") if isinstance(meta, dict) else None
            sample_id = str(rid) if rid is not None else f"line{number}:{within}"
            try:
                n = _add_response(response, sample_id, tokens)
            except ValueError as exc:
                ctx.reject(number, str(exc), field="meta_info")
                continue
            tops = meta.get("output_top_logprobs") or ()
            ks.update(len(p) for p in tops[:1] if p)
            finish = meta.get("finish_reason")
            if isinstance(finish, dict):
                finish = finish.get("type")
            extra = {k: meta.get(k) for k in ("id", "prompt_tokens", "completion_tokens",
                                              "cached_tokens") if meta.get(k) is not None}
            sequences.add(sample_id=sample_id, split="inference", completion=response.get("text"),
                          num_tokens=n or meta.get("completion_tokens"),
                          finish_reason=str(finish) if finish is not None else None,
                          extra=extra)
            if tokens.full:
                yield Chunk("tokens", *tokens.take())
            if sequences.full:
                yield Chunk("sequences", *sequences.take())
    if ks:
        ctx.note(top_k=max(ks))
    for builder, kind in ((tokens, "tokens"), (sequences, "sequences")):
        taken = builder.take()
        if taken is not None:
            yield Chunk(kind, *taken)


def sniff(sample: Sample) -> float:
    record = first_mapping(first_record(sample))
    if record is not None:
        meta = record.get("meta_info")
        if not isinstance(meta, dict):
            return 0.0
        if "output_token_logprobs" in meta:
            return 0.95
        if "text" in record and ("finish_reason" in meta or "completion_tokens" in meta):
            return 0.8
        return 0.0
    prefix = head_json_prefix(sample)
    if prefix.startswith(("{", "[")) and '"meta_info":{' in prefix:
        return 0.9 if '"output_token_logprobs":[' in prefix else 0.8
    return 0.0
