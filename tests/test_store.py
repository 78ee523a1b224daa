import json

import pyarrow as pa
import pytest

from entropylens.errors import RunExistsError, StoreError
from entropylens.store import Store, validate_run_name


def _tokens(n=5, step=0):
    return pa.table({"step": [step] * n, "sample_id": ["s"] * n, "position": list(range(n)),
                     "entropy": [float(i) for i in range(n)]})


def test_create_open_and_write_run(tmp_path):
    store = Store.create(tmp_path / "s")
    with store.write_run("a") as writer:
        writer.write_tokens(_tokens())
        writer.write_metrics(pa.table({"step": [0], "metric": ["kl"], "value": [0.5]}))
    store = Store.open(tmp_path / "s")
    assert store.runs() == ["a"]
    assert store.read_tokens("a").num_rows == 5
    manifest = store.manifest("a")
    assert manifest["counts"]["tokens"] == 5 and manifest["counts"]["metrics"] == 1
    assert manifest["entropy_sources"] == ["exact"]
    assert json.loads((tmp_path / "s" / "store.json").read_text())["version"] == 1


def test_failure_mid_write_leaves_no_run_and_keeps_others(tmp_path):
    store = Store.create(tmp_path / "s")
    with store.write_run("keep") as writer:
        writer.write_tokens(_tokens())
    with pytest.raises(RuntimeError):
        with store.write_run("broken") as writer:
            writer.write_tokens(_tokens())
            raise RuntimeError("killed")
    assert store.runs() == ["keep"]
    assert [p.name for p in store.runs_dir.iterdir()] == ["keep"]
    assert store.read_tokens("keep").num_rows == 5


def test_refuses_to_overwrite_unless_replace(tmp_path):
    store = Store.create(tmp_path / "s")
    with store.write_run("a") as writer:
        writer.write_tokens(_tokens(3))
    with pytest.raises(RunExistsError):
        store.write_run("a")
    with store.write_run("a", replace=True) as writer:
        writer.write_tokens(_tokens(7))
    assert store.read_tokens("a").num_rows == 7


def test_failed_replace_keeps_the_old_run(tmp_path):
    store = Store.create(tmp_path / "s")
    with store.write_run("a") as writer:
        writer.write_tokens(_tokens(3))
    with pytest.raises(ValueError):
        with store.write_run("a", replace=True) as writer:
            writer.write_tokens(_tokens(7))
            raise ValueError("bad data")
    assert store.read_tokens("a").num_rows == 3


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", "", "a\\b", ".hidden", "x" * 201,
                                  "a..b"])
def test_bad_run_names_are_refused(name):
    with pytest.raises(StoreError):
        validate_run_name(name)


def test_scan_with_projection_and_step_filter(tmp_path):
    store = Store.create(tmp_path / "s")
    with store.write_run("a") as writer:
        for step in range(4):
            writer.write_tokens(_tokens(10, step))
    batches = list(store.scan_tokens("a", columns=["step", "entropy"], steps=[1, 3]))
    table = pa.Table.from_batches(batches)
    assert table.column_names == ["step", "entropy"]
    assert sorted(set(table.column("step").to_pylist())) == [1, 3]
    assert table.num_rows == 20
    assert store.token_steps("a") == [0, 1, 2, 3]


def test_tokens_sorted_within_parts(tmp_path):
    store = Store.create(tmp_path / "s")
    with store.write_run("a") as writer:
        writer.write_tokens(pa.table({"step": [2, 1, 1], "sample_id": ["b", "b", "a"],
                                      "position": [0, 1, 0]}))
    rows = store.read_tokens("a", columns=["step", "sample_id", "position"]).to_pylist()
    assert [(r["step"], r["sample_id"], r["position"]) for r in rows] == \
        [(1, "a", 0), (1, "b", 1), (2, "b", 0)]


def test_open_missing_store_is_an_error(tmp_path):
    with pytest.raises(StoreError, match="no entropylens store"):
        Store.open(tmp_path / "nothing")


def test_metrics_pivot(tmp_path):
    store = Store.create(tmp_path / "s")
    with store.write_run("a") as writer:
        writer.write_metrics(pa.table({"step": [0, 1, 0], "metric": ["kl", "kl", "loss"],
                                       "value": [0.1, 0.2, 3.0]}))
    wide = store.read_metrics("a", pivot=True)
    assert list(wide.columns) == ["kl", "loss"]
    assert wide.loc[1, "kl"] == 0.2
