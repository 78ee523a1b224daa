"""OpenAI-style API responses with logprobs: ``openai_chat`` and ``openai_completion``.

The same shapes come from OpenAI, vLLM and SGLang servers, saved one response per line
(JSON Lines), as one JSON document (a response or an array of them), as OpenAI Batch API
output lines (``{"custom_id", "response": {"body": ...}}``) or as streamed chunks
(``chat.completion.chunk``, optionally as ``data: {...}`` lines).

What is stored
--------------
- ``sample_id``: ``<id>:<choice index>`` (the Batch API ``custom_id`` replaces the id; the
  line number stands in when there is no id). ``position`` counts the choice's tokens from 0;
  chunks of one stream continue the count. ``split`` is ``inference``, ``step`` null.
- ``token``: the token text exactly as the API gives it (OpenAI writes a token that is part of
  a multi-byte character as an escape text such as ``\\xe6\\x95``; vLLM writes U+FFFD). The
  correctly decoded text of a whole completion is the sequence's ``completion``: the message
  content, or else the UTF-8 decoding of the concatenated ``bytes`` of its tokens.
- ``token_id``: from vLLM's ``token_ids`` or from tokens written as ``token_id:N``
  (``return_tokens_as_token_ids``); the token text is null then.
- ``logprob``: as logged; the sentinel -9999.0 becomes null (counted in the manifest).
- ``top_*``: the alternatives, most likely first. vLLM's chat server lists the sampled token
  first and adds it when it lies outside the top k: that extra entry is dropped from rows
  longer than the run's k (the shortest row seen). Current vLLM cuts every row to k entries,
  so a sampled token ranked below k stays in its row (a real token with its true logprob, in
  place of the k-th alternative); dropping it would lose a real alternative in every row
  where the sampled token is itself the k-th, which are the high-entropy positions.
- Legacy completions with ``echo``: the echoed prompt tokens (the first has a null logprob)
  are dropped when the usage counts identify them; otherwise (scoring with ``max_tokens=0``)
  every token is kept and the first keeps its null logprob.

Server logprobs are of the raw model distribution (before temperature) unless the server was
told otherwise, so the logprob basis is recorded as ``raw``; ``--temperature`` and
``--vocab-size`` say the rest.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import msgspec

from ..errors import FormatError
from ._records import (SequenceRows, TokenColumns, decode_bytes, first_mapping, first_record,
                       head_json_prefix, iter_raw_records, standard_json, validation_field)
from .registry import Chunk, Sample

_TOKEN_ID_PREFIX = "token_id:"


# -- typed records: decoding straight into these skips the fields entropylens ignores ----

class _Alternative(msgspec.Struct, gc=False):
    token: str | None = None
    logprob: float | None = None


class _ChatToken(msgspec.Struct, gc=False):
    token: str | None = None
    logprob: float | None = None
    bytes: msgspec.Raw = msgspec.Raw()
    top_logprobs: list[_Alternative] | None = None


class _ChatLogprobs(msgspec.Struct, gc=False):
    content: list[_ChatToken] | None = None


class _Message(msgspec.Struct, gc=False):
    content: Any = None


class _ChatChoice(msgspec.Struct, gc=False):
    index: int = 0
    logprobs: _ChatLogprobs | None = None
    message: _Message | None = None
    delta: _Message | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class _ChatBatchBody(msgspec.Struct, gc=False):
    status_code: int | None = None
    body: _ChatResponse | None = None


class _ChatResponse(msgspec.Struct, gc=False):
    id: str | None = None
    object: str | None = None
    model: str | None = None
    created: float | None = None
    choices: list[_ChatChoice] | None = None
    prompt_text: str | None = None
    custom_id: str | None = None
    response: _ChatBatchBody | None = None


class _Usage(msgspec.Struct, gc=False):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _CompletionLogprobs(msgspec.Struct, gc=False):
    tokens: list[str | None] | None = None
    token_logprobs: list[float | None] | None = None
    top_logprobs: list[dict[str, float | None] | None] | None = None
    text_offset: list[int] | None = None


class _CompletionChoice(msgspec.Struct, gc=False):
    index: int = 0
    text: str | None = None
    logprobs: _CompletionLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class _CompletionBatchBody(msgspec.Struct, gc=False):
    status_code: int | None = None
    body: _CompletionResponse | None = None


class _CompletionResponse(msgspec.Struct, gc=False):
    id: str | None = None
    object: str | None = None
    model: str | None = None
    created: float | None = None
    choices: list[_CompletionChoice] | None = None
    usage: _Usage | None = None
    custom_id: str | None = None
    response: _CompletionBatchBody | None = None


_CHAT_DECODER = msgspec.json.Decoder(_ChatResponse)
_COMPLETION_DECODER = msgspec.json.Decoder(_CompletionResponse)
_INT_LIST = msgspec.json.Decoder(list[int] | None)


def _decode(decoder, raw: bytes, number: int, ctx):
    """Decode one record; a bad record goes to ``ctx.reject`` and gives None."""
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        message = str(exc)
        ctx.reject(number, f"unexpected value: {message}", field=validation_field(message))
        return None
    except msgspec.DecodeError:
        pass
    try:  # NaN / Infinity, which Python's json module writes
        return decoder.decode(standard_json(raw))
    except msgspec.ValidationError as exc:
        message = str(exc)
        ctx.reject(number, f"unexpected value: {message}", field=validation_field(message))
    except ValueError as exc:
        ctx.reject(number, f"not valid JSON: {str(exc).splitlines()[0][:200]}")
    return None


def _unwrap(record, number: int, ctx):
    """The response inside a Batch API output line (None for failed requests)."""
    if record.response is None:
        return record, record.custom_id
    body = record.response.body
    if body is None:
        ctx.reject(number, "batch request has no response body (failed request?)",
                   field="response.body")
        return None, None
    return body, record.custom_id


def _token_id(text: str | None) -> int | None:
    if text is not None and text.startswith(_TOKEN_ID_PREFIX):
        try:
            return int(text[len(_TOKEN_ID_PREFIX):])
        except ValueError:
            return None
    return None


def _most_likely_first(logprobs: list, tokens: list, sampled_token, k: int):
    """Order alternatives most likely first, dropping the sampled token that vLLM's chat
    server lists first only when the row is longer than the run's ``k``.

    vLLM puts the sampled token at the head of the list and adds it when it lies outside the
    top k, so only a row of k + 1 entries carries an extra one; in a row of k entries the
    sampled token is itself one of the top k and dropping it would lose a real alternative
    (and the high-entropy positions forking analysis is about).
    """
    if len(logprobs) > k and tokens[0] == sampled_token:
        logprobs, tokens = logprobs[1:], tokens[1:]
    try:
        if logprobs == sorted(logprobs, reverse=True):
            return logprobs, tokens
    except TypeError:  # a null logprob among the alternatives
        pass
    keys = [v if v is not None else -math.inf for v in logprobs]
    order = sorted(range(len(keys)), key=lambda i: -keys[i])
    return [logprobs[i] for i in order], [tokens[i] for i in order]


def _require_logprobs(tokens: TokenColumns, path: Path) -> None:
    """Refuse responses none of which carries logprobs: 0 tokens is not a result."""
    if not tokens.emitted + tokens.rows:
        raise FormatError("no response carries logprobs ('logprobs': null or missing): ask "
                          "the server for them (logprobs=true, top_logprobs=k)", path=path)


# -- chat completions ------------------------------------------------------------------------

class _Stream:
    """A streamed choice whose chunks are still arriving."""

    __slots__ = ("position", "text", "bytes_ok")

    def __init__(self):
        self.position = 0
        self.text: list[str] = []
        self.bytes_ok = True


def _chat_choice_tokens(choice: _ChatChoice, tokens: TokenColumns, sample_id: str,
                        position: int, stats: dict) -> tuple[int, list | None]:
    """Append the tokens of one choice; returns (count, per-token bytes or None)."""
    content = choice.logprobs.content if choice.logprobs is not None else None
    if not content:
        return 0, None
    n = len(content)
    texts = [c.token for c in content]
    logprobs = [c.logprob for c in content]
    as_ids = texts[0] is not None and texts[0].startswith(_TOKEN_ID_PREFIX)
    token_ids = None
    if as_ids:
        token_ids = [_token_id(t) for t in texts]
        texts = None
    elif choice.token_ids is not None and len(choice.token_ids) == n:
        token_ids = choice.token_ids
    lengths: list = []
    top_lp: list = []
    top_tok: list = []
    # the run's k: the shortest row seen (rows holding an added sampled token have k + 1)
    sizes = [len(c.top_logprobs) for c in content if c.top_logprobs]
    if sizes:
        stats["k"] = min(stats.get("k") or min(sizes), min(sizes))
    for c in content:
        alts = c.top_logprobs
        if not alts:
            lengths.append(None)
            continue
        lps = [a.logprob for a in alts]
        toks = [a.token for a in alts]
        if len(lps) > 1:
            before = len(lps)
            lps, toks = _most_likely_first(lps, toks, c.token, stats["k"])
            stats["dropped_sampled_alternatives"] += before - len(lps)
        lengths.append(len(lps))
        top_lp.extend(lps)
        top_tok.extend(toks)
    top_ids = None
    if as_ids:
        top_ids = [_token_id(t) for t in top_tok]
        top_tok = None
    tokens.add(sample_id, n, position_start=position, token=texts, token_id=token_ids,
               logprob=logprobs, top_lengths=lengths, top_ids=top_ids, top_tokens=top_tok,
               top_logprobs=top_lp)
    return n, content


def _bytes_of(content) -> list | None:
    pieces = []
    for c in content:
        raw = bytes(c.bytes)
        if not raw:
            return None
        value = _INT_LIST.decode(raw)
        if value is None:
            return None
        pieces.append(bytes(value))
    return pieces


def _completion_text(message_text, content, texts_known: bool) -> str | None:
    if isinstance(message_text, str):
        return message_text
    if not content:
        return None
    pieces = _bytes_of(content)
    if pieces is not None:
        return decode_bytes(pieces)
    if texts_known:
        return "".join(c.token or "" for c in content)
    return None


def read_chat(path: Path, ctx) -> Iterator[Chunk]:
    """Stream Chat Completions responses into token and sequence chunks."""
    ctx.note(logprob_basis="raw")
    tokens = TokenColumns(split="inference")
    sequences = SequenceRows()
    streams: dict[tuple, _Stream] = {}
    stats = {"dropped_sampled_alternatives": 0}
    with ctx.open() as fh:
        for number, raw in iter_raw_records(fh, ctx):
            record = _decode(_CHAT_DECODER, raw, number, ctx)
            if record is None:
                continue
            response, custom_id = _unwrap(record, number, ctx)
            if response is None:
                continue
            if response.choices is None:
                ctx.reject(number, "no 'choices' in this record", field="choices")
                continue
            chunked = response.object == "chat.completion.chunk"
            base = custom_id or response.id or f"line{number}"
            for choice in response.choices:
                sample_id = f"{base}:{choice.index}"
                if chunked or (choice.message is None and choice.delta is not None):
                    key = (base, choice.index)
                    stream = streams.get(key)
                    if stream is None:
                        stream = streams[key] = _Stream()
                    n, content = _chat_choice_tokens(choice, tokens, sample_id,
                                                     stream.position, stats)
                    stream.position += n
                    if choice.delta is not None and isinstance(choice.delta.content, str):
                        stream.text.append(choice.delta.content)
                    if choice.finish_reason is not None:
                        del streams[key]
                        sequences.add(sample_id=sample_id, split="inference",
                                      completion="".join(stream.text), num_tokens=stream.position,
                                      finish_reason=choice.finish_reason,
                                      extra={"id": response.id, "model": response.model,
                                             "index": choice.index, "streamed": True})
                else:
                    n, content = _chat_choice_tokens(choice, tokens, sample_id, 0, stats)
                    message = choice.message.content if choice.message is not None else None
                    extra = {"id": response.id, "model": response.model, "index": choice.index}
                    if custom_id:
                        extra["custom_id"] = custom_id
                    sequences.add(sample_id=sample_id, split="inference",
                                  prompt=response.prompt_text,
                                  completion=_completion_text(message, content,
                                                              texts_known=True),
                                  num_tokens=n if content is not None else None,
                                  finish_reason=choice.finish_reason, extra=extra)
            if tokens.full:
                yield Chunk("tokens", *tokens.take())
            if sequences.full:
                yield Chunk("sequences", *sequences.take())
    for (base, index), stream in streams.items():
        # a stream that never finished (cut-off log): keep what arrived
        sequences.add(sample_id=f"{base}:{index}", split="inference",
                      completion="".join(stream.text), num_tokens=stream.position,
                      extra={"index": index, "streamed": True, "unfinished": True})
    if stats["dropped_sampled_alternatives"]:
        ctx.note(dropped_sampled_alternatives=stats["dropped_sampled_alternatives"])
    _require_logprobs(tokens, path)
    for builder, kind in ((tokens, "tokens"), (sequences, "sequences")):
        taken = builder.take()
        if taken is not None:
            yield Chunk(kind, *taken)


# -- legacy completions ------------------------------------------------------------------------

def _echo_start(response: _CompletionResponse, choices) -> int:
    """Echoed prompt tokens to drop: the prompt length when usage identifies it exactly."""
    usage = response.usage
    if usage is None or not usage.prompt_tokens or not usage.completion_tokens:
        return 0
    prompt = usage.prompt_tokens
    lengths = [len(c.logprobs.tokens) for c in choices
               if c.logprobs is not None and c.logprobs.tokens is not None]
    if lengths and all(n > prompt for n in lengths) \
            and sum(n - prompt for n in lengths) == usage.completion_tokens:
        return prompt
    return 0


def _ordered_mapping(mapping: dict | None):
    if not mapping:
        return None, None
    items = sorted(mapping.items(),
                   key=lambda kv: -(kv[1] if kv[1] is not None else -math.inf))
    return [k for k, _ in items], [v for _, v in items]


def read_completion(path: Path, ctx) -> Iterator[Chunk]:
    """Stream legacy Completions responses into token and sequence chunks."""
    ctx.note(logprob_basis="raw")
    tokens = TokenColumns(split="inference")
    sequences = SequenceRows()
    dropped_prompt = 0
    with ctx.open() as fh:
        for number, raw in iter_raw_records(fh, ctx):
            record = _decode(_COMPLETION_DECODER, raw, number, ctx)
            if record is None:
                continue
            response, custom_id = _unwrap(record, number, ctx)
            if response is None:
                continue
            if response.choices is None:
                ctx.reject(number, "no 'choices' in this record", field="choices")
                continue
            base = custom_id or response.id or f"line{number}"
            echo_start = None
            for choice in response.choices:
                sample_id = f"{base}:{choice.index}"
                lp = choice.logprobs
                n = 0
                text = choice.text
                if lp is not None and lp.tokens is not None:
                    texts = lp.tokens
                    logprobs = lp.token_logprobs
                    if logprobs is None or len(logprobs) != len(texts):
                        ctx.reject(number, "'token_logprobs' and 'tokens' differ in length",
                                   field="choices.logprobs.token_logprobs")
                        continue
                    tops = lp.top_logprobs
                    if tops is not None and len(tops) != len(texts):
                        ctx.reject(number, "'top_logprobs' and 'tokens' differ in length",
                                   field="choices.logprobs.top_logprobs")
                        continue
                    start = 0
                    if texts and logprobs[0] is None:  # echoed prompt
                        if echo_start is None:
                            echo_start = _echo_start(response, response.choices)
                        start = echo_start
                        dropped_prompt += start
                        offsets = lp.text_offset
                        if start and text is not None and offsets and len(offsets) == len(texts):
                            text = text[offsets[start] - offsets[0]:]
                    texts = texts[start:]
                    logprobs = logprobs[start:]
                    tops = tops[start:] if tops is not None else None
                    n = len(texts)
                    _add_completion_tokens(tokens, sample_id, texts, logprobs, tops,
                                           choice.token_ids)
                sequences.add(sample_id=sample_id, split="inference", completion=text,
                              num_tokens=n if lp is not None else None,
                              finish_reason=choice.finish_reason,
                              extra={"id": response.id, "model": response.model,
                                     "index": choice.index,
                                     **({"custom_id": custom_id} if custom_id else {})})
            if tokens.full:
                yield Chunk("tokens", *tokens.take())
            if sequences.full:
                yield Chunk("sequences", *sequences.take())
    if dropped_prompt:
        ctx.note(echoed_prompt_tokens_dropped=dropped_prompt)
    _require_logprobs(tokens, path)
    for builder, kind in ((tokens, "tokens"), (sequences, "sequences")):
        taken = builder.take()
        if taken is not None:
            yield Chunk(kind, *taken)


def _add_completion_tokens(tokens: TokenColumns, sample_id: str, texts, logprobs, tops,
                           token_ids) -> None:
    n = len(texts)
    if not n:
        return
    as_ids = texts[0] is not None and texts[0].startswith(_TOKEN_ID_PREFIX)
    ids = None
    if as_ids:
        ids = [_token_id(t) for t in texts]
        texts = None
    elif token_ids is not None and len(token_ids) >= n:
        ids = token_ids[-n:]
    lengths, top_lp, top_tok = [], [], []
    if tops is not None:
        # positions hold k alternatives, or k+1 when the sampled token was added
        sizes = [len(t) for t in tops if t]
        smallest = min(sizes) if sizes else 0
        for i, mapping in enumerate(tops):
            keys, values = _ordered_mapping(mapping)
            if keys is None:
                lengths.append(None)
                continue
            sampled = texts[i] if texts is not None else f"{_TOKEN_ID_PREFIX}{ids[i]}"
            if len(keys) > smallest and keys[-1] == sampled:
                keys, values = keys[:-1], values[:-1]
            lengths.append(len(keys))
            top_tok.extend(keys)
            top_lp.extend(values)
    top_ids = None
    if as_ids:
        top_ids = [_token_id(t) for t in top_tok]
        top_tok = None
    tokens.add(sample_id, n, token=texts, token_id=ids, logprob=logprobs,
               top_lengths=lengths if tops is not None else None, top_ids=top_ids,
               top_tokens=top_tok if tops is not None else None,
               top_logprobs=top_lp if tops is not None else None)


# -- sniffing ----------------------------------------------------------------------------------

def _response_of(record):
    record = first_mapping(record)
    if record is None:
        return None
    body = record.get("response")
    if isinstance(body, dict) and isinstance(body.get("body"), dict):
        return body["body"]
    return record


def _first_choice(response) -> dict | None:
    choices = response.get("choices") if isinstance(response, dict) else None
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return None


def sniff_chat(sample: Sample) -> float:
    response = _response_of(first_record(sample))
    if response is not None:
        choice = _first_choice(response)
        if choice is None:
            return 0.0
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict) and "content" in logprobs:
            return 0.95
        if response.get("object") in ("chat.completion", "chat.completion.chunk") \
                or "message" in choice or "delta" in choice:
            return 0.8
        return 0.0
    # a long pretty-printed document cut short by the sniff head
    prefix = head_json_prefix(sample)
    if prefix.startswith(("{", "[")) and '"choices":[' in prefix:
        if '"logprobs":{"content":[' in prefix or '"object":"chat.completion' in prefix:
            return 0.9
    return 0.0


def sniff_completion(sample: Sample) -> float:
    response = _response_of(first_record(sample))
    if response is not None:
        choice = _first_choice(response)
        if choice is None:
            return 0.0
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict) and ("token_logprobs" in logprobs or
                                           "tokens" in logprobs):
            return 0.95
        if response.get("object") == "text_completion" or \
                ("text" in choice and "message" not in choice and "meta_info" not in response):
            return 0.8
        return 0.0
    prefix = head_json_prefix(sample)
    if prefix.startswith(("{", "[")) and '"choices":[' in prefix and \
            ('"token_logprobs":[' in prefix or '"object":"text_completion"' in prefix):
        return 0.9
    return 0.0
