"""Benchmark: every analysis of ``entropylens report`` on a synthetic store of N tokens.

Writes (or reuses) a store made by :mod:`make_store` and times, in one process:

1. ``scan_s``, the floor: a bare ``pyarrow.dataset`` scan of the token columns the report
   reads (:data:`REPORT_COLUMNS`), batch by batch, nothing computed;
2. ``entropylens_s``: :func:`entropylens.report.collect.collect`, every analysis of the
   report (summary and data quality, policy entropy, phases, saturation fit, distribution,
   forking tokens, roles, covariance) without drawing or writing the report. It runs in a
   child process (with ``--workers`` engine workers of its own) so that ``peak_rss_mb`` is
   the memory of this step alone: the peak of the summed resident memory of the child and
   its workers, sampled every 10 ms. The time is taken in the child around the call,
   imports excluded (the workers' start is included);
3. ``pandas_s``, the naive way: ``pandas.read_parquet`` of the whole token table (the same
   columns), then the same statistics with ``groupby``: per-step count, mean, eight
   quantiles, near-zero share, completion means and histogram; global quantiles; the
   train-split curve; per-completion position checks; per-step forking thresholds and
   forking counts by token text; per-step covariance of logprob and advantage with its
   rank groups; and planning tokens from the same strategic-gram regex run over each
   completion's text (:func:`naive_pandas`). ``--pandas subset`` times only the first
   group (the per-step statistics and token counts), for comparison.

Prints one JSON line ``{"tokens", "scan_s", "entropylens_s", "pandas_s", "peak_rss_mb"}``
(with ``--json``; otherwise an indented object with a few more fields). Targets at 50M tokens
on 2 cores: entropylens_s <= 3 x scan_s, pandas_s >= 5 x entropylens_s, peak_rss_mb < 1500
and flat from 10M to 50M tokens.

Usage::

    .venv/bin/python benchmarks/report_bench.py --tokens 10000000 --json
    .venv/bin/python benchmarks/report_bench.py --tokens 50000000 --json --workers 1
    .venv/bin/python benchmarks/report_bench.py --tokens 50000000 --json --engine ray
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds

from entropylens.analysis.distribution import DEFAULT_BINS, DISTRIBUTION_QUANTILES
from entropylens.analysis.lexicon import default_lexicon
from entropylens.schema import EOS_TOKENS
from entropylens.engine import WORKERS_ENV, local_workers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_store import VOCAB, make_store  # noqa: E402

#: Token columns read by the report's analyses on a run with exact entropies.
REPORT_COLUMNS = ["step", "split", "sample_id", "position", "token_id", "token", "logprob",
                  "entropy", "advantage"]
RUN = "synthetic"

_CHILD = r"""
import json, sys, threading, time
import psutil
from entropylens.report.collect import collect
from entropylens.store import Store

me = psutil.Process()
peak = [0]
done = threading.Event()

def sample():
    # the child and its engine workers together (Ray's own processes are not children);
    # the process list is read every 0.2 s (reading it every 10 ms cost the workers a tenth
    # of their time on 2 cores), the memory of each process every 10 ms
    processes, listed = [me], 0.0
    while not done.is_set():
        if time.monotonic() - listed > 0.2:
            processes, listed = [me] + me.children(recursive=True), time.monotonic()
        total = 0
        for process in processes:
            try:
                total += process.memory_info().rss
            except psutil.Error:
                pass
        peak[0] = max(peak[0], total)
        done.wait(0.01)

store = Store.open(sys.argv[1])
watcher = threading.Thread(target=sample, daemon=True)
watcher.start()
started = time.perf_counter()
results = collect(store, [sys.argv[2]], engine=sys.argv[3])
seconds = time.perf_counter() - started
done.set()
watcher.join()
failed = {name: part.reason for entry in results.runs for name, part in entry.outcomes.items()
          if not part.ok}
print(json.dumps({"seconds": seconds, "failed": failed, "peak_rss_mb": peak[0] / 2**20}))
"""


def tokens_folder(store: Path) -> Path:
    return store / "runs" / RUN / "tokens"


def bare_scan(folder: Path) -> float:
    """Seconds to stream the report's columns, nothing computed."""
    started = time.perf_counter()
    dataset = ds.dataset(str(folder), format="parquet")
    rows = 0
    for batch in dataset.to_batches(columns=REPORT_COLUMNS, batch_size=256 * 1024):
        rows += batch.num_rows
    return time.perf_counter() - started


