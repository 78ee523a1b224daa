"""The Ray engine gives exactly the local engine's results (one local 2-CPU Ray instance)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

import entropylens as el  # noqa: E402
from entropylens.analysis.distribution import distribution  # noqa: E402
from entropylens.analysis.forking import forking_tokens  # noqa: E402
from entropylens.engine import init_ray, plan_units  # noqa: E402

from test_engine import synthetic_store  # noqa: E402,F401  (module fixture)


@pytest.fixture(scope="module")
def ray_instance():
    started = not ray.is_initialized()
    init_ray(num_cpus=2)
    yield ray
    if started:
        ray.shutdown()


def same_json(left, right) -> None:
    assert json.dumps(left.to_dict(), sort_keys=True, default=str) == \
        json.dumps(right.to_dict(), sort_keys=True, default=str)


def test_distribution_identical_on_many_units(ray_instance, synthetic_store):
    options = {"unit_rows": 50_000, "global_quantiles": "sketch"}
    assert len(plan_units(synthetic_store, "synthetic", unit_rows=50_000)) > 3
    local = distribution(synthetic_store, **options)
    remote = distribution(synthetic_store, engine="ray", **options)
    for name in ("steps", "histogram", "global_quantiles", "runs"):
        pd.testing.assert_frame_equal(getattr(local, name), getattr(remote, name),
                                      check_exact=True)


def test_report_analyses_identical_on_real_store(ray_instance, shared_store):
    # the real SmolLM2 GRPO run: exact entropies, logprobs, advantages, token texts
    for name, call in [
            ("summary", lambda **kw: el.summary(shared_store, "vanilla", **kw)),
            ("forks", lambda **kw: forking_tokens(shared_store, "vanilla", scope="global",
                                                  **kw)),
            ("covariance", lambda **kw: el.covariance(shared_store, "vanilla", **kw)),
            ("roles", lambda **kw: el.roles(shared_store, "vanilla", **kw))]:
        local, remote = call(unit_rows=20_000), call(engine="ray", unit_rows=20_000)
        same_json(local, remote)


def test_policy_entropy_identical(ray_instance, synthetic_store):
    from entropylens.analysis import curves

    local = el.policy_entropy(synthetic_store, "synthetic", unit_rows=30_000)
    curves._CURVE_CACHE.clear()   # the remembered curve would answer without Ray
    remote = el.policy_entropy(synthetic_store, "synthetic", engine="ray", unit_rows=30_000)
    pd.testing.assert_frame_equal(local, remote, check_exact=True)
