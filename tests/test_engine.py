"""The streaming engine: step-closed units, sealing, and results against plain numpy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import entropylens.store as store_module
from entropylens.analysis.distribution import DISTRIBUTION_QUANTILES, StepStats, distribution
from entropylens.engine import plan_units, run_aggregators, run_unit, scan_unit
from entropylens.errors import EntropylensError, StoreReadError
from entropylens.store import Store

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "make_store.py"


def load_make_store():
    spec = importlib.util.spec_from_file_location("make_store", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    """300k synthetic tokens, 12 steps, written with small parts and row groups so that
    steps straddle row groups and part files."""
    path = tmp_path_factory.mktemp("synthetic")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store_module, "ROWS_PER_PART", 70_000)
        patch.setattr(store_module, "ROWS_PER_GROUP", 16_000)
        info = load_make_store().make_store(path, 300_000, steps=12, seed=5)
    assert info["tokens"] == 300_000
    return Store.open(path)


@pytest.fixture(scope="module")
def shuffled_store(tmp_path_factory):
    """Tokens written in shuffled step order, so every part file holds many steps and step
    ranges of part files overlap; plus tokens without a step."""
    rng = np.random.default_rng(11)
    path = tmp_path_factory.mktemp("shuffled")
    n = 60_000
    step = rng.integers(0, 9, n)
    table = pa.table({"step": pa.array(step, pa.int64()).to_pandas().astype("Int64")
                      .mask(rng.random(n) < 0.03),
                      "sample_id": pa.array([f"s{i % 97}" for i in range(n)]),
                      "position": pa.array(np.arange(n, dtype=np.int32)),
                      "entropy": pa.array(rng.exponential(0.5, n).astype(np.float32))})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store_module, "ROWS_PER_PART", 9_000)
        patch.setattr(store_module, "ROWS_PER_GROUP", 2_000)
        store = Store.create(path)
        with store.write_run("r") as writer:
            for lo in range(0, n, 5_000):
                writer.write_tokens(table.slice(lo, 5_000))
    return Store.open(path), table.to_pandas()


def unit_steps(unit) -> list:
    rows = pa.Table.from_batches(list(scan_unit(unit, ["step"])), schema=pa.schema(
        [("step", pa.int64())])).column("step").to_pylist()
    return [s if s is not None else "null" for s in rows]


@pytest.mark.parametrize("fixture", ["synthetic_store", "shuffled_store"])
@pytest.mark.parametrize("unit_rows", [1, 50_000, 10**9])
def test_units_are_step_closed_and_cover_every_row(request, fixture, unit_rows):
    store = request.getfixturevalue(fixture)
    store = store[0] if isinstance(store, tuple) else store
    run = store.runs()[0]
    units = plan_units(store, run, unit_rows=unit_rows)
    seen: set = set()
    rows = 0
    for unit in units:
        steps = unit_steps(unit)
        rows += len(steps)
        assert not set(steps) & seen, "a step lies in two units"
        seen |= set(steps)
    assert rows == store.manifest(run)["counts"]["tokens"]
    assert [u.index for u in units] == list(range(len(units)))
    if unit_rows == 10**9:   # one unit, plus one for rows without a step
        assert len(units) == 1 + (fixture == "shuffled_store")


def test_units_split_a_sorted_store(synthetic_store):
    units = plan_units(synthetic_store, "synthetic", unit_rows=1)
    assert len(units) == 12   # steps straddle row groups, yet each step is its own unit


def numpy_step_stats(frame: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for step, group in frame.groupby("step"):
        h = group["entropy"].to_numpy(dtype=np.float64)
        seq = group.groupby("sample_id")["entropy"].mean().mean()
        rows.append([step, len(h), h.mean(), seq, *np.quantile(h, DISTRIBUTION_QUANTILES),
                     np.mean(h < 0.01)])
    return pd.DataFrame(rows)


@pytest.mark.parametrize("unit_rows,batch_size", [(1, 1_000), (40_000, 7_777),
                                                  (10**9, 256 * 1024)])
@pytest.mark.slow
def test_per_step_statistics_match_numpy(synthetic_store, unit_rows, batch_size):
    frame = synthetic_store.read_tokens("synthetic", columns=["step", "sample_id",
                                                              "entropy"]).to_pandas()
    frame["entropy"] = frame["entropy"].astype(np.float64)
    result = distribution(synthetic_store, unit_rows=unit_rows, batch_size=batch_size)
    ours = result.steps.drop(columns=["run", "entropy_source"])
    expected = numpy_step_stats(frame)
    np.testing.assert_allclose(ours.to_numpy(dtype=float), expected.to_numpy(dtype=float),
                               rtol=1e-12, atol=1e-12)
    # synthetic shape: about half the tokens below 0.01 nats
    assert 0.45 < result.runs["frac_below_0_01"][0] < 0.55
    assert result.runs["tokens"][0] == 300_000
    np.testing.assert_allclose(result.runs["entropy_token_mean"][0], frame["entropy"].mean(),
                               rtol=1e-12)


@pytest.mark.slow
def test_overlapping_parts_and_null_steps(shuffled_store):
    store, frame = shuffled_store
    frame = frame.assign(entropy=frame["entropy"].astype(np.float64))
    result = distribution(store, unit_rows=1)
    steps = result.steps
    assert steps["step"].isna().sum() == 1   # tokens without a step form one row
    with_step = frame.dropna(subset=["step"])
    expected = numpy_step_stats(with_step)
    np.testing.assert_allclose(steps.dropna(subset=["step"]).drop(
        columns=["run", "entropy_source"]).to_numpy(dtype=float),
        expected.to_numpy(dtype=float), rtol=1e-12)
    null_row = steps[steps["step"].isna()].iloc[0]
    nulls = frame.loc[frame["step"].isna(), "entropy"].to_numpy()
    assert null_row["tokens"] == len(nulls)
    np.testing.assert_allclose(null_row["p50"], np.quantile(nulls, 0.5), rtol=1e-12)


def test_step_filter_reads_only_those_steps(synthetic_store):
    chosen = [2, 7]
    units = plan_units(synthetic_store, "synthetic", steps=chosen, unit_rows=1)
    everything = plan_units(synthetic_store, "synthetic", unit_rows=1)
    assert sum(u.rows for u in units) < sum(u.rows for u in everything) / 3
    stats = run_aggregators(synthetic_store, "synthetic", {"s": StepStats("exact")},
                            steps=chosen)["s"]
    assert stats["step"].tolist() == chosen
    frame = synthetic_store.read_tokens("synthetic", columns=["step", "entropy"],
                                        steps=chosen).to_pandas()
    assert stats["tokens"].tolist() == frame.groupby("step").size().tolist()


def test_seal_frees_step_values(synthetic_store):
    aggregator = StepStats("exact")
    units = plan_units(synthetic_store, "synthetic", unit_rows=1)
    state = run_unit(units[0], {"s": aggregator}, list(aggregator.columns))["s"]
    assert state.values == {} and state.sequences == [] and state.rows
    # a step sealed twice means an engine broke the step-closed contract
    with pytest.raises(EntropylensError):
        aggregator.merge(state, run_unit(units[0], {"s": aggregator},
                                         list(aggregator.columns))["s"])


def test_unknown_engine(synthetic_store):
    with pytest.raises(EntropylensError, match="unknown engine"):
        run_aggregators(synthetic_store, "synthetic", {"s": StepStats("exact")},
                        engine="spark")


def test_corrupt_part_file_names_the_file(tmp_path, synthetic_store):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_store.path, copy)
    part = sorted((copy / "runs" / "synthetic" / "tokens").glob("part-*.parquet"))[0]
    part.write_bytes(b"not parquet")
    # a damaged store is an OSError (StoreReadError), so that no analysis takes it for a
    # run that merely lacks data
    with pytest.raises(StoreReadError) as info:
        distribution(Store.open(copy))
    assert info.value.path == str(part)


class _Texts:
    """Collects the token column's types and texts (a test aggregator)."""

    columns = ("step", "token")
    after_eos = False

    def __init__(self, dictionary: bool):
        self.dictionary_columns = ("token",) if dictionary else ()

    def start(self):
        return {"types": set(), "texts": []}

    def update(self, state, batch):
        state["types"].add(str(batch.column("token").type))
        state["texts"] += batch.column("token").to_pylist()
        return state

    def seal(self, state):
        return state

    def merge(self, left, right):
        return {"types": left["types"] | right["types"], "texts": left["texts"] + right["texts"]}

    def finish(self, state):
        return state

    def share_key(self):
        return None


