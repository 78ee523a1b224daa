"""The branches analysis gives exactly the same result on the Ray engine as locally."""

from __future__ import annotations

import json

import pytest

ray = pytest.importorskip("ray")

import entropylens as el  # noqa: E402
from entropylens.engine import init_ray  # noqa: E402

from test_branches import build_many_store  # noqa: E402


@pytest.fixture(scope="module")
def ray_instance():
    started = not ray.is_initialized()
    init_ray(num_cpus=2)
    yield ray
    if started:
        ray.shutdown()


def test_branches_identical_on_ray(ray_instance, tmp_path):
    store = build_many_store(tmp_path)
    assert len(el.open(store).node_parts("many")) > 3
    local = el.branches(store, workers=1, nodes=True).to_dict()
    remote = el.branches(store, engine="ray", nodes=True).to_dict()
    assert json.dumps(local, sort_keys=True) == json.dumps(remote, sort_keys=True)
    assert local["runs"][0]["by_depth"]
