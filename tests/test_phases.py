"""Collapse phases: the real SmolLM2 runs, real metric-only logs and curves with known breaks."""

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from typer.testing import CliRunner

import entropylens as el
from entropylens.analysis.phases import analyse_curve
from entropylens.cli import app
from entropylens.store import Store

runner = CliRunner()


def _collapses(result, run):
    item = next(r for r in result.runs if r.run == run)
    return item, item.segments[item.segments["label"] == "rapid_collapse"]


def _numpy_summary(steps, values):
    """early_drop_fraction and arrival_step computed plainly from their definitions."""
    steps = np.asarray(steps, float)
    values = np.asarray(values, float)
    floor = values[-max(3, math.ceil(len(values) / 10)):].mean()
    drop = values[0] - floor
    at_twelfth = np.interp(steps[0] + (steps[-1] - steps[0]) / 12, steps, values)
    arrival = steps[np.argmax(values <= floor + 0.1 * drop)]
    return (values[0] - at_twelfth) / drop, int(arrival), floor


def test_shared_vanilla_collapses_between_steps_8_and_30(shared_store, shared_run):
    # the curve the trainer logged: tokens after end-of-sequence kept
    result = el.phases(shared_store, keep_after_eos=True)
    vanilla, rapid = _collapses(result, "vanilla")
    assert len(rapid) >= 1
    assert rapid["start_step"].min() >= 8 and rapid["end_step"].max() <= 30
    assert vanilla.collapse["drop"] > 1.0
    # after the collapse the tail declines slowly into its floor: observed, not fitted, ends
    last = vanilla.segments.iloc[-1]
    assert last["label"] in ("plateau", "slow_decline") and 0 < last["end_entropy"] < 0.1
    # the same numbers computed plainly from the trainer's logged curve
    logged = pd.read_csv(shared_run / "vanilla" / "metrics.csv").dropna(subset=["entropy"])
    early, arrival, floor = _numpy_summary(logged["step"], logged["entropy"])
    assert vanilla.early_drop_fraction == pytest.approx(early, abs=1e-5)
    assert vanilla.arrival_step == arrival == 20
    assert vanilla.floor == pytest.approx(floor, abs=1e-6)
    # entropy sits at 0.07 nats while validation accuracy went down over its last points
    assert vanilla.alarm and vanilla.alarm_message.startswith("ALARM")
    assert vanilla.entropy_source == "exact" and vanilla.performance_metric == "val_accuracy"


def test_shared_top20_has_no_collapse(shared_store):
    top20, rapid = _collapses(el.phases(shared_store, "top20", keep_after_eos=True), "top20")
    assert rapid.empty and not top20.alarm
    assert top20.early_drop_fraction is None and top20.arrival_step is None
    assert set(top20.segments["label"]) <= {"rise", "plateau"}


def test_sample_logs_subset_gives_the_same_picture(sample_store):
    result = el.phases(sample_store)
    _, rapid = _collapses(result, "vanilla")
    assert len(rapid) and rapid["start_step"].min() >= 8 and rapid["end_step"].max() <= 30
    assert _collapses(result, "top20")[1].empty


def test_metric_only_logs(tmp_path, shared_run):
    for run in ("vanilla", "top20"):
        el.ingest(shared_run / run / "metrics.csv", tmp_path / "s", run=run)
    result = el.phases(tmp_path / "s")
    vanilla, rapid = _collapses(result, "vanilla")
    assert vanilla.entropy_source == "metric"
    assert len(rapid) and rapid["start_step"].min() >= 8 and rapid["end_step"].max() <= 30
    assert _collapses(result, "top20")[1].empty


def test_real_trl_run_logged_every_5_steps(tmp_path, shared_samples):
    """Qwen3.5-9B GRPO (rho 0.7, seed 42): entropy 0.3 -> 0.05 between steps 50 and 85."""
    records = json.loads((shared_samples / "real_runs" / "qwen35_9b_grpo_rho0.70_seed42"
                          / "step_logs.json").read_text())
    frame = pd.DataFrame([r for r in records if "entropy" in r])[["step", "entropy", "reward"]]
    frame.to_csv(tmp_path / "log.csv", index=False)
    el.ingest(tmp_path / "log.csv", tmp_path / "s", run="q")
    item, rapid = _collapses(el.phases(tmp_path / "s"), "q")
    assert len(rapid) and rapid["start_step"].min() >= 45 and rapid["end_step"].max() <= 90
    early, arrival, _ = _numpy_summary(frame["step"], frame["entropy"])
    assert item.arrival_step == arrival
    assert item.early_drop_fraction == pytest.approx(early)
    assert item.performance_metric == "reward_mean"


