"""Per-token entropy estimators and the choice of entropy source.

Each token's entropy comes from the best source a run has (DESIGN.md section 4):

1. ``exact``: the full-vocabulary entropy, logged or computed from logits
   (:func:`entropy_from_logits`).
2. ``topk``: estimated from the logged top-k alternatives: rigorous bounds
   (:func:`topk_bounds`) and a measured point estimate (:func:`topk_point_estimate`).
3. ``surprisal``: ``-logprob`` of the sampled token (:func:`surprisal`); per token it is noise,
   but its mean over many tokens estimates the mean entropy when the token was sampled from the
   distribution the logprob describes (temperature 1 or tempered logprobs, no top-p/top-k).

Every result of entropylens says which source it used. All entropies are in nats.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import EntropylensError

#: Entropy sources, best first.
ENTROPY_SOURCES = ("exact", "topk", "surprisal")

#: Weight of the upper bound in the top-k point estimate ``lower + w * (upper - lower)``.
#: The median of ``(H - lower) / (upper - lower)`` over the 115,607 tokens of the shared
#: SmolLM2 ``vanilla`` run (V = 49,152, top-5) is 0.265; on the ``top20`` run it is 0.269.
TOPK_UPPER_WEIGHT = 0.27

#: Vocabulary size the top-k point estimate assumes when the run does not say (see
#: :func:`topk_point_estimate`); the rigorous upper bound is NaN then.
ASSUMED_VOCAB_SIZE = 65_536

#: Bytes of float64 work space :func:`entropy_from_logits` allows itself per chunk of rows.
_LOGIT_CHUNK_BYTES = 64 * 1024 * 1024


class VocabularySizeWarning(UserWarning):
    """A top-k estimate had to assume the vocabulary size."""


def best_entropy_source(manifest: Mapping) -> str | None:
    """The best entropy source a run has, from its manifest (None for metric-only runs)."""
    available = set(manifest.get("entropy_sources") or ())
    for source in ENTROPY_SOURCES:
        if source in available:
            return source
    return None


def columns_for(source: str) -> tuple[str, ...]:
    """Token columns an estimator of ``source`` reads."""
    try:
        return {"exact": ("entropy",), "topk": ("top_logprobs",),
                "surprisal": ("logprob",)}[source]
    except KeyError:
        raise EntropylensError(f"unknown entropy source {source!r} "
                               f"(one of {', '.join(ENTROPY_SOURCES)})") from None


# -- exact entropy from logits -------------------------------------------------------------

def _logit_rows(logits) -> tuple[np.ndarray, tuple[int, ...]]:
    array = np.asarray(logits)
    if array.ndim == 0:
        raise EntropylensError("logits need a vocabulary axis (the last one)")
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype,
                                                                          np.integer):
        raise EntropylensError(f"logits must be numbers, not {array.dtype}")
    return array.reshape(-1, array.shape[-1]), array.shape[:-1]


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not np.isfinite(temperature) or temperature <= 0:
        raise EntropylensError(f"temperature must be a positive number, got {temperature}")
    return temperature


def _chunk_rows(vocab: int, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        return max(1, int(chunk_rows))
    return max(1, _LOGIT_CHUNK_BYTES // (8 * max(vocab, 1)))


def _shifted_logits(chunk: np.ndarray, temperature: float):
    """``z = logits/T - max`` in float64 and ``log Σ exp z`` per row (stable)."""
    z = chunk.astype(np.float64) / temperature
    top = np.max(z, axis=1, keepdims=True)
    # a row of all -inf has no distribution: keep it NaN instead of inf - inf warnings
    top = np.where(np.isfinite(top), top, np.nan)
    z -= top
    with np.errstate(under="ignore"):
        log_norm = np.log(np.sum(np.exp(z), axis=1))
    return z, log_norm


def entropy_from_logits(logits, temperature: float = 1.0, *,
                        chunk_rows: int | None = None) -> np.ndarray:
    """Exact full-vocabulary entropy of ``softmax(logits / T)``, in nats.

    Parameters
    ----------
    logits : array_like, shape (..., V)
        Unnormalised log-probabilities; the last axis is the vocabulary. ``-inf`` entries
        (masked tokens) have probability zero.
    temperature : float
        Sampling temperature T: the entropy is that of the distribution the tokens were sampled
        from, ``softmax(logits / T)``.
    chunk_rows : int, optional
        Rows processed at once; by default as many as fit in 64 MiB of float64 work space, so
        memory stays bounded whatever the number of rows.

    Returns
    -------
    numpy.ndarray
        float64 of shape ``logits.shape[:-1]``; NaN for a row without a finite logit.

    Notes
    -----
    Stable log-sum-exp: with ``z = logits/T - max`` and ``Z = Σ exp z``,
    ``H = log Z - Σ exp(z) z / Z``.
    """
    temperature = _check_temperature(temperature)
    rows, shape = _logit_rows(logits)
    out = np.empty(rows.shape[0], dtype=np.float64)
    step = _chunk_rows(rows.shape[1], chunk_rows)
    for start in range(0, rows.shape[0], step):
        z, log_norm = _shifted_logits(rows[start:start + step], temperature)
        with np.errstate(under="ignore", invalid="ignore"):
            weights = np.exp(z)
            # masked tokens (-inf) contribute nothing; avoid 0 * -inf = NaN
            expected = np.sum(weights * np.where(np.isfinite(z), z, 0.0), axis=1)
            out[start:start + step] = log_norm - expected / np.exp(log_norm)
    # float rounding can leave -1e-16 for one-hot rows
    np.maximum(out, 0.0, out=out, where=np.isfinite(out))
    return out.reshape(shape)


def logprobs_from_logits(logits, token_ids, temperature: float = 1.0, *,
                         chunk_rows: int | None = None) -> np.ndarray:
    """Log-probability of ``token_ids`` under ``softmax(logits / T)``.

    Parameters
    ----------
    logits : array_like, shape (..., V)
    token_ids : array_like of int, shape (...)
        One token per row of ``logits``.
    temperature : float
    chunk_rows : int, optional
        As in :func:`entropy_from_logits`.

    Returns
    -------
    numpy.ndarray
        float64 of shape ``logits.shape[:-1]``.
    """
    temperature = _check_temperature(temperature)
    rows, shape = _logit_rows(logits)
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if ids.shape[0] != rows.shape[0]:
        raise EntropylensError(f"{ids.shape[0]} token ids for {rows.shape[0]} rows of logits")
    if ids.size and (ids.min() < 0 or ids.max() >= rows.shape[1]):
        raise EntropylensError(f"token ids must lie in [0, {rows.shape[1]}) "
                               f"(the vocabulary of the logits)")
    out = np.empty(rows.shape[0], dtype=np.float64)
    step = _chunk_rows(rows.shape[1], chunk_rows)
    for start in range(0, rows.shape[0], step):
        z, log_norm = _shifted_logits(rows[start:start + step], temperature)
        chosen = z[np.arange(z.shape[0]), ids[start:start + step]]
        out[start:start + step] = chosen - log_norm
    return out.reshape(shape)


# -- top-k bounds and point estimate ------------------------------------------------------

@dataclass
class TopkEntropy:
    """Per-token entropy information from logged top-k alternatives (all float64, nats).

    Attributes
    ----------
    lower, upper : numpy.ndarray
        Rigorous bounds (DESIGN.md section 4). ``upper`` is NaN when the vocabulary size is
        unknown.
    point : numpy.ndarray
        The point estimate of :func:`topk_point_estimate`.
    tail_mass : numpy.ndarray
        ``m = 1 - Σ p_i``, clipped at 0.
    entropy_source : str
        Always ``"topk"``.
    """

    lower: np.ndarray
    upper: np.ndarray
    point: np.ndarray
    tail_mass: np.ndarray
    entropy_source: str = "topk"


def _flatten_lists(top_logprobs) -> tuple[np.ndarray, np.ndarray, int]:
    """Flat float64 values and their row index for a list column (no per-row Python)."""
    if isinstance(top_logprobs, np.ndarray) and top_logprobs.dtype != object \
            and top_logprobs.ndim == 2:
        n, k = top_logprobs.shape
        return (top_logprobs.astype(np.float64).reshape(-1),
                np.repeat(np.arange(n), k), n)
    if isinstance(top_logprobs, pa.ChunkedArray):
        top_logprobs = top_logprobs.combine_chunks() if top_logprobs.num_chunks != 1 \
            else top_logprobs.chunk(0)
    if not isinstance(top_logprobs, pa.Array):
        top_logprobs = pa.array(list(top_logprobs), type=pa.list_(pa.float64()))
    if not (pa.types.is_list(top_logprobs.type) or pa.types.is_large_list(top_logprobs.type)
            or pa.types.is_fixed_size_list(top_logprobs.type)):
        raise EntropylensError(f"top_logprobs must be a list column, not {top_logprobs.type}",
                               field="top_logprobs")
    n = len(top_logprobs)
    # list_value_length is null for null lists and list_flatten skips their children,
    # whatever the offsets of a sliced array say
    lengths = pc.list_value_length(top_logprobs).fill_null(0).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(top_logprobs)
    values = pc.cast(flat, pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
    return values, np.repeat(np.arange(n), lengths.astype(np.int64)), n


def _topk_parts(top_logprobs, vocab_size: int | None, top_k: int | None):
    values, rows, n = _flatten_lists(top_logprobs)
    with np.errstate(over="ignore", under="ignore"):
        # rounding can put a logprob a hair above 0; a probability is never above 1
        probs = np.exp(np.minimum(values, 0.0))
    valid = np.isfinite(values) & (probs > 0)
    probs = np.where(valid, probs, 0.0)
    counts = np.bincount(rows, weights=valid, minlength=n)
    mass = np.bincount(rows, weights=probs, minlength=n)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(valid, -probs * np.log(np.where(valid, probs, 1.0)), 0.0)
    known = np.bincount(rows, weights=terms, minlength=n)

    # The cap of an unlisted token's probability is the k-th largest listed one: the list
    # may hold the sampled token after the top k (vLLM returns k + 1 entries then).
    order = np.lexsort((-probs, rows))
    sorted_probs = probs[order]
    starts = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))[:-1]]) \
        if n else np.zeros(0, dtype=np.int64)
    nominal = counts.astype(np.int64)
    if top_k:
        nominal = np.minimum(nominal, int(top_k))
    has_values = nominal > 0
    cap = np.zeros(n)
    cap[has_values] = sorted_probs[(starts + nominal - 1)[has_values]]

    tail = np.clip(1.0 - mass, 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        full = np.floor(np.where(cap > 0, tail / np.where(cap > 0, cap, 1.0), 0.0))
        rest = tail - full * cap
        lower = known - np.where(full > 0, full * cap * np.log(np.where(cap > 0, cap, 1.0)),
                                 0.0) - np.where(rest > 0, rest * np.log(np.where(
                                     rest > 0, rest, 1.0)), 0.0)
        if vocab_size:
            others = float(vocab_size) - counts
            upper = known - np.where(tail > 0, tail * np.log(np.where(tail > 0, tail, 1.0)
                                                             / np.where(others > 0, others,
                                                                        np.nan)), 0.0)
            upper = np.where(others > 0, upper, np.nan)
        else:
            upper = np.full(n, np.nan)
    empty = counts == 0
    lower[empty] = np.nan
    upper[empty] = np.nan
    tail[empty] = np.nan
    return lower, upper, tail, counts


def topk_bounds(top_logprobs, *, vocab_size: int | None = None,
                top_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rigorous lower and upper bounds of each token's entropy from its top-k alternatives.

    With the listed probabilities ``p_1 ≥ … ≥ p_k``, tail mass ``m = 1 - Σ p_i`` and
    vocabulary size ``V`` (DESIGN.md section 4):

    - lower: the tail in as few tokens as possible, each at most ``p_k``:
      ``n = ⌊m / p_k⌋`` tokens of ``p_k`` and one of ``m - n·p_k``;
    - upper: the tail spread evenly over the ``V - k`` other tokens,
      adding ``-m·log(m / (V - k))``.

    Parameters
    ----------
    top_logprobs : pyarrow list array, chunked array, 2-D numpy array or list of lists
        Logprobs of the logged alternatives of each token, in any order. Null lists give NaN;
        null, NaN and ``-inf`` entries count as absent (probability 0).
    vocab_size : int, optional
        ``V``. Unknown: the upper bound is NaN (no rigorous bound exists without it).
    top_k : int, optional
        The nominal ``k``. A row with more entries (vLLM adds the sampled token when it is not
        in the top k) takes its cap ``p_k`` from the k-th largest entry; without ``top_k`` the
        cap is the smallest listed probability.

    Returns
    -------
    lower, upper : numpy.ndarray
        float64. Rounding: logprobs above 0 are read as 0 and a negative tail mass (listed
        probabilities summing above 1) as 0, in which case both bounds equal the entropy of
        the listed tokens.
    """
    lower, upper, _, _ = _topk_parts(top_logprobs, vocab_size, top_k)
    return lower, upper


