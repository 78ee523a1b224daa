"""Every analysis through the registry: one result type, one vocabulary, the report generic."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from typer.testing import CliRunner

import entropylens as el
from entropylens.analysis import registry
from entropylens.cli import app
from entropylens.report import build_report
from entropylens.store import Store

from _eos import before_eos
from conftest import SAMPLE_LOGS

BUILTIN = {"summary", "quality", "policy_entropy", "performance", "phases", "distribution",
           "saturation", "forking", "roles", "covariance", "compare"}


def test_every_analysis_returns_a_dataclass_with_json(sample_store):
    names = {a.name for a in registry.registered()}
    assert BUILTIN <= names
    for name in sorted(BUILTIN):
        result = registry.run_analysis(name, sample_store, ["top20", "vanilla"], workers=1)
        assert dataclasses.is_dataclass(result), name
        json.dumps(result.to_dict())   # plain JSON, nothing left to convert


def test_shared_curve_is_the_numpy_token_mean(sample_store):
    raw = before_eos(pd.read_parquet(SAMPLE_LOGS / "vanilla" / "tokens.parquet"))
    expected = raw.groupby("step")["entropy"].apply(lambda h: h.to_numpy(np.float64).mean())
    result = registry.run_analysis("policy_entropy", sample_store, ["vanilla"])
    assert result.raw_key == {"vanilla": None}   # explicit, not hidden in DataFrame.attrs
    np.testing.assert_allclose(result.curve["entropy"], expected.to_numpy(), rtol=1e-9)
    assert set(result.curve["run"]) == {"vanilla"}
    pd.testing.assert_frame_equal(result.of("vanilla"), el.policy_entropy(sample_store,
                                                                          "vanilla"))
    perf = registry.run_analysis("performance", sample_store, ["vanilla"])
    assert perf.metric == {"vanilla": "val_accuracy"} and perf.raw_key == {"vanilla": "val_acc"}
    assert perf.scaled == {"vanilla": False} and perf.note == {"vanilla": None}
    metrics = pd.read_csv(SAMPLE_LOGS / "vanilla" / "metrics.csv").dropna(subset=["val_acc"])
    np.testing.assert_array_equal(perf.curve["step"], metrics["step"])
    np.testing.assert_allclose(perf.curve["value"], metrics["val_acc"], rtol=1e-12)
    attrs = el.performance(sample_store, "vanilla").attrs
    assert {k: attrs[k] for k in ("metric", "raw_key", "scaled")} == {
        "metric": "val_accuracy", "raw_key": "val_acc", "scaled": False}


def test_one_column_vocabulary(sample_store):
    summary = el.summary(sample_store, "vanilla")
    dist = el.distribution(sample_store, "vanilla")
    assert "mean" not in dist.steps.columns and "seq_mean" not in dist.steps.columns
    for column in ("entropy_token_mean", "entropy_seq_mean", "p50", "p80"):
        np.testing.assert_array_equal(dist.steps[column], summary.steps[column])
    raw = before_eos(pd.read_parquet(SAMPLE_LOGS / "vanilla" / "tokens.parquet"))
    assert dist.runs["entropy_token_mean"].iloc[0] == pytest.approx(
        raw["entropy"].to_numpy(np.float64).mean(), rel=1e-12)


def test_quality_is_a_dataclass_equal_to_the_summary_checks(sample_store):
    quality = el.quality(sample_store)
    assert isinstance(quality, el.Quality)
    summary = el.summary(sample_store)
    assert quality.to_dict()["checks"] == summary.to_dict()["quality"]
    assert set(quality.warnings["severity"]) <= {"warning"}


def test_overlap_result_is_the_cli_json(sample_store):
    overlap = el.forking_overlap(sample_store, "vanilla", "vanilla")
    assert isinstance(overlap, el.ForkingOverlap)
    assert overlap.overlap == 1.0 and overlap.jaccard == 1.0 and overlap.both == \
        overlap.forking_a
    cli = CliRunner().invoke(app, ["forks", str(sample_store.path), "--run", "vanilla",
                                   "--overlap", "vanilla", "vanilla", "--json"])
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.stdout)["overlap"] == json.loads(json.dumps(overlap.to_dict()))


def test_fit_saturation_takes_runs_and_warns_on_run(sample_store):
    one = el.fit_saturation(sample_store, runs="vanilla")
    assert isinstance(one, el.SaturationFit)
    with pytest.warns(DeprecationWarning, match="runs="):
        old = el.fit_saturation(sample_store, run="vanilla")
    assert old.to_dict() == one.to_dict()
    both = el.fit_saturation(sample_store)
    assert isinstance(both, el.SaturationFits) and len(both) == 2
    assert [f.run for f in both] == ["top20", "vanilla"] and both[1].a == one.a
    cli = CliRunner().invoke(app, ["fit", str(sample_store.path), "--json"])
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.stdout) == json.loads(json.dumps(both.to_dict()))


def test_a_run_left_out_keeps_its_place_where_results_have_one_entry_per_run(
        sample_store, tmp_path):
    store = Store.create(tmp_path / "s")
    with store.write_run("a-metrics-only") as writer:
        writer.write_metrics(pa.table({"step": [1, 2], "metric": ["reward_mean"] * 2,
                                       "value": [0.1, 0.2], "raw_key": ["r"] * 2}))
    el.ingest(SAMPLE_LOGS / "vanilla", store.path, run="vanilla")
    phases = el.phases(store)
    assert [r.run for r in phases.runs] == ["a-metrics-only", "vanilla"]
    assert phases.runs[0].note.startswith("skipped: ") and phases.runs[1].floor is not None
    fits = el.fit_saturation(store)
    assert fits[0].error and fits[0].a is None and fits[1].a is not None
    assert fits.skipped[0].startswith("a-metrics-only: ")
    dist = el.distribution(store)
    assert set(dist.steps["run"]) == {"vanilla"}
    assert dist.skipped == ["a-metrics-only: the run has no tokens (only step metrics)"]


class _StepCount(registry.Analysis):
    """A test analysis with every report hook: it counts each run's steps."""

    name = "test_step_count"
    title = "Steps <counted>"
    needs = ("tokens",)
    order = 55
    headline = False

    def plan(self, store, run, inputs):
        steps = store.read_tokens(run, columns=["step"]).column("step")
        return {"run": run, "steps": len(set(steps.to_pylist()))}
        yield

    def combine(self, parts, *, skipped=(), **options):
        return list(parts)

    def figures(self, result, run):
        from entropylens.plots import run_overlay

        curves = pd.DataFrame({"run": run, "step": [0, 1], "metric": "m", "value": [1.0, 2.0]})
        return [registry.FigureSpec("stepcount", f"{run}: steps", "Two points.",
                                    lambda ax: run_overlay(curves, metric="m", ax=ax))]

    def section(self, result, run):
        return {"steps": result[0]["steps"]}

    def findings(self, result, run):
        return [registry.Finding("test_step_count", f"{result[0]['steps']} steps <b>",
                                 numbers={"steps": result[0]["steps"]})]


