"""Tokens after end-of-sequence: marked at ingest, left out of analyses, kept on request."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import entropylens as el
from entropylens.schema import is_special_token, mark_after_eos
from entropylens.store import Store

from _eos import after_eos


def _table(steps, samples, positions, tokens):
    return pa.table({"step": pa.array(steps, pa.int64()), "sample_id": samples,
                     "position": pa.array(positions, pa.int32()), "token": tokens})


def test_marks_follow_the_first_eos_across_chunks():
    first, carry = mark_after_eos(_table(
        [0, 0, 0, 0, 1], ["a", "a", "b", "b", "a"], [0, 1, 0, 1, 0],
        ["x", "<|im_end|>", "y", "z", "</s>"]))
    assert first.column("after_eos").to_pylist() == [False, False, False, False, False]
    # the rest of completion (0, a) arrives in the next chunk: still after its EOS
    second, carry = mark_after_eos(_table(
        [0, 0, 0, 1, 1], ["a", "a", "b", "a", "a"], [2, 3, 2, 1, 2],
        ["<|im_start|>", "q", " <|im_end|>", "w", "<|im_end|>"]), carry)
    assert second.column("after_eos").to_pylist() == [True, True, False, True, True]
    # forget=True carries only the completions of the last chunk
    firsts = {(s, a): f for s, a, f in zip(*carry.to_pydict().values())}
    assert firsts == {(0, "a"): 1, (0, "b"): 2, (1, "a"): 0}
    # a completion not in the next chunk is forgotten; forget=False keeps it
    third, dropped = mark_after_eos(_table([2], ["c"], [0], ["x"]), carry)
    assert dropped.num_rows == 0
    _, kept = mark_after_eos(_table([2], ["c"], [0], ["x"]), carry, forget=False)
    assert kept.num_rows == 3


def test_without_token_texts_nothing_can_be_told():
    table = pa.table({"step": [0, 0], "sample_id": ["a", "a"], "position": [0, 1],
                      "token": pa.nulls(2, pa.string())})
    marked, _ = mark_after_eos(table)
    assert marked.column("after_eos").null_count == 2


def test_special_tokens():
    for text in ("<|im_start|>", "<|im_end|>", "</s>", "<s>", "<pad>", "[INST]",
                 "<｜begin▁of▁sentence｜>", "<start_of_turn>", " <|endoftext|>"):
        assert is_special_token(text), text
    for text in ("Ġthe", "<", "a < b", "<0x0A>", "[1]", "</think", None, "<HTML>"):
        assert not is_special_token(text), text


def test_ingest_marks_exactly_what_pandas_finds(shared_store, shared_run):
    raw = pd.read_parquet(shared_run / "vanilla" / "tokens.parquet",
                          columns=["step", "prompt_idx", "sample_idx", "position", "token"])
    raw["sample_id"] = raw["prompt_idx"].astype(str) + ":" + raw["sample_idx"].astype(str)
    expected = raw.assign(after=after_eos(raw)).set_index(["step", "sample_id", "position"])
    stored = shared_store.read_tokens("vanilla", columns=["step", "sample_id", "position",
                                                          "after_eos"]).to_pandas()
    stored = stored.set_index(["step", "sample_id", "position"]).loc[expected.index]
    np.testing.assert_array_equal(stored["after_eos"].to_numpy(bool),
                                  expected["after"].to_numpy())
    assert shared_store.manifest("vanilla")["counts"]["tokens_after_eos"] == \
        expected["after"].sum() == 3627
    # all of them are the never-sampled <|im_start|>
    assert set(expected[expected["after"]]["token"]) == {"<|im_start|>"}


def _strip_marks(store: Store, run: str) -> None:
    """Rewrite a run's token parts without the after_eos column (a store from before it)."""
    for part in sorted((store.run_dir(run) / "tokens").glob("part-*.parquet")):
        table = pq.read_table(part)
        pq.write_table(table.drop_columns(["after_eos"]), part, row_group_size=4096)


