"""Watching a run while it trains: the live diagnosis, its cache and the watch command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import entropylens as el
from entropylens import live
from entropylens.analysis.curves import policy_entropy
from entropylens.store import Store

ROOT = Path(__file__).resolve().parents[1]
VANILLA = ROOT / ".." / "shared" / "runs" / "smollm2_grpo_taskB" / "vanilla"
pytestmark = pytest.mark.skipif(not VANILLA.exists(), reason="shared vanilla run missing")
TOKEN_COLUMNS = ["step", "prompt_idx", "sample_idx", "position", "token_id", "logprob",
                 "entropy"]


class TrainerLog:
    """Writes the vanilla run's per-step data as a trainer would: tokens.jsonl and
    metrics.csv, one line at a time, flushed, step by step."""

    def __init__(self, folder: Path):
        tokens = pq.read_table(VANILLA / "tokens.parquet", columns=TOKEN_COLUMNS).to_pandas()
        self.tokens = {step: rows for step, rows in tokens.groupby("step")}
        lines = (VANILLA / "metrics.csv").read_text().splitlines(keepends=True)
        self.header, self.rows = lines[0], lines[1:]
        self.folder = folder
        folder.mkdir(parents=True)
        self.paths = [folder / "tokens.jsonl", folder / "metrics.csv"]
        with open(self.paths[1], "w") as fh:
            fh.write(self.header)
        self.paths[0].touch()

    def steps(self) -> list[int]:
        return [int(row.split(",")[0]) for row in self.rows]

    def write(self, index: int) -> int:
        """Write the ``index``-th step's lines; returns the step."""
        row = self.rows[index]
        step = int(row.split(",")[0])
        with open(self.paths[0], "a") as tokens, open(self.paths[1], "a") as metrics:
            if step in self.tokens:
                for line in self.tokens[step].to_json(orient="records",
                                                      lines=True).splitlines():
                    tokens.write(line + "\n")
                    tokens.flush()
            metrics.write(row)
            metrics.flush()
        return step

    def prefix_store(self, last_step: int, where: Path) -> Store:
        """A store ingested in one go from the lines up to ``last_step`` (the reference)."""
        where.mkdir(parents=True)
        tokens = pd.concat([rows for step, rows in self.tokens.items() if step <= last_step])
        (where / "tokens.jsonl").write_text(tokens.to_json(orient="records", lines=True))
        (where / "metrics.csv").write_text(self.header + "".join(
            row for row in self.rows if int(row.split(",")[0]) <= last_step))
        el.ingest([where / "tokens.jsonl", where / "metrics.csv"], where / "store", run="v")
        return Store.open(where / "store")


def _follow(tmp_path: Path) -> tuple[TrainerLog, dict[int, str]]:
    """Write the run step by step with one refresh after each step: step -> status."""
    log = TrainerLog(tmp_path / "logs")
    watcher = live.Watcher(log.paths, tmp_path / "watched", "v")
    seen = {}
    for index in range(len(log.rows)):
        step = log.write(index)
        result = watcher.refresh()
        seen[step] = result.status
    return log, seen


@pytest.fixture(scope="module")
def followed(tmp_path_factory):
    return _follow(tmp_path_factory.mktemp("watch"))


def _first(seen: dict[int, str], status: str) -> int:
    return next(step for step, got in sorted(seen.items()) if got == status)


@pytest.mark.slow  # several seconds: `make test` runs it
@pytest.mark.parametrize("status", ["collapsing", "collapsed_plateau"])
def test_status_change_within_one_refresh_of_full_diagnose(followed, tmp_path, status):
    log, seen = followed
    step = _first(seen, status)
    steps = log.steps()
    before = steps[steps.index(step) - 1]
    # a full diagnose of the prefix first reports the status at this step: not one step before
    assert el.diagnose(log.prefix_store(step, tmp_path / "at"), "v").run("v").status == status
    assert el.diagnose(log.prefix_store(before, tmp_path / "before"),
                       "v").run("v").status != status


def test_watched_store_equals_one_ingest(followed, tmp_path):
    log, seen = followed
    assert seen[log.steps()[-1]] == "collapsed_plateau"  # the vanilla run's final status
    whole = log.prefix_store(log.steps()[-1], tmp_path / "whole")
    watched = Store.open(log.folder.parent / "watched")
    key = ["step", "sample_id", "position"]
    pd.testing.assert_frame_equal(
        whole.read_tokens("v").to_pandas().sort_values(key).reset_index(drop=True),
        watched.read_tokens("v").to_pandas().sort_values(key).reset_index(drop=True))
    assert whole.manifest("v")["counts"] == watched.manifest("v")["counts"]
    # the live curve is the full policy-entropy curve
    a, b = policy_entropy(whole, "v"), live.live_curve(watched, "v")
    np.testing.assert_allclose(a["entropy"], b["entropy"], rtol=1e-12)
    np.testing.assert_allclose(a["entropy_seq_mean"], b["entropy_seq_mean"], rtol=1e-12)


