"""Per-token entropy estimators and the choice of entropy source.

Each token's entropy comes from the best source a run has (DESIGN.md section 4):

1. ``exact``: the full-vocabulary entropy, logged or computed from logits.
2. ``topk``: estimated from the logged top-k alternatives.
3. ``surprisal``: ``-logprob`` of the sampled token; per token it is noise, but its mean over
   many tokens estimates the mean entropy when the token was sampled from the distribution
   the logprob describes.

Every result of entropylens says which source it used.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pyarrow as pa

#: Entropy sources, best first.
ENTROPY_SOURCES = ("exact", "topk", "surprisal")


def best_entropy_source(manifest: Mapping) -> str | None:
    """The best entropy source a run has, from its manifest (None for metric-only runs)."""
    available = set(manifest.get("entropy_sources") or ())
    for source in ENTROPY_SOURCES:
        if source in available:
            return source
    return None


def columns_for(source: str) -> tuple[str, ...]:
    """Token columns an estimator of ``source`` reads."""
    return {"exact": ("entropy",), "topk": ("top_logprobs",),
            "surprisal": ("logprob",)}[source]


def surprisal(logprob) -> np.ndarray:
    """``-logprob`` of the sampled tokens, as float64 (nulls become NaN)."""
    values = np.asarray(logprob, dtype=np.float64)
    return -values


def token_entropy(batch: pa.RecordBatch | pa.Table, source: str, *,
                  vocab_size: int | None = None) -> np.ndarray:
    """Per-token entropy of a batch from ``source``, in nats, NaN where unavailable.

    Parameters
    ----------
    batch : pyarrow.RecordBatch or pyarrow.Table
        Must hold the columns of :func:`columns_for`.
    source : {"exact", "topk", "surprisal"}
    vocab_size : int, optional
        Vocabulary size for the top-k estimate.
    """
    if source == "exact":
        return batch.column("entropy").to_numpy(zero_copy_only=False).astype(np.float64)
    if source == "surprisal":
        return surprisal(batch.column("logprob").to_numpy(zero_copy_only=False))
    if source == "topk":
        return topk_point_estimate(batch.column("top_logprobs"), vocab_size=vocab_size)
    raise ValueError(f"unknown entropy source {source!r} (one of {ENTROPY_SOURCES})")