class _Headline(_StepCount):
    name = "test_headline"
    title = "Headline block"
    headline = True

    def figures(self, result, run):
        return []

    def findings(self, result, run):
        return []


@pytest.fixture()
def extra_analyses():
    registry.register(_StepCount())
    registry.register(_Headline())
    yield
    registry._REGISTRY.pop("test_step_count", None)
    registry._REGISTRY.pop("test_headline", None)


def test_the_report_shows_a_registered_analysis_without_touching_build(tmp_path,
                                                                        extra_analyses):
    store = Store.create(tmp_path / "s")
    with store.write_run("r") as writer:
        writer.write_tokens(pa.table({"step": [0, 0, 3], "sample_id": ["a", "a", "b"],
                                      "position": [0, 1, 0], "token": ["x", "y", "z"],
                                      "entropy": [0.1, 0.2, 0.3]}))
    with store.write_run("m") as writer:
        writer.write_metrics(pa.table({"step": [1, 2], "metric": ["policy_entropy"] * 2,
                                       "value": [1.0, 0.5], "raw_key": ["e"] * 2}))
    report = build_report(store, tmp_path / "out")
    model = report.model
    names = [s["name"] for s in model["sections"]]
    assert names.index("roles") < names.index("test_step_count") < names.index("covariance")
    run = {r["run"]: r for r in model["runs"]}
    section = run["r"]["sections"]["test_step_count"]
    assert section["available"] and section["steps"] == 2
    assert [f["id"] for f in section["figures"]] == ["stepcount-r1-r"]
    assert (tmp_path / "out" / "figures" / "stepcount-r1-r.png").exists()
    assert run["m"]["sections"]["test_step_count"] == {
        "name": "test_step_count", "title": "Steps <counted>", "available": False,
        "reason": "the run has no tokens (only step metrics)", "figures": []}
    finding = next(v for v in model["verdicts"] if v["kind"] == "test_step_count")
    assert finding["run"] == "r" and finding["anchor"] == "sec-test_step_count-r1-r"
    html = report.html.read_text()
    assert 'id="sec-test_step_count-r1-r"' in html and 'href="#sec-test_step_count-r1-r"' in html
    assert "Steps &lt;counted&gt;" in html and "2 steps &lt;b&gt;" in html
    assert "<b>" not in html and 'id="stepcount-r1-r"' in html
    # headline blocks come before the comparison and the details, one per run
    assert html.index('id="headline-test_headline"') < html.index('id="compare"') \
        < html.index('id="sec-test_step_count-r1-r"')
    markdown = report.markdown.read_text()
    assert "### Steps <counted>" not in markdown and "## Headline block" in markdown
    assert "(figures/stepcount-r1-r.png)" in markdown


def test_analyses_that_describe_every_run_raise_for_one_that_fails(tmp_path):
    store = Store.create(tmp_path / "s")
    for name, token in (("ids-only", None), ("text", "x")):
        with store.write_run(name) as writer:
            table = {"step": [0, 0], "sample_id": ["a", "a"], "position": [0, 1],
                     "token_id": [5, 6], "entropy": [0.5, 0.25]}
            if token is not None:
                table["token"] = [token, token]
            writer.write_tokens(pa.table(table))
    with pytest.raises(el.EntropylensError, match="no token text"):
        el.roles(store)
    # the token analyses still describe both runs
    dist = el.distribution(store)
    assert list(dist.runs["run"]) == ["ids-only", "text"] and dist.skipped == []
    np.testing.assert_allclose(dist.runs["entropy_token_mean"], [0.375, 0.375])
