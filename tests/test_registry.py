"""The analysis registry: registration, the generic runner, requirements and reasons."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest

import entropylens as el
from entropylens.analysis import registry
from entropylens.analysis.distribution import StepStats
from entropylens.engine import Failed
from entropylens.errors import EntropylensError

from conftest import SAMPLE_LOGS


class _TokenCount(registry.Analysis):
    """Counts a run's tokens through a real scan; test-only."""

    name = "test_token_count"
    needs = ("tokens",)
    in_report = False

    def plan(self, store, run, inputs, *, scale=1):
        stats = (yield {"s": StepStats("exact", quantiles=())})["s"]
        return int(stats["tokens"].sum()) * scale

    def combine(self, parts, *, skipped=(), **options):
        return {"total": sum(parts), "skipped": list(skipped)}


class _Doubled(registry.Analysis):
    """Reads the per-run outcome of the analysis above; test-only."""

    name = "test_doubled"
    requires = ("test_token_count",)
    in_report = False

    def plan(self, store, run, inputs):
        count = inputs["test_token_count"]
        if not count.ok:
            raise EntropylensError(f"needs the token count: {count.reason}")
        return 2 * count.value["total"]
        yield  # a plan is a generator, even one that reads nothing

    def combine(self, parts, *, skipped=(), **options):
        return list(parts)


def _kept(store, run):
    """Tokens analyses see by default: those not marked after the end of their sequence."""
    marks = store.read_tokens(run, columns=["after_eos"]).column("after_eos")
    return len(marks) - (pc.sum(pc.fill_null(marks, False)).as_py() or 0)


def _metrics_run(store):
    with store.write_run("metrics-only") as writer:
        writer.write_metrics(pa.table({"step": [1, 2], "metric": ["policy_entropy"] * 2,
                                       "value": [1.0, 0.5]}))


@pytest.fixture(autouse=True)
def _registered():
    registry.register(_TokenCount())
    registry.register(_Doubled())
    yield
    registry._REGISTRY.pop("test_token_count", None)
    registry._REGISTRY.pop("test_doubled", None)


def test_builtin_analyses_are_registered():
    names = [a.name for a in registry.registered()]
    assert "covariance" in names
    assert registry.get("covariance").needs == ("tokens",)
    with pytest.raises(EntropylensError, match="no analysis named"):
        registry.get("nope")


def test_run_analysis_counts_like_numpy(sample_store):
    result = registry.run_analysis("test_token_count", sample_store, ["vanilla", "top20"],
                                   scale=3)
    total = sum(_kept(sample_store, r) for r in ("vanilla", "top20"))
    assert result == {"total": 3 * total, "skipped": []}
    # engine options are the engine's, not the analysis'
    assert registry.run_analysis("test_token_count", sample_store, "vanilla", workers=1,
                                 unit_rows=1000)["total"] == _kept(sample_store, "vanilla")
    # so is the token selection: keep_after_eos reaches the scans, not the plan
    everything = len(sample_store.read_tokens("vanilla", columns=["entropy"]))
    assert registry.run_analysis("test_token_count", sample_store, "vanilla",
                                 keep_after_eos=True)["total"] == everything \
        > _kept(sample_store, "vanilla")


def test_missing_need_is_a_reason_or_an_error(tmp_path, sample_store):
    store = el.Store.create(tmp_path / "s")
    _metrics_run(store)
    with pytest.raises(EntropylensError, match="no tokens"):
        registry.run_analysis("test_token_count", store, "metrics-only")
    parts = registry.run_parts(store, "metrics-only", ["test_doubled"])
    assert isinstance(parts["test_token_count"], Failed)
    assert isinstance(parts["test_doubled"], Failed)
    assert "needs the token count: the run has no tokens" in str(parts["test_doubled"].error)


def test_requirements_run_first_and_feed_inputs(sample_store):
    parts = registry.run_parts(sample_store, "vanilla", ["test_doubled"])
    n = _kept(sample_store, "vanilla")
    assert parts == {"test_token_count": n, "test_doubled": 2 * n}


def test_several_runs_skip_the_ones_that_cannot(tmp_path):

    path = tmp_path / "s"
    el.ingest(SAMPLE_LOGS / "vanilla", path, run="vanilla")
    store = el.open(path)
    _metrics_run(store)
    result = registry.run_analysis("test_token_count", store)
    assert result["skipped"] == ["metrics-only: the run has no tokens (only step metrics)"]
    assert result["total"] == _kept(store, "vanilla")
