"""Throughput of ``entropylens.roles`` on the shared SmolLM2 run replicated N times.

Usage: ``.venv/bin/python benchmarks/bench_roles.py [COPIES]`` (default 20, about 2.3M tokens).
Each copy shifts the steps, so the store holds COPIES x 69 steps of real byte-level tokens.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

import entropylens as el
from entropylens.store import Store

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "runs" / "smollm2_grpo_taskB"


def main(copies: int = 20) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        el.ingest(SHARED / "vanilla", Path(tmp) / "src", run="vanilla")
        tokens = Store.open(Path(tmp) / "src").read_tokens("vanilla")
        store = Store.create(Path(tmp) / "big")
        with store.write_run("big") as writer:
            for k in range(copies):
                step = pc.add(tokens.column("step"), pa.scalar(k * 100, pa.int64()))
                writer.write_tokens(tokens.set_column(0, "step", step))
        n = store.manifest("big")["counts"]["tokens"]
        start = time.perf_counter()
        result = el.roles(store, "big")
        seconds = time.perf_counter() - start
        print(f"{n:,} tokens, {len(result.semantic)} steps: {seconds:.2f} s, "
              f"{n / seconds / 1e6:.2f} M tokens/s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