@pytest.mark.parametrize("unit_rows", [None, 5000])
def test_stores_written_before_the_mark_give_the_same_results(tmp_path, shared_run,
                                                              unit_rows):
    path = tmp_path / "s"
    el.ingest(shared_run / "vanilla", path, run="new", step_basis="policy_version")
    el.ingest(shared_run / "vanilla", path, run="old", step_basis="policy_version")
    store = el.open(path)
    _strip_marks(store, "old")
    assert "after_eos" not in pq.read_schema(
        next((store.run_dir("old") / "tokens").glob("part-*.parquet"))).names
    options = {"workers": 1} if unit_rows is None else {"workers": 1, "unit_rows": unit_rows}
    new = el.summary(store, "new", **options)
    old = el.summary(store, "old", **options)
    pd.testing.assert_frame_equal(new.steps.drop(columns="run"), old.steps.drop(columns="run"),
                                  check_exact=False, rtol=1e-12)
    assert old.runs.iloc[0]["tokens_after_eos"] == 3627
    forks_new = el.forking_tokens(store, "new", **options)
    forks_old = el.forking_tokens(store, "old", **options)
    pd.testing.assert_frame_equal(forks_new.top_tokens.drop(columns="run"),
                                  forks_old.top_tokens.drop(columns="run"))
    kept = el.summary(store, "old", keep_after_eos=True, **options)
    assert kept.steps["tokens"].sum() == store.manifest("old")["counts"]["tokens"]


def test_workers_and_units_agree(shared_store):
    one = el.distribution(shared_store, "vanilla", workers=1)
    many = el.distribution(shared_store, "vanilla", workers=2, unit_rows=3000)
    pd.testing.assert_frame_equal(one.steps, many.steps, check_exact=False, rtol=1e-12)
    assert one.runs.iloc[0]["tokens"] == 115607 - 3627


def test_policy_entropy_cache_keys_on_the_selection(shared_store):
    dropped = el.policy_entropy(shared_store, "vanilla")
    kept = el.policy_entropy(shared_store, "vanilla", keep_after_eos=True)
    again = el.policy_entropy(shared_store, "vanilla")
    assert (kept["tokens"] >= dropped["tokens"]).all()
    assert kept["tokens"].sum() - dropped["tokens"].sum() == 3627
    pd.testing.assert_frame_equal(dropped, again)
    # a registered analysis reads the curve inside its plan: it must get the right one
    cov_kept = el.covariance(shared_store, "vanilla", keep_after_eos=True)
    np.testing.assert_allclose(cov_kept.steps["entropy"], kept["entropy"])
    cov = el.covariance(shared_store, "vanilla")
    np.testing.assert_allclose(cov.steps["entropy"], dropped["entropy"])


def test_late_training_entropy_without_the_padding(shared_store, shared_run):
    """The numbers for the report: how much the padding moves the token-mean entropy."""
    raw = pd.read_parquet(shared_run / "vanilla" / "tokens.parquet",
                          columns=["step", "prompt_idx", "sample_idx", "position", "token",
                                   "entropy"])
    mask = after_eos(raw)
    h = raw["entropy"].astype(np.float64)
    share = h.where(mask, 0).groupby(raw["step"]).sum() / h.groupby(raw["step"]).sum()
    kept = el.policy_entropy(shared_store, "vanilla", keep_after_eos=True).set_index("step")
    dropped = el.policy_entropy(shared_store, "vanilla").set_index("step")
    change = 1 - dropped["entropy"] / kept["entropy"]
    assert share.max() == pytest.approx(0.363, abs=0.001) and share.idxmax() == 36
    assert change.max() == pytest.approx(0.314, abs=0.001) and change.idxmax() == 36
    # late in training the padding (learned, but still uncertain) raises the token mean
    assert dropped["entropy"].iloc[-10:].mean() < 0.95 * kept["entropy"].iloc[-10:].mean()
