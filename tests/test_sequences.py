"""Run-length helpers against plain numpy/pandas, the quality scan's two paths, case
folding in the phrase matcher, and reading the head of a run."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from entropylens.analysis.lexicon import default_lexicon
from entropylens.analysis.lexicon_matching import PlanningMatcher, fold_case
from entropylens.analysis.quality import QualityScan, _fold_sequences
from entropylens.analysis.sequences import sequence_starts, step_groups
from entropylens.store import Store


def _reference_starts(steps, samples):
    return [i for i in range(len(steps))
            if i == 0 or steps[i] != steps[i - 1] or samples[i] != samples[i - 1]]


@pytest.mark.parametrize("seed", range(5))
def test_sequence_starts_and_step_groups_match_plain_python(seed):
    rng = np.random.default_rng(seed)
    n = 2_000
    steps = np.sort(rng.integers(0, 6, n)) if seed % 2 else rng.integers(0, 6, n)
    samples = [None if rng.random() < 0.05 else f"s{v}" for v in rng.integers(0, 4, n)]
    starts = sequence_starts(steps, pa.array(samples, pa.string()))
    assert starts.tolist() == _reference_starts(steps, samples)
    unique, codes = step_groups(steps)
    expected_unique, expected_codes = np.unique(steps, return_inverse=True)
    np.testing.assert_array_equal(unique, expected_unique)
    np.testing.assert_array_equal(codes, expected_codes)
    assert sequence_starts(steps[:0], pa.array([], pa.string())).tolist() == []


@pytest.mark.parametrize("duplicates", [False, True])
def test_quality_per_completion_rows_match_pandas(duplicates):
    rng = np.random.default_rng(4)
    lengths = rng.integers(1, 40, 300)
    steps = np.repeat(np.arange(300) // 50, lengths)
    samples = np.repeat([f"c{i % 50}" for i in range(300)], lengths)
    positions = np.concatenate([np.arange(k) for k in lengths])
    if duplicates:
        positions[rng.random(len(positions)) < 0.05] = 0   # repeated and out-of-order
    is_eos = rng.random(len(positions)) < 0.02
    # without duplicates, in two batches split inside a completion, as the engine hands them
    # over (a duplicate whose copies fall in different batches is counted by position range)
    cut = len(steps) if duplicates else len(steps) // 2 + 7
    got = _fold_sequences([QualityScan._per_sequence(steps[part], pa.array(samples[part]),
                                                     positions[part], is_eos[part])
                           for part in (slice(0, cut), slice(cut, None))
                           if part.start < len(steps)]).to_pandas()
    frame = pd.DataFrame({"step": steps, "sample_id": samples, "position": positions,
                          "eos": np.where(is_eos, positions, np.iinfo(np.int64).max)})
    expected = frame.groupby(["step", "sample_id"], as_index=False).agg(
        rows=("position", "size"), distinct=("position", "nunique"),
        first=("position", "min"), last=("position", "max"), first_eos=("eos", "min"))
    got = got.sort_values(["step", "sample_id"], ignore_index=True)
    for column in ("rows", "distinct", "first", "last", "first_eos"):
        np.testing.assert_array_equal(got[column].to_numpy(np.int64),
                                      expected[column].to_numpy(np.int64), err_msg=column)


TRICKY = ["SO the answer", "Wait, maybe", "ſo we wait", "But WAİT: so", "the \u212aelvin so",
          "dotless ıs not so", "BUT\n\n WAIT", "also so", "ALTERNATIVELY, let me check"]


def test_case_folding_finds_what_ignorecase_finds():
    lexicon = default_lexicon()
    matcher = PlanningMatcher(lexicon, "text")
    for text in TRICKY:
        expected = [(m.start(), m.end()) for m in lexicon.pattern.finditer(text)]
        tokens = list(text)   # one character per token: spans map to characters
        result = matcher.match(tokens, np.array([0]))
        got = sorted(zip(result.first_token.tolist(), (result.last_token + 1).tolist()))
        assert got == expected, text
    assert fold_case("İ") is None                 # lower-casing would shift offsets
    assert fold_case("ſ\u0131K") == "sik"


def test_head_tokens_reads_across_parts(tmp_path, monkeypatch):
    import entropylens.store as store_module

    monkeypatch.setattr(store_module, "ROWS_PER_PART", 100)
    monkeypatch.setattr(store_module, "ROWS_PER_GROUP", 30)
    store = Store.create(tmp_path / "s")
    with store.write_run("r") as writer:
        writer.write_tokens(pa.table({"step": np.zeros(250, np.int64),
                                      "sample_id": ["a"] * 250,
                                      "position": np.arange(250, dtype=np.int32),
                                      "token": [f"t{i}" for i in range(250)]}))
    head = store.head_tokens("r", 170, columns=["token", "position"])
    assert head.num_rows == 170 and head.column("position").to_pylist() == list(range(170))
    assert store.head_tokens("r", 1000, columns=["token"]).num_rows == 250


def test_roles_match_the_same_phrases_in_shuffled_rows(tmp_path):
    import entropylens as el

    rng = np.random.default_rng(8)
    words = ["Ġso", "Ġwait", ",", "Ġlet", "'s", "Ġcheck", "Ġthe", "Ġanswer", "."]
    n = 4_000
    table = pa.table({"step": np.repeat(np.arange(4), n // 4),
                      "sample_id": [f"c{i // 40}" for i in range(n)],
                      "position": np.tile(np.arange(40), n // 40).astype(np.int32),
                      "token": [words[k] for k in rng.integers(0, len(words), n)],
                      "entropy": rng.exponential(0.5, n), "logprob": -rng.exponential(0.3, n)})
    shuffled = table.take(pa.array(rng.permutation(n)))
    results = []
    for name, rows in (("sorted", table), ("shuffled", shuffled)):
        store = Store.create(tmp_path / name)
        with store.write_run("r") as writer:
            writer.write_tokens(rows)
        results.append(el.roles(store, "r", workers=1))
    pd.testing.assert_frame_equal(results[0].steps, results[1].steps, check_exact=False,
                                  rtol=1e-12)
    pd.testing.assert_frame_equal(results[0].grams, results[1].grams)
    assert results[0].grams["count"].sum() > 100


def test_completion_order_puts_split_completions_together():
    from entropylens.analysis.roles import _in_completion_order

    table = pa.table({"step": [1, 1, 0, 1, 0], "sample_id": ["b", "a", "a", "b", "a"],
                      "position": [1, 0, 1, 0, 0]})
    ordered, steps, starts = _in_completion_order(table)
    assert ordered.to_pydict() == {"step": [0, 0, 1, 1, 1],
                                   "sample_id": ["a", "a", "a", "b", "b"],
                                   "position": [0, 1, 0, 0, 1]}
    assert steps.tolist() == [0, 0, 1, 1, 1] and starts.tolist() == [0, 2, 3]
    assert _in_completion_order(ordered)[0] is ordered
