"""The diagnosis on real runs (one test per status), its noise rule on simulated binomial
accuracies, events, the saturation quality gate and the CLI contract."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from _eos import before_eos
import entropylens as el
from entropylens.analysis import noise
from entropylens.analysis.curves import performance, policy_entropy
from entropylens.analysis.diagnose import STATUSES, diagnose_curves, entropy_events
from entropylens.cli import app

runner = CliRunner()
REAL = {
    "explosion": "qwen35_9b_grpo_rho0.70_seed44_collapse/step_logs.json",
    "rho07_seed42": "qwen35_9b_grpo_rho0.70_seed42/step_logs.json",
    "rho10_seed44": "qwen35_9b_grpo_rho1.00_seed44/step_logs.json",
    "qwen25_vanilla": "qwen25_7b_grpo_vanilla_seed42/vanilla_rho1.0_seed42.log",
    "verl_resp512": "verl_gsm8k_ppo/Qwen2.5-0.5B-bsz256_2-prompt1024-resp512-0.567.log",
    "verl_gemma": "verl_gsm8k_ppo/gemma-2-2b-it-ppo-bsz512_4-prompt1024-resp-512-0.640.log",
}


@pytest.fixture(scope="module")
def real_store(tmp_path_factory, shared_samples):
    """The public real runs (metrics only) in one store; treat as read-only."""
    path = tmp_path_factory.mktemp("real") / "store"
    for name, rel in REAL.items():
        el.ingest(shared_samples / "real_runs" / rel, path, run=name)
    return el.open(path)


@pytest.fixture(scope="module")
def shared_diagnosis(shared_store):
    return el.diagnose(shared_store, workers=1)


@pytest.fixture(scope="module")
def real_diagnosis(real_store):
    return el.diagnose(real_store, workers=1)


def _trl_records(shared_samples, key: str) -> list[dict]:
    records = json.loads((shared_samples / "real_runs" / REAL[key]).read_text())
    return [r for r in records if "entropy" in r]


# -- one test per status on real data ------------------------------------------------------
def test_explosion_run_is_entropy_explosion_with_its_peak(real_diagnosis, shared_samples):
    item = real_diagnosis.run("explosion")
    assert item.status == "entropy_explosion"
    records = _trl_records(shared_samples, "explosion")
    peak = max(records, key=lambda r: r["entropy"])
    explosion = next(e for e in item.events if e["kind"] == "explosion")
    assert explosion["peak"] == pytest.approx(peak["entropy"], rel=1e-6)   # 6.355 nats
    assert explosion["end_step"] == peak["step"] == 175
    assert 140 <= explosion["start_step"] < 175
    # the way down from the peak is a partial recovery, not a collapse
    recovery = next(e for e in item.events if e["kind"] == "recovery")
    assert recovery["complete"] is False and recovery["start_step"] == 175
    assert not [e for e in item.events if e["kind"] == "collapse" and e["start_step"] >= 140]
    # reward before the explosion versus the end, from the log
    assert item.performance["end"] < 0.05 and item.performance["before_explosion"] > 0.8
    assert item.performance["trend"] == "fall"
    assert all(a["reference"].startswith("arXiv ") for a in item.actions)


def test_top20_is_not_learning_and_is_not_told_to_use_top20(shared_diagnosis, shared_run):
    item = shared_diagnosis.run("top20")
    assert item.status == "not_learning"
    # binomial noise from the 64 validation prompts of the run's config.json
    config = json.loads((shared_run / "top20" / "config.json").read_text())
    assert item.performance["noise"]["kind"] == "binomial"
    assert item.performance["noise"]["n"] == config["val_n"] == 64
    assert not any("top-20%" in a["text"] and "send" in a["text"] for a in item.actions)
    assert any("top-20%" in c for c in item.causes)


def test_vanilla_is_collapsed_plateau_and_says_why(shared_diagnosis, shared_run):
    item = shared_diagnosis.run("vanilla")
    assert item.status == "collapsed_plateau"
    assert item.entropy["collapsed"] and item.entropy["drop_fraction"] > 0.9
    assert item.performance["trend"] in ("flat", "fall")
    # responses shrink while entropy collapses, measured from the completions themselves
    sequences = pd.read_parquet(shared_run / "vanilla" / "sequences.parquet")
    lengths = sequences.groupby("step")["length"].mean()
    assert lengths.iloc[:7].mean() > 3 * lengths.iloc[-7:].mean()
    assert any(c.startswith("responses shrank") for c in item.causes)
    # the decision tokens lost their entropy too: a frontier collapse
    assert item.collapse_kind["kind"] == "frontier"
    forks = next(k for k in item.collapse_kind["by"] if k["decision"].startswith("top-20%"))
    assert forks["decision_start"] > forks["rest_start"]
    assert {a["reference"] for a in item.actions} >= {
        "arXiv 2505.22617 (Clip-Cov / KL-Cov)", "arXiv 2503.14476 (DAPO clip-higher)",
        "arXiv 2506.01939 (top-20% high-entropy tokens)"}


def test_learning_runs_get_no_plateau(real_diagnosis):
    for name in ("rho07_seed42", "rho10_seed44", "verl_gemma"):
        item = real_diagnosis.run(name)
        assert item.status == "learning", (name, item.evidence)
        assert item.performance["change"]["verdict"] == "rise"


def test_collapsing_on_the_real_vanilla_curve_cut_mid_collapse(shared_store):
    curve = policy_entropy(shared_store, "vanilla")
    perf = performance(shared_store, "vanilla")
    cut = curve[curve["step"] <= 16]
    item = diagnose_curves(cut, perf[perf["step"] <= 16], run="vanilla", val_size=64)
    assert item.status == "collapsing"
    assert "falling fast" in item.evidence[0]


def test_insufficient_data(shared_store, real_store):
    curve = policy_entropy(real_store, "rho07_seed42")
    assert diagnose_curves(curve.head(2), None, run="r").status == "insufficient_data"
    # an entropy curve without any performance metric cannot be judged
    steady = curve[curve["step"] >= 120]
    assert diagnose_curves(steady, None, run="r").status == "insufficient_data"


def test_noise_that_could_hide_a_rise_is_inconclusive_not_a_verdict():
    # three noisy logged rewards and no validation size (like the wild TRL console log, three
    # logging steps): a rise of the whole range still fits, so no "not learning" is claimed
    curve = pd.DataFrame({"step": [10, 20, 30], "entropy": [0.113, 0.120, 0.113],
                          "source": "metric", "tokens": 0})
    perf = pd.DataFrame({"step": [10, 20, 30], "value": [1.88, 0.62, 0.80],
                         "metric": "reward_mean"})
    item = diagnose_curves(curve, perf, run="r")
    assert item.performance["change"]["verdict"] == "inconclusive"
    assert item.status == "insufficient_data"
    assert any("too few or too noisy" in cause for cause in item.causes)


def test_qwen25_started_near_its_ceiling_and_is_not_learning(real_diagnosis):
    item = real_diagnosis.run("qwen25_vanilla")
    assert item.status == "not_learning"
    assert any("little room" in c for c in item.causes)


def test_verl_entropy_bonus_is_read_from_the_log(real_diagnosis):
    item = real_diagnosis.run("verl_resp512")
    # the log prints entropy_coeff 0.001: the run already has an entropy bonus
    assert not any("entropy bonus" in a["text"] for a in item.actions)


def test_learning_run_from_the_issue_is_not_a_plateau_alarm():
    """Accuracy 0.20 -> 0.70, last 4 points moving by -0.007 on 64 prompts, entropy 77%
    lower: still learning, the plateau is inconclusive."""
    steps = np.arange(0, 40)
    entropy = pd.DataFrame({"step": steps, "entropy": 1.0 - 0.77 * (1 - np.exp(-steps / 6)),
                            "source": "metric"})
    val_steps = np.arange(0, 40, 4)
    accuracy = np.array([0.20, 0.31, 0.42, 0.50, 0.58, 0.64, 0.707, 0.703, 0.70, 0.700])
    perf = pd.DataFrame({"step": val_steps, "value": accuracy, "metric": "val_accuracy"})
    item = diagnose_curves(entropy, perf, run="r", val_size=64,
                           settings={"mode": "top20"})
    assert item.status == "learning"
    assert item.performance["plateau"] is None and item.performance["trend"] == "inconclusive"
    assert not any("send the policy gradient only through" in a["text"] for a in item.actions)


# -- the noise rule against simulated binomial noise ---------------------------------------
def test_binomial_se_matches_the_formula():
    p = np.array([0.1, 0.5, 0.9])
    assert noise.binomial_se(p, 64) == pytest.approx(np.sqrt(p * (1 - p) / 64))
    assert noise.binomial_se(0.5, 64) == pytest.approx(0.0625)
    assert noise.binomial_se(0.0, 64) > 0   # a score of 0 is not exact


def test_noise_rule_on_simulated_binomial_accuracy():
    rng = np.random.default_rng(17)
    n, steps = 64, np.arange(20)
    false_claims = rises = flats = inconclusive = 0
    trials = 400
    for _ in range(trials):
        # a true plateau at 0.6: claims of a rise or fall are false positives
        values = rng.binomial(n, 0.6, size=len(steps)) / n
        level = noise.level_change(steps, values, noise.curve_noise(values, n), 0.05)
        false_claims += level.verdict in ("rise", "fall")
        recent = noise.trend_change(steps, values, noise.curve_noise(values, n), 0.05)
        inconclusive += recent.verdict == "inconclusive"
        # a true rise 0.2 -> 0.7
        rising = rng.binomial(n, np.linspace(0.2, 0.7, len(steps))) / n
        rises += noise.level_change(steps, rising, noise.curve_noise(rising, n),
                                    0.05).verdict == "rise"
        # the same plateau measured on 20000 prompts is provably flat
        precise = rng.binomial(20000, 0.6, size=len(steps)) / 20000
        flats += noise.trend_change(steps, precise, noise.curve_noise(precise, 20000),
                                    0.05).verdict == "flat"
    assert false_claims / trials < 0.08          # about 5% at Z = 2
    assert rises == trials
    assert flats == trials
    assert inconclusive / trials > 0.9           # 5 points of 64 prompts cannot show a plateau


def test_residual_scatter_recovers_white_noise():
    rng = np.random.default_rng(3)
    values = np.linspace(0.1, 0.6, 400) + rng.normal(0, 0.03, 400)
    assert noise.residual_scatter(values) == pytest.approx(0.03, rel=0.15)


# -- events and phases ---------------------------------------------------------------------
def test_phases_of_the_explosion_run(real_store, shared_samples):
    result = el.phases(real_store, "explosion").runs[0]
    segments = result.segments
    observed = pd.DataFrame(_trl_records(shared_samples, "explosion"))
    by_step = observed.set_index("step")["entropy"]
    # observed end points (medians of observed values), disjoint, non-negative
    assert (segments["start_step"].to_numpy()[1:] > segments["end_step"].to_numpy()[:-1]).all()
    for seg in segments.itertuples():
        part = by_step.loc[seg.start_step:seg.end_step].to_numpy()
        k = max(1, min(3, len(part) // 2))
        assert seg.start_entropy == pytest.approx(np.median(part[:k]), rel=1e-5)
        assert seg.end_entropy == pytest.approx(np.median(part[-k:]), rel=1e-5)
    late = segments[segments["start_step"] >= 170]
    assert "rapid_collapse" not in set(late["label"])
    assert "recovery" in set(late["label"])


def test_entropy_events_on_a_flat_curve_are_empty():
    steps = np.arange(50)
    values = 1.0 + 0.01 * np.sin(steps)
    assert entropy_events(steps, values) == []


# -- saturation quality gate ---------------------------------------------------------------
def test_no_ceiling_below_the_quality_gate(real_store, shared_store):
    weak = el.fit_saturation(real_store, "rho10_seed44")
    assert weak.r2 < 0.5 and weak.ceiling is None and "R²" in weak.ceiling_reason
    data = weak.to_dict()
    assert data["ceiling"] is None and data["ceiling_ci"] is None and data["ceiling_reason"]
    good = el.fit_saturation(shared_store, "vanilla")
    assert good.ceiling == pytest.approx(good.b - good.a)
    assert good.above_ceiling == int((good.data["R"] > good.b - good.a).sum()) > 0
    assert good.early["rmse_share_of_range"] == pytest.approx(good.early["rmse"])  # range 1
    out = runner.invoke(app, ["fit", str(real_store.path), "--run", "rho10_seed44"])
    assert out.exit_code == 0 and "no ceiling" in out.stdout


# -- CLI -----------------------------------------------------------------------------------
def test_cli_json_keys_and_fail_on(real_store):
    out = runner.invoke(app, ["diagnose", str(real_store.path), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert len(data["runs"]) == len(REAL)
    for item in data["runs"]:
        assert item["status"] in STATUSES
        assert set(item) >= {"run", "status", "entropy", "performance", "events", "causes",
                             "actions"}
        assert set(item["entropy"]) >= {"start", "end", "floor", "drop_fraction", "collapsed"}
        assert set(item["performance"]) >= {"metric", "start", "end", "best", "trend",
                                             "plateau", "noise"}
        for event in item["events"]:
            assert set(event) >= {"kind", "start_step", "end_step", "peak"}
        for action in item["actions"]:
            assert set(action) == {"text", "reference"}
    stop = runner.invoke(app, ["diagnose", str(real_store.path), "--fail-on",
                               "entropy_explosion,collapsing"])
    assert stop.exit_code == 3 and "explosion" in stop.stdout
    fine = runner.invoke(app, ["diagnose", str(real_store.path), "--run", "verl_gemma",
                               "--fail-on", "entropy_explosion"])
    assert fine.exit_code == 0
    bad = runner.invoke(app, ["diagnose", str(real_store.path), "--fail-on", "bogus"])
    assert bad.exit_code == 2


def test_report_hooks(shared_diagnosis):
    from entropylens.analysis import registry

    analysis = registry.get("diagnose")
    assert analysis.headline
    section = analysis.section(shared_diagnosis, "vanilla")
    assert section["status"] == "collapsed_plateau"
    json.dumps(section)   # JSON-ready
    finding = analysis.findings(shared_diagnosis, "top20")[0]
    assert finding.severity == "alarm" and finding.text.startswith("not learning")
    spec = analysis.figures(shared_diagnosis, "vanilla")[0]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    spec.draw(ax)
    assert len(fig.axes) >= 2   # entropy and performance on a twin axis
    plt.close(fig)
    assert math.isfinite(section["entropy"]["start"])


# -- both policy-entropy definitions -------------------------------------------------------
def test_both_entropy_definitions_in_curves_phases_fit_and_diagnosis(shared_store, shared_run):
    curve = policy_entropy(shared_store, "vanilla")
    # the padding after end-of-sequence is left out by default, as in the analyses
    tokens = before_eos(pd.read_parquet(
        shared_run / "vanilla" / "tokens.parquet",
        columns=["step", "prompt_idx", "sample_idx", "position", "token", "entropy"]))
    per_sequence = tokens.groupby(["step", "prompt_idx", "sample_idx"])["entropy"].mean()
    expected = per_sequence.groupby("step").mean()
    assert np.allclose(curve.set_index("step")["entropy_seq_mean"], expected, rtol=1e-5)
    assert np.allclose(curve.set_index("step")["entropy"],
                       tokens.groupby("step")["entropy"].mean(), rtol=1e-5)
    phases = el.phases(shared_store, "vanilla").to_dict()["runs"][0]
    assert phases["entropy_definition"].startswith("entropy_token_mean")
    assert phases["entropy_seq_mean"]["start_entropy"] == pytest.approx(expected.iloc[0],
                                                                        rel=1e-5)
    fit = el.fit_saturation(shared_store, "vanilla").to_dict()
    assert fit["x_definition"].startswith("entropy_token_mean")
    assert fit["entropy_seq_mean_fit"]["x_definition"].startswith("entropy_seq_mean")
    assert fit["entropy_seq_mean_fit"]["r2"] > 0.5
    item = el.diagnose(shared_store, "vanilla", workers=1).runs[0]
    assert item.entropy["definition"].startswith("token mean")
    assert item.entropy["definitions"]["entropy_seq_mean"]["start"] == pytest.approx(
        float(np.median(expected.iloc[:3])), rel=1e-5)


def _render_block(section: dict, run: str, markdown: bool) -> str:
    from markupsafe import Markup

    from entropylens.report.render import environment

    env = environment(markdown)
    template = env.get_template(f"sections/diagnose.{'md' if markdown else 'html'}.j2")

    def figure(f):
        return Markup(f'<figure id="{f["id"]}"></figure>')

    return template.render(s=section, r={"run": run, "slug": "x"}, figures={}, figure=figure,
                           md_figure=lambda f: "")


def test_headline_blocks_render_and_escape(shared_diagnosis):
    from entropylens.analysis import registry

    analysis = registry.get("diagnose")
    section = dict(analysis.section(shared_diagnosis, "vanilla"), available=True, reason=None,
                   figures=[{"id": "diagnose-x", "title": "t", "caption": "c",
                             "file": "figures/diagnose-x.png"}])
    page = _render_block(section, "vanilla", markdown=False)
    assert "COLLAPSED PLATEAU" in page.upper() and 'id="diagnose-x"' in page
    assert "arXiv 2505.22617" in page and "frontier collapse" in page
    hostile = dict(section, evidence=["<script>alert(1)</script> *x*"] + section["evidence"])
    page = _render_block(hostile, "<b>run</b>", markdown=False)
    assert "<script>" not in page and "&lt;script&gt;" in page and "<b>run" not in page
    text = _render_block(hostile, "<b>run</b>", markdown=True)
    assert "<script>" not in text and r"\*x\*" in text
    assert "collapsed plateau".upper() in text


def test_sustained_late_rise_is_kept():
    """Entropy collapses from 2 nats to 0.054, sits, then doubles to 0.118 over the last
    third: small against the run's range, but a real trend at its own level."""
    rng = np.random.default_rng(5)
    steps = np.arange(150)
    curve = np.where(steps < 20, 2.0 - 0.097 * steps, 0.054)
    curve = np.where(steps >= 100, 0.054 + 0.064 * (steps - 100) / 49, curve)
    curve = curve + rng.normal(0, 0.004, len(steps))
    segments = el.analysis.phases.analyse_curve(steps, curve).segments
    last = segments.iloc[-1]
    assert last["label"] == "rise" and last["start_step"] >= 90
    assert last["end_entropy"] == pytest.approx(np.median(curve[-3:]))
    assert (segments["start_step"].to_numpy()[1:] > segments["end_step"].to_numpy()[:-1]).all()


