"""Plans: analyses written as generators share scans, and keep their own failures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import entropylens as el
import entropylens.engine as engine
from entropylens.analysis.distribution import distribution_from_parts, distribution_plan
from entropylens.analysis.forking import forking_from_parts, forking_plan
from entropylens.engine import Aggregator, Failed, Scan, run_plan, run_plans
from entropylens.errors import EntropylensError
from entropylens.report.collect import collect
from entropylens.store import Store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(2)
    n = 30_000
    store = Store.create(tmp_path_factory.mktemp("plans") / "s")
    with store.write_run("r") as writer:
        writer.write_tokens(pa.table({
            "step": np.repeat(np.arange(6), n // 6), "sample_id": [f"c{i // 50}" for i in
                                                                  range(n)],
            "position": np.tile(np.arange(50), n // 50).astype(np.int32),
            "token": [["Ġso", "Ġwait", "Ġthe", "Ġ7", ","][i % 5] for i in range(n)],
            "entropy": rng.exponential(0.5, n), "logprob": -rng.exponential(0.3, n),
            "advantage": np.repeat(rng.normal(size=n // 50), 50)}))
    return store


@pytest.fixture
def scans(monkeypatch):
    """Counts the units the engine reads."""
    counter = {"units": 0}
    original = engine.scan_unit

    def counting(*args, **kwargs):
        counter["units"] += 1
        yield from original(*args, **kwargs)

    monkeypatch.setattr(engine, "scan_unit", counting)
    return counter


def test_fused_plans_give_what_each_analysis_gives_alone(store, scans):
    manifest = store.manifest("r")
    outcomes = run_plans(store, "r", {
        "dist": distribution_plan(store, "r", "exact", manifest),
        "fork": forking_plan(store, "r", "exact", manifest)}, workers=1)
    assert scans["units"] == 1            # one read of the data for both
    fused_dist = distribution_from_parts([outcomes["dist"]])
    fused_fork = forking_from_parts([outcomes["fork"]])
    alone_dist = el.distribution(store, "r", workers=1)
    alone_fork = el.forking_tokens(store, "r", workers=1)
    pd.testing.assert_frame_equal(fused_dist.steps, alone_dist.steps)
    pd.testing.assert_frame_equal(fused_fork.top_tokens, alone_fork.top_tokens)
    pd.testing.assert_frame_equal(fused_fork.thresholds, alone_fork.thresholds)


def test_the_report_reads_each_unit_once(store, scans):
    results = collect(store, ["r"])
    # one fused read for every analysis, the diagnosis' decision split included (it flags
    # tokens with each unit's forking thresholds when the unit is sealed)
    assert len(engine.plan_units(store, "r")) == 1 and scans["units"] == 1
    entry = results.runs[0]
    # tokens only: the saturation fit (it needs a performance curve), the diversity (it needs
    # completions), the origins and the search trees are missing
    assert {name for name, part in entry.outcomes.items() if not part.ok} == {
        "saturation", "diversity", "origins", "branches"}
    cov = el.covariance(store, "r")
    pd.testing.assert_frame_equal(entry.part("covariance").value.groups, cov.groups)


class _Raises(Aggregator):
    columns = ("step",)

    def start(self):
        return 0

    def update(self, state, batch):
        raise EntropylensError("this aggregator cannot read step 3", path="/x")

    def merge(self, left, right):
        return left

    def finish(self, state):
        return state


class _Rows(Aggregator):
    columns = ("step",)

    def start(self):
        return 0

    def update(self, state, batch):
        return state + batch.num_rows

    def merge(self, left, right):
        return left + right

    def finish(self, state):
        return state


def _asks(aggregator):
    return (yield {"a": aggregator})["a"]


def _fails_early():
    raise EntropylensError("no tokens here")
    yield   # pragma: no cover - makes this a generator


def _recovers():
    try:
        yield {"a": _Raises()}
    except EntropylensError as exc:
        return f"handled: {exc.message}"


def test_a_failing_plan_keeps_its_failure_to_itself(store, scans):
    outcomes = run_plans(store, "r", {"bad": _asks(_Raises()), "good": _asks(_Rows()),
                                      "early": _fails_early(), "recovers": _recovers()},
                         workers=1)
    assert outcomes["good"] == 30_000
    assert isinstance(outcomes["bad"], Failed)
    assert str(outcomes["bad"].error) == "/x: this aggregator cannot read step 3"
    assert isinstance(outcomes["early"], Failed)
    assert outcomes["recovers"] == "handled: this aggregator cannot read step 3"
    with pytest.raises(EntropylensError, match="cannot read step 3"):
        run_plan(store, "r", _asks(_Raises()), workers=1)


def test_scans_over_other_steps_are_not_fused(store, scans):
    def some_steps():
        return (yield Scan({"a": _Rows()}, steps=(1, 2)))["a"]

    outcomes = run_plans(store, "r", {"all": _asks(_Rows()), "some": some_steps()},
                         workers=1)
    assert outcomes == {"all": 30_000, "some": 10_000}
    assert scans["units"] == 2


def test_merging_halves_of_one_step_equals_one_state(store):
    """merge takes partial states of any disjoint batches, sealed or not."""
    from entropylens.analysis.covariance import StepCovariance
    from entropylens.analysis.forking_counts import ForkingScan

    batch = store.read_tokens("r").combine_chunks().to_batches()[0].slice(0, 7_500)
    pieces = [batch.slice(0, 2_500), batch.slice(2_500, 2_500), batch.slice(5_000, 2_500)]
    for aggregator in (StepCovariance(), ForkingScan("exact", scope="step", ratio=0.2)):
        whole = aggregator.finish(aggregator.update(aggregator.start(), batch))
        states = [aggregator.update(aggregator.start(), piece) for piece in pieces]
        merged = aggregator.finish(aggregator.merge(aggregator.merge(states[0], states[1]),
                                                    states[2]))
        if isinstance(whole, tuple):   # forking: thresholds and counts by text
            pd.testing.assert_frame_equal(whole[0].frame, merged[0].frame)
            pd.testing.assert_frame_equal(whole[1].sort_values("token", ignore_index=True),
                                          merged[1].sort_values("token", ignore_index=True))
        else:
            pd.testing.assert_frame_equal(whole, merged, check_exact=False, rtol=1e-12)
            assert len(whole) == 2 * 6    # steps 0 and 1, six groups each


def test_a_plan_asking_for_nonsense_fails_alone(store):
    def nonsense():
        yield 42

    outcomes = run_plans(store, "r", {"bad": nonsense(), "good": _asks(_Rows())}, workers=1)
    assert isinstance(outcomes["bad"], Failed) and outcomes["good"] == 30_000


def test_plans_asking_for_the_same_statistics_share_one_aggregator(store, monkeypatch):
    from entropylens.analysis.summary import summary_from_parts, summary_plan

    seen = []
    original = engine.run_aggregators

    def recording(store, run, aggregators, **options):
        seen.append(sorted(aggregators))
        return original(store, run, aggregators, **options)

    monkeypatch.setattr(engine, "run_aggregators", recording)
    manifest = store.manifest("r")
    outcomes = run_plans(store, "r", {
        "summary": summary_plan(store, "r"),
        "dist": distribution_plan(store, "r", "exact", manifest)}, workers=1)
    # summary's step statistics are the distribution's: computed once
    assert seen[0] == sorted(["summary\x00steps", "summary\x00quality", "dist\x00dist"])
    fused = summary_from_parts([outcomes["summary"]])
    monkeypatch.setattr(engine, "run_aggregators", original)
    alone = el.summary(store, "r", workers=1)
    pd.testing.assert_frame_equal(fused.steps, alone.steps)
    dist = distribution_from_parts([outcomes["dist"]])
    np.testing.assert_allclose(dist.steps["p50"], alone.steps["p50"], rtol=0, atol=0)
    # each plan got its own copy to change
    assert "run" in fused.steps and "run" in dist.steps


def test_the_report_matches_and_counts_forks_once(shared_store, monkeypatch):
    # the roles and forking analyses and the diagnosis that reads them ask for the same
    # aggregators: each runs once in the report's scan, and every part gets the same answer
    from entropylens.analysis.forking_counts import ForkingScan
    from entropylens.analysis.roles import RolesAggregator

    ran = []
    original = engine.run_aggregators

    def recording(store, run, aggregators, **options):
        ran.extend(type(a).__name__ for a in aggregators.values())
        return original(store, run, aggregators, **options)

    monkeypatch.setattr(engine, "run_aggregators", recording)
    results = collect(shared_store, ["vanilla"], workers=1)
    assert ran.count(RolesAggregator.__name__) == 1 and ran.count(ForkingScan.__name__) == 1
    monkeypatch.setattr(engine, "run_aggregators", original)
    (entry,) = results.runs
    roles = entry.outcomes["roles"].value
    alone = el.roles(shared_store, "vanilla", workers=1)
    pd.testing.assert_frame_equal(roles.steps, alone.steps)
    forks = entry.outcomes["forking"].value
    pd.testing.assert_frame_equal(forks.top_tokens,
                                  el.forking_tokens(shared_store, "vanilla").top_tokens)