def entropylens_child(store: Path, engine: str, workers: int | None) -> dict:
    """Run the report's analyses in a child process; its time and peak memory."""
    env = dict(os.environ)
    if workers is not None:
        env[WORKERS_ENV] = str(workers)
    done = subprocess.run([sys.executable, "-c", _CHILD, str(store), RUN, engine],
                          capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        raise SystemExit(f"entropylens step failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def naive_pandas(folder: Path, *, subset: bool = False) -> float:
    """Seconds for read_parquet of the whole table, then the report's statistics by groupby.

    Written as a pandas user would: whole columns in memory, ``groupby`` for every
    per-step or per-completion figure, a Python loop only where pandas has no vectorised
    form (the regex over each completion's text).
    """
    started = time.perf_counter()
    frame = pd.read_parquet(folder, columns=REPORT_COLUMNS)
    entropy, step = frame["entropy"], frame["step"]
    # summary and distribution: per-step statistics, completion means, histogram, global
    by_step = entropy.groupby(step)
    steps = by_step.agg(["count", "mean"]).join(
        by_step.quantile(list(DISTRIBUTION_QUANTILES)).unstack())
    steps["frac_below_0_01"] = (entropy < 0.01).groupby(step).mean()
    completions = frame.groupby(["step", "sample_id"], sort=False)
    steps["seq_mean"] = completions["entropy"].mean().groupby(level=0).mean()
    counts = frame.groupby("token").size()
    if subset:
        assert len(steps) and len(counts)
        return time.perf_counter() - started
    histogram = pd.cut(entropy, DEFAULT_BINS, include_lowest=True).groupby(step,
                                                                          observed=False).size()
    overall = entropy.quantile(list(DISTRIBUTION_QUANTILES))
    curve = entropy[frame["split"].fillna("train") == "train"].groupby(step).mean()
    # data quality: positions per completion, range checks, end-of-sequence tokens
    positions = completions["position"].agg(["count", "nunique", "min", "max"])
    duplicates = int((positions["count"] - positions["nunique"]).sum())
    out_of_range = int(((entropy < 0) | (entropy > np.log(VOCAB))).sum())
    positive_logprob = int((frame["logprob"] > 0).sum())
    eos = frame["token"].isin(EOS_TOKENS)
    # forking tokens: per-step 80th percentile, then forks and totals by token text
    threshold = step.map(by_step.quantile(0.8))
    frame["fork"] = entropy > threshold
    forks = frame.groupby("token")["fork"].agg(["size", "sum"])
    top = forks.sort_values("sum", ascending=False).head(30)
    # covariance: per-step centred product, its mean and rank groups
    means = frame.groupby("step")[["logprob", "advantage"]].transform("mean")
    frame["cov"] = (frame["logprob"] - means["logprob"]) * (frame["advantage"]
                                                              - means["advantage"])
    groups = frame.groupby("step")["cov"].apply(_rank_groups)
    # roles: decode each completion, run the strategic-gram regex, mark the tokens it covers
    pattern = default_lexicon().pattern
    codes, pieces_of = pd.factorize(frame["token"])   # decode each distinct piece once
    decoded = np.array([_decode(piece) for piece in pieces_of] + [""], dtype=object)[codes]
    planning = np.zeros(len(frame), bool)
    for rows in completions.indices.values():
        pieces = decoded[rows]
        ends = np.cumsum([len(piece) for piece in pieces])
        text = "".join(pieces)
        for match in pattern.finditer(text):
            first = np.searchsorted(ends, match.start(), side="right")
            last = np.searchsorted(ends, match.end() - 1, side="right")
            planning[rows[first:last + 1]] = True
    classes = frame.assign(planning=planning).groupby(["step", "planning"])["entropy"] \
        .agg(["count", "mean"])
    assert len(steps) and len(counts) and len(histogram) and len(overall) and len(curve)
    assert len(positions) and len(top) and len(groups) and len(classes)
    assert duplicates >= 0 and out_of_range >= 0 and positive_logprob >= 0 and eos.sum() >= 0
    return time.perf_counter() - started


def _rank_groups(values: pd.Series) -> list[float]:
    ranked = np.sort(values.dropna().to_numpy())[::-1]
    return [float(ranked[:max(1, int(np.ceil(f * len(ranked))))].mean())
            for f in (0.0002, 0.002, 0.02, 0.2, 0.5, 1.0)]


def _decode(piece):
    return "" if piece is None else piece.replace("Ġ", " ").replace("Ċ", "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--store", default=None,
                        help="Store folder (default /tmp/entropylens_bench_<N>; reused "
                             "when it already holds the run)")
    parser.add_argument("--engine", default="local", choices=["local", "ray"])
    parser.add_argument("--workers", type=int, default=None,
                        help="Engine worker processes of the local engine (default: as "
                             "entropylens chooses, the usable CPUs up to 4)")
    parser.add_argument("--pandas", default="full", choices=["full", "subset", "skip"],
                        help="Naive baseline: the report's statistics (full), the per-step "
                             "statistics and token counts only (subset), or none")
    parser.add_argument("--json", action="store_true", help="One JSON line on stdout.")
    args = parser.parse_args()
    store = Path(args.store or f"/tmp/entropylens_bench_{args.tokens}")
    manifest = store / "runs" / RUN / "manifest.json"
    made = None
    if not manifest.exists() or json.loads(manifest.read_text())["counts"]["tokens"] \
            != args.tokens:
        made = make_store(store, args.tokens)
    scan_s = bare_scan(tokens_folder(store))
    child = entropylens_child(store, args.engine, args.workers)
    pandas_s = None if args.pandas == "skip" else naive_pandas(
        tokens_folder(store), subset=args.pandas == "subset")
    result = {"tokens": args.tokens, "scan_s": round(scan_s, 2),
              "entropylens_s": round(child["seconds"], 2),
              "pandas_s": None if pandas_s is None else round(pandas_s, 2),
              "peak_rss_mb": round(child["peak_rss_mb"], 1)}
    if args.json:
        print(json.dumps(result))
        return
    result.update({"engine": args.engine, "workers": local_workers(args.workers),
                   "pandas": args.pandas, "vs_scan": round(child["seconds"] / scan_s, 2),
                   "pandas_speedup": None if pandas_s is None
                   else round(pandas_s / child["seconds"], 2),
                   "failed_parts": child["failed"], "made_store": made})
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
