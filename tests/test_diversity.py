"""Diversity across a prompt's samples, against independent computations on the real run."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy.special import comb
from typer.testing import CliRunner

import entropylens as el
from entropylens.analysis import diversity as dv
from entropylens.cli import app
from entropylens.errors import EntropylensError
from entropylens.store import Store

runner = CliRunner()


def _raw(shared_run, name="vanilla") -> pd.DataFrame:
    return pd.read_parquet(shared_run / name / "sequences.parquet")


def _chen_pass_at_k(n: int, c: int, k: int) -> float:
    """The estimator as written in arXiv 2107.03374, with exact binomials."""
    return 1.0 - comb(n - c, k, exact=True) / comb(n, k, exact=True)


@pytest.mark.parametrize("name", ["vanilla", "top20"])
def test_pass_at_k_equals_scipy_binomials_for_every_step_and_k(shared_store, shared_run, name):
    raw = _raw(shared_run, name)
    result = el.diversity(shared_store, name)
    got = result.pass_at_k.set_index(["step", "k"])["pass_at_k"]
    counts = raw.groupby(["step", "prompt_idx"]).agg(n=("reward", "size"),
                                                     c=("reward", lambda r: (r >= 1.0).sum()))
    assert set(counts["n"]) == {8}
    expected = {}
    for (step, _), row in counts.iterrows():
        for k in (1, 2, 4, 8):
            expected.setdefault((step, k), []).append(_chen_pass_at_k(row.n, row.c, k))
    assert len(got) == len(expected) == raw["step"].nunique() * 4
    for key, values in expected.items():
        assert got.loc[key] == pytest.approx(np.mean(values), abs=1e-12)
    # every step and every k, in the JSON too
    steps = result.to_dict()["runs"][0]["steps"]
    assert [s["step"] for s in steps] == sorted(raw["step"].unique())
    assert all(list(s["pass_at_k"]) == ["1", "2", "4", "8"] for s in steps)


def test_zero_variance_distinct_and_variance_equal_pandas(shared_store, shared_run):
    raw = _raw(shared_run)
    # the documented rule in pandas: the last number, thousands separators dropped,
    # integral values without their decimals
    last = pd.to_numeric(raw["completion"].str.findall(r"-?\d[\d,]*(?:\.\d+)?").str[-1]
                         .str.replace(",", ""))
    raw["answer_seen"] = last.map(lambda v: None if pd.isna(v) else
                                  str(int(v)) if float(v).is_integer() else repr(float(v)))
    grouped = raw.groupby(["step", "prompt_idx"])
    per_group = pd.DataFrame({
        "zero": grouped["reward"].agg(lambda r: r.nunique() == 1),
        "distinct": grouped["answer_seen"].agg(lambda a: a.dropna().nunique()),
        "texts": grouped["completion"].agg(lambda t: t.str.strip().nunique()),
        "var": grouped["reward"].agg(lambda r: r.var(ddof=0))}).groupby("step").agg(
        zero=("zero", "sum"), distinct=("distinct", "mean"), texts=("texts", "mean"),
        var=("var", "mean"))
    steps = el.diversity(shared_store, "vanilla").steps.set_index("step")
    assert steps["zero_variance_groups"].tolist() == per_group["zero"].tolist()
    np.testing.assert_allclose(steps["distinct_answers_mean"], per_group["distinct"])
    np.testing.assert_allclose(steps["distinct_completions_mean"], per_group["texts"])
    np.testing.assert_allclose(steps["reward_variance_mean"], per_group["var"], atol=1e-15)
    assert (steps["samples_per_prompt"] == 8).all() and (steps["prompts"] == 8).all()


def test_rewarded_completions_have_the_reference_answer(shared_store, shared_run):
    # the extractor agrees with the run's own reward on every correct completion
    raw = _raw(shared_run)
    correct = raw[raw["reward"] >= 1.0]
    answers = [dv.extract_answer(t) for t in correct["completion"]]
    assert answers == [str(a) for a in correct["answer"]]


def test_training_entropy_sits_next_to_each_step(shared_store):
    steps = el.diversity(shared_store, "vanilla").steps
    curve = el.policy_entropy(shared_store, "vanilla")
    merged = steps.merge(curve[["step", "entropy"]].astype({"step": "Int64"}), on="step")
    np.testing.assert_allclose(merged["entropy_x"], merged["entropy_y"])


def test_best_at_k_is_the_mean_maximum_over_all_subsets():
    rng = np.random.default_rng(3)
    for n in (1, 2, 5, 7):
        rewards = rng.normal(size=n).round(1)   # ties included
        for k in range(1, n + 1):
            brute = np.mean([max(s) for s in itertools.combinations(rewards, k)])
            assert dv.best_at_k(rewards, k) == pytest.approx(brute, abs=1e-12)
    # for 0/1 rewards best@k is pass@k
    binary = np.array([0, 1, 0, 0, 1, 0, 0, 0], float)
    for k in (1, 2, 4, 8):
        assert dv.best_at_k(binary, k) == pytest.approx(dv.pass_at_k(8, 2, k)[0])


def test_pass_at_k_is_stable_for_large_groups():
    # binomials of this size overflow floats; the product form does not
    assert dv.pass_at_k(2000, 3, 1)[0] == pytest.approx(3 / 2000)
    assert dv.pass_at_k(2000, 0, 1000)[0] == 0.0
    assert dv.pass_at_k(2000, 1500, 600)[0] == 1.0
    assert dv.pass_at_k(200, 10, 50)[0] == pytest.approx(_chen_pass_at_k(200, 10, 50), rel=1e-12)
    with pytest.raises(ValueError):
        dv.pass_at_k(4, 1, 5)


@pytest.mark.parametrize("text, regex, expected", [
    ("so it is \\boxed{\\frac{1}{2}} and then 3", None, "\\frac{1}{2}"),
    ("first \\boxed{4}, finally \\boxed{ 12.0 }", None, "12"),
    ("He has 1,000 apples, then 15.0", None, "15"),
    ("a total of 1,200", None, "1200"),
    ("no digits here", None, None),
    ("Answer: B ... Answer: C", r"Answer:\s*([A-D])", "C"),
    ("Answer: 7", r"Result: (\d+)", None),
])
def test_answer_extraction(text, regex, expected):
    assert dv.extract_answer(text, dv.compile_answer_regex(regex)) == expected


def test_bad_options_are_one_clear_error(shared_store):
    with pytest.raises(EntropylensError, match="one capturing group"):
        el.diversity(shared_store, answer_regex=r"\d+")
    with pytest.raises(EntropylensError, match="positive integers"):
        el.diversity(shared_store, k="1,x")
    result = runner.invoke(app, ["diversity", str(shared_store.path), "--answer-regex", "a(b"])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "not a regular expression" in result.output


def _store(tmp_path, rows: list[dict], tokens: pa.Table | None = None, run="r") -> Store:
    store = Store.create(tmp_path / "store")
    with store.write_run(run) as writer:
        writer.write_sequences(pa.Table.from_pylist(rows))
        if tokens is not None:
            writer.write_tokens(tokens)
    return store


def _rows(step, split, group, rewards, texts=None, **extra):
    texts = texts or [f"answer {r}" for r in rewards]
    return [{"step": step, "split": split, "sample_id": f"{step}:{split}:{group}:{i}",
             "group_id": str(group), "completion": t, "reward": float(r),
             **{key: values[i] for key, values in extra.items()}}
            for i, (r, t) in enumerate(zip(rewards, texts))]


def test_splits_are_kept_apart_and_logged_answers_win(tmp_path):
    rows = (_rows(0, "train", 0, [1, 1, 1, 1]) + _rows(0, "train", 1, [0, 1, 0, 0])
            + _rows(0, "inference", 0, [1, 0], texts=["x 5", "x 6"],
                    final_answer=["five", "six"])
            + _rows(None, "val", 0, [1, 0, 0]))
    result = el.diversity(_store(tmp_path, rows), k="1,2,4")
    steps = result.steps.set_index("split")
    assert steps.loc["train", "zero_variance_groups"] == 1
    assert steps.loc["train", "zero_variance_share"] == 0.5
    assert steps.loc["train", "correctness_variance_mean"] == pytest.approx((0 + 0.1875) / 2)
    assert steps.loc["inference", "distinct_answers_mean"] == 2
    assert steps.loc["inference", "answer_entropy_mean"] == pytest.approx(np.log(2))
    assert pd.isna(steps.loc["val", "step"])
    passes = result.pass_at_k
    # k larger than a group is left out for that group, and a k no group reaches is absent
    assert passes[passes["split"] == "inference"]["k"].tolist() == [1, 2]
    assert passes[passes["split"] == "val"]["k"].tolist() == [1, 2]
    train4 = passes[(passes["split"] == "train") & (passes["k"] == 4)]
    assert train4["pass_at_k"].item() == pytest.approx((1 + 1) / 2)
    data = result.to_dict()
    assert [s["split"] for s in data["runs"][0]["steps"]] == ["inference", "train", "val"]
    assert data["correct"] == 1.0 and "boxed" in data["answer_rule"]


def test_correct_threshold_is_applied(tmp_path):
    store = _store(tmp_path, _rows(0, "train", 0, [0.2, 0.6, 0.9, 0.4]))
    strict = el.diversity(store).pass_at_k.set_index("k")["pass_at_k"]
    loose = el.diversity(store, correct=0.5).pass_at_k.set_index("k")["pass_at_k"]
    assert strict.loc[1] == 0 and loose.loc[1] == pytest.approx(0.5)
    best = el.diversity(store).pass_at_k.set_index("k")["best_at_k"]
    assert best.loc[4] == pytest.approx(0.9) and best.loc[1] == pytest.approx(0.525)


def test_reward_space_winners(tmp_path):
    one_hot = [[1.0 if j == i else 0.0 for j in range(4)] for i in range(4)]
    dominated = [[1.0, 1.0, 1.0], [0.5, 0.2, 0.9], [0.0, 0.1, 0.3], [0.9, 0.9, 0.9]]
    twins = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]   # the same text twice wins once
    rows = (_rows(0, "train", 0, [0, 0, 0, 0], texts=list("abcd"), reward_vector=one_hot)
            + _rows(0, "train", 1, [1, 0, 0, 0], texts=list("abcd"), reward_vector=dominated)
            + _rows(1, "train", 0, [0, 0, 0], texts=["same", "same", "other"],
                    reward_vector=twins))
    result = el.diversity(_store(tmp_path, rows))
    winners = result.steps.set_index("step")["reward_space_winners_mean"]
    # each one-hot completion wins when its weight is the largest (p = 1/4 per draw)
    assert winners.loc[0] == pytest.approx((4 + 1) / 2)
    assert winners.loc[1] == 2
    assert result.to_dict()["reward_space"] == {"draws": 256, "seed": 0,
                                                "weights": "Dirichlet(1)"}


def test_reward_vectors_of_different_lengths_are_an_error(tmp_path):
    rows = _rows(0, "train", 0, [0, 1], reward_vector=[[1.0, 0.0], [1.0]])
    with pytest.raises(EntropylensError, match="different lengths"):
        el.diversity(_store(tmp_path, rows))


def test_streams_in_batches_of_whole_steps(shared_store, monkeypatch):
    whole = el.diversity(shared_store, "top20")
    tables = list(dv.step_batches(shared_store, "top20", ["step"], batch_rows=100))
    assert all(t.column("step").to_numpy().min() == t.column("step").to_numpy().max()
               for t in tables)   # 64 rows a step: one step per batch
    assert sum(t.num_rows for t in tables) == shared_store.manifest("top20")["counts"][
        "sequences"]
    monkeypatch.setattr(dv, "STEP_BATCH_ROWS", 1)
    stepwise = el.diversity(shared_store, "top20")
    assert json.dumps(whole.to_dict()) == json.dumps(stepwise.to_dict())


def test_completions_without_text_still_give_pass_at_k(tmp_path):
    # sequences logged with rewards but no completion text (as benchmarks/make_store.py
    # writes them): pass@k and reward variance stand, answers are unknown
    rows = _rows(0, "train", 0, [1, 0, 0, 1], texts=[None] * 4)
    result = el.diversity(_store(tmp_path, rows), k="1,2")
    step = result.steps.iloc[0]
    assert step["prompts"] == 1 and pd.isna(step["distinct_answers_mean"])
    assert pd.isna(step["distinct_completions_mean"]) and step["answered_share"] == 0
    assert result.pass_at_k.set_index("k")["pass_at_k"].loc[1] == pytest.approx(0.5)


def test_runs_without_completions(tmp_path, shared_store):
    store = Store.create(tmp_path / "store")
    with store.write_run("metrics_only") as writer:
        writer.write_metrics(pa.table({"step": [0], "metric": ["reward_mean"], "value": [0.5]}))
    with pytest.raises(EntropylensError, match="no completions"):
        el.diversity(store, "metrics_only")


def test_narrowing_finding_needs_changes_beyond_noise(tmp_path):
    rows = []
    for step in range(8):
        early = step < 2
        for g in range(40):
            # early: each prompt solved by a few samples; late: half the prompts always,
            # the others never (pass@1 up, pass@8 down)
            if early:
                rewards = [1 if i < 2 else 0 for i in range(8)]
            else:
                rewards = [1] * 8 if g % 2 == 0 else [0] * 8
            rows += _rows(step, "train", g, rewards, texts=[f"{i}" for i in range(8)])
    store = _store(tmp_path, rows)
    result = el.diversity(store)
    analysis = dv.DiversityAnalysis()
    found = analysis.findings(result, "r")
    assert found[0].severity == "warning" and found[0].tier == "key"
    assert "RL is narrowing the policy" in found[0].text
    assert found[0].numbers["passk_from"] > found[0].numbers["passk_to"]
    # the same shape on three prompts is within the noise
    few = _store(tmp_path / "few", [r for r in rows if int(r["group_id"]) < 3])
    text = analysis.findings(el.diversity(few), "r")[0].text
    assert "inconclusive" in text


def test_compare_two_evaluations(tmp_path):
    rows = (_rows(None, "inference", 0, [1, 1, 1, 0])
            + _rows(None, "inference", 1, [1, 0, 1, 1]))
    hot = [dict(r, reward=1.0 - r["reward"]) for r in rows]
    store = Store.create(tmp_path / "store")
    for run, data in (("t07", rows), ("t12", hot)):
        with store.write_run(run) as writer:
            writer.write_sequences(pa.Table.from_pylist(data))
    compared = el.diversity_compare(store, "t07", "t12")
    one = compared.pass_at_k.set_index("k").loc[1]
    assert one["pass_at_k_a"] == 0.75 and one["pass_at_k_b"] == 0.25
    assert one["difference"] == pytest.approx(-0.5)
    cli = runner.invoke(app, ["diversity", str(store.path), "--run", "t07", "--run", "t12",
                              "--compare", "--json"])
    assert cli.exit_code == 0, cli.output
    data = json.loads(cli.output)
    assert data["comparison"]["run_b"] == "t12" and len(data["runs"]) == 2
    usage = runner.invoke(app, ["diversity", str(store.path), "--compare"])
    assert usage.exit_code == 2


def test_cli_json_has_the_issue_keys(shared_store):
    cli = runner.invoke(app, ["diversity", str(shared_store.path), "--run", "vanilla",
                              "--k", "1,2,4", "--json"])
    assert cli.exit_code == 0, cli.output
    data = json.loads(cli.output)
    step = data["runs"][0]["steps"][0]
    for key in ("step", "split", "prompts", "samples_per_prompt", "pass_at_k", "best_at_k",
                "distinct_completions_mean", "distinct_answers_mean", "zero_variance_groups",
                "reward_variance_mean"):
        assert key in step
    assert list(step["pass_at_k"]) == ["1", "2", "4"]
    text = runner.invoke(app, ["diversity", str(shared_store.path), "--run", "top20"])
    assert text.exit_code == 0 and "top20: diversity per step" in text.output


def test_ray_engine_gives_identical_results(shared_store):
    ray = pytest.importorskip("ray")
    from entropylens.engine import init_ray

    started = not ray.is_initialized()
    init_ray(num_cpus=2)
    try:
        local = el.diversity(shared_store, "vanilla", unit_rows=20_000)
        remote = el.diversity(shared_store, "vanilla", engine="ray", unit_rows=20_000)
    finally:
        if started:
            ray.shutdown()
    assert local.steps["entropy"].notna().all()   # the token scan ran in both
    assert json.dumps(local.to_dict()) == json.dumps(remote.to_dict())


def test_figures_and_section(shared_store):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = el.diversity(shared_store, "vanilla")
    analysis = dv.DiversityAnalysis()
    figures = analysis.figures(result, "vanilla")
    assert [f.kind for f in figures] == ["pass-at-k-train", "distinct-answers",
                                         "zero-variance", "split-variance"]
    for spec in figures:
        fig, ax = plt.subplots()
        spec.draw(ax)
        assert ax.lines
        plt.close(fig)
    section = analysis.section(result, "vanilla")
    json.dumps(section)
    assert section["narrowing"]["verdict"] == "both rising"
    assert len(section["steps"]) == 69 and section["splits"][0]["split"] == "train"


def render_block(name: str, section: dict, run: str, markdown: bool) -> str:
    """A section block as the report renders it (variables of the registry contract)."""
    from entropylens.report.render import environment

    suffix = "md" if markdown else "html"
    template = environment(markdown).get_template(f"sections/{name}.{suffix}.j2")
    block = {"name": name, "title": "t", "available": True, "reason": None, "figures": [],
             **section}
    return template.render(s=block, r={"run": run, "slug": "r"}, figures={},
                           figure=lambda f: "")


def test_html_and_markdown_blocks_escape_data(tmp_path):
    rows = _rows(0, "train", "<b>g</b>", [1, 0, 1, 0], texts=["<script>", "a", "b", "c"])
    rows += _rows(3, "inference", "<b>g</b>", [1, 0], texts=["<x>", "<y>"])
    result = el.diversity(_store(tmp_path, rows, run="r"), answer_regex=r"(<\w+>)")
    section = dv.DiversityAnalysis().section(result, "r")
    section["splits"][0]["split"] = "<i>"   # data text reaches the block
    html = render_block("diversity", section, "r", markdown=False)
    md = render_block("diversity", section, "r", markdown=True)
    assert "<i>" not in html and "&lt;i&gt;" in html
    assert "pass@k" in html and "1: 0.5" in html
    assert "regular expression (&lt;\\w+&gt;)" in html   # the rule, escaped
    assert "&lt;i&gt;" in md and "<i>" not in md
    assert "| inference | 3 " not in md and "| 3 | inference | 1 × 2 |" in md


# -- ingest: answers and reward vectors from the formats that carry them -----------------

def test_trl_reward_functions_become_reward_vectors(tmp_path):
    from _ingest_helpers import FIXTURES, ingest_one

    trl = FIXTURES / "trl" / "completions"
    _, sequences, _ = ingest_one(trl, tmp_path)
    first = pd.read_parquet(trl / "completions_00001.parquet")
    got = sequences[sequences.step == 1].sort_values("sample_id", key=lambda c: c.astype(int))
    both = first["format_reward"].notna().to_numpy()
    vectors = got["reward_vector"].tolist()
    for has_both, vector, row in zip(both, vectors, first.itertuples()):
        if has_both:   # one entry per reward function, in the file's column order
            assert list(vector) == [row.correctness_reward, row.format_reward]
        else:
            assert vector is None
    result = el.diversity(tmp_path / "store")
    assert result.steps.loc[result.steps["step"] == 1, "reward_vector_size"].item() == 2


def test_verl_pred_is_the_final_answer(tmp_path):
    from _ingest_helpers import FIXTURES

    lines = (FIXTURES / "verl_rollout" / "rollout" / "1.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines[:3]]
    for record, pred in zip(records, ["42", "[INVALID]", None]):
        record["pred"] = pred     # math_dapo.compute_score's extra; the last one lacks it
    folder = tmp_path / "rollout"
    folder.mkdir()
    (folder / "3.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    el.ingest(folder / "3.jsonl", tmp_path / "store", run="r", progress=False)
    sequences = el.open(tmp_path / "store").read_sequences("r")
    assert sequences.column("final_answer").to_pylist() == ["42", None, None]


def test_generic_tables_map_answers_origins_and_vectors(tmp_path):
    rows = [{"step": 0, "uid": "p", "idx": i, "text": f"... so {a}", "score": float(a == 2),
             "pred": str(a), "src": "refinement" if i else "on_policy", "tests": [a, 1.0]}
            for i, a in enumerate([2, 2, 3])]
    path = tmp_path / "rollouts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cli = runner.invoke(app, ["ingest", str(path), "--out", str(tmp_path / "store"), "--run",
                              "r", "--map", "completion=text", "--map", "group_id=uid",
                              "--map", "sample_id=idx", "--map", "final_answer=pred",
                              "--map", "origin=src", "--map", "reward_vector=tests"])
    assert cli.exit_code == 0, cli.output
    table = el.open(tmp_path / "store").read_sequences("r").to_pandas()
    assert table["origin"].tolist() == ["on_policy", "refinement", "refinement"]
    assert [list(v) for v in table["reward_vector"]] == [[2, 1], [2, 1], [3, 1]]
    steps = el.diversity(tmp_path / "store").steps.iloc[0]
    assert steps["distinct_answers_mean"] == 2 and steps["reward_space_winners_mean"] == 1


def test_per_group_labels_equal_a_pandas_groupby():
    # distinct labels and their entropy per group, labels compared as text (1 and "1" one)
    from entropylens.analysis.diversity import _label_codes, _per_group

    rng = np.random.default_rng(3)
    n = 2000
    codes = rng.integers(-1, 40, n)
    labels = pd.Series(rng.choice(np.array([1, "1", "a", "b", " b", None, 2.5, "2.5", "é"],
                                           dtype=object), n))
    distinct, entropy = _per_group(codes, _label_codes(labels), 40)
    frame = pd.DataFrame({"g": codes, "label": labels.astype(str).where(labels.notna())})
    frame = frame[(frame["g"] >= 0) & frame["label"].notna()]
    counts = frame.groupby(["g", "label"]).size()
    expected_distinct = counts.groupby(level="g").size()
    shares = counts / counts.groupby(level="g").transform("sum")
    expected_entropy = (-(shares * np.log(shares))).groupby(level="g").sum()
    np.testing.assert_array_equal(distinct, expected_distinct.to_numpy())
    np.testing.assert_allclose(entropy, expected_entropy.to_numpy(), rtol=1e-12)
