"""Appending to a run (``ingest --append``): new steps only, atomically, value for value."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import entropylens as el
from entropylens.errors import EntropylensError
from entropylens.store import Store

VANILLA = Path(__file__).resolve().parents[1] / ".." / "shared" / "runs" / "smollm2_grpo_taskB" \
    / "vanilla"
pytestmark = pytest.mark.skipif(not VANILLA.exists(), reason="shared vanilla run missing")


def _write_prefix(folder: Path, last_step: int | None) -> None:
    """The vanilla run's files as a trainer would have written them up to ``last_step``
    (None: the whole run): Parquet files rewritten as a whole, metrics.csv line by line."""
    tokens = pq.read_table(VANILLA / "tokens.parquet")
    sequences = pq.read_table(VANILLA / "sequences.parquet")
    lines = (VANILLA / "metrics.csv").read_text().splitlines(keepends=True)
    if last_step is not None:
        tokens = tokens.filter(pc.less_equal(tokens["step"], last_step))
        sequences = sequences.filter(pc.less_equal(sequences["step"], last_step))
        lines = lines[:1] + [line for line in lines[1:] if int(line.split(",")[0]) <= last_step]
    pq.write_table(tokens, folder / "tokens.parquet")
    pq.write_table(sequences, folder / "sequences.parquet")
    (folder / "metrics.csv").write_text("".join(lines))


def _sorted(table, keys):
    frame = table.to_pandas() if not isinstance(table, pd.DataFrame) else table
    return frame.sort_values(keys, kind="stable").reset_index(drop=True)


@pytest.mark.slow  # several seconds: `make test` runs it
def test_ten_appends_equal_one_ingest(tmp_path):
    el.ingest(VANILLA, tmp_path / "whole", run="v")
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(VANILLA / "config.json", live)
    steps = sorted(set(pq.read_table(VANILLA / "tokens.parquet", columns=["step"])
                       .column("step").to_pylist()))
    chunks = np.array_split(np.array(steps), 10)
    for i, chunk in enumerate(chunks):
        _write_prefix(live, None if i == len(chunks) - 1 else int(chunk[-1]))
        el.ingest(live, tmp_path / "appended", run="v", append=True)
    whole, appended = Store.open(tmp_path / "whole"), Store.open(tmp_path / "appended")
    parts = sorted(p.name for p in (appended.run_dir("v") / "tokens").iterdir())
    assert len(parts) == 10  # one new part per append, earlier ones kept
    key = ["step", "sample_id", "position"]
    pd.testing.assert_frame_equal(_sorted(whole.read_tokens("v"), key),
                                  _sorted(appended.read_tokens("v"), key))
    pd.testing.assert_frame_equal(_sorted(whole.read_sequences("v"), ["step", "sample_id"]),
                                  _sorted(appended.read_sequences("v"), ["step", "sample_id"]))
    pd.testing.assert_frame_equal(_sorted(whole.read_metrics("v"), ["metric", "step"]),
                                  _sorted(appended.read_metrics("v"), ["metric", "step"]))
    a, b = whole.manifest("v"), appended.manifest("v")
    assert a["counts"] == b["counts"]
    assert a["entropy_sources"] == b["entropy_sources"] and a["top_k"] == b["top_k"]
    # the manifest records what was read from each source
    states = b["append"]["sources"]
    assert states[str((live / "tokens.parquet").resolve())]["last_step"] == steps[-1]
    csv = states[str((live / "metrics.csv").resolve())]
    assert csv["line_oriented"] and csv["size"] == (live / "metrics.csv").stat().st_size
    # diagnosis of the appended store is the one of the whole ingest
    assert el.diagnose(whole, "v").run("v").status == el.diagnose(appended, "v").run("v").status


def test_earlier_parts_are_never_rewritten(tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    _write_prefix(live, 10)
    el.ingest(live, tmp_path / "s", run="v", append=True)
    part = tmp_path / "s" / "runs" / "v" / "tokens" / "part-00000.parquet"
    inode, mtime = part.stat().st_ino, part.stat().st_mtime_ns
    _write_prefix(live, 20)
    el.ingest(live, tmp_path / "s", run="v", append=True)
    assert part.stat().st_ino == inode and part.stat().st_mtime_ns == mtime
    assert Store.open(tmp_path / "s").manifest("v")["counts"]["token_steps"] == 21
    # nothing new: the run is not rewritten at all
    manifest = (tmp_path / "s" / "runs" / "v" / "manifest.json").stat().st_mtime_ns
    el.ingest(live, tmp_path / "s", run="v", append=True)
    assert (tmp_path / "s" / "runs" / "v" / "manifest.json").stat().st_mtime_ns == manifest


def test_rewritten_prefix_is_an_error_and_leaves_the_run(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "entropy": 1.0 / (s + 1), "reward": 0.1 * s})
                           + "\n" for s in range(5)))
    el.ingest(log, tmp_path / "s", run="r", append=True)
    before = Store.open(tmp_path / "s").read_metrics("r")
    log.write_text(log.read_text().replace('"reward": 0.0', '"reward": 0.5'))
    with pytest.raises(EntropylensError, match="read by the last ingest changed") as info:
        el.ingest(log, tmp_path / "s", run="r", append=True)
    assert info.value.path == str(log)
    pd.testing.assert_frame_equal(before, Store.open(tmp_path / "s").read_metrics("r"))


def test_half_written_line_waits(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "entropy": 1.0 / (s + 1), "reward": 0.1 * s}) + "\n"
             for s in range(4)]
    log.write_text("".join(lines[:3]) + lines[3][:10])  # the trainer is mid-line
    el.ingest(log, tmp_path / "s", run="r", append=True)
    assert Store.open(tmp_path / "s").manifest("r")["counts"]["metric_steps"] == 3
    log.write_text("".join(lines))
    el.ingest(log, tmp_path / "s", run="r", append=True)
    metrics = Store.open(tmp_path / "s").read_metrics("r")
    assert sorted(metrics["step"].unique()) == [0, 1, 2, 3]


def test_crash_mid_append_leaves_run(tmp_path, monkeypatch):
    live = tmp_path / "live"
    live.mkdir()
    _write_prefix(live, 5)
    el.ingest(live, tmp_path / "s", run="v", append=True)
    before = Store.open(tmp_path / "s").read_tokens("v").to_pandas()
    _write_prefix(live, 9)
    from entropylens import store as store_module

    def crash(self):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(store_module.RunWriter, "_publish", crash)
    with pytest.raises(EntropylensError):
        el.ingest(live, tmp_path / "s", run="v", append=True)
    store = Store.open(tmp_path / "s")
    pd.testing.assert_frame_equal(before, store.read_tokens("v").to_pandas())
    assert not [p for p in store.runs_dir.iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    el.ingest(live, tmp_path / "s", run="v", append=True)
    assert Store.open(tmp_path / "s").manifest("v")["counts"]["token_steps"] == 10


def test_append_and_replace_exclude(tmp_path):
    with pytest.raises(EntropylensError, match="exclude"):
        el.ingest(VANILLA / "metrics.csv", tmp_path / "s", run="r", append=True, replace=True)
