"""Entropy estimators: exact from logits, top-k bounds and point estimate, surprisal."""

import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.special import log_softmax, softmax
from scipy.stats import entropy as scipy_entropy

from entropylens.errors import EntropylensError
from entropylens.estimators import (ASSUMED_VOCAB_SIZE, TOPK_UPPER_WEIGHT,
                                    VocabularySizeWarning, entropy_from_logits,
                                    logprobs_from_logits, token_entropy, topk_bounds,
                                    topk_entropy, topk_error_table, topk_point_estimate)

V_SMOLLM2 = 49_152
#: Errors measured on the shared run and stated in topk_point_estimate's docstring.
MEASURED = {"vanilla": {"mae": 0.0544, "bias": -0.0173},
            "top20": {"mae": 0.1195, "bias": -0.0404}}


def _shared_tokens(shared_run, run):
    return pq.read_table(shared_run / run / "tokens.parquet",
                         columns=["entropy", "top_logprobs", "logprob"])


# -- exact entropy from logits -----------------------------------------------------------

def test_entropy_from_logits_equals_scipy_at_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=4.0, size=(37, 500))
    for temperature in (0.6, 1.0, 1.7):
        expected = scipy_entropy(softmax(logits / temperature, axis=1), axis=1)
        np.testing.assert_allclose(entropy_from_logits(logits, temperature), expected,
                                   rtol=1e-10, atol=1e-12)
    # chunking does not change the result, and any leading shape is kept
    np.testing.assert_array_equal(entropy_from_logits(logits, chunk_rows=5),
                                  entropy_from_logits(logits))
    assert entropy_from_logits(logits.reshape(1, 37, 500)).shape == (1, 37)


def test_entropy_from_logits_handles_masked_and_extreme_logits():
    logits = np.array([[0.0, 0.0, -np.inf, -np.inf],     # two equal tokens: log 2
                       [1e4, 0.0, 0.0, 0.0],             # one-hot without overflow
                       [-np.inf] * 4,                    # nothing: NaN
                       [3.0, 3.0, 3.0, 3.0]], dtype=np.float32)
    h = entropy_from_logits(logits)
    assert h[0] == pytest.approx(np.log(2))
    assert h[1] == 0.0
    assert np.isnan(h[2])
    assert h[3] == pytest.approx(np.log(4))


def test_logprobs_from_logits_equal_log_softmax():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(20, 64))
    ids = rng.integers(0, 64, size=20)
    expected = log_softmax(logits / 0.8, axis=1)[np.arange(20), ids]
    np.testing.assert_allclose(logprobs_from_logits(logits, ids, 0.8, chunk_rows=3),
                               expected, rtol=1e-12)
    with pytest.raises(EntropylensError, match="token ids"):
        logprobs_from_logits(logits, ids + 64)


@pytest.mark.parametrize("temperature", [0, -1, float("nan")])
def test_bad_temperature_is_an_error(temperature):
    with pytest.raises(EntropylensError, match="temperature"):
        entropy_from_logits(np.zeros((2, 3)), temperature)


# -- top-k bounds ------------------------------------------------------------------------

def test_topk_bounds_bracket_every_token_of_the_shared_run(shared_run):
    for run in ("vanilla", "top20"):
        table = _shared_tokens(shared_run, run)
        exact = table.column("entropy").to_numpy().astype(np.float64)
        lower, upper = topk_bounds(table.column("top_logprobs"), vocab_size=V_SMOLLM2,
                                   top_k=5)
        assert np.isfinite(lower).all() and np.isfinite(upper).all()
        # float32 logging of logprobs and entropies: 1e-4 nats of slack
        assert (lower <= exact + 1e-4).all(), run
        assert (upper >= exact - 1e-4).all(), run


def test_point_estimate_error_is_what_the_docstring_states(shared_run):
    for run, stated in MEASURED.items():
        table = _shared_tokens(shared_run, run)
        exact = table.column("entropy").to_numpy().astype(np.float64)
        point = topk_point_estimate(table.column("top_logprobs"), vocab_size=V_SMOLLM2,
                                    top_k=5)
        error = point - exact
        assert np.abs(error).mean() == pytest.approx(stated["mae"], abs=5e-4), run
        assert error.mean() == pytest.approx(stated["bias"], abs=5e-4), run
    # the error table of the library agrees with this computation
    table = topk_error_table(_shared_tokens(shared_run, "vanilla"), vocab_size=V_SMOLLM2,
                             top_k=5).set_index("range")
    assert table.loc["all", "mae"] == pytest.approx(MEASURED["vanilla"]["mae"], abs=5e-4)
    assert table["below_lower"].sum() == 0 and table["above_upper"].sum() == 0
    assert table.loc["[0, 0.1)", "mae"] < 0.001 < table.loc["[4, inf)", "mae"]


