"""Benchmark: entropylens against DuckDB and Polars on the same work, in one run.

On one synthetic store (:mod:`make_store`) this times, each as a whole process (start-up,
imports and worker processes included, as a user pays them), with the peak resident memory
of the process and its children sampled every 10 ms:

1. ``scan``: a bare ``pyarrow.dataset`` scan of the columns the subset reads, nothing
   computed (the floor); ``report_scan`` the same for the columns the report reads
   (:data:`report_bench.REPORT_COLUMNS`), the report's floor;
2. ``entropylens_subset``: ``entropylens summary STORE --json`` then ``entropylens forks
   STORE --json``: per-step count, mean, quantiles and share below 0.01, per-completion means,
   per-step 80th-percentile thresholds with forking counts by token text (and the data-quality
   checks, which the peers do not do);
3. ``duckdb_subset`` and ``polars_subset``: the same statistics written as a user of each
   would write them (:data:`DUCKDB_SQL`, :func:`polars_subset`): per-step count, mean, eight
   quantiles and share below 0.01, per-completion means, per-step 80th-percentile thresholds
   with forking counts by token text, and eight global quantiles;
4. ``entropylens_report``: every analysis of ``entropylens report`` (as
   :mod:`report_bench` times it, drawing excluded).

Tokens marked after the end of their sequence are left out everywhere, as entropylens does by
default. DuckDB and Polars are benchmark-only extras (``pip install -e '.[bench]'``).

Usage::

    .venv/bin/python benchmarks/peers_bench.py --tokens 5000000
    .venv/bin/python benchmarks/peers_bench.py --tokens 50000000 --repeat 1 --json

Prints seconds, peak MB and the ratios ``vs_scan`` (seconds over the scan's) and
``vs_best_peer`` (the faster of DuckDB and Polars over entropylens: above 1, entropylens is
faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_store import make_store  # noqa: E402
from report_bench import REPORT_COLUMNS, RUN, entropylens_child  # noqa: E402

from entropylens.analysis.distribution import DISTRIBUTION_QUANTILES  # noqa: E402

QUANTILES = list(DISTRIBUTION_QUANTILES)
SUBSET_COLUMNS = ["step", "sample_id", "token", "entropy", "after_eos"]

#: A bare scan of the given columns (a JSON list in argv[2]), nothing computed.
SCAN = """
import json, sys, pyarrow.dataset as ds
rows = 0
for batch in ds.dataset(sys.argv[1], format="parquet").to_batches(
        columns=json.loads(sys.argv[2]), batch_size=256 * 1024):
    rows += batch.num_rows
print(rows)
"""

#: The subset in DuckDB's SQL, as its users would write it.
DUCKDB_SQL = """
CREATE TEMP VIEW t AS
    SELECT step, sample_id, token, entropy FROM read_parquet('{folder}/*.parquet')
    WHERE NOT coalesce(after_eos, false);
CREATE TEMP TABLE per_step AS
    SELECT step, count(*) AS tokens, avg(entropy) AS mean,
           quantile_cont(entropy, {quantiles}) AS quantiles,
           avg((entropy < 0.01)::INT) AS below_0_01
    FROM t GROUP BY step;
CREATE TEMP TABLE per_completion AS
    SELECT step, avg(m) AS seq_mean
    FROM (SELECT step, sample_id, avg(entropy) AS m FROM t GROUP BY step, sample_id)
    GROUP BY step;
CREATE TEMP TABLE forks AS
    WITH th AS (SELECT step, quantile_cont(entropy, 0.8) AS q FROM t GROUP BY step)
    SELECT token, count(*) AS n, sum((entropy > q)::INT) AS forking
    FROM t JOIN th USING (step) GROUP BY token ORDER BY forking DESC LIMIT 30;
CREATE TEMP TABLE overall AS SELECT quantile_cont(entropy, {quantiles}) AS q FROM t;
"""

DUCKDB = """
import sys, duckdb
con = duckdb.connect()
con.execute("SET threads = %d" % int(sys.argv[2]))
con.execute(sys.argv[3].format(folder=sys.argv[1], quantiles=sys.argv[4]))
assert con.execute("SELECT count(*) FROM per_step").fetchone()[0] > 0
assert con.execute("SELECT count(*) FROM forks").fetchone()[0] > 0
"""

#: The subset as a Polars lazy query.
POLARS = """
import sys, json, polars as pl
quantiles = json.loads(sys.argv[2])
t = (pl.scan_parquet(sys.argv[1] + "/*.parquet")
     .filter(~pl.col("after_eos").fill_null(False))
     .select("step", "sample_id", "token", "entropy"))
per_step = t.group_by("step").agg(
    pl.len().alias("tokens"), pl.col("entropy").mean().alias("mean"),
    *[pl.col("entropy").quantile(q, "linear").alias(f"q{q}") for q in quantiles],
    (pl.col("entropy") < 0.01).mean().alias("below_0_01"))
