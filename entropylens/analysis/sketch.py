"""A mergeable quantile sketch with a relative-error guarantee (DDSketch, arXiv 1908.10693).

Values are counted in logarithmic buckets ``(gamma**(i-1), gamma**i]`` with
``gamma = (1 + alpha) / (1 - alpha)``; a bucket is represented by ``2 gamma**i / (gamma + 1)``,
which lies within relative distance ``alpha`` of every value in it. Counts are integers, so
merging two sketches is exact and order-independent (the Ray and local engines agree).

Error bound
-----------
Let ``x`` be the values added, sorted, and ``r = q (n - 1)`` the rank numpy's default
(linear) quantile interpolates at. :meth:`QuantileSketch.quantile` returns the same linear
interpolation of estimates ``e_k`` of the order statistics ``x_k`` with
``|e_k - x_k| <= alpha |x_k| + MIN_VALUE``. Hence, for ``v = numpy.quantile(x, q)``::

    |estimate - v| <= alpha * max(|x_floor(r)|, |x_ceil(r)|) + MIN_VALUE

and, when all values have one sign (entropies are non-negative),
``|estimate - v| <= alpha |v| + MIN_VALUE``. Values with ``|x| < MIN_VALUE`` count as 0 and
values beyond ``MAX_VALUE`` are clamped to it (the bound holds for ``|x| <= MAX_VALUE``). The
exact minimum and maximum are kept and the estimate is clipped to them, so ``q = 0`` and
``q = 1`` are exact. Memory: two fixed arrays of about ``ln(MAX/MIN) / ln(gamma)`` counts
(4,147 each at the default ``alpha = 0.005``), whatever the number of values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Default relative accuracy of :class:`QuantileSketch`.
DEFAULT_ALPHA = 0.005
#: Magnitudes below this count as zero (absolute error at most this).
MIN_VALUE = 1e-9
#: Magnitudes above this are clamped (entropies and surprisals never get near it).
MAX_VALUE = 1e9


@dataclass
class QuantileSketch:
    """Mergeable relative-error quantile sketch over float values.

    Parameters
    ----------
    alpha : float
        Relative accuracy, strictly between 0 and 1 (default 0.005: 0.5 %).

    Examples
    --------
    >>> s = QuantileSketch()
    >>> s.add(np.array([0.0, 1.0, 2.0, 3.0]))
    >>> abs(s.quantile([0.5])[0] - 1.5) <= 0.005 * 1.5 + 1e-9
    True
    """

    alpha: float = DEFAULT_ALPHA
    positive: np.ndarray = field(default=None, repr=False)
    negative: np.ndarray = field(default=None, repr=False)
    zeros: int = 0
    count: int = 0
    min: float = np.inf
    max: float = -np.inf

    def __post_init__(self):
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must lie strictly between 0 and 1, got {self.alpha!r}")
        self._log_gamma = np.log1p(2 * self.alpha / (1 - self.alpha))
        self._offset = int(np.ceil(np.log(MIN_VALUE) / self._log_gamma))
        self._nbuckets = int(np.ceil(np.log(MAX_VALUE) / self._log_gamma)) - self._offset + 1
        if self.positive is None:
            self.positive = np.zeros(self._nbuckets, dtype=np.int64)
        if self.negative is None:
            self.negative = np.zeros(self._nbuckets, dtype=np.int64)

    # -- building -------------------------------------------------------------------------
    def _buckets(self, magnitudes: np.ndarray) -> np.ndarray:
        index = np.ceil(np.log(np.minimum(magnitudes, MAX_VALUE)) / self._log_gamma)
        return np.clip(index.astype(np.int64) - self._offset, 0, self._nbuckets - 1)

    def add(self, values: np.ndarray) -> None:
        """Count finite values (NaN and infinities are left out)."""
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if not len(values):
            return
        self.count += len(values)
        self.min = min(self.min, float(values.min()))
        self.max = max(self.max, float(values.max()))
        big = np.abs(values) >= MIN_VALUE
        self.zeros += int(len(values) - big.sum())
        pos = values[big & (values > 0)]
        neg = -values[big & (values < 0)]
        if len(pos):
            self.positive += np.bincount(self._buckets(pos), minlength=self._nbuckets)
        if len(neg):
            self.negative += np.bincount(self._buckets(neg), minlength=self._nbuckets)

    def merge(self, other: "QuantileSketch") -> "QuantileSketch":
        """Add ``other``'s counts into this sketch (same ``alpha``) and return it."""
        if other.alpha != self.alpha:
            raise ValueError(f"cannot merge sketches of alpha {self.alpha} and {other.alpha}")
        self.positive += other.positive
        self.negative += other.negative
        self.zeros += other.zeros
        self.count += other.count
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        return self

    # -- querying -------------------------------------------------------------------------
    def _value(self, bucket: np.ndarray) -> np.ndarray:
        gamma = np.exp(self._log_gamma)
        return 2 * np.exp((bucket + self._offset) * self._log_gamma) / (gamma + 1)

    def order_statistics(self, ranks: np.ndarray) -> np.ndarray:
        """Estimates of the order statistics at 0-based integer ``ranks``."""
        ranks = np.asarray(ranks, dtype=np.int64)
        # ascending order: negatives by decreasing magnitude, zeros, positives
        neg_counts = self.negative[::-1]
        counts = np.concatenate([neg_counts, [self.zeros], self.positive])
        buckets = np.arange(self._nbuckets)
        values = np.concatenate([-self._value(buckets[::-1]), [0.0], self._value(buckets)])
        cumulative = np.cumsum(counts)
        where = np.searchsorted(cumulative, ranks, side="right")
        return np.clip(values[np.minimum(where, len(values) - 1)], self.min, self.max)

    def quantile(self, quantiles) -> np.ndarray:
        """Quantiles with numpy's default (linear) rule; NaN when the sketch is empty."""
        q = np.atleast_1d(np.asarray(quantiles, dtype=np.float64))
        if not self.count:
            return np.full(len(q), np.nan)
        rank = q * (self.count - 1)
        low, high = np.floor(rank).astype(np.int64), np.ceil(rank).astype(np.int64)
        lo_value, hi_value = self.order_statistics(low), self.order_statistics(high)
        return lo_value + (rank - low) * (hi_value - lo_value)
