"""Cost of one ``watch`` refresh on a large run after one new step.

Makes a synthetic store of ``--tokens`` tokens (``make_store.py``), follows it with a
:class:`entropylens.live.Watcher` whose sources are a token JSONL log and a metrics JSONL
log, and times refreshes that each find one new step of ``--step-tokens`` tokens: the append
(only the new lines are parsed, into a new part file) and the live diagnosis (per-step
statistics of earlier parts come from the cache). ``--full`` also times a full
``entropylens.diagnose`` of the same run for comparison.

Usage::

    .venv/bin/python benchmarks/watch_bench.py --tokens 5000000 --step-tokens 25000 \\
        --out /tmp/watch_bench
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from entropylens import live
from entropylens.store import Store

from make_store import entropies, make_store


def write_step(folder: Path, step: int, tokens: int, rng: np.random.Generator) -> None:
    """Append one step's lines to tokens.jsonl and metrics.jsonl, as a trainer would."""
    per = 200
    with open(folder / "tokens.jsonl", "a") as fh:
        h = entropies(rng, tokens)
        for i in range(tokens):
            fh.write(json.dumps({"step": step, "sample_id": f"s{step}-{i // per}",
                                 "group_id": f"g{step}-{i // (8 * per)}", "position": i % per,
                                 "token_id": int(rng.integers(0, 49152)),
                                 "logprob": float(-h[i] * rng.exponential()),
                                 "entropy": float(h[i])}) + "\n")
    with open(folder / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": step, "policy_entropy": float(h.mean()),
                             "reward_mean": float(rng.random())}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=5_000_000)
    parser.add_argument("--step-tokens", type=int, default=25_000)
    parser.add_argument("--refreshes", type=int, default=3)
    parser.add_argument("--out", default="/tmp/watch_bench")
    parser.add_argument("--full", action="store_true", help="also time a full diagnose")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    made = make_store(out / "store", args.tokens, run="bench")
    print(f"store: {made}")
    logs = out / "logs"
    logs.mkdir()
    rng = np.random.default_rng(1)
    watcher = live.Watcher([logs / "tokens.jsonl", logs / "metrics.jsonl"], out / "store",
                           "bench")
    step = made["steps"]
    write_step(logs, step, args.step_tokens, rng)
    started = time.perf_counter()
    watcher.refresh()  # first refresh: reads the new logs and fills the per-part cache
    print(f"first refresh (cache cold, every part scanned): "
          f"{time.perf_counter() - started:.2f} s")
    times, appends = [], []
    for _ in range(args.refreshes):
        step += 1
        write_step(logs, step, args.step_tokens, rng)
        started = time.perf_counter()
        appended = watcher._append()
        middle = time.perf_counter()
        diagnosis, _ = live.live_diagnosis(Store.open(out / "store"), "bench")
        ended = time.perf_counter()
        assert appended == [step], appended
        appends.append(middle - started)
        times.append(ended - started)
    store = Store.open(out / "store")
    print(f"run: {store.manifest('bench')['counts']['tokens']} tokens, "
          f"{len(list((store.run_dir('bench') / 'tokens').iterdir()))} part files")
    print(f"refresh after one new step of {args.step_tokens} tokens: median "
          f"{statistics.median(times):.3f} s (append {statistics.median(appends):.3f} s, "
          f"diagnosis {statistics.median(times) - statistics.median(appends):.3f} s) "
          f"over {len(times)} refreshes; status {diagnosis.status}")
    if args.full:
        import entropylens as el
        started = time.perf_counter()
        el.diagnose(store, "bench")
        print(f"full diagnose: {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
