"""Compare: one table and one set of curves for every run of a store."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from typer.testing import CliRunner

import entropylens as el
from entropylens.cli import app

runner = CliRunner()


def test_table_and_curves_of_the_shared_runs(shared_store, shared_run):
    # against the trainer's logged curve: tokens after end-of-sequence kept, as it kept them
    result = el.compare(shared_store, keep_after_eos=True)
    table = result.table.set_index("run")
    assert table.index.tolist() == ["top20", "vanilla"]
    vanilla, top20 = table.loc["vanilla"], table.loc["top20"]
    logged = pd.read_csv(shared_run / "vanilla" / "metrics.csv")
    entropy = logged.dropna(subset=["entropy"])["entropy"].to_numpy()
    val = logged.dropna(subset=["val_acc"])["val_acc"].to_numpy()
    assert vanilla["steps"] == len(entropy) == 69 and vanilla["entropy_source"] == "exact"
    assert vanilla["first_entropy"] == pytest.approx(entropy[0], abs=1e-5)
    assert vanilla["last_entropy"] == pytest.approx(entropy[-1], abs=1e-5)
    assert vanilla["final_performance"] == pytest.approx(val[-1])
    assert 8 <= vanilla["collapse_start"] < vanilla["collapse_end"] <= 30
    assert pd.isna(top20["collapse_start"]) and not top20["alarm"]
    fit = el.fit_saturation(shared_store, "vanilla", keep_after_eos=True)
    assert vanilla["ceiling"] == pytest.approx(fit.ceiling) and vanilla["r2"] > 0.7
    assert vanilla["fit_n"] == fit.n
    phases = el.phases(shared_store, "vanilla", keep_after_eos=True).runs[0]
    assert vanilla["early_drop_fraction"] == pytest.approx(phases.early_drop_fraction)
    assert vanilla["arrival_step"] == phases.arrival_step and vanilla["alarm"]
    curves = result.curves
    assert set(curves["metric"]) == {"policy_entropy", "val_accuracy", "reward_mean"}
    h = curves[(curves.run == "vanilla") & (curves.metric == "policy_entropy")]
    np.testing.assert_allclose(h["value"], entropy, atol=1e-5)
    reward = curves[(curves.run == "top20") & (curves.metric == "reward_mean")]
    np.testing.assert_allclose(reward["value"],
                               pd.read_csv(shared_run / "top20" / "metrics.csv")["reward"]
                               .dropna())


def test_single_run_and_a_run_with_only_rewards(tmp_path, shared_run):
    el.ingest(shared_run / "top20" / "metrics.csv", tmp_path / "s", run="top20")
    single = el.compare(tmp_path / "s")
    assert single.table["run"].tolist() == ["top20"]
    assert single.table["entropy_source"].tolist() == ["metric"]
    store = el.open(tmp_path / "s")
    with store.write_run("rewards") as writer:
        writer.write_metrics(pa.table({"step": [0, 1, 2], "metric": ["reward_mean"] * 3,
                                       "value": [0.1, 0.2, 0.3]}))
    both = el.compare(store).table.set_index("run")
    rewards = both.loc["rewards"]
    assert "no policy entropy" in rewards["note"] and pd.isna(rewards["ceiling"])
    assert rewards["final_performance"] == pytest.approx(0.3)
    assert both.loc["top20", "steps"] == 25


def test_cli_json(shared_store):
    result = runner.invoke(app, ["compare", str(shared_store.path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["run"] for r in data["runs"]] == ["top20", "vanilla"]
    assert set(data["runs"][0]) >= {"run", "steps", "first_entropy", "last_entropy", "drop",
                                    "early_drop_fraction", "ceiling", "r2",
                                    "final_performance"}
    assert set(data["curves"][0]) == {"run", "step", "metric", "value"}
    text = runner.invoke(app, ["compare", str(shared_store.path), "--run", "vanilla"])
    assert text.exit_code == 0 and "vanilla" in text.stdout and "ceiling" in text.stdout
