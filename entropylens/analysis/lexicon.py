"""Strategic-gram lexicons: loading, matching on decoded tokens, and mining.

arXiv 2509.03646 (HICRA) calls a generated token a *planning* token when it is part of a
"strategic gram" ("wait", "but wait", "let me", "the key insight is", ...) and an *execution*
token otherwise. This module finds lexicon phrases in the text that a completion's tokens
decode to and maps every match back to the tokens it overlaps:

- Tokens are decoded to bytes under one tokenizer convention (:data:`CONVENTIONS`):
  ``bytelevel`` (GPT-2 style byte-level BPE: ``Ġ`` is a space, ``Ċ`` a newline, a multi-byte
  character may be split across tokens), ``sentencepiece`` (``▁`` is a space, byte-fallback
  tokens such as ``<0x0A>``) or ``text`` (tokens are plain text, as OpenAI and vLLM return
  them; OpenAI's ``bytes:\\xe2\\x80`` pieces are decoded as bytes). :func:`detect_convention`
  picks one from the tokens themselves.
- Each sequence's bytes are decoded as UTF-8; every token keeps its byte span, so a character
  split across two tokens belongs to both.
- Phrases are defined by one regular expression (:attr:`Lexicon.pattern`: the phrases
  factored as a character trie; where one phrase extends another the longer wins, so "but
  wait" beats "but"), case-insensitive, on word boundaries (a phrase that starts or ends with
  a letter or digit must not touch another one), with any run of whitespace between its words
  and any apostrophe (``'``, ``’`` or ``ʼ``). Matches do not overlap: the text is scanned left
  to right. Lexicons of ASCII phrases (the default) are matched by the same rules compiled to
  a numpy automaton (:mod:`entropylens.analysis.automaton`), which finds the regular
  expression's matches two to three times faster.
- A token is a planning token when its bytes overlap a match.

:func:`mine_lexicon` ranks n-grams of successful completions so that users can build a
lexicon for their own domain, offline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import EntropylensError
from .automaton import PhraseAutomaton

#: The default lexicon shipped as package data: the 249 grams of arXiv 2509.03646, App. A.
DEFAULT_LEXICON_FILE = "strategic_grams_hicra.txt"
LEXICON_MODES = ("replace", "extend")

_APOSTROPHES = "'\u2019\u02bc"
_APOSTROPHE_CLASS = "['\u2019\u02bc]"
_WORD_CHAR = re.compile(r"\w")
_COMMENT = re.compile(r"^#(\s|$)")
#: Separator placed between sequences in one decoded batch: no phrase can contain it.
_SEPARATOR = b"\x00"


# --------------------------------------------------------------------------------------
# Lexicons
# --------------------------------------------------------------------------------------

def normalize_phrase(phrase: str) -> str:
    """Lower-case a phrase, collapse its whitespace and straighten its apostrophes."""
    phrase = " ".join(phrase.split()).lower()
    for apostrophe in _APOSTROPHES[1:]:
        phrase = phrase.replace(apostrophe, "'")
    return phrase


def _phrase_pattern(phrase: str) -> str:
    words = [re.escape(word).replace("'", _APOSTROPHE_CLASS) for word in phrase.split(" ")]
    body = r"\s+".join(words)
    before = r"(?<!\w)" if _WORD_CHAR.match(phrase[0]) else ""
    after = r"(?!\w)" if _WORD_CHAR.match(phrase[-1]) else ""
    return before + body + after


def _trie_pattern(phrases: Sequence[str]) -> str:
    """A regular expression matching any of ``phrases``, factored as a character trie.

    A space matches any run of whitespace and an apostrophe either apostrophe; a phrase that
    ends with a letter or digit must not be followed by one.
    """
    end = ""
    trie: dict = {}
    for phrase in phrases:
        node = trie
        for ch in phrase:
            node = node.setdefault(ch, {})
        node[end] = True

    def unit(ch: str) -> str:
        if ch == " ":
            return r"\s+"
        if ch == "'":
            return _APOSTROPHE_CLASS
        return re.escape(ch)

    def emit(node: dict, last: str) -> str:
        # Continuations first, so the longest phrase wins; ending here is the fallback.
        alternatives = [unit(ch) + emit(node[ch], ch) for ch in sorted(k for k in node if k)]
        if end in node:
            alternatives.append(r"(?!\w)" if _WORD_CHAR.match(last) else "")
        if len(alternatives) == 1:
            return alternatives[0]
        return "(?:" + "|".join(alternatives) + ")"

    return emit(trie, "")


@lru_cache(maxsize=8)
def _automaton(phrases: tuple[str, ...]) -> PhraseAutomaton:
    return PhraseAutomaton.build(phrases)


@dataclass(frozen=True)
class Lexicon:
    """A set of strategic-gram phrases and the compiled matcher for them.

    Attributes
    ----------
    phrases : tuple of str
        Normalised phrases (lower case, single spaces, straight apostrophes), unique, in the
        order first given.
    source : str
        Where the phrases came from (file names, ``"default"``, ``"list"``).
    """

    phrases: tuple[str, ...]
    source: str = "list"

    def __post_init__(self):
        if not self.phrases:
            raise EntropylensError(f"the lexicon ({self.source}) holds no phrases")
        bad = next((p for p in self.phrases if _SEPARATOR.decode() in p), None)
        if bad is not None:   # the matcher separates sequences with it
            raise EntropylensError(f"the lexicon ({self.source}) holds a phrase with a NUL "
                                   f"character: {bad!r}")

    def __len__(self) -> int:
        return len(self.phrases)

    def __iter__(self):
        return iter(self.phrases)

    @cached_property
    def pattern(self) -> re.Pattern:
        """One regular expression for every phrase, built as a trie of the phrases.

        At each text position the trie tries one branch per character, so the cost does not
        grow with the number of phrases (a flat alternation of the 249 default phrases is
        about 500 times slower). Where one phrase extends another ("but", "but wait"), the
        longer one is tried first. Map a match back to its phrase with :meth:`phrase_index`.
        """
        word = [p for p in self.phrases if _WORD_CHAR.match(p[0])]
        other = [p for p in self.phrases if not _WORD_CHAR.match(p[0])]
        parts = []
        if word:
            parts.append(r"(?<!\w)" + _trie_pattern(word))
        if other:
            parts.append(_trie_pattern(other))
        return re.compile("|".join(parts), re.IGNORECASE)

    @cached_property
    def splitter(self) -> re.Pattern:
        """:attr:`pattern` in one capturing group, for ``split``: text and matches alternate."""
        return re.compile(f"({self.pattern.pattern})", re.IGNORECASE)

    @property
    def automaton(self) -> PhraseAutomaton | None:
        """The phrases as a :class:`PhraseAutomaton`: the matches of :attr:`pattern` on
        text case-folded by :func:`fold_case`, found without a character-by-character
        scan; None when a phrase is not ASCII, where lower-casing and the regex engine's
        case rules may part. Built once per process for the same phrases (and not pickled
        with the lexicon: engine workers build their own)."""
        if not all(p.isascii() for p in self.phrases):
            return None
        return _automaton(self.phrases)

    @cached_property
    def _index(self) -> dict[str, int]:
        return {p.casefold(): i for i, p in enumerate(self.phrases)}

    def phrase_index(self, matched: str) -> int:
        """Index in :attr:`phrases` of the phrase that matched the text ``matched``."""
        # the same few spellings match again and again: remember them
        cached = self._matched.get(matched)
        if cached is not None:
            return cached
        self._matched[matched] = index = self._phrase_index(matched)
        return index

    @cached_property
    def _matched(self) -> dict[str, int]:
        return {}

    def _phrase_index(self, matched: str) -> int:
        key = normalize_phrase(matched).casefold()
        index = self._index.get(key)
        if index is None:  # a case equivalence that casefold does not share with re
            index = next(i for i, p in enumerate(self.phrases)
                         if re.fullmatch(_phrase_pattern(p), matched, re.IGNORECASE))
        return index

    def extend(self, phrases: Iterable[str], source: str = "list") -> "Lexicon":
        """A new lexicon with ``phrases`` added after these."""
        return Lexicon(_unique(list(self.phrases) + [normalize_phrase(p) for p in phrases]),
                       f"{self.source}+{source}")


def _unique(phrases: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(p for p in phrases if p))


def _parse_lexicon(text: str, path: str) -> list[str]:
    """Phrases of a lexicon file: one a line; ``#`` followed by a space starts a comment line.

    A line such as ``## step`` is a phrase (the published list has it), not a comment.
    """
    phrases = []
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or _COMMENT.match(stripped):
            continue
        phrase = normalize_phrase(stripped)
        if "\x00" in phrase:
            raise EntropylensError("a phrase may not contain a NUL character", path=path,
                                   line=lineno)
        phrases.append(phrase)
    return phrases


def read_lexicon_file(path: str | Path) -> list[str]:
    """Read the phrases of one lexicon file (UTF-8, one phrase a line, ``# `` comments).

    Raises
    ------
    EntropylensError
        When the file is missing, not UTF-8 (naming the line) or holds no phrase.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise EntropylensError(f"cannot read the lexicon: {exc.strerror or exc}",
                               path=path) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise EntropylensError("the lexicon is not UTF-8 text", path=path, line=line) from None
    phrases = _parse_lexicon(text, str(path))
    if not phrases:
        raise EntropylensError("the lexicon holds no phrases (one phrase a line)", path=path)
    return phrases


def default_lexicon() -> Lexicon:
    """The 249 strategic grams published with HICRA (arXiv 2509.03646, Appendix A)."""
    text = resources.files("entropylens").joinpath("data", DEFAULT_LEXICON_FILE) \
        .read_text(encoding="utf-8")
    return Lexicon(_unique(_parse_lexicon(text, DEFAULT_LEXICON_FILE)), "default")


def load_lexicon(lexicon: "str | Path | Sequence[str] | Lexicon | None" = None, *,
                 mode: str = "replace") -> Lexicon:
    """Build the lexicon an analysis uses.

    Parameters
    ----------
    lexicon : path, sequence of str, Lexicon or None
        A lexicon file (one phrase a line, ``# `` comment lines), several files, a list of
        phrases, or a :class:`Lexicon`. None gives the default lexicon.
    mode : {"replace", "extend"}
        ``replace`` uses ``lexicon`` alone; ``extend`` adds it to the default lexicon.

    Returns
    -------
    Lexicon
    """
    if mode not in LEXICON_MODES:
        raise EntropylensError(f"unknown lexicon mode {mode!r} (one of "
                               f"{', '.join(LEXICON_MODES)})")
    if lexicon is None:
        return default_lexicon()
    if isinstance(lexicon, Lexicon):
        given = lexicon
    elif isinstance(lexicon, (str, Path)):
        given = Lexicon(_unique(read_lexicon_file(lexicon)), Path(lexicon).name)
    else:
        items = list(lexicon)
        if items and all(isinstance(i, Path) for i in items):
            given = Lexicon(_unique(p for f in items for p in read_lexicon_file(f)),
                            "+".join(Path(f).name for f in items))
        else:
            given = Lexicon(_unique(normalize_phrase(str(p)) for p in items), "list")
    if mode == "extend":
        return default_lexicon().extend(given.phrases, given.source)
    return given
