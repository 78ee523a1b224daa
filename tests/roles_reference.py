"""Plain-Python reference implementations the roles and lexicon tests compare against."""

from __future__ import annotations


def reference_spans(text: str, phrases) -> list[tuple[int, int, str]]:
    """Leftmost-longest, non-overlapping phrase matching with plain string scanning."""
    ordered = sorted(phrases, key=len, reverse=True)
    lower = text.lower()

    def is_word(ch):
        return ch.isalnum() or ch == "_"

    def match_at(i, phrase):
        j = i
        for ch in phrase:
            if ch == " ":
                k = j
                while k < len(lower) and lower[k].isspace():
                    k += 1
                if k == j:
                    return None
                j = k
            elif ch == "'":
                if j < len(lower) and lower[j] in "'’ʼ":
                    j += 1
                else:
                    return None
            elif j < len(lower) and lower[j] == ch:
                j += 1
            else:
                return None
        if is_word(phrase[-1]) and j < len(lower) and is_word(lower[j]):
            return None
        return j

    spans, i = [], 0
    while i < len(lower):
        found = None
        for phrase in ordered:
            if is_word(phrase[0]) and i > 0 and is_word(lower[i - 1]):
                continue
            end = match_at(i, phrase)
            if end is not None:
                found = (i, end, phrase)
                break
        if found:
            spans.append(found)
            i = found[1]
        else:
            i += 1
    return spans


def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character alphabet for bytes, inverted (character -> byte)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            mapping[chr(byte)] = byte
        else:
            mapping[chr(256 + extra)] = byte
            extra += 1
    return mapping


def token_char_spans(tokens: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Decode byte-level tokens one by one; each token gets the characters it completes."""
    import codecs

    decoder_map = gpt2_byte_decoder()
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    text, spans = "", []
    for token in tokens:
        piece = decoder.decode(bytes(decoder_map[c] for c in token))
        spans.append((len(text), len(text) + len(piece)))
        text += piece
    return text, spans


def theil_sen(x, y) -> float:
    """Median of the pairwise slopes."""
    import statistics

    slopes = [(y[j] - y[i]) / (x[j] - x[i]) for i in range(len(x)) for j in range(i + 1, len(x))
              if x[j] != x[i]]
    return statistics.median(slopes)


def mann_kendall_exact_p(y) -> float:
    """One-sided exact p-value of an increasing trend, enumerating all orderings (no ties)."""
    import itertools

    def s_stat(values):
        return sum((values[j] > values[i]) - (values[j] < values[i])
                   for i in range(len(values)) for j in range(i + 1, len(values)))

    observed = s_stat([float(v) for v in y])
    ranks = sorted(range(len(y)), key=lambda i: y[i])
    count = total = 0
    for perm in itertools.permutations(range(len(ranks))):
        total += 1
        count += s_stat(perm) >= observed
    return count / total