def test_saturation_figure_draws_no_ceiling_below_the_gate(real_store):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from entropylens.plots import saturation_fit

    weak = el.fit_saturation(real_store, "rho10_seed44")
    fig, ax = plt.subplots()
    saturation_fit(weak, ax=ax)
    assert not [line for line in ax.lines if line.get_gid() == "ceiling"]
    assert "no ceiling" in ax.get_title(loc="left")
    plt.close(fig)


def test_decision_split_equals_flagging_with_the_forking_thresholds(shared_store, shared_run):
    # the decision split is computed in the forking scan (thresholds at each unit's seal);
    # it must equal a plain second pass: the forking analysis' step thresholds, training
    # tokens before their end of sequence, means of each class per step
    from entropylens.analysis.diagnose import DECISION_RATIO, DecisionScan
    from entropylens.engine import run_aggregators

    got = run_aggregators(shared_store, "vanilla",
                          {"d": DecisionScan("exact", ratio=DECISION_RATIO)}, workers=1)["d"]
    thresholds = el.forking_tokens(shared_store, "vanilla", ratio=DECISION_RATIO).thresholds
    tokens = before_eos(pd.read_parquet(shared_run / "vanilla" / "tokens.parquet"))
    tokens["entropy"] = tokens["entropy"].astype(np.float64)
    tokens = tokens.merge(thresholds[["step", "threshold"]], on="step")
    tokens["fork"] = tokens["entropy"] > tokens["threshold"]
    means = tokens.groupby(["step", "fork"])["entropy"].mean().unstack("fork")
    assert len(got) == len(means) > 10
    np.testing.assert_array_equal(got["step"], means.index.to_numpy())
    np.testing.assert_allclose(got["decision_entropy"], means[True], rtol=1e-12)
    np.testing.assert_allclose(got["routine_entropy"], means[False], rtol=1e-12)
