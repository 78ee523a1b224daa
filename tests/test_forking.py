"""Forking tokens: thresholds per scope, counts by token, composition, overlap, CLI."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from typer.testing import CliRunner

import entropylens as el
from entropylens.analysis.forking_counts import token_categories, token_category
from entropylens.analysis.forking_thresholds import grouped_quantile
from entropylens.base.pieces import normalise_token
from entropylens.cli import app
from entropylens.errors import EntropylensError
from entropylens.store import Store
from _eos import before_eos


@pytest.fixture(scope="module")
def vanilla_all(shared_run):
    """The raw vanilla tokens, keyed as the store keys them (sample_id = prompt:sample)."""
    raw = pd.read_parquet(shared_run / "vanilla" / "tokens.parquet",
                          columns=["step", "prompt_idx", "sample_idx", "position", "token",
                                   "entropy"])
    raw["sample_id"] = raw["prompt_idx"].astype(str) + ":" + raw["sample_idx"].astype(str)
    raw["h"] = raw["entropy"].astype(np.float64)
    return raw


@pytest.fixture(scope="module")
def vanilla(vanilla_all):
    """The raw tokens analyses see by default: none after the end of its sequence."""
    return before_eos(vanilla_all).reset_index(drop=True)


def _flag_with_numpy(raw, by):
    thresholds = raw.groupby(by)["h"].apply(lambda h: np.quantile(h.to_numpy(), 0.8))
    keyed = raw.join(thresholds.rename("threshold"), on=by)
    return keyed["h"] > keyed["threshold"], thresholds


def test_step_thresholds_equal_numpy_quantile(shared_store, vanilla):
    result = el.forking_tokens(shared_store, "vanilla")
    got = result.thresholds.set_index("step")["threshold"]
    for step, group in vanilla.groupby("step"):
        assert got.loc[step] == np.quantile(group["h"].to_numpy(), 0.8)
    flags, _ = _flag_with_numpy(vanilla, "step")
    run = result.runs.iloc[0]
    assert run["forking_tokens"] == flags.sum() and run["tokens"] == len(vanilla)
    assert run["forking_fraction"] == pytest.approx(0.2, abs=0.005)
    assert result.scope == "step" and result.ratio == 0.2


def test_top_tokens_and_composition_equal_pandas(shared_store, vanilla):
    result = el.forking_tokens(shared_store, "vanilla", top_n=10, min_count=20)
    flags, _ = _flag_with_numpy(vanilla, "step")
    counts = vanilla.assign(fork=flags).groupby("token")["fork"].agg(["size", "sum"])
    expected = counts.sort_values(["sum", "size"], ascending=False).head(10)
    top = result.top_tokens.set_index("token")
    assert top.index.tolist() == expected.index.tolist()
    assert top["count"].tolist() == expected["size"].tolist()
    assert top["forking_count"].tolist() == expected["sum"].tolist()
    rates = counts[counts["size"] >= 20].assign(rate=lambda f: f["sum"] / f["size"])
    best = rates.sort_values(["rate", "size"], ascending=False).head(10)
    np.testing.assert_allclose(result.top_by_rate["forking_rate"], best["rate"])
    assert (result.top_by_rate["count"] >= 20).all()
    # composition: shares by category of the decoded token text
    categories = vanilla["token"].map(token_category)
    comp = result.composition.set_index("category")
    for category in ("whitespace", "punctuation", "digits", "other"):
        chosen = categories == category
        assert comp.loc[category, "all_share"] == pytest.approx(chosen.mean())
        assert comp.loc[category, "forking_share"] == pytest.approx(
            (flags & chosen).sum() / flags.sum())
    assert comp["forking_share"].sum() == pytest.approx(1.0)
    assert "<|im_start|>" not in top.index
    assert top.loc["<|im_end|>", "special"] and not top.drop("<|im_end|>")["special"].any()


def test_padding_after_eos_forks_most_when_kept(shared_store, vanilla_all):
    """The masking artefact: kept, <|im_start|> after <|im_end|> forks more than anything
    else, marked special, with its rate next to its count."""
    result = el.forking_tokens(shared_store, "vanilla", top_n=10, keep_after_eos=True)
    flags, _ = _flag_with_numpy(vanilla_all, "step")
    assert result.runs.iloc[0]["tokens"] == len(vanilla_all)
    assert result.runs.iloc[0]["forking_tokens"] == flags.sum()
    first = result.top_tokens.iloc[0]
    assert first["token"] == "<|im_start|>" and first["special"]
    padding = vanilla_all[vanilla_all["token"] == "<|im_start|>"]
    assert first["count"] == len(padding)
    assert first["forking_rate"] == pytest.approx(flags[padding.index].mean())
    data = result.to_dict()["top_tokens"][0]
    assert data["special"] is True and data["forking_rate"] == pytest.approx(first["forking_rate"])


def test_global_and_sequence_thresholds_equal_numpy(shared_store, vanilla):
    result = el.forking_tokens(shared_store, "vanilla", scope="global")
    assert result.thresholds["step"].isna().all()
    assert result.thresholds["threshold"].iloc[0] == np.quantile(vanilla["h"], 0.8)
    result = el.forking_tokens(shared_store, "vanilla", scope="sequence")
    got = result.thresholds.set_index(["step", "sample_id"])["threshold"]
    flags, expected = _flag_with_numpy(vanilla, ["step", "sample_id"])
    assert len(got) == len(expected)
    np.testing.assert_array_equal(got.loc[expected.index].to_numpy(), expected.to_numpy())
    assert result.runs.iloc[0]["forking_tokens"] == flags.sum()


def test_batch_thresholds_follow_stored_order(shared_store, vanilla):
    size = 300
    result = el.forking_tokens(shared_store, "vanilla", scope="batch", batch_size=size)
    ordered = vanilla.sort_values(["step", "sample_id", "position"]).copy()
    ordered["batch"] = ordered.groupby("step").cumcount() // size
    flags, expected = _flag_with_numpy(ordered, ["step", "batch"])
    got = result.thresholds.set_index(["step", "batch"])
    np.testing.assert_array_equal(got["threshold"].loc[expected.index].to_numpy(),
                                  expected.to_numpy())
    assert got["tokens"].max() == size
    assert result.runs.iloc[0]["forking_tokens"] == flags.sum()
    # the per-token mask of stored tokens is the same flag
    table = shared_store.read_tokens("vanilla", steps=[3, 4])
    table = table.filter(pc.invert(pc.fill_null(table.column("after_eos"), False)))
    mask = el.forking_mask(table, result, run="vanilla")
    chosen = ordered[ordered["step"].isin([3, 4])]
    assert mask.sum() == flags[chosen.index].sum()


def test_grouped_quantile_is_bit_identical_to_numpy():
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 50, size=2000)
    values = rng.exponential(size=2000).round(rng.integers(0, 4))   # many ties
    got = grouped_quantile(codes, values, 0.8, 52)
    for group in range(50):
        assert got[group] == np.quantile(values[codes == group], 0.8)
    assert np.isnan(got[50:]).all()


def _store(tmp_path, runs: dict) -> Store:
    store = Store.create(tmp_path / "s")
    for name, tokens in runs.items():
        with store.write_run(name) as writer:
            writer.write_tokens(pa.table(tokens))
    return store


def test_single_token_step_and_equal_entropies_do_not_fork(tmp_path):
    store = _store(tmp_path, {"r": {
        "step": [0, 1, 1, 1, 1], "sample_id": ["a"] * 5, "position": [0, 0, 1, 2, 3],
        "token": ["x", "y", "y", "y", "y"],
        "entropy": pa.array([2.0, 0.5, 0.5, 0.5, 0.5], pa.float32())}})
    result = el.forking_tokens(store, min_count=1)
    thresholds = result.thresholds.set_index("step")["threshold"]
    assert thresholds.loc[0] == 2.0 and thresholds.loc[1] == 0.5
    # a token forks only strictly above its threshold
    assert result.runs.loc[0, "forking_tokens"] == 0
    assert result.top_tokens.empty and result.top_by_rate.empty
    assert result.composition["forking_share"].isna().all()


def test_surprisal_run_without_steps_and_token_text(tmp_path):
    store = _store(tmp_path, {"r": {
        "sample_id": ["a"] * 10, "position": list(range(10)), "token_id": list(range(10)),
        "logprob": pa.array(-np.arange(10, dtype=np.float32))}})
    result = el.forking_tokens(store, ratio=0.3, min_count=1)
    assert result.runs.loc[0, "entropy_source"] == "surprisal"
    assert result.thresholds["step"].isna().all()
    assert result.thresholds["threshold"].iloc[0] == np.quantile(np.arange(10.0), 0.7)
    assert set(result.top_tokens["token"]) == {"<id 7>", "<id 8>", "<id 9>"}


def test_overlap_of_two_runs_scored_on_the_same_tokens(tmp_path):
    rng = np.random.default_rng(4)
    keys = {"step": np.repeat([0, 1], 50), "sample_id": np.tile(np.repeat(["a", "b"], 25), 2),
            "position": np.tile(np.arange(25, dtype=np.int32), 4),
            "token_id": np.arange(100)}
    h_a, h_b = rng.exponential(size=100), rng.exponential(size=100)
    store = _store(tmp_path, {"a": {**keys, "entropy": h_a}, "b": {**keys, "entropy": h_b},
                              "other": {**keys, "step": keys["step"] + 10, "entropy": h_a}})
    frame = pd.DataFrame({"step": keys["step"], "a": h_a, "b": h_b})
    fork = {run: frame.groupby("step")[run].transform(lambda h: h > np.quantile(h, 0.8))
            for run in ("a", "b")}
    both = int((fork["a"] & fork["b"]).sum())
    result = el.forking_overlap(store, "a", "b")
    assert result.shared_positions == 100
    assert result.forking_a == fork["a"].sum() and result.both == both
    assert result.overlap == pytest.approx(both / fork["a"].sum())
    assert result.jaccard == pytest.approx(both / (fork["a"] | fork["b"]).sum())
    assert result.token_mismatches == 0 and result.warning is None
    assert [s["step"] for s in result.by_step] == [0, 1]
    assert el.forking_overlap(store, "a", "a").overlap == 1.0
    with pytest.raises(EntropylensError, match="share no token position"):
        el.forking_overlap(store, "a", "other")


def test_bad_options_are_errors(shared_store):
    with pytest.raises(EntropylensError, match="scope"):
        el.forking_tokens(shared_store, scope="micro")
    with pytest.raises(EntropylensError, match="ratio"):
        el.forking_tokens(shared_store, ratio=1.0)
    with pytest.raises(EntropylensError, match="batch size"):
        el.forking_tokens(shared_store, scope="batch")
    with pytest.raises(EntropylensError, match="batch"):
        el.forking_tokens(shared_store, scope="step", batch_size=10)


@pytest.mark.parametrize("text, category", [
    ("Ġ", "whitespace"), ("Ċ", "whitespace"), ("ĠĠ", "whitespace"), ("<0x0A>", "whitespace"),
    ("▁", "whitespace"), (".", "punctuation"), ("Ġ=", "punctuation"), ("),", "punctuation"),
    ("7", "digits"), ("Ġ42", "digits"), ("Ġthe", "other"), ("1.", "other"),
    ("<|im_end|>", "other"), ("", "other")])
def test_token_categories(text, category):
    assert token_category(text) == category
    assert token_categories([text]).tolist() == [category]


def test_vocabulary_categories_at_once_equal_one_by_one(vanilla):
    # the vectorised rule (Arrow regular expressions for ASCII and byte-level marks) must
    # agree with the per-text one on a real vocabulary and on every character near ASCII,
    # alone and after each mark
    from entropylens.base.pieces import BYTE_DECODER

    chars = [chr(c) for c in range(0x250)] + sorted(BYTE_DECODER)
    texts = (list(vanilla["token"].dropna().unique())
             + chars + [m + c for m in ("Ġ", "Ċ", "ĉ", " ", "") for c in chars]
             + ["<0x0A>", "<0x0A>\n", "<0x41>x", "ĠĠ7Ġ", "\x1c.\x1f", "Ġ\x0b", "1 2", "--"])
    expected = [token_category(t) for t in texts]
    assert token_categories(texts).tolist() == expected
    assert {"whitespace", "punctuation", "digits", "other"} <= set(expected)


def test_normalise_token():
    assert normalise_token("Ġthe") == " the" and normalise_token("▁word") == " word"
    assert normalise_token("<0x41>") == "A" and normalise_token("<0xZZ>") == "<0xZZ>"


def test_forks_cli_json_and_errors(shared_store):
    runner = CliRunner()
    out = runner.invoke(app, ["forks", str(shared_store.path), "--json", "--run", "vanilla",
                              "--overlap", "vanilla", "vanilla"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert {"ratio", "scope", "thresholds", "top_tokens"} <= set(data)
    assert set(data["thresholds"][0]) >= {"run", "step", "threshold"}
    assert set(data["top_tokens"][0]) >= {"run", "token", "count", "forking_count",
                                          "forking_rate"}
    assert data["overlap"]["overlap"] == 1.0
    out = runner.invoke(app, ["forks", str(shared_store.path), "--scope", "batch"])
    assert out.exit_code == 2
    out = runner.invoke(app, ["forks", str(shared_store.path), "--run", "nope"])
    assert out.exit_code == 1 and "nope" in out.output
    out = runner.invoke(app, ["forks", str(shared_store.path), "--run", "top20",
                              "--scope", "global"])
    assert out.exit_code == 0 and "top20" in out.output
