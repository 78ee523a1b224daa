"""Mining a lexicon: n-grams of successful completions ranked as candidate strategic grams
(see :mod:`entropylens.analysis.lexicon`)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from ..base.jsonable import records as _records
from ..errors import EntropylensError
from ..store import Store, open_store
from .lexicon import _APOSTROPHES

# --------------------------------------------------------------------------------------
# Mining a lexicon
# --------------------------------------------------------------------------------------

MINED_COLUMNS = ["gram", "n", "solutions", "df", "occurrences", "mean_per_solution",
                 "sparsity", "score", "df_other"]
#: English function words that are never strategic on their own: an n-gram made only of these
#: (or of one-letter words such as the "x" of "4 x 7") is not mined. Discourse markers ("so",
#: "but", "now", "wait", "since") are deliberately absent.
FUNCTION_WORDS = frozenset("""
a an the of to in on at by for with from as into onto is are was were be been being am it
its it's he she they them his her their i you we our my your this that these those and or
has have had will would there which who whom
""".split())
_BREAK = re.compile(r"[^\w\s,']|[\d_]+")
_WORD = re.compile(r"\w+(?:'\w+)*|,")


def _ngrams(text: str, min_n: int, max_n: int) -> Counter:
    """Word n-grams of a text, lower case, not crossing sentence punctuation or numbers.

    Commas are kept inside n-grams ("wait, but") but an n-gram never starts or ends with one.
    """
    text = text.lower()
    for apostrophe in _APOSTROPHES[1:]:
        text = text.replace(apostrophe, "'")
    counts: Counter = Counter()
    for segment in _BREAK.split(text):
        words = _WORD.findall(segment)
        for i, word in enumerate(words):
            if word == ",":
                continue
            words_n = 0
            for j in range(i, len(words)):
                if words[j] != ",":
                    words_n += 1
                if words_n > max_n:
                    break
                if words[j] == "," or words_n < min_n:
                    continue
                counts[" ".join(words[i:j + 1]).replace(" ,", ",")] += 1
    return counts


@dataclass
class MinedLexicon:
    """Result of :func:`mine_lexicon`.

    Attributes
    ----------
    table : pandas.DataFrame
        Ranked n-grams: ``gram, n, solutions`` (successful completions containing it),
        ``df`` (that share of successful completions), ``occurrences``,
        ``mean_per_solution`` (occurrences per containing completion), ``sparsity``
        (its inverse), ``score = df * sparsity`` and ``df_other`` (share of the other
        completions containing it, for contrast).
    documents : int
        Successful completions read.
    others : int
        Completions at or below the threshold.
    reward_threshold : float
    """

    table: pd.DataFrame
    documents: int
    others: int
    reward_threshold: float
    runs: list[str] = field(default_factory=list)

    @property
    def phrases(self) -> list[str]:
        """The mined phrases, best first."""
        return self.table["gram"].tolist()

    def write(self, path: str | Path) -> Path:
        """Write the phrases as a lexicon file for ``--lexicon``."""
        path = Path(path)
        header = (f"# Strategic grams mined by entropylens from {self.documents} completions "
                  f"with reward > {self.reward_threshold:g} (runs: {', '.join(self.runs)}).\n"
                  "# Ranked by document frequency times within-solution sparsity; "
                  "review before use.\n")
        try:
            path.write_text(header + "".join(p + "\n" for p in self.phrases), encoding="utf-8")
        except OSError as exc:
            raise EntropylensError(f"cannot write the lexicon: {exc.strerror or exc}",
                                   path=path) from None
        return path

    def to_dict(self) -> dict:
        return {"runs": list(self.runs), "documents": self.documents, "others": self.others,
                "reward_threshold": self.reward_threshold, "grams": _records(self.table)}


def mine_lexicon(store: Store | str, runs: str | Sequence[str] | None = None, *,
                 reward_threshold: float = 0.5, min_n: int = 1, max_n: int = 5,
                 min_df: float = 0.05, top_n: int = 100, exclude_prompt: bool = True,
                 drop_function_words: bool = True, split: str | None = None) -> MinedLexicon:
    """Rank n-grams of successful completions as candidate strategic grams.

    A strategic gram is a phrase that many solutions use, a few times each ("so", "let's
    check"), unlike content that recurs inside one solution ("the apples"). For every word
    n-gram (``min_n`` to ``max_n`` words, not crossing sentence punctuation or numbers) of the
    completions whose reward is above ``reward_threshold``:

    - ``df``: share of those completions containing it (document frequency);
    - ``sparsity``: completions containing it over its occurrences (1 when it appears once in
      each, lower when it repeats inside solutions);
    - ``score = df * sparsity``, the ranking key (ties: higher df, shorter, alphabetical).

    N-grams below ``min_df`` (or in fewer than two completions) are dropped, and so is an
    n-gram that only ever occurs inside one longer kept n-gram (same completions, same
    occurrences) and, by default, one made only of function words. Nothing is downloaded:
    the n-grams come from the stored completions.

    Parameters
    ----------
    store : Store or path
    runs : str or sequence of str, optional
        Default: every run.
    reward_threshold : float
        A completion is a solution when its reward is strictly above this.
    min_n, max_n : int
        N-gram lengths in words (1..5 by default).
    min_df : float
        Minimum document frequency kept.
    top_n : int
        Rows returned.
    exclude_prompt : bool
        Do not count, for a completion, n-grams that occur in its own prompt (copied problem
        text is content, not strategy).
    drop_function_words : bool
        Drop n-grams made only of :data:`FUNCTION_WORDS` and one-letter words ("is", "of
        the", "x"): they are frequent everywhere and never a strategy by themselves.
    split : str, optional
        Only completions of this split.

    Returns
    -------
    MinedLexicon
    """
    if not 1 <= min_n <= max_n:
        raise EntropylensError(f"need 1 <= min_n <= max_n, got {min_n} and {max_n}")
    store = open_store(store)
    names = store.resolve_runs(runs)
    df_counts: Counter = Counter()
    occurrences: Counter = Counter()
    other_df: Counter = Counter()
    documents = others = 0
    for run in names:
        table = store.read_sequences(run, columns=["split", "prompt", "completion", "reward"])
        if split is not None:
            table = table.filter(pc.equal(table.column("split"), split))
        for prompt, completion, reward in zip(table.column("prompt").to_pylist(),
                                              table.column("completion").to_pylist(),
                                              table.column("reward").to_pylist()):
            if not completion or reward is None:
                continue
            grams = _ngrams(completion, min_n, max_n)
            if exclude_prompt and prompt:
                prompt_grams = _ngrams(prompt, min_n, max_n)
                grams = Counter({g: c for g, c in grams.items() if g not in prompt_grams})
            if reward > reward_threshold:
                documents += 1
                df_counts.update(grams.keys())
                occurrences.update(grams)
            else:
                others += 1
                other_df.update(grams.keys())
    if documents == 0:
        raise EntropylensError(f"no completion with a reward above {reward_threshold:g} in "
                               f"run(s) {', '.join(names)}; lower --reward-threshold or check "
                               "that the runs have sequences with rewards", path=store.path)
    floor = max(2, int(np.ceil(min_df * documents)))
    kept = {g: d for g, d in df_counts.items() if d >= floor}
    redundant = set()
    for gram in kept:
        words = gram.replace(",", " ,").split(" ")
        real = [w for w in words if w != ","]
        if len(real) < 2:
            continue
        for sub_words in (words[1:], words[:-1]):
            while sub_words and sub_words[0] == ",":
                sub_words = sub_words[1:]
            while sub_words and sub_words[-1] == ",":
                sub_words = sub_words[:-1]
            sub = " ".join(sub_words).replace(" ,", ",")
            if sub in kept and kept[sub] == kept[gram] and occurrences[sub] == occurrences[gram]:
                redundant.add(sub)
    rows = []
    for gram, d in kept.items():
        words = gram.replace(",", " ").split()
        if gram in redundant or (drop_function_words and all(
                w in FUNCTION_WORDS or len(w) == 1 for w in words)):
            continue
        n = len(words)
        occ = occurrences[gram]
        rows.append({"gram": gram, "n": n, "solutions": d, "df": d / documents,
                     "occurrences": occ, "mean_per_solution": occ / d, "sparsity": d / occ,
                     "score": (d / documents) * (d / occ),
                     "df_other": other_df[gram] / others if others else float("nan")})
    table = pd.DataFrame(rows, columns=MINED_COLUMNS)
    if len(table):
        table = table.sort_values(["score", "df", "n", "gram"],
                                  ascending=[False, False, True, True], kind="mergesort")
    table = table.head(top_n).reset_index(drop=True)
    return MinedLexicon(table=table, documents=documents, others=others,
                        reward_threshold=float(reward_threshold), runs=list(names))