@pytest.mark.parametrize("seed", range(5))
def test_synthetic_collapse_with_known_change_points(seed):
    rng = np.random.default_rng(seed)
    steps = np.arange(100)
    truth = np.piecewise(steps.astype(float), [steps < 20, (steps >= 20) & (steps < 30),
                                               steps >= 30],
                         [2.0, lambda s: 2.0 - 0.18 * (s - 20), lambda s: 0.2 - 0.001 * (s - 30)])
    result = analyse_curve(steps, truth + rng.normal(0, 0.03, len(steps)))
    rapid = result.segments[result.segments["label"] == "rapid_collapse"]
    assert len(rapid) == 1
    assert abs(rapid["start_step"].iloc[0] - 20) <= 2 and abs(rapid["end_step"].iloc[0] - 30) <= 2
    assert result.segments["label"].iloc[0] == "plateau"
    assert result.segments["label"].iloc[-1] == "plateau"


def test_synthetic_rise_and_irregular_steps():
    steps = np.arange(0, 400, 5)
    rng = np.random.default_rng(1)
    curve = np.where(steps < 150, 0.3, 0.3 + 0.01 * (steps - 150)) + rng.normal(0, 0.01, len(steps))
    result = analyse_curve(steps, curve)
    assert list(result.segments["label"]) == ["plateau", "rise"]
    assert abs(result.segments["start_step"].iloc[1] - 150) <= 10
    assert result.early_drop_fraction is None and result.arrival_step is None
    assert not result.alarm


def test_all_equal_entropies_are_one_plateau():
    result = analyse_curve(range(30), [0.7] * 30)
    assert result.segments[["start_step", "end_step", "label"]].values.tolist() == \
        [[0, 29, "plateau"]]
    assert result.early_drop_fraction is None and result.arrival_step is None
    assert result.floor == pytest.approx(0.7) and not result.alarm


@pytest.mark.parametrize("n", [0, 1, 2])
def test_too_few_steps_give_no_segments_and_say_so(n):
    result = analyse_curve(range(n), [1.0, 0.5][:n])
    assert result.segments.empty and "at least 3" in result.note
    json.dumps(result.to_dict(), allow_nan=False)


def test_alarm_needs_a_plateaued_reward():
    steps = np.arange(60)
    entropy = np.where(steps < 10, 2.0, np.maximum(0.05, 2.0 - 0.2 * (steps - 10)))
    improving = pd.DataFrame({"step": steps, "value": steps / 60, "metric": "reward_mean"})
    flat = improving.assign(value=np.minimum(steps / 20, 1.0))
    assert not analyse_curve(steps, entropy, perf=improving).alarm
    assert analyse_curve(steps, entropy, perf=flat).alarm
    unknown = analyse_curve(steps, entropy)
    assert not unknown.alarm and "not evaluated" in unknown.alarm_message


def test_a_run_without_entropy_is_reported_not_fatal(tmp_path, shared_run):
    store = Store.create(tmp_path / "s")
    with store.write_run("rewards") as writer:
        writer.write_metrics(pa.table({"step": [0, 1], "metric": ["reward_mean"] * 2,
                                       "value": [0.1, 0.2]}))
    el.ingest(shared_run / "vanilla" / "metrics.csv", tmp_path / "s", run="vanilla")
    result = el.phases(store)
    skipped = next(r for r in result.runs if r.run == "rewards")
    assert skipped.segments.empty and "no policy entropy" in skipped.note
    cli = runner.invoke(app, ["phases", str(tmp_path / "s"), "--run", "rewards"])
    assert cli.exit_code == 1 and "no policy entropy" in cli.stderr


