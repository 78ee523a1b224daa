"""Helpers of the per-token ingest tests: fixture paths, the real run they were made from."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

import entropylens as el

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "ingest"
SAMPLE_RUN = Path(__file__).resolve().parents[1] / "sample_logs" / "vanilla"


def ingest_one(source, tmp_path, **options):
    """Ingest ``source`` into a fresh store; returns (tokens, sequences, manifest)."""
    store_path = tmp_path / "store"
    runs = el.ingest(source, store_path, run=options.pop("run", "r"), progress=False,
                     **options)
    store = el.open(store_path)
    name = runs[0]
    return (store.read_tokens(name).to_pandas(), store.read_sequences(name).to_pandas(),
            store.manifest(name))


def real_tokens(steps=(0, 1), samples=range(4)):
    """The SmolLM2 run's tokens the fixtures were made from, in generation order."""
    tokens = pd.read_parquet(SAMPLE_RUN / "tokens.parquet")
    tokens = tokens[tokens.step.isin(list(steps)) & tokens.sample_idx.isin(list(samples))]
    return tokens.sort_values(["step", "prompt_idx", "sample_idx", "position"]) \
        .reset_index(drop=True)


def real_sequences(steps=(0, 1), samples=range(4)):
    sequences = pd.read_parquet(SAMPLE_RUN / "sequences.parquet")
    keep = sequences.step.isin(list(steps)) & sequences.sample_idx.isin(list(samples))
    return sequences[keep].sort_values(["step", "prompt_idx", "sample_idx"]) \
        .reset_index(drop=True)
