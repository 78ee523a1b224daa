"""Saturation law R = -a exp(H) + b: the real run against scipy, joins and edge cases."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy.optimize import curve_fit
from typer.testing import CliRunner

import entropylens as el
from entropylens.analysis.saturation import fit_arrays, join_curves
from entropylens.cli import app
from entropylens.errors import EntropylensError
from entropylens.store import Store
from _eos import before_eos

runner = CliRunner()


def _law(h, a, b):
    return -a * np.exp(h) + b


def _independent_points(run_folder):
    """(H, R) of the shared run joined plainly: validation steps, final one on the last step;
    the entropy without the tokens after end-of-sequence, as analyses see it by default."""
    tokens = before_eos(pd.read_parquet(run_folder / "tokens.parquet", columns=[
        "step", "prompt_idx", "sample_idx", "position", "token", "entropy"]))
    entropy = tokens.groupby("step")["entropy"].apply(lambda s: s.to_numpy(np.float64).mean())
    val = pd.read_csv(run_folder / "metrics.csv").dropna(subset=["val_acc"])
    steps = val["step"].astype(int).to_numpy()
    # the final validation (one step after the last training step) takes the last entropy
    h = entropy.reindex(np.minimum(steps, entropy.index.max())).to_numpy()
    return steps, h, val["val_acc"].to_numpy()


def _metric_store(path, columns, run="r"):
    store = Store.create(path)
    frames = [pd.DataFrame({"step": steps, "metric": name, "value": values})
              for name, (steps, values) in columns.items()]
    with store.write_run(run) as writer:
        writer.write_metrics(pa.Table.from_pandas(pd.concat(frames), preserve_index=False))
    return store


def test_vanilla_fit_matches_scipy_and_the_done_criteria(shared_store, shared_run):
    fit = el.fit_saturation(shared_store, "vanilla")
    steps, h, r = _independent_points(shared_run / "vanilla")
    (a, b), _ = curve_fit(_law, h, r, p0=(0.1, 1.0))
    assert fit.a == pytest.approx(a, rel=1e-6) and fit.b == pytest.approx(b, rel=1e-6)
    predicted = _law(h, a, b)
    r2 = 1 - ((r - predicted) ** 2).sum() / ((r - r.mean()) ** 2).sum()
    assert fit.r2 == pytest.approx(r2, rel=1e-6) and fit.r2 > 0.7
    assert fit.n == len(steps) == 19
    assert r.min() <= fit.ceiling <= r.max()
    assert fit.ceiling == pytest.approx(b - a)
    assert fit.x == "policy_entropy (exact tokens)" and fit.y == "val_accuracy"
    assert fit.join == {"exact": 18, "interpolated": 0, "carried": 1, "dropped": 0}
    assert fit.data["step"].tolist() == steps.tolist()
    assert fit.a_ci[0] <= fit.a <= fit.a_ci[1] and fit.b_ci[0] <= fit.b <= fit.b_ci[1]
    assert fit.ceiling_ci[0] <= fit.ceiling <= fit.ceiling_ci[1]
    assert fit.predict(0.0) == pytest.approx(fit.ceiling)


def test_early_prediction_is_fitted_on_the_first_15_percent(shared_store, shared_run):
    fit = el.fit_saturation(shared_store, "vanilla")
    _, h, r = _independent_points(shared_run / "vanilla")
    n_fit = 3  # ceil(0.15 * 19)
    coef, *_ = np.linalg.lstsq(np.column_stack([-np.exp(h[:n_fit]), np.ones(n_fit)]),
                               r[:n_fit], rcond=None)
    rmse = np.sqrt(np.mean((_law(h[n_fit:], *coef) - r[n_fit:]) ** 2))
    assert fit.early["n_fit"] == n_fit and fit.early["fraction"] == 0.15
    assert fit.early["rmse"] == pytest.approx(rmse, rel=1e-6)


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(0)
    h = rng.uniform(0, 2, 40)
    r = _law(h, 0.1, 0.9) + rng.normal(0, 0.01, 40)
    one, two = fit_arrays(h, r, seed=3), fit_arrays(h, r, seed=3)
    assert one.a_ci == two.a_ci and one.b_ci == two.b_ci
    assert fit_arrays(h, r, seed=4).a_ci != one.a_ci
    assert one.a_ci[0] < 0.1 < one.a_ci[1]


def test_metric_only_store_without_validation_uses_reward(tmp_path):
    steps = np.arange(30)
    h = np.linspace(2.0, 0.1, 30)
    store = _metric_store(tmp_path / "s", {"policy_entropy": (steps, h),
                                           "reward_mean": (steps, _law(h, 0.12, 0.95))})
    fit = el.fit_saturation(store)  # one run in the store: one fit, not a list
    assert fit.y == "reward_mean" and fit.x == "policy_entropy (metric)"
    assert fit.a == pytest.approx(0.12) and fit.b == pytest.approx(0.95) and fit.r2 == 1.0
    assert fit.early["rmse"] == pytest.approx(0.0, abs=1e-9)


def test_validation_between_entropy_steps_is_interpolated(tmp_path):
    h_steps = np.arange(0, 40, 2)
    h = np.linspace(2.0, 0.2, len(h_steps))
    val_steps = np.array([-1, 1, 5, 9, 17, 25, 33, 39, 40, 50])
    truth = np.interp(val_steps, h_steps, h)
    store = _metric_store(tmp_path / "s", {"policy_entropy": (h_steps, h),
                                           "val_accuracy": (val_steps, _law(truth, 0.1, 1.0))})
    fit = el.fit_saturation(store, "r")
    # the last entropy step is 38 (spacing 2): 39 and 40 take its entropy; -1 and 50 drop
    assert fit.join == {"exact": 0, "interpolated": 6, "carried": 2, "dropped": 2}
    assert fit.data["step"].tolist() == [1, 5, 9, 17, 25, 33, 39, 40]
    np.testing.assert_allclose(fit.data["H"].iloc[:6], truth[1:7])
    assert fit.data["H"].iloc[-1] == pytest.approx(h[-1])
    assert any("left out" in note for note in fit.notes)


def test_join_curves_prefers_an_exact_step():
    entropy = pd.DataFrame({"step": [0, 10], "entropy": [1.0, 2.0]})
    data, counts = join_curves(entropy, pd.DataFrame({"step": [0, 5], "value": [0.1, 0.2]}))
    assert data["H"].tolist() == [1.0, 1.5] and counts["exact"] == counts["interpolated"] == 1


def test_too_few_points_and_constant_entropy_are_clear_errors(tmp_path):
    with pytest.raises(EntropylensError, match="too few points"):
        fit_arrays([1.0, 2.0], [0.5, 0.6])
    with pytest.raises(EntropylensError, match="same at every point"):
        fit_arrays([1.0] * 5, [0.1, 0.2, 0.3, 0.4, 0.5])
    store = _metric_store(tmp_path / "s", {"policy_entropy": ([0, 1, 2], [1.0, 0.5, 0.2]),
                                           "val_accuracy": ([0, 2], [0.1, 0.5])})
    with pytest.raises(EntropylensError, match="run 'r': too few points"):
        el.fit_saturation(store)
    cli = runner.invoke(app, ["fit", str(tmp_path / "s")])
    assert cli.exit_code == 1 and "too few points" in cli.stderr


def test_constant_reward_has_no_r2(tmp_path):
    fit = fit_arrays(np.linspace(0, 2, 10), np.full(10, 0.5))
    assert fit.r2 is None and fit.a == pytest.approx(0, abs=1e-12)
    json.dumps(fit.to_dict(), allow_nan=False)


def test_cli_json_one_run_and_several(shared_store):
    result = runner.invoke(app, ["fit", str(shared_store.path), "--run", "vanilla", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) >= {"run", "x", "y", "a", "b", "ceiling", "r2", "n", "a_ci", "b_ci"}
    assert data["run"] == "vanilla" and data["r2"] > 0.7 and len(data["a_ci"]) == 2
    result = runner.invoke(app, ["fit", str(shared_store.path), "--json"])
    fits = json.loads(result.stdout)["fits"]
    assert [f["run"] for f in fits] == ["top20", "vanilla"]
    assert fits[1]["a"] == pytest.approx(data["a"])
    reward = runner.invoke(app, ["fit", str(shared_store.path), "--run", "vanilla",
                                 "--reward", "reward_mean", "--json"])
    assert json.loads(reward.stdout)["y"] == "reward_mean"
    text = runner.invoke(app, ["fit", str(shared_store.path), "--run", "vanilla"])
    assert text.exit_code == 0 and "ceiling" in text.stdout


def test_a_run_that_cannot_be_fitted_does_not_hide_the_others(tmp_path, shared_run):
    store = _metric_store(tmp_path / "s", {"policy_entropy": ([0, 1, 2], [1.0, 0.5, 0.2])},
                          run="noreward")
    el.ingest(shared_run / "vanilla" / "metrics.csv", store.path, run="vanilla")
    fits = el.fit_saturation(store)
    assert fits[0].error and "val_accuracy" in fits[0].error and fits[0].a is None
    assert fits[1].r2 > 0.7
    with pytest.raises(EntropylensError):
        fits[0].predict(1.0)
