"""Planning versus execution tokens, semantic entropy and the phase rule."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import entropylens as el
import entropylens.store as store_module
from entropylens.analysis.lexicon import default_lexicon
from entropylens.analysis.roles import RolesAggregator, _tables
from entropylens.analysis.roles_phases import detect_phases
from entropylens.cli import app
from entropylens.errors import EntropylensError
from entropylens.store import Store
from _eos import before_eos

from roles_reference import (mann_kendall_exact_p, reference_spans, theil_sen,
                             token_char_spans)

runner = CliRunner()


def _shannon(counts) -> float:
    total = sum(counts)
    return -sum(c / total * math.log(c / total) for c in counts if c)


# -- hand-built runs ----------------------------------------------------------------------

def _token_store(tmp_path, sequences) -> Store:
    """sequences: list of (step, sample_id, tokens, entropies, logprobs)."""
    rows = []
    for step, sample_id, tokens, entropies, logprobs in sequences:
        for position, (token, h, lp) in enumerate(zip(tokens, entropies, logprobs)):
            rows.append({"step": step, "sample_id": sample_id, "position": position,
                         "token": token, "entropy": h, "logprob": lp})
    store = Store.create(tmp_path / "store")
    with store.write_run("r") as writer:
        writer.write_tokens(pa.Table.from_pylist(rows))
    return store


def test_hand_built_run_per_step_figures(tmp_path):
    store = _token_store(tmp_path, [
        (0, "a", ["So", "Ġwe", "Ġadd", ".", "ĠWait", ",", "Ġno"],
         [1, 2, 3, 4, 5, 6, 7], [-0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7]),
        (0, "b", ["Let", "'s", "Ġadd", "Ġnow"], [8, 9, 10, 11], [-1.0, -1.1, -1.2, -1.3]),
        (1, "a", ["x", "Ġ=", "Ġ1"], [0.5, 0.5, 0.5], [-2.0, -2.0, -2.0]),
        (1, "b", ["so", "Ġnow", "Ġso", "Ġbut"], [1, 1, 1, 1], [-0.5, -0.5, -0.5, -0.5]),
    ])
    result = el.roles(store)
    assert result.runs.loc[0, "convention"] == "bytelevel"
    assert result.runs.loc[0, "entropy_source"] == "exact"
    steps = result.steps.set_index(["step", "cls"])
    # Step 0: planning = So, Wait , no, Let 's, now; execution = we add . add
    planning_h, execution_h = [1, 5, 6, 7, 8, 9, 11], [2, 3, 4, 10]
    planning_lp = [-0.1, -0.5, -0.6, -0.7, -1.0, -1.1, -1.3]
    execution_lp = [-0.2, -0.3, -0.4, -1.2]
    assert steps.loc[(0, "planning"), "tokens"] == 7
    assert steps.loc[(0, "execution"), "tokens"] == 4
    assert steps.loc[(0, "planning"), "mean_entropy"] == pytest.approx(np.mean(planning_h))
    assert steps.loc[(0, "execution"), "mean_entropy"] == pytest.approx(np.mean(execution_h))
    ppl_plan0 = math.exp(-np.mean(planning_lp))
    ppl_exec0 = math.exp(-np.mean(execution_lp))
    assert steps.loc[(0, "planning"), "perplexity"] == pytest.approx(ppl_plan0)
    assert steps.loc[(1, "planning"), "relative_perplexity"] == pytest.approx(
        math.exp(0.5) / ppl_plan0)
    assert steps.loc[(1, "execution"), "relative_perplexity"] == pytest.approx(
        math.exp(2.0) / ppl_exec0)
    semantic = result.semantic.set_index("step")
    # Step 0 grams: so, wait no, let's, now (one each); pairs so->wait no, let's->now.
    assert semantic.loc[0, "semantic_entropy"] == pytest.approx(math.log(4))
    assert semantic.loc[0, "conditional_entropy"] == pytest.approx(0.0)
    assert semantic.loc[0, "sequences_with_grams"] == 2
    # Step 1 grams: so, now, so, but; pairs so->now, now->so, so->but.
    assert semantic.loc[1, "semantic_entropy"] == pytest.approx(_shannon([2, 1, 1]))
    assert semantic.loc[1, "conditional_entropy"] == pytest.approx(2 / 3 * math.log(2))
    assert semantic.loc[1, "transitions"] == 3 and semantic.loc[1, "sequences_with_grams"] == 1
    grams = result.grams.set_index("gram")["count"].to_dict()
    assert grams == {"so": 3, "now": 2, "wait, no": 1, "let's": 1, "but": 1}


def test_run_with_only_completions_gets_semantic_entropy(tmp_path):
    texts = {0: ["So we add. Wait, let me verify.", "Now, so what?"],
             1: ["The answer is 4.", "But wait, so be it."]}
    rows = [{"step": step, "sample_id": str(i), "completion": text, "reward": 1.0}
            for step, items in texts.items() for i, text in enumerate(items)]
    store = Store.create(tmp_path / "store")
    with store.write_run("c") as writer:
        writer.write_sequences(pa.Table.from_pylist(rows))
    result = el.roles(store)
    assert result.runs.loc[0, "semantic_from"] == "completions" and result.steps.empty
    steps = result.to_dict()["runs"][0]["steps"]
    assert [s["step"] for s in steps] == [0, 1] and steps[0]["planning_tokens"] is None
    phrases = default_lexicon().phrases
    for step, items in texts.items():
        counts = Counter(p for text in items for _, _, p in reference_spans(text, phrases))
        row = result.semantic.set_index("step").loc[step]
        assert row["gram_count"] == sum(counts.values())
        assert row["semantic_entropy"] == pytest.approx(_shannon(counts.values()))


def test_inference_tokens_without_steps_and_plain_text(tmp_path):
    store = Store.create(tmp_path / "store")
    tokens = ["Let", " me", " think", ".", " The", " key", " is", " to", " add", "."]
    with store.write_run("api") as writer:
        writer.write_tokens(pa.table({
            "split": ["inference"] * 10, "sample_id": ["q1"] * 10, "position": range(10),
            "token": tokens, "logprob": [-0.5] * 10}))
    result = el.roles(store)
    run = result.to_dict()["runs"][0]
    assert run["convention"] == "text" and run["entropy_source"] == "surprisal"
    (step,) = run["steps"]
    # "let me" is a gram; "the key is to" only starts one ("the key is to realize").
    assert step["step"] is None
    assert (step["planning_tokens"], step["execution_tokens"]) == (2, 8)
    assert step["planning_entropy"] == pytest.approx(0.5)
    assert not any(p["detected"] for p in run["phases"])


def test_run_without_token_text_is_refused(tmp_path):
    store = Store.create(tmp_path / "store")
    with store.write_run("ids") as writer:
        writer.write_tokens(pa.table({"step": [0, 0], "sample_id": ["a", "a"],
                                      "position": [0, 1], "token_id": [5, 6]}))
    with pytest.raises(EntropylensError, match="no token text"):
        el.roles(store)


# -- streaming: batches, partitions and part files ------------------------------------------

def test_results_do_not_depend_on_batch_size(sample_store):
    whole = el.roles(sample_store, "vanilla")
    for batch_size in (37, 4099):
        part = el.roles(sample_store, "vanilla", batch_size=batch_size)
        pd.testing.assert_frame_equal(whole.steps, part.steps)
        pd.testing.assert_frame_equal(whole.semantic, part.semantic)


def test_contiguous_partitions_merge_to_the_same_result(sample_store):
    agg = RolesAggregator(default_lexicon(), "bytelevel", "exact")
    batches = list(sample_store.scan_tokens("vanilla", columns=list(agg.columns),
                                            batch_size=611))
    whole = agg.start()
    for batch in batches:
        whole = agg.update(whole, batch)
    expected = _tables("r", agg.finish(whole), default_lexicon())
    k = len(batches) // 2
    states = []
    for part in (batches[:k], batches[k:k + 3], batches[k + 3:]):
        state = agg.start()
        for batch in part:
            state = agg.update(state, batch)
        states.append(state)
    merged = agg.merge(states[2], agg.merge(states[1], states[0]))
    got = _tables("r", agg.finish(merged), default_lexicon())
    for left, right in zip(expected, got):
        pd.testing.assert_frame_equal(left, right)


def test_sequences_split_across_part_files(tmp_path, sample_store, monkeypatch):
    tokens = sample_store.read_tokens("vanilla")
    monkeypatch.setattr(store_module, "ROWS_PER_PART", 5000)
    store = Store.create(tmp_path / "store")
    with store.write_run("vanilla") as writer:
        for offset in range(0, tokens.num_rows, 3333):
            writer.write_tokens(tokens.slice(offset, 3333))
    assert len(list((store.run_dir("vanilla") / "tokens").glob("part-*.parquet"))) > 4
    expected = el.roles(sample_store, "vanilla")
    got = el.roles(store, "vanilla", batch_size=1000)
    pd.testing.assert_frame_equal(expected.steps, got.steps)
    pd.testing.assert_frame_equal(expected.semantic, got.semantic)


# -- the shared SmolLM2 run, against plain Python ------------------------------------------

def _independent_step(raw: pd.DataFrame, step: int, phrases) -> dict:
    """Decode, match and count one step with plain Python on the raw parquet rows."""
    rows = raw[raw["step"] == step].sort_values(["prompt_idx", "sample_idx", "position"])
    planning_h, execution_h, planning_lp, execution_lp = [], [], [], []
    grams, pairs = Counter(), Counter()
    for _, seq in rows.groupby(["prompt_idx", "sample_idx"], sort=True):
        text, spans = token_char_spans(seq["token"].tolist())
        matches = reference_spans(text, phrases)
        grams.update(p for _, _, p in matches)
        pairs.update(zip([p for _, _, p in matches][:-1], [p for _, _, p in matches][1:]))
        for (lo, hi), h, lp in zip(spans, seq["entropy"], seq["logprob"]):
            planning = any(lo < end and hi > start for start, end, _ in matches)
            (planning_h if planning else execution_h).append(float(h))
            (planning_lp if planning else execution_lp).append(float(lp))
    firsts = Counter()
    for (a, _), count in pairs.items():
        firsts[a] += count
    return {"planning_tokens": len(planning_h), "execution_tokens": len(execution_h),
            "planning_entropy": sum(planning_h) / len(planning_h),
            "execution_entropy": sum(execution_h) / len(execution_h),
            "planning_perplexity": math.exp(-sum(planning_lp) / len(planning_lp)),
            "execution_perplexity": math.exp(-sum(execution_lp) / len(execution_lp)),
            "semantic_entropy": _shannon(grams.values()), "gram_count": sum(grams.values()),
            "distinct_grams": len(grams),
            "conditional_entropy": _shannon(pairs.values()) - _shannon(firsts.values())}


def test_roles_json_matches_plain_python_on_the_shared_run(shared_store, shared_run):
    result = runner.invoke(app, ["roles", str(shared_store.path), "--run", "vanilla", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    (run,) = data["runs"]
    assert run["run"] == "vanilla" and run["entropy_source"] == "exact"
    steps = {s["step"]: s for s in run["steps"]}
    assert len(steps) == 69
    assert set(steps[0]) >= {"step", "planning_tokens", "execution_tokens", "planning_entropy",
                             "execution_entropy", "semantic_entropy"}
    assert [p["name"] for p in run["phases"]] == ["consolidation", "exploration"]
    assert all({"name", "start_step", "end_step"} <= set(p) for p in run["phases"])
    raw = pq.read_table(shared_run / "vanilla" / "tokens.parquet",
                        columns=["step", "prompt_idx", "sample_idx", "position", "token",
                                 "entropy", "logprob"]).to_pandas()
    raw = before_eos(raw)   # the tokens after end-of-sequence are left out by default
    phrases = default_lexicon().phrases
    first = _independent_step(raw, 0, phrases)
    expected = _independent_step(raw, 3, phrases)
    got = steps[3]
    assert got["planning_tokens"] == expected["planning_tokens"] > 100
    assert got["execution_tokens"] == expected["execution_tokens"]
    for key in ("planning_entropy", "execution_entropy", "planning_perplexity",
                "execution_perplexity", "semantic_entropy", "conditional_entropy"):
        assert got[key] == pytest.approx(expected[key], rel=1e-9), key
    assert got["gram_count"] == expected["gram_count"]
    assert got["distinct_grams"] == expected["distinct_grams"]
    assert got["execution_relative_perplexity"] == pytest.approx(
        expected["execution_perplexity"] / first["execution_perplexity"], rel=1e-9)
    top = {g["gram"] for g in run["top_grams"][:8]}
    assert {"so", "now", "let's"} <= top


def test_shared_runs_consolidate_only_in_vanilla(shared_store):
    result = el.roles(shared_store)
    vanilla = {p["name"]: p for p in result.phases["vanilla"]}
    top20 = {p["name"]: p for p in result.phases["top20"]}
    consolidation = vanilla["consolidation"]
    assert consolidation["detected"] and consolidation["start_step"] == 0
    assert 10 <= consolidation["end_step"] <= 45
    assert consolidation["evidence"]["relative_drop"] > 0.5
    # top20 keeps its entropy: execution perplexity never drops by the 10% the rule needs.
    assert not top20["consolidation"]["detected"]
    assert "less than" in top20["consolidation"]["reason"]
    # Planning grams die out in vanilla as completions shrink to "4 x 7 = 28".
    wide = result.wide("vanilla")
    assert wide["planning_tokens"].iloc[:5].mean() > 100
    assert wide["planning_tokens"].iloc[-5:].sum() == 0
    assert not vanilla["exploration"]["detected"]


# -- the phase rule --------------------------------------------------------------------------

def _frames(steps, execution, semantic):
    step_rows = pd.DataFrame({"run": "r", "step": pd.array(steps, "Int64"), "cls": "execution",
                              "tokens": 100, "mean_entropy": execution,
                              "perplexity": execution, "relative_perplexity": np.nan})
    sem_rows = pd.DataFrame({"run": "r", "step": pd.array(steps, "Int64"),
                             "semantic_entropy": semantic})
    return step_rows, sem_rows


def test_consolidation_ends_where_the_documented_rule_says():
    rng = np.random.default_rng(0)
    x = np.arange(60)
    y = 1 + 5 * np.exp(-x / 6) + rng.normal(0, 0.02, len(x))
    steps, semantic = _frames(x, y, np.ones(len(x)))
    phase = detect_phases(steps, semantic)[0]
    window = 6
    smooth = [float(np.median(y[max(0, i - 3):i + 3])) for i in range(len(y))]
    drop = smooth[0] - min(smooth)
    tolerance = 0.25 * drop / 59
    half = next(i for i, v in enumerate(smooth) if v <= smooth[0] - drop / 2)
    end = next(i for i in range(half, len(y) - window + 1)
               if abs(theil_sen(x[i:i + window], y[i:i + window])) <= tolerance)
    assert phase["detected"] and phase["window"] == window
    assert (phase["start_step"], phase["end_step"]) == (0, end)
    assert 10 <= end <= 35
    assert phase["evidence"]["tolerance"] == pytest.approx(tolerance)


def test_exploration_starts_at_a_sustained_rise():
    rng = np.random.default_rng(1)
    x = np.arange(60)
    semantic = np.where(x < 30, 1.0, 1.0 + 0.05 * (x - 30)) + rng.normal(0, 0.03, len(x))
    steps, sem = _frames(x, np.full(len(x), 2.0), semantic)
    consolidation, exploration = detect_phases(steps, sem)
    assert not consolidation["detected"]
    assert exploration["detected"] and 24 <= exploration["start_step"] <= 34
    assert exploration["end_step"] == 59
    start = exploration["start_step"]
    window = next(w for w in exploration["evidence"]["windows"] if w["start_step"] == start)
    values = semantic[start:start + 6]
    assert window["p_value"] == pytest.approx(mann_kendall_exact_p(list(values)), rel=1e-6)
    assert window["slope"] == pytest.approx(theil_sen(x[start:start + 6], values))
    # Every earlier window is either not significant or not followed by a rise to the end.
    flat = detect_phases(*_frames(x, np.full(60, 2.0), rng.normal(1, 0.03, 60)))[1]
    assert not flat["detected"] and "no sustained rise" in flat["reason"]
    short = detect_phases(*_frames(x[:4], np.full(4, 2.0), semantic[:4]))[1]
    assert not short["detected"] and "needs more than one window" in short["reason"]


# -- command line -------------------------------------------------------------------------

def test_cli_lexicon_extend_and_bad_lexicon(tmp_path, sample_store):
    extra = tmp_path / "extra.txt"
    extra.write_text("# domain grams\nthere are\n", encoding="utf-8")
    result = runner.invoke(app, ["roles", str(sample_store.path), "--run", "vanilla",
                                 "--lexicon", str(extra), "--lexicon-mode", "extend", "--json"])
    assert result.exit_code == 0, result.output
    extended = json.loads(result.stdout)["runs"][0]
    default = el.roles(sample_store, "vanilla").runs.iloc[0]
    assert extended["lexicon_size"] == 250
    assert extended["planning_tokens"] > default["planning_tokens"]
    replaced = el.roles(sample_store, "vanilla", lexicon=extra)
    assert replaced.grams["gram"].tolist() == ["there are"]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"so\n\xff\n")
    result = runner.invoke(app, ["roles", str(sample_store.path), "--lexicon", str(bad)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"error: {bad}:2: the lexicon is not UTF-8 text"]


def test_cli_mine_lexicon_writes_a_usable_lexicon(tmp_path, shared_store):
    out = tmp_path / "mined.txt"
    result = runner.invoke(app, ["mine-lexicon", str(shared_store.path), "--run", "top20",
                                 "--min-df", "0.02", "--top", "30", "--out", str(out),
                                 "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["documents"] > 50 and len(data["grams"]) == 30
    mined = el.load_lexicon(out)
    assert list(mined.phrases) == [g["gram"] for g in data["grams"]]
    roles = el.roles(shared_store, "top20", lexicon=out)
    assert roles.runs.loc[0, "planning_tokens"] > 0


def test_theil_sen_slope_is_scipys_to_the_bit():
    from scipy import stats

    from entropylens.analysis.roles_phases import theil_sen_slope

    rng = np.random.default_rng(5)
    for n in (2, 3, 7, 25, 26, 120):
        for _ in range(20):
            x = np.sort(rng.choice(1000, n, replace=False)).astype(float)
            y = rng.normal(size=n)
            if rng.random() < 0.3:
                y = np.round(y, 1)   # ties
            assert theil_sen_slope(x, y) == float(stats.theilslopes(y, x)[0])