def _entropy(p):
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_bounds_are_attained_by_their_extreme_distributions():
    vocab, top = 40, np.array([0.4, 0.2, 0.1])
    tail = 1 - top.sum()                                   # 0.3 = 3 tokens of 0.1 + 0
    # lower: the tail in as few tokens as possible, each at most p_k
    concentrated = np.concatenate([top, [0.1, 0.1, 0.1], np.zeros(vocab - 6)])
    # upper: the tail spread evenly over the V - k other tokens
    spread = np.concatenate([top, np.full(vocab - 3, tail / (vocab - 3))])
    lower, upper = topk_bounds([np.log(top).tolist()], vocab_size=vocab)
    assert lower[0] == pytest.approx(_entropy(concentrated), rel=1e-12)
    assert upper[0] == pytest.approx(_entropy(spread), rel=1e-12)
    # a remainder token: tail 0.25 = 2 tokens of 0.1 and one of 0.05
    top = np.array([0.5, 0.15, 0.1])
    lower, _ = topk_bounds([np.log(top).tolist()], vocab_size=vocab)
    assert lower[0] == pytest.approx(_entropy(np.array([0.5, 0.15, 0.1, 0.1, 0.1, 0.05])))


def test_bounds_bracket_random_distributions_with_any_k():
    rng = np.random.default_rng(2)
    vocab = 300
    probs = softmax(rng.normal(scale=rng.uniform(0.5, 6, size=(400, 1)), size=(400, vocab)),
                    axis=1)
    exact = scipy_entropy(probs, axis=1)
    ordered = -np.sort(-probs, axis=1)
    for k in (1, 5, 20):
        lower, upper = topk_bounds(np.log(ordered[:, :k]), vocab_size=vocab)
        assert (lower <= exact + 1e-12).all() and (upper >= exact - 1e-12).all()
        point = topk_point_estimate(np.log(ordered[:, :k]), vocab_size=vocab)
        assert ((point >= lower) & (point <= upper)).all()


def test_extra_sampled_entry_takes_its_cap_from_the_kth_largest():
    # vLLM lists the top k plus the sampled token when it is not among them
    probs = np.array([0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    exact = _entropy(probs)
    listed = [np.log([0.5, 0.2, 0.05]).tolist()]             # top-2 + sampled 0.05
    lower, upper = topk_bounds(listed, vocab_size=6, top_k=2)
    assert lower[0] <= exact <= upper[0]
    # without top_k the cap would be the sampled token's 0.05, which overstates the lower
    # bound; with it the cap is 0.2 and the bound holds
    naive, _ = topk_bounds(listed, vocab_size=6)
    assert naive[0] > lower[0]


def test_rounding_nulls_and_empty_lists():
    lists = pa.array([[np.log(0.6), np.log(0.41)],      # sums above 1: no tail
                      None,                            # no alternatives logged
                      [],                              # empty list
                      [1e-7, None, -np.inf],           # a hair above 0, null, zero prob
                      [np.log(0.7), np.log(0.2)]], pa.list_(pa.float32()))
    result = topk_entropy(lists, vocab_size=100)
    truncated = -(0.6 * np.log(0.6) + 0.41 * np.log(0.41))
    assert result.lower[0] == pytest.approx(truncated, rel=1e-6)
    assert result.upper[0] == pytest.approx(truncated, rel=1e-6)
    assert result.tail_mass[0] == 0
    assert np.isnan(result.lower[1:3]).all() and np.isnan(result.point[1:3]).all()
    assert result.lower[3] == pytest.approx(0.0, abs=1e-6)
    assert result.entropy_source == "topk"
    # slices of an Arrow array give the rows they hold
    sliced_lower, _ = topk_bounds(lists.slice(3), vocab_size=100)
    np.testing.assert_array_equal(sliced_lower, result.lower[3:])
    chunked_lower, _ = topk_bounds(pa.chunked_array([lists.slice(0, 2), lists.slice(2)]),
                                   vocab_size=100)
    np.testing.assert_array_equal(chunked_lower, result.lower)


def test_unknown_vocabulary_gives_no_upper_bound_and_a_warned_assumption():
    lists = [np.log([0.5, 0.3]).tolist(), np.log([0.9, 0.05]).tolist()]
    lower, upper = topk_bounds(lists)
    assert np.isnan(upper).all() and np.isfinite(lower).all()
    with pytest.warns(VocabularySizeWarning):
        point = topk_point_estimate(lists)
    lo, up = topk_bounds(lists, vocab_size=ASSUMED_VOCAB_SIZE)
    np.testing.assert_allclose(point, lo + TOPK_UPPER_WEIGHT * (up - lo))


def test_token_entropy_dispatches_on_source():
    batch = pa.table({"entropy": pa.array([0.5, None], pa.float32()),
                      "logprob": pa.array([-0.25, None], pa.float32()),
                      "top_logprobs": pa.array([[np.log(0.9)], None], pa.list_(pa.float32()))})
    np.testing.assert_array_equal(token_entropy(batch, "exact"), [0.5, np.nan])
    np.testing.assert_array_equal(token_entropy(batch, "surprisal"), [0.25, np.nan])
    with warnings.catch_warnings():
        warnings.simplefilter("error", VocabularySizeWarning)   # analyses do not warn
        topk = token_entropy(batch, "topk")
    assert np.isfinite(topk[0]) and np.isnan(topk[1])
    with pytest.raises(EntropylensError, match="unknown entropy source"):
        token_entropy(batch, "magic")


def test_numpy_and_arrow_inputs_agree(shared_run):
    table = _shared_tokens(shared_run, "vanilla").slice(0, 2000)
    dense = np.stack(table.column("top_logprobs").to_numpy(zero_copy_only=False))
    from_arrow = topk_bounds(table.column("top_logprobs"), vocab_size=V_SMOLLM2)
    from_numpy = topk_bounds(dense, vocab_size=V_SMOLLM2)
    np.testing.assert_allclose(from_arrow, from_numpy, rtol=1e-12)