def topk_entropy(top_logprobs, *, vocab_size: int | None = None,
                 top_k: int | None = None) -> TopkEntropy:
    """Bounds, point estimate and tail mass at once (see :func:`topk_bounds`)."""
    lower, upper, tail, _ = _topk_parts(top_logprobs, vocab_size, top_k)
    point = _point(top_logprobs, lower, upper, vocab_size, top_k)
    return TopkEntropy(lower=lower, upper=upper, point=point, tail_mass=tail)


def _point(top_logprobs, lower, upper, vocab_size, top_k, warn: bool = True) -> np.ndarray:
    if not vocab_size:
        if warn:
            warnings.warn(f"vocabulary size unknown: the top-k entropy estimate assumes "
                          f"V = {ASSUMED_VOCAB_SIZE:,} (pass vocab_size or ingest with "
                          "--vocab-size)", VocabularySizeWarning, stacklevel=3)
        _, upper, _, _ = _topk_parts(top_logprobs, ASSUMED_VOCAB_SIZE, top_k)
    return lower + TOPK_UPPER_WEIGHT * (upper - lower)


def topk_point_estimate(top_logprobs, *, vocab_size: int | None = None,
                        top_k: int | None = None) -> np.ndarray:
    """Point estimate of each token's entropy from its top-k alternatives, in nats.

    ``lower + 0.27 · (upper - lower)`` with the bounds of :func:`topk_bounds`: the weight
    :data:`TOPK_UPPER_WEIGHT` is the median position of the exact entropy between the bounds
    on the shared SmolLM2-135M GRPO run (V = 49,152, top-5 logprobs, exact entropies).

    Measured error against the exact entropy (:func:`topk_error_table`):

    ============================  =========  ==========  =======
    tokens                        MAE        bias        RMSE
    ============================  =========  ==========  =======
    ``vanilla``, all (115,607)    0.054      -0.017      0.136
    ``top20``, all (123,123)      0.120      -0.040      0.210
    H < 0.1 (both runs, 46,367)   0.0003     0.000       0.001
    0.1 ≤ H < 0.5 (25,408)        0.005      +0.001      0.009
    0.5 ≤ H < 1 (21,435)          0.017      +0.006      0.025
    1 ≤ H < 2 (47,418)            0.051      +0.021      0.073
    2 ≤ H < 4 (78,486)            0.126      -0.004      0.165
    H ≥ 4 (19,616)                0.42       -0.40       0.51
    ============================  =========  ==========  =======

    ``top20`` was not used to choose the weight, so its numbers are out of sample. The
    estimate is good where most tokens are (low and middle entropy) and underestimates the
    rare very flat distributions, whose mass lies mostly outside the top 5. The lower bound
    alone has MAE 0.26 (``vanilla``) and 0.60 (``top20``), the midpoint of the bounds 0.19 and
    0.43.

    Parameters
    ----------
    top_logprobs : see :func:`topk_bounds`
    vocab_size : int, optional
        ``V``. Unknown: the estimate assumes ``V =`` :data:`ASSUMED_VOCAB_SIZE` and emits a
        :class:`VocabularySizeWarning`; its value moves by ``0.27 · m · log(V'/V)`` for a true
        size ``V'`` (``m`` the tail mass), e.g. at most 0.23 nats for V' = 152k.
    top_k : int, optional
        See :func:`topk_bounds`.

    Returns
    -------
    numpy.ndarray
        float64, NaN for tokens without alternatives.
    """
    lower, upper, _, _ = _topk_parts(top_logprobs, vocab_size, top_k)
    return _point(top_logprobs, lower, upper, vocab_size, top_k)


