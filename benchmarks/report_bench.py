"""Benchmark: every analysis of ``entropylens report`` on a synthetic store of N tokens.

Writes (or reuses) a store made by :mod:`make_store` and times, in one process:

1. ``scan_s``, the floor: a bare ``pyarrow.dataset`` scan of the token columns the report
   reads (:data:`REPORT_COLUMNS`), batch by batch, nothing computed;
2. ``entropylens_s``: :func:`entropylens.report.collect.collect`, every analysis of the
   report (summary, policy entropy, phases, saturation fit, distribution, forking tokens,
   roles, covariance, quality) without drawing or writing the report. It runs in a child
   process so that ``peak_rss_mb`` (the child's ``ru_maxrss``) is the memory of this step
   alone; the time is taken in the child around the call, imports excluded;
3. ``pandas_s``, the naive way: ``pandas.read_parquet`` of the whole token table (the same
   columns), then ``groupby`` for the per-step mean, the eight quantiles of the
   distribution, the near-zero fraction, per-sequence means and token counts by text: a
   subset of step 2's work.

Prints one JSON line ``{"tokens", "scan_s", "entropylens_s", "pandas_s", "peak_rss_mb"}``
(with ``--json``; otherwise an indented object with a few more fields). Targets at 50M tokens
on 2 cores: entropylens_s <= 3 x scan_s, pandas_s >= 5 x entropylens_s, peak_rss_mb < 1500
and flat from 10M to 50M tokens.

Usage::

    .venv/bin/python benchmarks/report_bench.py --tokens 10000000 --json
    .venv/bin/python benchmarks/report_bench.py --tokens 50000000 --json --engine ray
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_store import make_store  # noqa: E402

#: Token columns read by the report's analyses on a run with exact entropies.
REPORT_COLUMNS = ["step", "split", "sample_id", "position", "token_id", "token", "logprob",
                  "entropy", "advantage"]
RUN = "synthetic"

_CHILD = r"""
import json, resource, sys, time
from entropylens.report.collect import collect
from entropylens.store import Store
store = Store.open(sys.argv[1])
started = time.perf_counter()
results = collect(store, [sys.argv[2]], engine=sys.argv[3])
seconds = time.perf_counter() - started
failed = {name: part.reason for entry in results.runs for name, part in entry.parts.items()
          if not part.ok}
print(json.dumps({"seconds": seconds, "failed": failed,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
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


def entropylens_child(store: Path, engine: str) -> dict:
    """Run the report's analyses in a child process; its time and peak memory."""
    done = subprocess.run([sys.executable, "-c", _CHILD, str(store), RUN, engine],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"entropylens step failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def naive_pandas(folder: Path) -> float:
    """Seconds for read_parquet of the whole table, then groupby statistics."""
    started = time.perf_counter()
    frame = pd.read_parquet(folder, columns=REPORT_COLUMNS)
    by_step = frame.groupby("step")["entropy"]
    steps = by_step.agg(["count", "mean"])
    steps = steps.join(by_step.quantile([0.1, 0.25, 0.5, 0.75, 0.8, 0.9, 0.95, 0.99])
                       .unstack())
    steps["frac_below_0_01"] = (frame["entropy"] < 0.01).groupby(frame["step"]).mean()
    seq_mean = frame.groupby(["step", "sample_id"])["entropy"].mean().groupby(level=0).mean()
    counts = frame.groupby("token").size().sort_values(ascending=False).head(30)
    assert len(steps) and len(seq_mean) and len(counts)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--store", default=None,
                        help="Store folder (default /tmp/entropylens_bench_<N>; reused "
                             "when it already holds the run)")
    parser.add_argument("--engine", default="local", choices=["local", "ray"])
    parser.add_argument("--skip-pandas", action="store_true")
    parser.add_argument("--json", action="store_true", help="One JSON line on stdout.")
    args = parser.parse_args()
    store = Path(args.store or f"/tmp/entropylens_bench_{args.tokens}")
    manifest = store / "runs" / RUN / "manifest.json"
    made = None
    if not manifest.exists() or json.loads(manifest.read_text())["counts"]["tokens"] \
            != args.tokens:
        made = make_store(store, args.tokens)
    scan_s = bare_scan(tokens_folder(store))
    child = entropylens_child(store, args.engine)
    pandas_s = None if args.skip_pandas else naive_pandas(tokens_folder(store))
    result = {"tokens": args.tokens, "scan_s": round(scan_s, 2),
              "entropylens_s": round(child["seconds"], 2),
              "pandas_s": None if pandas_s is None else round(pandas_s, 2),
              "peak_rss_mb": round(child["peak_rss_mb"], 1)}
    if args.json:
        print(json.dumps(result))
        return
    result.update({"engine": args.engine, "vs_scan": round(child["seconds"] / scan_s, 2),
                   "pandas_speedup": None if pandas_s is None
                   else round(pandas_s / child["seconds"], 2),
                   "failed_parts": child["failed"], "made_store": made})
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