def test_token_texts_come_dictionary_encoded_only_to_who_asks(synthetic_store):
    # both read by one scan: the same texts in the same order, in the form each asked for
    got = run_aggregators(synthetic_store, "synthetic",
                          {"encoded": _Texts(True), "plain": _Texts(False)}, workers=1)
    assert got["encoded"]["types"] == {"dictionary<values=string, indices=int32, ordered=0>"}
    assert got["plain"]["types"] == {"string"}
    table = pa.concat_tables(pq.read_table(p, columns=["token"])
                             for p, _ in synthetic_store.token_parts("synthetic"))
    assert got["encoded"]["texts"] == got["plain"]["texts"] == table.column("token").to_pylist()


def test_counts_by_dictionary_index_equal_counts_by_text():
    from entropylens.analysis.forking_counts import count_forking, counts_frame
    from entropylens.schema import eos_mask

    rng = np.random.default_rng(3)
    texts = np.array(["Ġthe", "Ġ7", ",", "<|im_end|>", " </s> ", "Ċ", "x"], object)
    plain = pa.array(texts[rng.integers(0, len(texts), 5_000)].tolist(), pa.string())
    # a dictionary holding one text twice (concatenated batches can) and one unused
    dictionary = pa.array(["Ġthe", "Ġ7", ",", "<|im_end|>", " </s> ", "Ċ", "x", "Ġthe", "u"])
    where = {t: i for i, t in enumerate(dictionary.to_pylist()) if t not in ("u",)}
    codes = np.array([where[t] for t in plain.to_pylist()], np.int32)
    codes[(codes == 0) & (np.arange(len(codes)) % 2 == 0)] = 7   # the second "Ġthe"
    encoded = pa.DictionaryArray.from_arrays(pa.array(codes), dictionary)
    assert encoded.cast(pa.string()).to_pylist() == plain.to_pylist()
    flags = rng.random(5_000) < 0.2
    judged = rng.random(5_000) < 0.9
    by_index = counts_frame([count_forking(encoded, flags, judged)])
    by_text = counts_frame([count_forking(plain, flags, judged)])
    key = ["token"]
    pd.testing.assert_frame_equal(by_index.sort_values(key).reset_index(drop=True),
                                  by_text.sort_values(key).reset_index(drop=True))
    assert (eos_mask(encoded) == eos_mask(plain)).all() and eos_mask(plain).any()


