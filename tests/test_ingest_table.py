import numpy as np
import pandas as pd
import pytest

import entropylens as el
from entropylens.errors import EntropylensError, FormatError
from entropylens.ingest import detect


def test_reads_the_shared_tokens_file(tmp_path, shared_run):
    src = shared_run / "vanilla" / "tokens.parquet"
    el.ingest(src, tmp_path / "s", run="v")
    store = el.open(tmp_path / "s")
    got = store.read_tokens("v").to_pandas()
    raw = pd.read_parquet(src)
    assert len(got) == len(raw)
    raw["sample_id"] = raw["prompt_idx"].astype(str) + ":" + raw["sample_idx"].astype(str)
    raw = raw.sort_values(["step", "sample_id", "position"]).reset_index(drop=True)
    np.testing.assert_array_equal(got["entropy"].to_numpy(), raw["entropy"].to_numpy())
    np.testing.assert_array_equal(got["token_id"].to_numpy(), raw["token_id"].to_numpy())
    assert (got["group_id"] == raw["prompt_idx"].astype(str)).all()
    assert got["top_logprobs"].iloc[0].tolist() == pytest.approx(raw["top_logprobs"].iloc[0])
    manifest = store.manifest("v")
    assert manifest["sources"][0]["sha256"] and manifest["top_k"] == 5


def test_wide_metrics_csv_becomes_long_canonical(tmp_path, shared_run):
    el.ingest(shared_run / "vanilla" / "metrics.csv", tmp_path / "s", run="m")
    metrics = el.open(tmp_path / "s").read_metrics("m")
    raw = pd.read_csv(shared_run / "vanilla" / "metrics.csv")
    entropy = metrics[metrics.metric == "policy_entropy"].set_index("step")["value"]
    expected = raw.dropna(subset=["entropy"]).set_index("step")["entropy"]
    pd.testing.assert_series_equal(entropy, expected, check_names=False)
    val = metrics[metrics.metric == "val_accuracy"]
    assert set(val["split"]) == {"val"} and len(val) == raw["val_acc"].notna().sum()
    assert set(metrics[metrics.metric == "reward_mean"]["raw_key"]) == {"reward"}


def test_folder_ingest_fills_all_three_tables(sample_store):
    manifest = sample_store.manifest("vanilla")
    assert manifest["counts"]["tokens"] > 0
    assert manifest["counts"]["sequences"] > 0
    assert manifest["counts"]["metrics"] > 0
    assert {s["format"] for s in manifest["sources"]} == {"table"}
    seq = sample_store.read_sequences("vanilla").to_pandas()
    assert seq["completion"].str.len().gt(0).all()
    assert '"answer"' in seq["extra"].iloc[0]


def test_explicit_map_joins_columns(tmp_path):
    path = tmp_path / "t.csv"
    pd.DataFrame({"it": [0, 0], "q": [3, 3], "k": [1, 1], "pos": [0, 1],
                  "lp": [-0.5, -1.0]}).to_csv(path, index=False)
    el.ingest(path, tmp_path / "s", run="r",
              mapping={"step": "it", "sample_id": "q+k", "group_id": "q", "position": "pos",
                       "logprob": "lp"})
    tokens = el.open(tmp_path / "s").read_tokens("r").to_pylist()
    assert [t["sample_id"] for t in tokens] == ["3:1", "3:1"]
    assert [t["logprob"] for t in tokens] == [-0.5, -1.0]


def test_jsonl_tokens(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"step": 1, "sample_id": "a", "position": 0, "token": "<b>", '
                    '"logprob": -0.25, "entropy": 0.5}\n'
                    '{"step": 1, "sample_id": "a", "position": 1, "token": "x", '
                    '"logprob": -9999.0, "entropy": 0.1}\n')
    assert detect(path).name == "table"
    el.ingest(path, tmp_path / "s", run="r")
    store = el.open(tmp_path / "s")
    rows = store.read_tokens("r").to_pylist()
    assert rows[0]["token"] == "<b>" and rows[1]["logprob"] is None
    assert store.manifest("r")["counts"]["sentinel_logprobs"] == 1


@pytest.mark.parametrize("content,name", [(b"garbage", "bad.parquet"), (b"a,b\n1,2\n", "x.csv")])
def test_bad_files_fail_naming_the_file_and_write_nothing(tmp_path, content, name):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(EntropylensError) as info:
        el.ingest(path, tmp_path / "s")
    assert name in str(info.value)
    assert not (tmp_path / "s").exists()


def test_missing_required_column_names_column(tmp_path):
    path = tmp_path / "tok.csv"
    path.write_text("step,position,token,logprob\n0,0,a,-1\n")
    with pytest.raises(FormatError, match="sample_id"):
        el.ingest(path, tmp_path / "s")


def test_failed_ingest_does_not_touch_existing_run(tmp_path, shared_run):
    el.ingest(shared_run / "top20" / "metrics.csv", tmp_path / "s", run="keep")
    bad = tmp_path / "bad.csv"
    bad.write_text("step,position,sample_id,logprob\n0,0,a,-1\n1,x,a,-1\n")
    with pytest.raises(EntropylensError, match="row 2"):
        el.ingest(bad, tmp_path / "s", run="keep", replace=True)
    store = el.open(tmp_path / "s")
    assert store.runs() == ["keep"]
    assert store.manifest("keep")["counts"]["metrics"] > 0
