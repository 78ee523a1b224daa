"""Engine worker processes: the same numbers as one process, errors that name their file,
and no worker left behind."""

from __future__ import annotations

import importlib.util
import os
import pickle
from pathlib import Path

import pandas as pd
import psutil
import pytest

import entropylens as el
import entropylens.store as store_module
from entropylens import workers
from entropylens.analysis.covariance import StepCovariance
from entropylens.analysis.distribution import DistributionStats, StepStats
from entropylens.analysis.forking_counts import ForkingScan
from entropylens.analysis.quality import QualityScan
from entropylens.engine import Aggregator, local_workers, plan_units, run_aggregators
from entropylens.errors import EntropylensError, FormatError
from entropylens.store import Store

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "make_store.py"
UNIT = 40_000   # rows per unit: the 200k-token store makes several units


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("make_store", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path_factory.mktemp("workers")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store_module, "ROWS_PER_PART", 50_000)
        patch.setattr(store_module, "ROWS_PER_GROUP", 10_000)
        module.make_store(path, 200_000, steps=10, seed=3)
    return Store.open(path)


def _aggregators():
    return {"steps": StepStats("exact"), "dist": DistributionStats("exact"),
            "fork": ForkingScan("exact", scope="step", ratio=0.2),
            "quality": QualityScan(), "cov": StepCovariance()}


def test_workers_give_the_same_numbers_as_one_process(store):
    assert len(plan_units(store, "synthetic", unit_rows=UNIT)) >= 4
    alone = run_aggregators(store, "synthetic", _aggregators(), unit_rows=UNIT, workers=1)
    shared = run_aggregators(store, "synthetic", _aggregators(), unit_rows=UNIT, workers=2)
    pd.testing.assert_frame_equal(alone["steps"], shared["steps"])
    for key in ("histogram", "global"):
        pd.testing.assert_frame_equal(alone["dist"][key], shared["dist"][key])
    pd.testing.assert_frame_equal(alone["fork"][0].frame, shared["fork"][0].frame)
    pd.testing.assert_frame_equal(alone["fork"][1].sort_values("token", ignore_index=True),
                                  shared["fork"][1].sort_values("token", ignore_index=True))
    for attr in ("completions", "duplicate_tokens", "missing_positions", "steps"):
        assert getattr(alone["quality"], attr) == getattr(shared["quality"], attr)
    pd.testing.assert_frame_equal(alone["cov"], shared["cov"])


def test_analyses_through_the_api_take_workers(store):
    one = el.roles(store, "synthetic", unit_rows=UNIT, workers=1)
    two = el.roles(store, "synthetic", unit_rows=UNIT, workers=2)
    pd.testing.assert_frame_equal(one.steps, two.steps)
    pd.testing.assert_frame_equal(one.grams, two.grams)
    # and the roles of small units equal those of one unit: no phrase lost at unit edges
    whole = el.roles(store, "synthetic", workers=1)
    pd.testing.assert_frame_equal(whole.steps, one.steps, check_exact=False, rtol=1e-12)
    pd.testing.assert_frame_equal(whole.grams, one.grams)


class _Broken(Aggregator):
    columns = ("step",)

    def __init__(self, error):
        self.error = error

    def start(self):
        return 0

    def update(self, state, batch):
        raise self.error

    def merge(self, left, right):
        return left + right

    def finish(self, state):
        return state


def test_a_worker_error_keeps_its_file_and_line(store):
    error = FormatError("bad value", path="/data/run.jsonl", line=7)
    with pytest.raises(FormatError) as caught:
        run_aggregators(store, "synthetic", {"b": _Broken(error)}, unit_rows=UNIT, workers=2)
    assert caught.value.path == "/data/run.jsonl" and caught.value.line == 7
    assert str(caught.value) == "/data/run.jsonl:7: bad value"
    # the pool is usable again afterwards, and gives the right answer
    result = run_aggregators(store, "synthetic", {"q": QualityScan()}, unit_rows=UNIT,
                             workers=2)
    assert sum(result["q"].steps.values()) == 200_000


class _BrokenInWorkers(_Broken):
    """Raises in worker processes only: this process scans units too, and these tests are
    about what comes back from a worker."""

    def __init__(self, error):
        super().__init__(error)
        self.caller = os.getpid()

    def update(self, state, batch):
        if os.getpid() != self.caller:
            raise self.error
        return state


