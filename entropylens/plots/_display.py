"""Turning logged token strings into readable text (display only, never analysis).

Byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM2) log tokens as pieces such as
``Ġthe`` (``Ġ`` stands for a space, ``Ċ`` for a newline); SentencePiece tokenizers write
``▁the``. Figures and the report show the text those pieces stand for.
"""

from __future__ import annotations

import codecs
from functools import lru_cache
from typing import Iterable


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode`` table: printable character -> byte."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = list(printable)
    shift = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + shift)
            shift += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _is_byte_level(tokens: list[str]) -> bool:
    # A byte-level vocabulary never holds a raw space or newline, and marks them as
    # characters at or above U+0100 (Ġ, Ċ, ...): both must hold before decoding.
    decoder = _byte_decoder()
    marked = False
    for token in tokens:
        for char in token:
            if char not in decoder:
                return False
            if ord(char) >= 0x100:
                marked = True
    return marked


def decode_tokens(tokens: Iterable[str | None]) -> list[str]:
    """Readable text of each token of one completion, in order.

    Byte-level pieces are mapped back to bytes and decoded as UTF-8 across token
    boundaries (a character split over two tokens appears with the second one);
    SentencePiece's ``▁`` becomes a space; other text is kept as logged. Missing tokens
    become empty strings.

    Parameters
    ----------
    tokens : iterable of str or None
        The ``token`` column of one completion, by position.

    Returns
    -------
    list of str
        One string per token.
    """
    tokens = ["" if t is None else str(t) for t in tokens]
    if _is_byte_level(tokens):
        decoder = _byte_decoder()
        incremental = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return [incremental.decode(bytes(decoder[c] for c in t)) for t in tokens]
    return [t.replace("\u2581", " ") for t in tokens]


def token_label(token: str | None) -> str:
    """A one-token label with whitespace made visible (``␣`` space, ``↵`` newline, ``⇥`` tab)."""
    text = decode_tokens([token])[0]
    if text == "":
        return "∅"
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥").replace("\r", "")
