"""The token view: example completions with every token's entropy and forking flag.

Four completions per run: the highest and the lowest reward, the earliest and the latest
step (training completions first; ties go to the later step for the highest reward and to
the earlier step otherwise; a completion is shown once). Token text is decoded for display
(``Ġ`` pieces become spaces) and escaped by the templates, never trusted as markup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

from ..estimators import token_entropy
from ..base.pieces import decode_tokens
from ..store import Store

#: Candidates tried per example before settling for one without token rows.
MAX_TRIES = 12
SEQUENCE_COLUMNS = ["step", "split", "sample_id", "prompt", "completion", "reward",
                    "advantage"]


@dataclass
class Example:
    """One completion of the token view (``tokens`` empty when the run has no token rows)."""

    label: str
    step: int | None
    sample_id: str
    reward: float | None
    advantage: float | None
    prompt: str | None
    completion: str | None
    tokens: list[dict] = field(default_factory=list)
    forking_marked: bool = False

    def to_dict(self) -> dict:
        return {"label": self.label, "step": self.step, "sample_id": self.sample_id,
                "reward": self.reward, "advantage": self.advantage, "prompt": self.prompt,
                "completion": self.completion, "forking_marked": self.forking_marked,
                "n_tokens": len(self.tokens),
                "n_forking": sum(1 for t in self.tokens if t["fork"]), "tokens": self.tokens}


def _number(value) -> float | None:
    if value is None or value is pd.NA:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _candidates(sequences: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    has_reward = sequences.dropna(subset=["reward"])
    ordered = []
    if len(has_reward):
        ordered.append(("highest reward", has_reward.sort_values(
            ["reward", "step", "sample_id"], ascending=[False, False, True], kind="stable")))
        ordered.append(("lowest reward", has_reward.sort_values(
            ["reward", "step", "sample_id"], ascending=[True, True, True], kind="stable")))
    ordered.append(("earliest step", sequences.sort_values(
        ["step", "sample_id"], ascending=[True, True], kind="stable", na_position="last")))
    ordered.append(("latest step", sequences.sort_values(
        ["step", "sample_id"], ascending=[False, True], kind="stable", na_position="last")))
    return ordered


def _sample_tokens(store: Store, run: str, step, sample_id: str) -> pa.Table:
    where = ds.field("sample_id") == sample_id
    if step is None:
        where = where & ds.field("step").is_null()
        table = store.read_tokens(run, filter=where)
    else:
        table = store.read_tokens(run, steps=[int(step)], filter=where)
    return table.sort_by("position")


def _token_sequences(store: Store, run: str) -> pd.DataFrame:
    """Stand-in sequence rows (first and last step) for a run that logged only tokens."""
    steps = store.token_steps(run)
    rows = []
    for step in dict.fromkeys([steps[0], steps[-1]] if steps else []):
        ids = store.read_tokens(run, columns=["sample_id"], steps=[step]).column("sample_id")
        first = min(ids.to_pylist())
        rows.append({"step": step, "split": None, "sample_id": first, "prompt": None,
                     "completion": None, "reward": None, "advantage": None})
    return pd.DataFrame(rows, columns=SEQUENCE_COLUMNS)


def pick_examples(store: Store, run: str, *, source: str | None, vocab_size: int | None = None,
                  forking: Any = None, forking_mask: Callable | None = None) -> list[Example]:
    """Choose and load the run's example completions.

    Parameters
    ----------
    store : Store
    run : str
    source : str or None
        Entropy source of the run's tokens (None: show text only).
    vocab_size : int, optional
        For the top-k entropy estimate.
    forking : Forking, optional
        Forking-token result of the run; with ``forking_mask`` marks each forking token.
    forking_mask : callable, optional
        ``forking_mask(tokens_table, forking)`` -> one boolean per token row.

    Returns
    -------
    list of Example
    """
    sequences = store.read_sequences(run, columns=SEQUENCE_COLUMNS).to_pandas()
    if sequences.empty and source is not None:
        sequences = _token_sequences(store, run)
    if sequences.empty:
        return []
    train = sequences[sequences["split"].isna() | (sequences["split"] == "train")]
    if len(train):
        sequences = train
    chosen: set[tuple] = set()
    examples = []
    for label, ordered in _candidates(sequences):
        fallback = None
        for row in ordered.head(MAX_TRIES).itertuples(index=False):
            step = None if pd.isna(row.step) else int(row.step)
            key = (step, row.sample_id)
            if key in chosen:
                continue
            example = Example(label=label, step=step, sample_id=str(row.sample_id),
                              reward=_number(row.reward), advantage=_number(row.advantage),
                              prompt=row.prompt if isinstance(row.prompt, str) else None,
                              completion=row.completion if isinstance(row.completion, str)
                              else None)
            if source is None:
                fallback = example
                break
            table = _sample_tokens(store, run, step, example.sample_id)
            if table.num_rows:
                _attach_tokens(example, table, source, vocab_size, forking, forking_mask)
                fallback = example
                break
            fallback = fallback or example
        if fallback is not None:
            chosen.add((fallback.step, fallback.sample_id))
            examples.append(fallback)
    return examples


def _attach_tokens(example: Example, table: pa.Table, source: str, vocab_size: int | None,
                   forking: Any, forking_mask: Callable | None) -> None:
    entropy = token_entropy(table, source, vocab_size=vocab_size)
    texts = decode_tokens(table.column("token").to_pylist())
    if not any(texts) and example.completion is None:
        return
    flags = np.zeros(table.num_rows, dtype=bool)
    if forking is not None and forking_mask is not None:
        mask = forking_mask(table, forking)
        flags = np.asarray(mask.to_numpy(zero_copy_only=False) if hasattr(mask, "to_numpy")
                           else mask, dtype=bool)
        example.forking_marked = True
    positions = table.column("position").to_pylist()
    example.tokens = [{"position": int(p), "text": t,
                       "entropy": float(h) if math.isfinite(h) else None, "fork": bool(f)}
                      for p, t, h, f in zip(positions, texts, entropy, flags)]
    if example.completion is None:
        example.completion = "".join(texts)