class _Unpicklable(Exception):
    def __init__(self, a, b):   # pickles as (a,) only: cannot be rebuilt
        super().__init__(a)
        self.b = b


class _RaisesUnpicklable(_BrokenInWorkers):
    def __init__(self):
        super().__init__(None)

    def update(self, state, batch):
        if os.getpid() != self.caller:
            raise _Unpicklable("x", "y")
        return state


def test_an_unpicklable_worker_error_becomes_a_plain_error(store):
    with pytest.raises(EntropylensError, match="_Unpicklable: x"):
        run_aggregators(store, "synthetic", {"b": _RaisesUnpicklable()}, unit_rows=UNIT,
                        workers=2)


def test_a_request_that_does_not_unpickle_is_an_error_not_a_dead_worker(store):
    with pytest.raises(EntropylensError, match="could not rebuild its task"):
        run_aggregators(store, "synthetic", {"b": _BrokenInWorkers(_Unpicklable("x", "y"))},
                        unit_rows=UNIT, workers=2)


def test_workers_end_with_the_call(store):
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    run_aggregators(store, "synthetic", {"q": QualityScan()}, unit_rows=UNIT, workers=2)
    assert {p.pid for p in me.children(recursive=True)} - before == set()


def test_a_dead_worker_is_replaced_or_reported():
    pool = workers.WorkerPool(1)
    try:
        assert list(pool.map(len, [("a",)])) == [1]
        pool.workers[0].process.kill()      # died while idle: replaced before new work
        pool.workers[0].process.wait()
        assert list(pool.map(len, [("abc",), ("de",)])) == [3, 2]
        with pytest.raises(EntropylensError, match=r"stopped \(exit code 3\)"):
            list(pool.map(os._exit, [(3,)]))   # dies while working: reported
        assert list(pool.map(len, [("xyz",)])) == [3]
    finally:
        pool.close()


def test_workers_run_one_thread_and_the_c_allocator(monkeypatch):
    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
    pool = workers.WorkerPool(1)
    try:
        (env,) = pool.map(os.getenv, [("ARROW_DEFAULT_MEMORY_POOL",)])
        (threads,) = pool.map(os.getenv, [("OMP_NUM_THREADS",)])
        assert (env, threads) == ("system", "1")
    finally:
        pool.close()
    monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")   # the caller's choice wins
    pool = workers.WorkerPool(1)
    try:
        assert list(pool.map(os.getenv, [("ARROW_DEFAULT_MEMORY_POOL",)])) == ["jemalloc"]
    finally:
        pool.close()


def test_a_consumer_that_stops_early_leaves_no_answer_behind():
    pool = workers.WorkerPool(2)
    try:
        results = pool.map(len, [("a",), ("bb",), ("ccc",), ("dddd",)])
        assert next(results) == 1
        results.close()                      # abandoned with items in flight
        assert list(pool.map(len, [("xy",), ("z",)])) == [2, 1]
    finally:
        pool.close()


def test_worker_count_from_argument_environment_or_cpus(monkeypatch):
    monkeypatch.delenv("ENTROPYLENS_WORKERS", raising=False)
    assert 1 <= local_workers() <= 4
    assert local_workers(3) == 3
    monkeypatch.setenv("ENTROPYLENS_WORKERS", "1")
    assert local_workers() == 1
    monkeypatch.setenv("ENTROPYLENS_WORKERS", "many")
    with pytest.raises(EntropylensError, match="ENTROPYLENS_WORKERS"):
        local_workers()
    with pytest.raises(EntropylensError, match="at least 1"):
        local_workers(0)


def test_errors_survive_pickling():
    error = FormatError("bad", path="/x.csv", line=3, field="entropy")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is FormatError and str(copy) == str(error)
    assert (copy.path, copy.line, copy.field, copy.message) == ("/x.csv", 3, "entropy", "bad")


