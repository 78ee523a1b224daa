"""The one decoder of tokenizer pieces: what a logged token string stands for.

Logs write tokens in one of three conventions (:data:`CONVENTIONS`):

- ``bytelevel``: GPT-2 style byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2) maps every byte to
  a printable character (:data:`BYTE_DECODER`): ``Ġ`` is a space, ``Ċ`` a newline, and a
  multi-byte character may be split across two tokens;
- ``sentencepiece``: ``▁`` is a space, byte-fallback pieces such as ``<0x0A>`` one byte;
- ``text``: tokens are plain text (OpenAI, vLLM), except OpenAI's ``bytes:\\xe2\\x80``.

The analyses match phrases on :func:`token_bytes`, the forking analysis classifies
:func:`normalise_token`, figures and the report show :func:`decode_tokens` and
:func:`token_label`.
"""

from __future__ import annotations

import codecs
import re
from collections import Counter
from typing import Iterable

from ..errors import EntropylensError

#: Tokenizer conventions understood by the decoders.
CONVENTIONS = ("bytelevel", "sentencepiece", "text")

_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_OPENAI_BYTES = re.compile(r"^bytes:((?:\\x[0-9A-Fa-f]{2})+)$")
#: The byte-level marks of a space, a newline and a tab.
_BYTELEVEL_MARKS = ("\u0120", "\u010a", "\u0109")
#: Fallback for a single piece that is not valid UTF-8 on its own (half a character).
_MARKERS = str.maketrans({"Ġ": " ", "Ċ": "\n", "ĉ": "\t", "▁": " "})


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


#: Byte -> printable character of byte-level BPE, and its inverse.
BYTE_ENCODER = _bytes_to_unicode()
BYTE_DECODER = {char: byte for byte, char in BYTE_ENCODER.items()}


def detect_convention(tokens: Iterable[str | None]) -> str:
    """Guess the tokenizer convention of a sample of token strings.

    Counts distinct tokens that show each convention's marks: ``Ġ``/``Ċ``/``ĉ`` built only
    from the byte-level alphabet (``bytelevel``), ``▁`` or ``<0xNN>`` (``sentencepiece``),
    a plain space, tab or newline (``text``). The most frequent mark wins; with no marks at
    all the tokens are taken as plain text.
    """
    votes = Counter()
    for token in set(tokens):
        if not token:
            continue
        if any(mark in token for mark in _BYTELEVEL_MARKS) \
                and all(ch in BYTE_DECODER for ch in token):
            votes["bytelevel"] += 1
        elif "\u2581" in token or _SP_BYTE.match(token):
            votes["sentencepiece"] += 1
        elif " " in token or "\n" in token or "\t" in token:
            votes["text"] += 1
    if not votes:
        return "text"
    return max(CONVENTIONS, key=lambda c: (votes[c], c == "text"))


def token_bytes(token: str | None, convention: str) -> bytes:
    """The bytes a token stands for under ``convention``.

    Byte-level pieces map back through GPT-2's byte alphabet (a character outside it, as in
    an added special token, stands for its own UTF-8); sentencepiece ``▁`` is a space and
    ``<0xNN>`` one byte; plain-text tokens are their UTF-8, except OpenAI's ``bytes:\\xNN``.
    """
    if not token:
        return b""
    if convention == "bytelevel":
        try:
            return bytes(BYTE_DECODER[ch] for ch in token)
        except KeyError:
            return b"".join(bytes([BYTE_DECODER[ch]]) if ch in BYTE_DECODER
                            else ch.encode("utf-8", "surrogatepass") for ch in token)
    if convention == "sentencepiece":
        byte = _SP_BYTE.match(token)
        if byte:
            return bytes([int(byte.group(1), 16)])
        return token.replace("\u2581", " ").encode("utf-8", "surrogatepass")
    if convention == "text":
        raw = _OPENAI_BYTES.match(token)
        if raw:
            return bytes(int(h, 16) for h in raw.group(1).split("\\x")[1:])
        return token.encode("utf-8", "surrogatepass")
    raise EntropylensError(f"unknown tokenizer convention {convention!r} "
                           f"(one of {', '.join(CONVENTIONS)})")


def normalise_token(text: str) -> str:
    """Decoded text of one tokenizer piece, judged on its own.

    A piece with a byte-level mark (``Ġ``, ``Ċ``, ``ĉ``) decodes through the byte table, one
    with ``▁`` or a ``<0xNN>`` byte piece as SentencePiece; other text is kept. A piece that
    is not valid UTF-8 by itself (half of a character split across tokens, or a byte piece
    above 0x7F) keeps its characters, with only the space, newline and tab marks replaced.
    """
    if any(mark in text for mark in _BYTELEVEL_MARKS):
        convention = "bytelevel"
    elif "\u2581" in text or _SP_BYTE.match(text):
        convention = "sentencepiece"
    else:
        return text
    try:
        return token_bytes(text, convention).decode("utf-8")
    except UnicodeDecodeError:
        return text.translate(_MARKERS)


def _is_byte_level(tokens: list[str]) -> bool:
    # A byte-level vocabulary never holds a raw space or newline, and marks them as
    # characters at or above U+0100 (Ġ, Ċ, ...): both must hold before decoding.
    marked = False
    for token in tokens:
        for char in token:
            if char not in BYTE_DECODER:
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
        incremental = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return [incremental.decode(token_bytes(t, "bytelevel")) for t in tokens]
    return [t.replace("\u2581", " ") for t in tokens]


def token_label(token: str | None) -> str:
    """A one-token label with whitespace made visible (``␣`` space, ``↵`` newline, ``⇥`` tab)."""
    text = decode_tokens([token])[0]
    if text == "":
        return "∅"
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥").replace("\r", "")