def test_completion_runs_from_dictionary_ids_fold_to_the_same_sums():
    # runs found from dictionary indices: a dictionary holding an id twice may split a run,
    # never join two; summed by key, the rows are those of the plain ids
    from entropylens.analysis.sequences import run_keys, run_lengths, sequence_starts

    rng = np.random.default_rng(8)
    ids = np.repeat([f"c{i}" for i in rng.integers(0, 40, 300)], rng.integers(1, 30, 300))
    steps = np.sort(rng.integers(0, 4, len(ids)))
    plain = pa.array(ids.tolist())
    dictionary = pa.array(sorted(set(ids.tolist())) + ["c0"])   # "c0" twice
    index = {t: i for i, t in enumerate(dictionary.to_pylist()[:-1])}
    codes = np.array([index[t] for t in ids.tolist()], np.int32)
    codes[(ids == "c0") & (np.arange(len(ids)) % 3 == 0)] = len(dictionary) - 1
    encoded = pa.DictionaryArray.from_arrays(pa.array(codes), dictionary)

    def folded(samples):
        starts = sequence_starts(steps, samples)
        keys = run_keys(steps, samples, starts).to_pandas()
        assert keys["sample_id"].map(type).eq(str).all()
        keys["rows"] = run_lengths(starts, len(ids))
        return keys.groupby(["step", "sample_id"])["rows"].sum()

    pd.testing.assert_series_equal(folded(encoded), folded(plain))
    assert (sequence_starts(steps, pa.array(ids.tolist()).dictionary_encode())
            == sequence_starts(steps, plain)).all()
