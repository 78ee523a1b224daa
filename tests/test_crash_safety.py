"""Crash safety: an ingest killed midway (SIGKILL) leaves the store readable with the earlier
runs intact and no half run; re-running gives the same store; leftovers are swept safely."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import entropylens as el
from entropylens.errors import StoreError
from _hardening_helpers import SAMPLE_RUN, make_base_store, store_fingerprint

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")

#: The child ingests the sample tokens with small part files and, after its second part is
#: on disk, tells the parent and waits to be killed: a kill in the middle of a real write.
CHILD = r"""
import sys, time
from pathlib import Path
import entropylens.store as store_module
from entropylens.ingest import table as table_module
import entropylens as el
store_module.ROWS_PER_PART = table_module.BATCH_ROWS = 3000
original = store_module.RunWriter._flush_tokens
def flush(self):
    original(self)
    if self._parts == 2:
        Path(sys.argv[3]).write_text("midway")
        time.sleep(60)
store_module.RunWriter._flush_tokens = flush
el.ingest(sys.argv[1], sys.argv[2], run="big", progress=False)
"""


def _kill_midway(store: Path, tmp_path: Path) -> None:
    marker = tmp_path / "midway"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(SAMPLE_RUN / "tokens.parquet"),
                              str(store), str(marker)])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, "the child ended before reaching the middle"
            assert time.monotonic() < deadline, "the child never reached the middle"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL


def _content(store: el.Store, run: str):
    tokens = store.read_tokens(run)
    return (tokens, store.read_sequences(run), store.read_metrics(run),
            store.manifest(run)["counts"])


@pytest.mark.slow
def test_killed_ingest_leaves_earlier_runs_and_no_half_run(tmp_path):
    path = tmp_path / "store"
    keep = make_base_store(path)
    _kill_midway(path, tmp_path)

    store = el.open(path)
    assert store.runs() == ["keep"], "a half-written run is visible"
    assert store_fingerprint(path, "keep") == keep
    leftovers = [p for p in store.runs_dir.iterdir() if p.name.startswith(".tmp-big-")]
    assert len(leftovers) == 1 and len(list((leftovers[0] / "tokens").glob("*.parquet"))) == 2
    assert el.summary(path).runs.run.tolist() == ["keep"]

    # the same ingest again: succeeds, sweeps the dead writer's folder, same content as a
    # clean ingest into a fresh store
    el.ingest(SAMPLE_RUN / "tokens.parquet", path, run="big", progress=False)
    assert not [p for p in store.runs_dir.iterdir() if p.name.startswith(".tmp-")]
    assert store.runs() == ["big", "keep"]
    assert store_fingerprint(path, "keep") == keep

    clean = tmp_path / "clean"
    el.ingest(SAMPLE_RUN / "tokens.parquet", clean, run="big", progress=False)
    again, fresh = _content(store, "big"), _content(el.open(clean), "big")
    assert again[0].equals(fresh[0]) and again[1].equals(fresh[1])
    assert again[2].equals(fresh[2]) and again[3] == fresh[3]
    assert again[3]["tokens"] == pq.read_metadata(SAMPLE_RUN / "tokens.parquet").num_rows


@pytest.mark.slow
def test_killed_replace_keeps_the_old_run(tmp_path):
    """Killed while replacing run 'big': the old 'big' is still there, unchanged."""
    path = tmp_path / "store"
    el.ingest(SAMPLE_RUN / "metrics.csv", path, run="big", progress=False)
    before = store_fingerprint(path, "big")
    child = CHILD.replace('run="big"', 'run="big", replace=True')
    marker = tmp_path / "midway"
    proc = subprocess.Popen([sys.executable, "-c", child, str(SAMPLE_RUN / "tokens.parquet"),
                             str(path), str(marker)])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert marker.exists()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert el.open(path).runs() == ["big"]
    assert store_fingerprint(path, "big") == before


# -- sweeping leftover temporary folders ------------------------------------------------------
def _fake_tmp(store: el.Store, name: str, writer: str | None, age_s: float = 0) -> Path:
    folder = store.runs_dir / f".tmp-{name}-0123456789ab"
    (folder / "tokens").mkdir(parents=True)
    (folder / "tokens" / "part-00000.parquet").write_bytes(b"PAR1")
    (folder / "manifest.json").write_text("{}")  # even a manifest does not make it a run
    if writer is not None:
        (folder / ".writer").write_text(writer)
    if age_s:
        old = time.time() - age_s
        for p in [folder, *folder.rglob("*")]:
            os.utime(p, (old, old))
    return folder


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_are_invisible_and_swept_only_when_safe(tmp_path):
    import socket

    host = socket.gethostname()
    path = tmp_path / "store"
    make_base_store(path)
    store = el.open(path)
    live = _fake_tmp(store, "live", f"{os.getpid()} {host}", age_s=7 * 86400)
    dead = _fake_tmp(store, "dead", f"{_dead_pid()} {host}")
    remote_new = _fake_tmp(store, "remote-new", f"{os.getpid()} some-other-host")
    remote_old = _fake_tmp(store, "remote-old", "1 some-other-host", age_s=2 * 86400)
    unknown_old = _fake_tmp(store, "unknown-old", None, age_s=2 * 86400)
    unknown_new = _fake_tmp(store, "unknown-new", None)

    assert store.runs() == ["keep"]
    with pytest.raises(StoreError):
        store.manifest("live")

    el.ingest(SAMPLE_RUN / "metrics.csv", path, run="later", progress=False)
    present = {p.name for p in store.runs_dir.iterdir()}
    assert live.name in present, "a live writer's folder was removed"
    assert remote_new.name in present and unknown_new.name in present
    assert dead.name not in present and remote_old.name not in present
    assert unknown_old.name not in present
    assert store.runs() == ["keep", "later"]
    assert not (store.runs_dir / "later" / ".writer").exists()