def test_cli_json_follows_the_contract(tmp_path, shared_run):
    el.ingest(shared_run / "vanilla" / "metrics.csv", tmp_path / "s", run="vanilla")
    result = runner.invoke(app, ["phases", str(tmp_path / "s"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    item = data["runs"][0]
    assert set(item) >= {"run", "segments", "early_drop_fraction", "arrival_step"}
    assert set(item["segments"][0]) >= {"start_step", "end_step", "label"}
    assert {s["label"] for s in item["segments"]} <= {"rapid_collapse", "slow_decline",
                                                       "plateau", "rise"}
    assert item["run"] == "vanilla" and item["arrival_step"] == 20
    text = runner.invoke(app, ["phases", str(tmp_path / "s")])
    assert text.exit_code == 0 and "rapid_collapse" in text.stdout


def test_long_run_of_2400_steps_like_the_paper():
    """Change points are searched on a coarser grid past 400 points; the answer stays right."""
    steps = np.arange(2400)
    rng = np.random.default_rng(7)
    curve = np.maximum(0.1, 2.0 - np.maximum(0, steps - 240) * 0.0158) \
        + rng.normal(0, 0.03, len(steps))
    result = analyse_curve(steps, curve)
    rapid = result.segments[result.segments["label"] == "rapid_collapse"]
    assert len(rapid) == 1
    assert abs(rapid["start_step"].iloc[0] - 240) <= 12
    assert abs(rapid["end_step"].iloc[0] - 360) <= 12
    early, arrival, _ = _numpy_summary(steps, curve)
    assert result.early_drop_fraction == pytest.approx(early)
    assert result.arrival_step == arrival


@pytest.mark.parametrize("jump", [1, 3])
def test_segment_residuals_equal_a_least_squares_fit_per_segment(jump):
    from entropylens.analysis.phases import _rss_column, segment_rss

    rng = np.random.default_rng(jump)
    n = 61
    x = np.sort(rng.random(n))
    y = np.cumsum(rng.normal(size=n)) + 100.0   # an offset: no cancellation allowed
    rss = segment_rss(x, y, jump)
    design = np.column_stack([np.ones(n), x])
    ends = [*range(jump, n, jump), n]
    for start in range(0, n, jump):
        for end in ends:
            if end - start < 3:
                continue
            expected = np.linalg.lstsq(design[start:end], y[start:end], rcond=None)[1].sum()
            got = rss[start // jump, _rss_column(end, n, jump)]
            assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_change_points_equal_ruptures_linear_cost(shared_store):
    # the table-backed cost must cut where ruptures' own lstsq cost cuts: real curves and
    # long ones searched on a coarser grid
    import ruptures

    from entropylens.analysis.phases import MAX_POINTS, _line_cost, change_points

    curves = [(c["step"].to_numpy(float), c["entropy"].to_numpy(float))
              for c in (el.policy_entropy(shared_store, run).dropna(
                  subset=["entropy"]) for run in ("vanilla", "top20"))]
    rng = np.random.default_rng(11)
    for n in (120, 900):
        steps = np.sort(rng.choice(np.arange(4 * n), n, replace=False)).astype(float)
        curves.append((steps, np.exp(-steps / steps.max() * 3)
                       + rng.normal(0, 0.05, n)))
    cut = 0
    for steps, values in curves:
        n = len(values)
        sigma = 0.02 * np.ptp(values)
        span = steps[-1] - steps[0]
        signal = np.column_stack([values, np.ones(n), (steps - steps[0]) / span])
        jump = max(1, math.ceil(n / MAX_POINTS))
        min_size = max(3, math.ceil(n / 20))
        pen = 3.0 * sigma ** 2 * math.log(n)
        plain = ruptures.Pelt(model="linear", min_size=min_size, jump=jump).fit(signal)
        table = ruptures.Pelt(custom_cost=_line_cost(jump), min_size=min_size,
                              jump=jump).fit(signal)
        assert table.predict(pen=pen) == plain.predict(pen=pen)
        assert change_points(steps, values, sigma) == plain.predict(pen=pen)
        cut += len(plain.predict(pen=pen)) > 1
    assert cut >= 3   # curves with change points, not only single segments