def test_cli_workers_option(store, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    # the command sets ENTROPYLENS_WORKERS for its process: restore it after the test
    monkeypatch.setenv("ENTROPYLENS_WORKERS", "1")

    from entropylens.cli import app

    result = CliRunner().invoke(app, ["summary", str(store.path), "--workers", "2",
                                      "--json"])
    assert result.exit_code == 0, result.output
    refused = CliRunner().invoke(app, ["summary", str(store.path), "--workers", "2",
                                       "--engine", "ray"])
    assert refused.exit_code != 0 and "--workers" in refused.output


class _MergeFails(_Broken):
    def __init__(self):
        super().__init__(None)

    def update(self, state, batch):
        return state + batch.num_rows

    def merge(self, left, right):
        if left:   # the second unit's state: fail while later units are in flight
            raise RuntimeError("merge failed")
        return left + right


def test_a_failed_merge_leaves_no_answer_for_the_next_call(store):
    from entropylens.workers import session

    rows = QualityScan()
    with session():   # the same workers serve both calls
        with pytest.raises(RuntimeError, match="merge failed"):
            run_aggregators(store, "synthetic", {"m": _MergeFails()}, unit_rows=UNIT,
                            workers=2)
        result = run_aggregators(store, "synthetic", {"q": rows}, unit_rows=UNIT, workers=2)
    assert sum(result["q"].steps.values()) == 200_000


def test_threads_get_their_own_workers(store):
    from concurrent.futures import ThreadPoolExecutor

    def count(_):
        return sum(run_aggregators(store, "synthetic", {"q": QualityScan()}, unit_rows=UNIT,
                                   workers=2)["q"].steps.values())

    with ThreadPoolExecutor(2) as threads:
        assert list(threads.map(count, range(4))) == [200_000] * 4


def test_aggregators_from_a_script_run_in_this_process(store, tmp_path):
    script = tmp_path / "script.py"
    script.write_text(
        "import sys\n"
        "from entropylens.engine import Aggregator, run_aggregators\n"
        "from entropylens.store import Store\n"
        "class Rows(Aggregator):\n"
        "    columns = ('step',)\n"
        "    def start(self): return 0\n"
        "    def update(self, state, batch): return state + batch.num_rows\n"
        "    def merge(self, left, right): return left + right\n"
        "    def finish(self, state): return state\n"
        "print(run_aggregators(Store.open(sys.argv[1]), 'synthetic', {'r': Rows()},\n"
        "                      unit_rows=40_000, workers=2)['r'])\n")
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(script), str(store.path)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "200000"


def test_worker_errors_carry_the_worker_traceback(store):
    with pytest.raises(FormatError) as caught:
        run_aggregators(store, "synthetic",
                        {"b": _BrokenInWorkers(FormatError("bad", path="/p"))},
                        unit_rows=UNIT, workers=2)
    assert any("raised in an entropylens worker process" in note and "update" in note
               for note in getattr(caught.value, "__notes__", []))


def _pid_of(item):
    return item, os.getpid()


def test_the_caller_runs_items_too_and_answers_stay_in_order():
    pool = workers.WorkerPool(1)
    try:
        done = list(pool.map(_pid_of, [(k,) for k in range(40)], caller=True))
        assert [item for item, _ in done] == list(range(40))
        pids = {pid for _, pid in done}
        # the worker starts slower than the caller scans: the caller took items; a job this
        # long still reaches the worker once it is up, or the caller did it all
        assert os.getpid() in pids and len(pids) <= 2
        # a pool of no workers is this process alone
        assert list(workers.WorkerPool(0).map(len, [("ab",), ("c",)], caller=True)) == [2, 1]
    finally:
        pool.close()


def test_requests_larger_than_the_pipe_never_block():
    # requests far above the pipe's buffer, two to a worker: written by its writer thread
    big = "x" * (4 * 2**20)
    pool = workers.WorkerPool(2)
    try:
        assert list(pool.map(len, [(big,)] * 6, caller=True)) == [len(big)] * 6
        assert list(pool.map(len, [(big,)] * 6)) == [len(big)] * 6
    finally:
        pool.close()


def test_a_caller_that_stops_early_leaves_no_answer_behind():
    pool = workers.WorkerPool(1)
    try:
        results = pool.map(len, [("a",), ("bb",), ("ccc",), ("dddd",), ("eeeee",)],
                           caller=True)
        assert next(results) == 1
        results.close()
        assert list(pool.map(len, [("xy",), ("z",)], caller=True)) == [2, 1]
    finally:
        pool.close()


def _slow_in_workers(item, caller):
    import time

    if os.getpid() != caller:
        time.sleep(0.3)
    return item


def test_the_caller_does_not_run_far_ahead_of_a_slow_worker():
    # a slow worker holds the earliest items: the caller takes a bounded number of the
    # later ones, then waits; everything comes back, in order
    pool = workers.WorkerPool(1)
    try:
        items = [(k, os.getpid()) for k in range(30)]
        assert list(pool.map(_slow_in_workers, items, caller=True)) == list(range(30))
    finally:
        pool.close()
