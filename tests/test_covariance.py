"""Covariance of token logprob and advantage, against plain numpy on the real run."""

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from typer.testing import CliRunner

import entropylens as el
from entropylens.cli import app
from entropylens.errors import EntropylensError
from entropylens.store import Store
from _eos import before_eos

runner = CliRunner()
FRACTIONS = {"top 0.02%": 0.0002, "top 0.2%": 0.002, "top 2%": 0.02, "top 20%": 0.2,
             "top 50%": 0.5, "all": 1.0}


def _numpy_groups(tokens: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for step, group in tokens.groupby("step"):
        lp = group["logprob"].to_numpy(np.float64)
        adv = group["advantage"].to_numpy(np.float64)
        cov = np.sort((lp - lp.mean()) * (adv - adv.mean()))[::-1]
        for name, fraction in FRACTIONS.items():
            k = len(cov) if fraction == 1 else max(1, math.ceil(fraction * len(cov)))
            rows.append({"step": step, "group": name, "tokens": k, "mean_cov": cov[:k].mean()})
    return pd.DataFrame(rows)


def test_groups_equal_numpy_on_the_shared_run(shared_store, shared_run):
    result = el.covariance(shared_store, "vanilla")
    raw = before_eos(pd.read_parquet(
        shared_run / "vanilla" / "tokens.parquet",
        columns=["step", "prompt_idx", "sample_idx", "position", "token", "logprob",
                 "advantage", "entropy"]))
    expected = _numpy_groups(raw)
    got = result.groups.reset_index(drop=True)
    assert got["step"].tolist() == expected["step"].tolist()
    assert got["group"].tolist() == expected["group"].tolist()
    assert got["tokens"].tolist() == expected["tokens"].tolist()
    np.testing.assert_allclose(got["mean_cov"], expected["mean_cov"], rtol=1e-9, atol=1e-12)
    # the mean of all tokens is the biased sample covariance of the step
    one = raw[raw.step == 1]
    cov = np.cov(one.logprob.astype(float), one.advantage.astype(float), bias=True)[0, 1]
    assert got[(got.step == 1) & (got.group == "all")]["mean_cov"].item() == pytest.approx(cov)


def test_correlation_with_the_next_entropy_change(shared_store, shared_run):
    result = el.covariance(shared_store, "vanilla")
    raw = before_eos(pd.read_parquet(
        shared_run / "vanilla" / "tokens.parquet",
        columns=["step", "prompt_idx", "sample_idx", "position", "token", "logprob",
                 "advantage", "entropy"]))
    entropy = raw.groupby("step")["entropy"].apply(lambda s: s.to_numpy(np.float64).mean())
    change = entropy.shift(-1) - entropy
    mean_cov = _numpy_groups(raw).query("group == 'all'").set_index("step")["mean_cov"]
    both = pd.DataFrame({"cov": mean_cov, "dh": change}).dropna()
    steps = result.steps.set_index("step")
    np.testing.assert_allclose(steps["entropy_change_next"].iloc[:-1], change.iloc[:-1])
    assert pd.isna(steps["entropy_change_next"].iloc[-1])
    corr = result.correlation.iloc[0]
    assert corr["n"] == len(both) == 68
    assert corr["pearson_r"] == pytest.approx(np.corrcoef(both["cov"], both["dh"])[0, 1])
    assert corr["spearman_r"] == pytest.approx(both["cov"].rank().corr(both["dh"].rank()))


def test_one_unit_per_step_gives_the_same_result(shared_store):
    whole = el.covariance(shared_store, "top20")
    stepwise = el.covariance(shared_store, "top20", unit_rows=1)
    pd.testing.assert_frame_equal(whole.groups, stepwise.groups, check_exact=False,
                                  rtol=1e-12)


def test_single_token_step_and_missing_advantages(tmp_path):
    store = Store.create(tmp_path / "s")
    with store.write_run("r") as writer:
        writer.write_tokens(pa.table({
            "step": [0, 1, 1, 1, 2], "sample_id": ["a", "a", "b", "c", "a"],
            "position": [0] * 5, "logprob": [-1.0, -1.0, -3.0, -2.0, -1.0],
            "advantage": [0.5, 1.0, -1.0, None, None], "entropy": [1.0, 1.0, 2.0, 3.0, 0.5]}))
    result = el.covariance(store)
    groups = result.groups.set_index(["step", "group"])
    assert groups.loc[(0, "all"), "mean_cov"] == 0.0 and groups.loc[(0, "top 2%"), "tokens"] == 1
    # step 1: only the two tokens with an advantage count; each has cov (±1)(±1) = 1
    assert groups.loc[(1, "all"), "tokens"] == 2 and groups.loc[(1, "all"), "mean_cov"] == 1.0
    assert 2 not in result.steps["step"].tolist()  # no token of step 2 has an advantage
    assert result.correlation.iloc[0]["pearson_r"] is None


def test_runs_without_advantages_are_clear_errors(tmp_path, shared_run):
    store = Store.create(tmp_path / "s")
    with store.write_run("noadv") as writer:
        writer.write_tokens(pa.table({"step": [0], "sample_id": ["a"], "position": [0],
                                      "logprob": [-1.0]}))
    with pytest.raises(EntropylensError, match="no token advantage"):
        el.covariance(store)
    el.ingest(shared_run / "vanilla" / "metrics.csv", store.path, run="metrics")
    with pytest.raises(EntropylensError, match="has no tokens"):
        el.covariance(store, "metrics")
    cli = runner.invoke(app, ["covariance", str(store.path)])
    assert cli.exit_code == 1 and "advantage" in cli.stderr


def test_cli_json(shared_store):
    result = runner.invoke(app, ["covariance", str(shared_store.path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) >= {"groups", "steps", "correlation"}
    assert set(data["groups"][0]) >= {"run", "step", "group", "tokens", "mean_cov"}
    assert set(data["steps"][0]) >= {"run", "step", "mean_cov", "entropy_change_next"}
    assert {c["run"] for c in data["correlation"]} == {"top20", "vanilla"}