# -- surprisal and dispatch ---------------------------------------------------------------

def surprisal(logprob) -> np.ndarray:
    """``-logprob`` of the sampled tokens, as float64 (nulls become NaN).

    Per token this is noise around the entropy; only its mean over many tokens estimates the
    mean entropy, and only when the token was sampled from the distribution the logprob
    describes (temperature 1 or tempered logprobs, no top-p/top-k truncation).
    """
    if isinstance(logprob, (pa.Array, pa.ChunkedArray)):
        logprob = pc.cast(logprob, pa.float64()).fill_null(np.nan) \
            .to_numpy(zero_copy_only=False)
    values = np.asarray(logprob, dtype=np.float64)
    return -values


def token_entropy(batch: pa.RecordBatch | pa.Table, source: str, *,
                  vocab_size: int | None = None, top_k: int | None = None) -> np.ndarray:
    """Per-token entropy of a batch from ``source``, in nats, NaN where unavailable.

    Parameters
    ----------
    batch : pyarrow.RecordBatch or pyarrow.Table
        Must hold the columns of :func:`columns_for`.
    source : {"exact", "topk", "surprisal"}
    vocab_size : int, optional
        Vocabulary size for the top-k estimate.
    top_k : int, optional
        Nominal k of the top-k lists (see :func:`topk_bounds`).

    Notes
    -----
    Without ``vocab_size`` the top-k estimate assumes :data:`ASSUMED_VOCAB_SIZE` silently;
    :func:`topk_point_estimate` warns.
    """
    if source == "exact":
        column = batch.column("entropy")
        return pc.cast(column, pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
    if source == "surprisal":
        return surprisal(batch.column("logprob"))
    if source == "topk":
        # no warning here: analyses report a missing V through the data-quality check
        # ``topk_without_vocab`` instead of once per batch
        top = batch.column("top_logprobs")
        lower, upper, _, _ = _topk_parts(top, vocab_size, top_k)
        return _point(top, lower, upper, vocab_size, top_k, warn=False)
    raise EntropylensError(f"unknown entropy source {source!r} "
                           f"(one of {', '.join(ENTROPY_SOURCES)})")


#: Entropy ranges (nats) of :func:`topk_error_table`.
ERROR_RANGES = (0.0, 0.1, 0.5, 1.0, 2.0, 4.0, np.inf)


def topk_error_table(tokens: pa.Table | pa.RecordBatch, *, vocab_size: int,
                     top_k: int | None = None, ranges=ERROR_RANGES):
    """Error of the top-k estimates against exact entropies, overall and by entropy range.

    Use it on any run that logged both exact entropies and top-k logprobs to see how far the
    top-k estimate can be trusted for that model.

    Parameters
    ----------
    tokens : pyarrow.Table or RecordBatch
        With columns ``entropy`` and ``top_logprobs``; rows lacking either are left out.
    vocab_size : int
    top_k : int, optional
    ranges : sequence of float
        Edges of the exact-entropy ranges.

    Returns
    -------
    pandas.DataFrame
        One row per range and a last row ``all``: ``range, tokens, mae, bias, rmse,
        lower_mae, midpoint_mae, below_lower, above_upper`` (the last two count tokens whose
        exact entropy lies outside the bounds by more than 1e-4 nats, float32 rounding).
    """
    import pandas as pd

    exact = token_entropy(tokens, "exact")
    estimate = topk_entropy(tokens.column("top_logprobs"), vocab_size=vocab_size, top_k=top_k)
    keep = np.isfinite(exact) & np.isfinite(estimate.point)
    exact, lower, upper, point = (exact[keep], estimate.lower[keep], estimate.upper[keep],
                                  estimate.point[keep])
    edges = np.asarray(ranges, dtype=np.float64)
    which = np.clip(np.searchsorted(edges, exact, side="right") - 1, 0, len(edges) - 2)
    rows = []
    for index in [*range(len(edges) - 1), None]:
        chosen = np.ones(len(exact), bool) if index is None else which == index
        label = "all" if index is None else f"[{edges[index]:g}, {edges[index + 1]:g})"
        error = point[chosen] - exact[chosen]
        count = int(chosen.sum())
        rows.append({
            "range": label, "tokens": count,
            "mae": float(np.abs(error).mean()) if count else np.nan,
            "bias": float(error.mean()) if count else np.nan,
            "rmse": float(np.sqrt((error ** 2).mean())) if count else np.nan,
            "lower_mae": float(np.abs(lower[chosen] - exact[chosen]).mean()) if count
            else np.nan,
            "midpoint_mae": float(np.abs((lower[chosen] + upper[chosen]) / 2
                                         - exact[chosen]).mean()) if count else np.nan,
            "below_lower": int((exact[chosen] < lower[chosen] - 1e-4).sum()),
            "above_upper": int((exact[chosen] > upper[chosen] + 1e-4).sum()),
        })
    return pd.DataFrame(rows)
