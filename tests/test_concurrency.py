"""Concurrent writers into one store: the store lock serialises their commits, readers never
undo a live writer's rename, and a failed ingest removes only what it created.

The stress test runs three processes for ``ENTROPYLENS_STRESS_ROUNDS`` rounds (default 100,
about 8 s on two cores): each round, two good ingests and
one failing ingest start together into a new store (even rounds) or into an existing one
(odd rounds, one of the good ingests replacing a run). After every round each successful
ingest is present with its data, the failing one left nothing, the runs already there are
byte for byte unchanged and no temporary folder stays behind.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path

import pytest

import entropylens as el
import entropylens.store as store_module
from entropylens.errors import EntropylensError, StoreError
from _hardening_helpers import SAMPLE_RUN, make_base_store, store_fingerprint

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs fork")

METRICS = SAMPLE_RUN / "metrics.csv"
ROUNDS = int(os.environ.get("ENTROPYLENS_STRESS_ROUNDS", "100"))


def _bad_tokens(folder: Path) -> Path:
    """A token CSV whose last row is broken: the ingest fails after writing."""
    rows = [f"1,s{i},{p},tok,-0.{p + 1}" for i in range(200) for p in range(2)]
    path = folder / "bad.csv"
    path.write_text("step,sample_id,position,token,logprob\n" + "\n".join(rows)
                    + "\n1,s9,0,tok\n")
    return path


def _worker(role, rounds, folder, barrier, results):
    """One process: every round, wait for the others, then ingest (``role`` says what)."""
    bad = folder / "bad.csv"
    for number in range(rounds):
        store = folder / f"store-{number}"
        barrier.wait(timeout=120)
        try:
            if role == "fail":
                el.ingest(bad, store, run="failing", progress=False)
                results.put((number, role, "ingested"))
            else:
                replace = role == "good-b" and number % 2 == 1
                run = "keep" if replace else role
                el.ingest(METRICS, store, run=run, replace=replace, progress=False)
                results.put((number, role, "ok"))
        except EntropylensError as exc:
            results.put((number, role, f"error: {exc}"))
        except BaseException as exc:  # noqa: BLE001 - a traceback is the failure under test
            results.put((number, role, f"crash: {type(exc).__name__}: {exc}"))


def _run_rounds(tmp_path: Path, rounds: int) -> list:
    context = multiprocessing.get_context("fork")
    _bad_tokens(tmp_path)
    base = {}
    for number in range(1, rounds, 2):  # odd rounds write into a store with runs in it
        path = tmp_path / f"store-{number}"
        base[number] = make_base_store(path)
        el.ingest(SAMPLE_RUN / "sequences.parquet", path, run="untouched", progress=False)
        base[number, "untouched"] = store_fingerprint(path, "untouched")
    barrier, results = context.Barrier(3), context.Queue()
    workers = [context.Process(target=_worker, args=(role, rounds, tmp_path, barrier, results))
               for role in ("good-a", "good-b", "fail")]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=300) for _ in range(3 * rounds)]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    return outcomes, base


def _check_rounds(tmp_path: Path, outcomes: list, base: dict) -> None:
    by_round: dict[int, dict[str, str]] = {}
    for number, role, outcome in outcomes:
        by_round.setdefault(number, {})[role] = outcome
    import pandas as pd
    reference = pd.read_csv(METRICS)
    for number, roles in sorted(by_round.items()):
        assert roles["good-a"] == "ok", (number, roles)
        assert roles["good-b"] == "ok", (number, roles)
        assert roles["fail"].startswith("error: ") and "bad.csv:402" in roles["fail"], \
            (number, roles)
        store = el.open(tmp_path / f"store-{number}")
        if number % 2:
            assert store.runs() == ["good-a", "keep", "untouched"], number
            assert store_fingerprint(store.path, "untouched") == base[number, "untouched"]
            # 'keep' was replaced by an ingest of the same file: same files, same values
            assert set(store_fingerprint(store.path, "keep")) == set(base[number])
        else:
            assert store.runs() == ["good-a", "good-b"], number
        for run in ("good-a", "keep" if number % 2 else "good-b"):
            metrics = store.read_metrics(run, pivot=True)
            assert len(metrics) == len(reference)
            assert metrics["reward_mean"].to_numpy() == pytest.approx(
                reference["reward"].to_numpy(), nan_ok=True)
        leftovers = [p.name for p in store.runs_dir.iterdir() if p.name.startswith(".")]
        assert leftovers == [], (number, leftovers)


@pytest.mark.slow
def test_three_writers_new_and_existing_stores_one_failing(tmp_path):
    outcomes, base = _run_rounds(tmp_path, ROUNDS)
    _check_rounds(tmp_path, outcomes, base)


def test_first_ingests_into_a_new_store_all_succeed(tmp_path):
    """Three processes create the same new store at once: one creates it, all write."""
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(3), context.Queue()

    def first(name):
        barrier.wait(timeout=60)
        try:
            el.ingest(METRICS, tmp_path / "store", run=name, progress=False)
            results.put((name, "ok"))
        except BaseException as exc:  # noqa: BLE001
            results.put((name, f"{type(exc).__name__}: {exc}"))

    procs = [context.Process(target=first, args=(f"r{i}",)) for i in range(3)]
    for proc in procs:
        proc.start()
    outcomes = dict(results.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    assert outcomes == {"r0": "ok", "r1": "ok", "r2": "ok"}
    assert el.open(tmp_path / "store").runs() == ["r0", "r1", "r2"]


def test_failed_first_ingest_keeps_a_store_another_writer_uses(tmp_path):
    """The creator of a store gives it up only while ``runs/`` is empty: another writer's
    temporary folder keeps it, and that writer commits into it."""
    path = tmp_path / "store"
    created = el.Store.create(path)
    assert created._created == (True, True)
    other = el.Store.open(path).write_run("other")  # started, not yet committed
    assert created.discard_if_unused() is False
    assert (path / "store.json").exists()
    other.write_metrics(_metric_rows())
    other.commit()
    assert el.open(path).runs() == ["other"]
    lone = el.Store.create(tmp_path / "lone")
    assert lone.discard_if_unused() is True
    assert not (tmp_path / "lone").exists()


def _metric_rows():
    import pyarrow as pa
    return pa.table({"step": [0, 1], "metric": ["reward_mean"] * 2, "value": [0.1, 0.2],
                     "raw_key": ["reward"] * 2, "split": ["train"] * 2})


def test_failed_ingest_removes_only_what_it_created(tmp_path):
    """An empty folder the user made stays (empty); a folder the ingest made goes."""
    bad = _bad_tokens(tmp_path)
    mine = tmp_path / "made-by-user"
    mine.mkdir()
    with pytest.raises(EntropylensError):
        el.ingest(bad, mine, run="x", progress=False)
    assert mine.is_dir() and list(mine.iterdir()) == []
    fresh = tmp_path / "fresh" / "store"
    with pytest.raises(EntropylensError):
        el.ingest(bad, fresh, run="x", progress=False)
    assert not fresh.exists()


def test_reader_leaves_a_live_writers_replace_alone(tmp_path, monkeypatch):
    """A reader opening the store between a replace's two renames must not move the old run
    back: the replace completes and the new run is in place."""
    path = tmp_path / "store"
    make_base_store(path)
    before = store_fingerprint(path, "keep")
    real_replace = os.replace
    seen = {}

    def replace(src, dst):
        real_replace(src, dst)
        if Path(dst).name.startswith(".old-keep-") and "reader" not in seen:
            seen["reader"] = el.open(path).runs()  # between the two renames
            seen["old_still_aside"] = Path(dst).exists()

    monkeypatch.setattr(store_module.os, "replace", replace)
    el.ingest(SAMPLE_RUN / "sequences.parquet", path, run="keep", replace=True,
              progress=False)
    monkeypatch.setattr(store_module.os, "replace", real_replace)
    assert seen == {"reader": [], "old_still_aside": True}
    store = el.open(path)
    assert store.runs() == ["keep"]
    assert store_fingerprint(path, "keep") != before
    assert store.manifest("keep")["counts"]["sequences"] > 0
    assert not [p for p in store.runs_dir.iterdir() if p.name.startswith(".")]


def test_killed_replace_between_renames_is_recovered_by_a_reader(tmp_path):
    """With no writer alive, a reader finishes a replace killed between its renames."""
    path = tmp_path / "store"
    make_base_store(path)
    store = el.open(path)
    aside = store.runs_dir / ".old-keep-0123abcd"
    os.replace(store.runs_dir / "keep", aside)
    assert el.open(path).runs() == ["keep"]
    assert not aside.exists()


def test_second_writer_of_one_run_gets_a_clear_error(tmp_path):
    path = tmp_path / "store"
    store = el.Store.create(path)
    first, second = store.write_run("same"), store.write_run("same")
    first.write_metrics(_metric_rows())
    second.write_metrics(_metric_rows())
    first.commit()
    with pytest.raises(StoreError, match="already exists"):
        second.commit()
    assert not second.tmp.exists()
    assert store.runs() == ["same"]
