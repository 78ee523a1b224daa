"""Token-entropy distributions: per-step and global quantiles, histograms on fixed bins."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import entropylens as el
from entropylens.analysis.distribution import (DEFAULT_BINS, DISTRIBUTION_QUANTILES,
                                               bin_index, quantile_name)
from entropylens.errors import EntropylensError
from entropylens.store import Store
from _eos import before_eos

QNAMES = [quantile_name(q) for q in DISTRIBUTION_QUANTILES]


def _binned(values, edges):
    """Independent histogram: numpy's, with the first bin open below and the last above."""
    clipped = np.clip(values, edges[0], np.nextafter(edges[-1], -np.inf)) \
        if np.isfinite(edges[-1]) else np.maximum(values, edges[0])
    inner = np.histogram(clipped, bins=np.where(np.isinf(edges), np.finfo(float).max, edges))
    return inner[0]


def test_distribution_equals_numpy_on_the_shared_run(shared_store, shared_run):
    result = el.distribution(shared_store, "vanilla")
    raw = before_eos(pd.read_parquet(shared_run / "vanilla" / "tokens.parquet", columns=[
        "step", "prompt_idx", "sample_idx", "position", "token", "entropy"]))
    steps = result.steps.set_index("step")
    assert steps.index.tolist() == sorted(raw["step"].unique())
    for step, group in raw.groupby("step"):
        h = group["entropy"].to_numpy(np.float64)
        row = steps.loc[step]
        assert row["tokens"] == len(h)
        assert row["entropy_token_mean"] == pytest.approx(h.mean(), rel=1e-12)
        np.testing.assert_array_equal(row[QNAMES].to_numpy(float),
                                      np.quantile(h, DISTRIBUTION_QUANTILES))
        assert row["frac_below_0_01"] == np.mean(h < 0.01)
        counts = result.histogram[result.histogram["step"] == step]["count"].to_numpy()
        np.testing.assert_array_equal(counts, _binned(h, DEFAULT_BINS))
    every = raw["entropy"].to_numpy(np.float64)
    np.testing.assert_array_equal(result.global_quantiles["value"],
                                  np.quantile(every, DISTRIBUTION_QUANTILES))
    run = result.runs.iloc[0]
    assert run["tokens"] == len(every) and run["entropy_source"] == "exact"
    assert run["frac_below_0_01"] == np.mean(every < 0.01)
    # the run's mean: the per-step sums added in step order, as numpy adds them
    sums = [group["entropy"].to_numpy(np.float64).sum() for _, group in raw.groupby("step")]
    assert run["entropy_token_mean"] == np.sum(sums) / len(every)
    assert (result.steps["entropy_source"] == "exact").all()
    # every token lands in exactly one bin
    assert result.histogram["count"].sum() == len(every)


def test_distribution_of_both_runs_and_its_json(shared_store):
    result = el.distribution(shared_store)
    assert set(result.steps["run"]) == {"vanilla", "top20"}
    data = result.to_dict()
    assert set(data) == {"bins", "runs", "steps", "histogram", "global_quantiles", "skipped"}
    assert data["bins"][0] == 0.0 and data["bins"][-1] is not None
    first = data["steps"][0]
    assert {"run", "step", "tokens", "entropy_token_mean", "p10", "p99", "frac_below_0_01",
            "entropy_source"} <= set(first)
    # vanilla collapses: far more near-deterministic tokens than top20
    runs = result.runs.set_index("run")
    assert runs.loc["vanilla", "frac_below_0_01"] > 10 * runs.loc["top20", "frac_below_0_01"]


def _store(tmp_path, tokens: dict, **manifest) -> Store:
    store = Store.create(tmp_path / "s")
    with store.write_run("r") as writer:
        writer.write_tokens(pa.table(tokens))
        writer.manifest.update(manifest)
    return store


