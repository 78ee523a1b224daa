"""The mergeable quantile sketch: its stated error bound on synthetic and real entropies."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from entropylens.analysis.distribution import DISTRIBUTION_QUANTILES, distribution
from entropylens.analysis.forking_thresholds import ForkingThresholds, run_thresholds
from entropylens.analysis.sketch import MIN_VALUE, QuantileSketch
from entropylens.engine import run_aggregators

QS = np.array([0.0, 0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0])


def assert_within_bound(values: np.ndarray, estimate: np.ndarray, alpha: float,
                        quantiles=QS) -> None:
    """The bound of the sketch module: alpha * max(|x_lo|, |x_hi|) + MIN_VALUE, and
    alpha * |exact| + MIN_VALUE when the values have one sign."""
    x = np.sort(values)
    rank = quantiles * (len(x) - 1)
    lo, hi = x[np.floor(rank).astype(int)], x[np.ceil(rank).astype(int)]
    exact = np.quantile(values, quantiles)
    slack = 1e-12 * np.abs(exact)   # float rounding of log() at bucket edges
    bound = alpha * np.maximum(np.abs(lo), np.abs(hi)) + MIN_VALUE + slack
    assert (np.abs(estimate - exact) <= bound).all(), (estimate, exact, bound)
    if (x >= 0).all() or (x <= 0).all():
        assert (np.abs(estimate - exact) <= alpha * np.abs(exact) + MIN_VALUE + slack).all()


def sketch_of(values, alpha=0.005, chunks=1) -> QuantileSketch:
    sketch = QuantileSketch(alpha)
    for part in np.array_split(values, chunks):
        sketch.add(part)
    return sketch


SYNTHETIC = {
    "lognormal": lambda rng: np.exp(rng.normal(-1, 2, 50_000)),
    "half_near_zero": lambda rng: np.where(rng.random(40_000) < 0.5,
                                           10 ** rng.uniform(-8, -2, 40_000),
                                           rng.exponential(1.0, 40_000)),
    "pareto_heavy_tail": lambda rng: rng.pareto(0.8, 30_000),
    "with_exact_zeros": lambda rng: np.concatenate([np.zeros(7_000),
                                                    rng.exponential(2.0, 13_000)]),
    "all_equal": lambda rng: np.full(1_000, 0.6931),
    "all_zero": lambda rng: np.zeros(500),
    "mixed_sign": lambda rng: rng.normal(0, 3, 20_000),
    "tiny_negatives": lambda rng: np.concatenate([-rng.uniform(0, 1e-7, 100),
                                                  rng.exponential(1.0, 5_000)]),
    "single": lambda rng: np.array([3.25]),
}


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
@pytest.mark.parametrize("alpha", [0.005, 0.05])
def test_bound_on_synthetic_data(name, alpha):
    values = SYNTHETIC[name](np.random.default_rng(7))
    assert_within_bound(values, sketch_of(values, alpha, chunks=5).quantile(QS), alpha)


def test_bound_is_tight_not_vacuous():
    # the bound is attained up to a factor of a few: a sketch is not the exact answer
    values = np.exp(np.random.default_rng(1).normal(0, 1, 20_000))
    estimate = sketch_of(values, 0.05).quantile(QS[1:-1])
    relative = np.abs(estimate / np.quantile(values, QS[1:-1]) - 1)
    assert relative.max() > 0.005 and relative.max() <= 0.05 + 1e-12


def test_merge_is_exact_and_order_independent():
    values = np.random.default_rng(3).pareto(1.5, 25_000)
    whole = sketch_of(values)
    parts = [sketch_of(p) for p in np.array_split(values, 7)]
    forward, backward = QuantileSketch(), QuantileSketch()
    for p in parts:
        forward.merge(p)
    for p in parts[::-1]:
        backward.merge(p)
    for merged in (forward, backward):
        np.testing.assert_array_equal(merged.positive, whole.positive)
        assert (merged.count, merged.zeros, merged.min, merged.max) == \
            (whole.count, whole.zeros, whole.min, whole.max)
        np.testing.assert_array_equal(merged.quantile(QS), whole.quantile(QS))
    with pytest.raises(ValueError):
        QuantileSketch(0.01).merge(QuantileSketch(0.02))


def test_empty_nan_and_invalid_alpha():
    sketch = QuantileSketch()
    sketch.add(np.array([np.nan, np.inf, -np.inf]))
    assert sketch.count == 0 and np.isnan(sketch.quantile([0.5])).all()
    for alpha in (0, 1, -0.1):
        with pytest.raises(ValueError):
            QuantileSketch(alpha)


def test_bound_on_real_entropies(shared_run):
    # every exact per-token entropy of the real SmolLM2 GRPO run (vanilla, 69 steps)
    entropy = pq.read_table(shared_run / "vanilla" / "tokens.parquet",
                            columns=["entropy"]).column("entropy").to_numpy()
    entropy = entropy[np.isfinite(entropy)].astype(np.float64)
    assert len(entropy) > 100_000
    assert_within_bound(entropy, sketch_of(entropy, chunks=13).quantile(QS), 0.005)


def test_distribution_sketch_mode_on_real_store(shared_store):
    exact = distribution(shared_store, "vanilla", global_quantiles="exact")
    sketched = distribution(shared_store, "vanilla", global_quantiles="sketch")
    auto = distribution(shared_store, "vanilla")   # small run: exact by default
    pd.testing.assert_frame_equal(auto.global_quantiles, exact.global_quantiles)
    pd.testing.assert_frame_equal(sketched.steps, exact.steps)   # per-step: always exact
    e = exact.global_quantiles["value"].to_numpy()
    s = sketched.global_quantiles["value"].to_numpy()
    assert list(sketched.global_quantiles["q"]) == list(DISTRIBUTION_QUANTILES)
    assert (np.abs(s - e) <= 0.005 * np.abs(e) + MIN_VALUE + 1e-12).all()
    assert not np.array_equal(s, e)


def test_global_forking_threshold_sketch(shared_store):
    manifest = shared_store.manifest("vanilla")
    exact = run_thresholds(shared_store, "vanilla", "exact", manifest, scope="global",
                           ratio=0.2).frame
    sketched = run_aggregators(shared_store, "vanilla", {"t": ForkingThresholds(
        "exact", scope="global", ratio=0.2, sketch=True)})["t"].frame
    e, s = float(exact["threshold"][0]), float(sketched["threshold"][0])
    assert int(exact["tokens"][0]) == int(sketched["tokens"][0])
    assert abs(s - e) <= 0.005 * e + MIN_VALUE