@pytest.mark.slow
def test_every_prefix_status_matches_full_diagnose(followed, tmp_path):
    log, seen = followed
    for step in log.steps():
        expected = el.diagnose(log.prefix_store(step, tmp_path / str(step)), "v").run("v")
        assert seen[step] == expected.status, step


def test_cache_scans_only_new_parts(tmp_path, monkeypatch):
    log = TrainerLog(tmp_path / "logs")
    watcher = live.Watcher(log.paths, tmp_path / "s", "v")
    for index in range(12):
        log.write(index)
        watcher.refresh()
    store = Store.open(tmp_path / "s")
    scanned = []
    real = live._part_frame
    monkeypatch.setattr(live, "_part_frame",
                        lambda part, agg: scanned.append(part.name) or real(part, agg))
    log.write(12)
    watcher.refresh()
    assert scanned == [sorted(p.name for p in (store.run_dir("v") / "tokens").iterdir())[-1]]
    # a damaged cache entry is recomputed, not trusted
    entry = sorted((tmp_path / "s" / ".cache" / "v").iterdir())[0]
    entry.write_bytes(b"not parquet")
    expected = policy_entropy(store, "v")
    got = live.live_curve(store, "v")
    np.testing.assert_allclose(expected["entropy"], got["entropy"], rtol=1e-12)


def test_prediction_states_ceiling_only_when_earned():
    steps = np.arange(40)
    h = 1.5 * np.exp(-steps / 10) + 0.05
    rng = np.random.default_rng(0)
    perf = pd.DataFrame({"step": steps,
                         "value": -0.3 * np.exp(h) + 0.9 + rng.normal(0, 0.005, len(steps))})
    perf.attrs["metric"] = "val_accuracy"
    curve = pd.DataFrame({"step": steps, "entropy": h, "source": "exact"})
    few = live.predict_ceiling(curve.iloc[:4], perf.iloc[:4])
    assert not few.predictable and "at least" in few.reason
    good = live.predict_ceiling(curve, perf)
    assert good.predictable and good.ceiling == pytest.approx(0.6, abs=0.02)
    assert good.ceiling_ci[0] <= good.ceiling <= good.ceiling_ci[1]
    noisy = perf.assign(value=rng.uniform(0, 1, len(perf)))
    bad = live.predict_ceiling(curve, noisy)
    assert not bad.predictable and bad.text().startswith("not yet predictable")


@pytest.mark.slow  # several seconds: `make test` runs it
def test_watch_command_follows_a_growing_log(tmp_path):
    log = TrainerLog(tmp_path / "logs")
    hook = tmp_path / "hook.txt"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "entropylens.cli", "watch", *map(str, log.paths), "--out",
         str(tmp_path / "s"), "--run", "v", "--every", "0.3s", "--until-idle", "3s",
         "--on-change", f'echo "$ENTROPYLENS_STATUS $ENTROPYLENS_STEP" >> {hook}'],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for index in range(len(log.rows)):
        log.write(index)
        time.sleep(0.05)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    lines = out.strip().splitlines()
    assert lines and all(line.startswith("step ") for line in lines)
    assert "-> collapsed_plateau" in lines[-1]
    assert hook.read_text().splitlines()[-1].startswith("collapsed_plateau ")
    assert Store.open(tmp_path / "s").manifest("v")["counts"]["metric_steps"] == len(log.rows)


def test_watch_command_json_and_bad_duration(tmp_path):
    log = TrainerLog(tmp_path / "logs")
    for index in range(10):
        log.write(index)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "entropylens.cli", "watch", *map(str, log.paths),
                           "--out", str(tmp_path / "s"), "--run", "v", "--every", "0.1s",
                           "--until-idle", "0.1s", "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    objects = [json.loads(line) for line in done.stdout.splitlines()]
    assert objects and objects[-1]["run"] == "v" and objects[-1]["status"]
    bad = subprocess.run([sys.executable, "-m", "entropylens.cli", "watch", str(log.paths[1]),
                          "--out", str(tmp_path / "s"), "--run", "v", "--every", "soon"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode != 0 and "duration" in bad.stderr
