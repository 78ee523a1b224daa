"""Per-step policy entropy and performance curves, against plain pandas on the real run."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import entropylens as el
from entropylens.errors import EntropylensError
from entropylens.store import Store
from _eos import before_eos


def _metric_store(path, rows, run="r"):
    """A store with one run holding only long metric rows (step, metric, value, raw_key, split)."""
    store = Store.create(path)
    frame = pd.DataFrame(rows, columns=["step", "metric", "value", "raw_key", "split"])
    with store.write_run(run) as writer:
        writer.write_metrics(pa.Table.from_pandas(frame, preserve_index=False))
    return store


def test_token_curve_equals_pandas_mean_and_the_logged_metric(shared_store, shared_run):
    # kept, the tokens after end-of-sequence make the trainer's logged batch mean
    curve = el.policy_entropy(shared_store, "vanilla", keep_after_eos=True)
    raw = pd.read_parquet(shared_run / "vanilla" / "tokens.parquet")
    expected = raw.groupby("step")["entropy"].apply(lambda s: s.to_numpy(np.float64).mean())
    assert curve["step"].tolist() == expected.index.tolist()
    assert set(curve["source"]) == {"exact"}
    np.testing.assert_allclose(curve["entropy"], expected.to_numpy(), rtol=1e-12)
    assert curve["tokens"].tolist() == raw.groupby("step").size().tolist()
    # the trainer's own batch token mean (metrics.csv) is the same quantity
    logged = pd.read_csv(shared_run / "vanilla" / "metrics.csv").dropna(subset=["entropy"])
    np.testing.assert_allclose(curve["entropy"], logged["entropy"].to_numpy(), atol=1e-5)


def test_token_curve_leaves_out_tokens_after_eos_by_default(shared_store, shared_run):
    curve = el.policy_entropy(shared_store, "vanilla")
    raw = before_eos(pd.read_parquet(shared_run / "vanilla" / "tokens.parquet"))
    expected = raw.groupby("step")["entropy"].apply(lambda s: s.to_numpy(np.float64).mean())
    np.testing.assert_allclose(curve["entropy"], expected.to_numpy(), rtol=1e-12)
    assert curve["tokens"].tolist() == raw.groupby("step").size().tolist()
    # the padding raised the late token mean: removing it lowers the last step's entropy
    kept = el.policy_entropy(shared_store, "vanilla", keep_after_eos=True)
    assert curve["entropy"].iloc[-1] < kept["entropy"].iloc[-1]


def test_metric_only_run_uses_the_policy_entropy_metric(tmp_path, shared_run):
    el.ingest(shared_run / "top20" / "metrics.csv", tmp_path / "s", run="m")
    curve = el.policy_entropy(tmp_path / "s", "m")
    logged = pd.read_csv(shared_run / "top20" / "metrics.csv").dropna(subset=["entropy"])
    assert set(curve["source"]) == {"metric"} and curve.attrs["raw_key"] == "entropy"
    assert curve["step"].tolist() == logged["step"].astype(int).tolist()
    np.testing.assert_allclose(curve["entropy"], logged["entropy"], rtol=1e-12)


@pytest.mark.slow
def test_only_training_tokens_count(tmp_path):
    store = Store.create(tmp_path / "s")
    with store.write_run("r") as writer:
        writer.write_tokens(pa.table({
            "step": [0, 0, 0, 1, 1, None],
            "split": ["train", None, "val", "val", "val", "train"],
            "sample_id": ["a", "b", "c", "a", "b", "c"], "position": [0] * 6,
            "entropy": [1.0, 3.0, 100.0, 5.0, 7.0, 9.0]}))
        writer.write_metrics(pa.table({"step": [0, 1], "metric": ["policy_entropy"] * 2,
                                       "value": [0.5, 0.6]}))
    curve = el.policy_entropy(store, "r")
    # step 1 has only validation tokens, the null-step token has no step: left out
    assert curve["step"].tolist() == [0] and curve["entropy"].tolist() == [2.0]
    assert curve["tokens"].tolist() == [2]


def test_run_with_only_validation_tokens_falls_back_to_the_metric(tmp_path):
    store = Store.create(tmp_path / "s")
    with store.write_run("r") as writer:
        writer.write_tokens(pa.table({"step": [0, 1], "split": ["val", "val"],
                                      "sample_id": ["a", "b"], "position": [0, 0],
                                      "entropy": [1.0, 2.0]}))
        writer.write_metrics(pa.table({"step": [0, 1], "metric": ["policy_entropy"] * 2,
                                       "value": [0.5, 0.6]}))
    curve = el.policy_entropy(store, "r")
    assert curve["source"].tolist() == ["metric", "metric"]
    assert curve["entropy"].tolist() == [0.5, 0.6]


def test_no_entropy_at_all_is_a_clear_error(tmp_path):
    store = _metric_store(tmp_path / "s", [(0, "reward_mean", 0.5, "reward", "train")])
    with pytest.raises(EntropylensError, match="no policy entropy"):
        el.policy_entropy(store, "r")


def test_performance_prefers_validation_accuracy(shared_store, shared_run):
    perf = el.performance(shared_store, "vanilla")
    logged = pd.read_csv(shared_run / "vanilla" / "metrics.csv").dropna(subset=["val_acc"])
    assert perf.attrs["metric"] == "val_accuracy" and set(perf["metric"]) == {"val_accuracy"}
    assert perf["step"].tolist() == logged["step"].astype(int).tolist()
    np.testing.assert_allclose(perf["value"], logged["val_acc"])
    assert perf.attrs["note"] is None and not perf.attrs["scaled"]


def test_performance_falls_back_to_reward_and_honours_an_override(shared_store, shared_run):
    logged = pd.read_csv(shared_run / "top20" / "metrics.csv").dropna(subset=["reward"])
    perf = el.performance(shared_store, "top20", reward="reward_mean")
    np.testing.assert_allclose(perf["value"], logged["reward"])
    by_raw_key = el.performance(shared_store, "top20", reward="grad_norm")
    np.testing.assert_allclose(by_raw_key["value"], logged["grad_norm"])


def test_performance_without_validation_uses_mean_reward(tmp_path):
    store = _metric_store(tmp_path / "s", [(0, "reward_mean", 0.1, "reward", "train"),
                                           (1, "reward_mean", 0.4, "reward", "train")])
    perf = el.performance(store, "r")
    assert perf.attrs["metric"] == "reward_mean" and perf["value"].tolist() == [0.1, 0.4]


def test_percent_accuracy_is_divided_by_100_and_said(tmp_path):
    store = _metric_store(tmp_path / "s", [(0, "val_accuracy", 12.5, "val/acc", "val"),
                                           (4, "val_accuracy", 80.0, "val/acc", "val")])
    perf = el.performance(store, "r")
    assert perf["value"].tolist() == [0.125, 0.8]
    assert perf.attrs["scaled"] and "percentage" in perf.attrs["note"]


def test_several_raw_keys_use_the_one_logged_most(tmp_path):
    rows = [(s, "val_accuracy", 0.5, "val-core/a/acc/mean@1", "val") for s in (0, 4, 8)]
    rows += [(8, "val_accuracy", 0.9, "val-core/b/acc/mean@1", "val")]
    perf = el.performance(_metric_store(tmp_path / "s", rows), "r")
    assert perf["value"].tolist() == [0.5, 0.5, 0.5]
    assert perf.attrs["raw_key"] == "val-core/a/acc/mean@1" and "2 raw keys" in perf.attrs["note"]


def test_missing_performance_metric_is_a_clear_error(tmp_path):
    store = _metric_store(tmp_path / "s", [(0, "policy_entropy", 1.0, "entropy", "train")])
    with pytest.raises(EntropylensError, match="no 'val_accuracy' or 'reward_mean'"):
        el.performance(store, "r")
    with pytest.raises(EntropylensError, match="no metric 'kl'"):
        el.performance(store, "r", reward="kl")