def test_one_token_step_equal_entropies_custom_bins_and_nan(tmp_path):
    store = _store(tmp_path, {
        "step": [0, 1, 1, 1, 2, 2], "sample_id": ["a", "a", "a", "b", "a", "a"],
        "position": [0, 0, 1, 0, 0, 1],
        "entropy": pa.array([0.3, 0.7, 0.7, 0.7, None, 5.0], pa.float32())})
    result = el.distribution(store, bins=[0.0, 0.5, 1.0])
    steps = result.steps.set_index("step")
    assert steps.loc[0, "tokens"] == 1
    assert (steps.loc[0, QNAMES] == np.float32(0.3)).all()
    assert (steps.loc[1, QNAMES] == np.float32(0.7)).all()
    # the token without entropy is left out, not counted as zero
    assert steps.loc[2, "tokens"] == 1 and steps.loc[2, "entropy_token_mean"] == 5.0
    hist = result.histogram.set_index(["step", "bin_left"])["count"]
    assert hist.loc[(0, 0.0)] == 1 and hist.loc[(1, 0.5)] == 3
    assert hist.loc[(2, 0.5)] == 1      # above the last edge: counted in the last bin
    assert result.histogram["count"].sum() == 5


def test_tokens_without_a_step_and_topk_source(tmp_path):
    store = _store(tmp_path, {
        "sample_id": ["a", "a"], "position": [0, 1],
        "top_logprobs": pa.array([[np.log(0.5), np.log(0.3)], [np.log(0.99)]],
                                 pa.list_(pa.float32()))}, vocab_size=1000)
    result = el.distribution(store)
    assert result.steps["step"].isna().all() and result.steps["tokens"].tolist() == [2]
    assert result.runs.loc[0, "entropy_source"] == "topk"
    assert result.histogram["step"].isna().all()


def test_bad_bins_and_runs_without_tokens_are_errors(tmp_path, shared_run):
    el.ingest(shared_run / "vanilla" / "metrics.csv", tmp_path / "m", run="m")
    with pytest.raises(EntropylensError, match="runs/m: the run has no tokens"):
        el.distribution(tmp_path / "m")
    store = _store(tmp_path, {"step": [0], "sample_id": ["a"], "position": [0],
                              "entropy": [0.1]})
    for bins in ([1.0], [0.0, 0.0, 1.0], [1.0, 0.5]):
        with pytest.raises(EntropylensError, match="bins"):
            el.distribution(store, bins=bins)


@pytest.mark.parametrize("bins", [DEFAULT_BINS, np.array([0, 0.1, 0.5, 1, 5, np.inf]),
                                  np.concatenate([[0.0], np.logspace(-3, 1, 9), [20.0]]),
                                  np.logspace(-2, 1, 10)],
                         ids=["default", "linear", "log-inner", "log-all"])
def test_bin_index_equals_a_binary_search_over_the_edges(bins, shared_run):
    real = pq.read_table(shared_run / "top20" / "tokens.parquet",
                         columns=["entropy"]).column("entropy").to_numpy()
    edges = np.concatenate([bins[:-1], np.nextafter(bins[1:-1], 0),
                            np.nextafter(bins[:-1], np.inf),
                            [-1.0, -1e-300, 0.0, 1e-300, 1e300, np.inf]])
    rng = np.random.default_rng(3)
    drawn = 10.0 ** rng.uniform(-8, 3, 200_000)
    for values in (real[np.isfinite(real)], edges, drawn, np.array([np.nan, 1.0, np.nan])):
        expected = np.clip(np.searchsorted(bins, values, side="right") - 1, 0, len(bins) - 2)
        np.testing.assert_array_equal(bin_index(values, bins), expected)


def test_bin_index_over_log_edges_of_any_range():
    bins = np.concatenate([[0.0], np.logspace(-300, 300, 601), [np.inf]])
    values = 10.0 ** np.random.default_rng(4).uniform(-310, 308, 100_000)
    expected = np.clip(np.searchsorted(bins, values, side="right") - 1, 0, len(bins) - 2)
    np.testing.assert_array_equal(bin_index(values, bins), expected)
