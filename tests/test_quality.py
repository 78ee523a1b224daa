"""Data-quality checks: each one against an independent count on real or built data."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import entropylens as el
from entropylens.analysis.quality import QUALITY_COLUMNS
from entropylens.store import Store


def _after_eos_with_pandas(tokens: pd.DataFrame) -> tuple[int, int]:
    keys = ["step", "prompt_idx", "sample_idx"]
    first = tokens[tokens["token"] == "<|im_end|>"].groupby(keys)["position"].min()
    joined = tokens.join(first.rename("first_eos"), on=keys)
    after = joined[joined["position"] > joined["first_eos"]]
    return len(after), after.groupby(keys).ngroups


def test_tokens_after_eos_in_the_shared_run(shared_store, shared_run):
    result = el.quality(shared_store).checks
    for run in ("vanilla", "top20"):
        raw = pd.read_parquet(shared_run / run / "tokens.parquet")
        tokens, sequences = _after_eos_with_pandas(raw)
        row = result[(result["run"] == run) & (result["check"] == "tokens_after_eos")]
        assert len(row) == 1 and row["severity"].iloc[0] == "warning"
        assert row["count"].iloc[0] == tokens > 0
        assert f"in {sequences} of " in row["message"].iloc[0]
        assert "'<|im_start|>'" in row["message"].iloc[0]
    # nothing else is wrong with the shared run
    assert set(result["check"]) == {"tokens_after_eos"}


def test_summary_carries_the_warnings(sample_store):
    summary = el.summary(sample_store)
    assert any(w.startswith("vanilla: ") and "end-of-sequence" in w for w in summary.warnings)
    assert list(summary.quality.columns) == QUALITY_COLUMNS
    assert summary.to_dict()["warnings"] == summary.warnings


def _write(store: Store, name: str, tokens: dict | None = None, *, metrics=None,
           reject: int = 0, **manifest) -> None:
    with store.write_run(name) as writer:
        if tokens is not None:
            writer.write_tokens(pa.table(tokens))
        if metrics is not None:
            writer.write_metrics(pa.table(metrics))
        for i in range(reject):
            writer.reject(path="log.jsonl", line=i + 3, message="not JSON")
        writer.manifest.update(manifest)


@pytest.fixture()
def faulty(tmp_path) -> Store:
    store = Store.create(tmp_path / "s")
    n = 40
    tokens = {
        "step": [0] * n + [1],
        "sample_id": ["a"] * 20 + ["b"] * 20 + ["c"],
        # a: positions 0..19 with 5 and 6 logged twice and 18, 19 missing; b: a gap at 3
        "position": [0, 1, 2, 3, 4, 5, 5, 6, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]
        + [0, 1, 2] + list(range(4, 21)) + [0],
        "token": ["x"] * 10 + ["</s>"] + ["pad"] * 9 + ["y"] * 20 + ["z"],
        "entropy": pa.array([-0.5, 11.0, np.nan] + [0.5] * (n - 2), pa.float32()),
        "logprob": pa.array([0.2, 1e-7] + [-0.5] * (n - 1), pa.float32()),
        "top_logprobs": pa.array([[np.log(0.7), np.log(0.4)]] + [[np.log(0.5)]] * n,
                                 pa.list_(pa.float32())),
    }
    _write(store, "bad", tokens, vocab_size=1000, reject=3)
    _write(store, "m", metrics={"step": [1, 2, 3], "metric": ["policy_entropy"] * 3,
                                "value": [1.0, 0.9, 0.8],
                                "raw_key": ["train/approx_entropy"] * 3})
    _write(store, "clean", {"step": [0] * 12, "sample_id": ["a"] * 12,
                            "position": list(range(12)), "entropy": [0.1] * 12})
    return store


def _counts(frame: pd.DataFrame, run: str) -> dict:
    return frame[frame["run"] == run].set_index("check")["count"].to_dict()


def test_every_check_counts_what_it_should(faulty):
    counts = _counts(el.quality(faulty, "bad").checks, "bad")
    assert counts["tokens_after_eos"] == 9          # sequence a after its </s> at position 9
    assert counts["duplicate_positions"] == 2
    # a: 0..17 logged, nothing missing below its last position; b: position 3
    assert counts["missing_positions"] == 1
    assert counts["entropy_out_of_range"] == 3      # -0.5, 11 > log 1000, NaN
    assert counts["positive_logprob"] == 1          # 1e-7 is rounding, 0.2 is not
    assert counts["topk_mass_above_one"] == 1
    assert counts["thin_steps"] == 1                # step 1 has one token
    assert counts["rejected_records"] == 3


def test_duplicates_split_across_batches_are_still_found(faulty):
    # a scan in batches of 3 rows splits sequence a's repeated positions over batches
    counts = _counts(el.quality(faulty, "bad", batch_size=3).checks, "bad")
    assert counts["duplicate_positions"] == 2 and counts["missing_positions"] == 1
    assert counts["tokens_after_eos"] == 9


def test_metric_only_and_clean_runs(faulty):
    result = el.quality(faulty, ["m", "clean"]).checks
    assert _counts(result, "m") == {"approximate_metric": 3}
    assert "train/approx_entropy" in result["message"].iloc[0]
    assert _counts(result, "clean") == {}
    empty = el.quality(faulty, "clean").checks
    assert empty.empty and list(empty.columns) == QUALITY_COLUMNS


def test_entropy_source_notes(tmp_path):
    store = Store.create(tmp_path / "s")
    _write(store, "topk", {"sample_id": ["a"], "position": [0],
                           "top_logprobs": pa.array([[-0.1]], pa.list_(pa.float32()))})
    _write(store, "surprisal", {"sample_id": ["a"], "position": [0], "logprob": [-0.1]},
           logprob_basis="raw", temperature=0.7)
    result = el.quality(store).checks
    notes = result[result["check"] != "thin_steps"].set_index("run")
    assert notes.loc["topk", "check"] == "topk_without_vocab"
    assert notes.loc["surprisal", "check"] == "surprisal_source"
    assert (notes["severity"] == "info").all()
    assert "temperature: 0.7" in notes.loc["surprisal", "message"]
    # info rows are not summary warnings; the one-token steps are
    warnings = el.summary(store).warnings
    assert len(warnings) == 2 and all("fewer than 10 tokens" in w for w in warnings)


def test_values_nulled_at_ingest_are_reported(tmp_path):
    path = tmp_path / "tokens.jsonl"
    rows = [{"step": 0, "sample_id": "a", "position": i, "token": "x",
             "logprob": -9999.0 if i == 1 else -0.5, "entropy": -1.0 if i == 2 else 0.5}
            for i in range(12)]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    el.ingest(path, tmp_path / "s", run="r")
    counts = _counts(el.quality(tmp_path / "s").checks, "r")
    assert counts == {"entropy_out_of_range": 1, "null_logprobs": 1}


def test_footers_clear_the_columns_they_can_and_only_those(faulty, tmp_path):
    from entropylens.analysis.quality import quality_scan

    # the faulty run holds a positive logprob and top-k lists: both read
    scan = quality_scan(faulty, "bad", faulty.manifest("bad"))
    assert {"logprob", "top_logprobs"} <= set(scan.columns)
    assert faulty.token_column_max("bad", "logprob") == pytest.approx(0.2)
    assert not faulty.token_column_empty("bad", "top_logprobs")
    # the clean run logged neither: nothing to read for them, and the counts stay right
    clean = quality_scan(faulty, "clean", faulty.manifest("clean"))
    assert "logprob" not in clean.columns and "top_logprobs" not in clean.columns
    assert faulty.token_column_max("clean", "logprob") == -np.inf
    # a list whose one value sits beside a null list is not empty (leaf slots, not rows)
    store = Store.create(tmp_path / "lists")
    _write(store, "l", {"step": [0, 0], "sample_id": ["a", "a"], "position": [0, 1],
                        "entropy": [0.1, 0.2], "logprob": [-0.1, -0.2],
                        "top_logprobs": pa.array([None, [-0.1, None]],
                                                 pa.list_(pa.float32()))})
    assert not store.token_column_empty("l", "top_logprobs")
    assert store.token_column_max("l", "logprob") == pytest.approx(-0.1)
    assert "logprob" not in quality_scan(store, "l", store.manifest("l")).columns


def test_parts_without_statistics_are_read_for_every_check(faulty):
    import pyarrow.parquet as pq

    for part in (faulty.run_dir("bad") / "tokens").glob("part-*.parquet"):
        pq.write_table(pq.read_table(part), part, write_statistics=False)
    assert faulty.token_column_max("bad", "logprob") is None
    counts = _counts(el.quality(faulty, "bad").checks, "bad")
    assert counts["positive_logprob"] == 1 and counts["topk_mass_above_one"] == 1