per_completion = (t.group_by("step", "sample_id").agg(pl.col("entropy").mean().alias("m"))
                  .group_by("step").agg(pl.col("m").mean()))
thresholds = t.group_by("step").agg(pl.col("entropy").quantile(0.8, "linear").alias("q"))
forks = (t.join(thresholds, on="step")
         .group_by("token").agg(pl.len().alias("n"),
                                (pl.col("entropy") > pl.col("q")).sum().alias("forking"))
         .sort("forking", descending=True).head(30))
overall = t.select(*[pl.col("entropy").quantile(q, "linear").alias(f"q{q}")
                     for q in quantiles])
frames = pl.collect_all([per_step, per_completion, forks, overall])
assert all(frame.height for frame in frames)
"""


def timed(command: list[str], env: dict | None = None) -> tuple[float, float]:
    """Seconds of ``command`` as a whole process, and the peak resident MB of it and its
    children (sampled every 10 ms)."""
    peak, done = [0], threading.Event()
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=env)
    watched = psutil.Process(process.pid)

    def sample():
        while not done.is_set():
            try:
                total = sum(p.memory_info().rss for p in
                            [watched, *watched.children(recursive=True)])
                peak[0] = max(peak[0], total)
            except psutil.Error:
                pass
            done.wait(0.01)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    _, stderr = process.communicate()
    seconds = time.perf_counter() - started
    done.set()
    watcher.join()
    if process.returncode:
        raise SystemExit(f"{' '.join(command[:4])} failed:\n{stderr.decode()[-3000:]}")
    return seconds, peak[0] / 2**20


def entropylens_subset(store: Path, workers: int | None) -> tuple[float, float]:
    """``entropylens summary`` then ``entropylens forks``, as two commands."""
    cli = [sys.executable, "-m", "entropylens.cli"]
    extra = ["--workers", str(workers)] if workers else []
    first = timed([*cli, "summary", str(store), "--json", *extra])
    second = timed([*cli, "forks", str(store), "--json", *extra])
    return first[0] + second[0], max(first[1], second[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--store", default=None,
                        help="Store folder (default /tmp/entropylens_bench_<N>; reused)")
    parser.add_argument("--threads", type=int, default=2,
                        help="Threads of DuckDB and Polars, workers of entropylens")
    parser.add_argument("--repeat", type=int, default=3, help="Runs of each; medians kept")
    parser.add_argument("--skip-report", action="store_true",
                        help="Leave out the full report")
    parser.add_argument("--json", action="store_true", help="One JSON line on stdout.")
    args = parser.parse_args()
    store = Path(args.store or f"/tmp/entropylens_bench_{args.tokens}")
    manifest = store / "runs" / RUN / "manifest.json"
    if not manifest.exists() or json.loads(manifest.read_text())["counts"]["tokens"] \
            != args.tokens:
        make_store(store, args.tokens)
    folder = str(store / "runs" / RUN / "tokens")
    env = {**os.environ, "POLARS_MAX_THREADS": str(args.threads)}
    runs: dict[str, list[tuple[float, float]]] = {}
    for _ in range(args.repeat):   # interleaved, so that a busy moment hits every tool
        runs.setdefault("scan", []).append(timed([sys.executable, "-c", SCAN, folder,
                                                  json.dumps(SUBSET_COLUMNS)]))
        runs.setdefault("entropylens_subset", []).append(
            entropylens_subset(store, args.threads))
        runs.setdefault("duckdb_subset", []).append(timed(
            [sys.executable, "-c", DUCKDB, folder, str(args.threads), DUCKDB_SQL,
             "[" + ", ".join(map(str, QUANTILES)) + "]"]))
        runs.setdefault("polars_subset", []).append(timed(
            [sys.executable, "-c", POLARS, folder, json.dumps(QUANTILES)], env=env))
        if not args.skip_report:
            runs.setdefault("report_scan", []).append(timed(
                [sys.executable, "-c", SCAN, folder, json.dumps(REPORT_COLUMNS)]))
            child = entropylens_child(store, "local", args.threads)
            runs.setdefault("entropylens_report", []).append(
                (child["seconds"], child["peak_rss_mb"]))
    result = {"tokens": args.tokens, "threads": args.threads, "repeat": args.repeat}
    for name, values in runs.items():
        result[f"{name}_s"] = round(statistics.median(v[0] for v in values), 2)
        result[f"{name}_peak_mb"] = round(max(v[1] for v in values), 1)
    scan = result["scan_s"]
    best_peer = min(result["duckdb_subset_s"], result["polars_subset_s"])
    result["subset_vs_scan"] = round(result["entropylens_subset_s"] / scan, 2)
    result["subset_vs_best_peer"] = round(best_peer / result["entropylens_subset_s"], 2)
    if "entropylens_report_s" in result:
        # against a bare scan of the columns the report reads, as the subset's against its own
        result["report_vs_scan"] = round(result["entropylens_report_s"]
                                         / result["report_scan_s"], 2)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
