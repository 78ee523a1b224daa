"""Write a synthetic entropylens store of N tokens, quickly, with a realistic shape.

The run looks like a GRPO training log: steps of varying size (0.5x to 1.5x the mean), groups
of 8 completions per prompt with lognormal lengths (about 20 to 2,000 tokens), token
entropies of which about half lie below 0.01 nats (arXiv 2506.01939 reports 50.6 % for
Qwen3-8B) and the rest follow a long lognormal tail capped at ln(vocab), the sampled token's
log-probability, a per-completion advantage (so the covariance runs), Zipf-distributed token
ids with tokenizer-style pieces (so forking tokens and roles run), per-step metrics
(policy_entropy, reward_mean) and a sequences table. Everything is vectorised numpy, written
part by part through :meth:`entropylens.store.Store.write_run`.

Usage::

    .venv/bin/python benchmarks/make_store.py --tokens 10000000 --out /tmp/bench_store
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from entropylens.store import Store

VOCAB = 49_152
#: Tokens written per call of write_tokens (the writer cuts part files at 1M rows).
CHUNK = 1_000_000
GROUP = 8
WORDS = ["Ġthe", "Ġis", "Ġwe", "Ġso", "Ġnumber", "Ġanswer", "Ġfirst", "Ġthen", "ĠWait",
         "Ġlet", "Ġcheck", "Ġtherefore", "Ġhowever", "Ġmaybe", "Ġcompute", "Ġstep", "Ġtotal",
         "Ġapples", "Ġhas", "Ġgets", "Ġmore", "Ġequals", "Ġresult", "Ġbut", "Ġactually"]
PUNCT = [",", ".", "Ġ=", "Ġ+", ":", "!", "?", "(", ")", "Ċ", "ĊĊ", "Ġ"]


def vocabulary(size: int = VOCAB) -> pa.Array:
    """Token pieces by id: common words, punctuation, digits, then generic word pieces."""
    pieces = WORDS + PUNCT + [f"Ġ{d}" for d in range(10)] + [str(d) for d in range(10)]
    pieces += [f"Ġw{i}" if i % 3 else f"p{i}" for i in range(len(pieces), size)]
    return pa.array(pieces[:size], pa.string())


def entropies(rng: np.random.Generator, n: int) -> np.ndarray:
    """Half near-deterministic (log-uniform in [1e-6, 1e-2)), half a long lognormal tail."""
    low = rng.random(n) < 0.5
    values = np.empty(n, dtype=np.float64)
    k = int(low.sum())
    values[low] = 10.0 ** rng.uniform(-6, -2, k)
    values[~low] = np.minimum(np.exp(rng.normal(-0.6, 1.2, n - k)) + 0.01, np.log(VOCAB))
    return values


def plan_sequences(rng: np.random.Generator, tokens: int, steps: int):
    """(step, sequence length) of every completion, in step order, summing to ``tokens``."""
    weights = rng.uniform(0.5, 1.5, steps)
    step_tokens = np.floor(weights / weights.sum() * tokens).astype(np.int64)
    step_tokens[-1] += tokens - step_tokens.sum()
    seq_steps, lengths = [], []
    for step, budget in enumerate(step_tokens.tolist()):
        mean_len = max(20.0, min(400.0, budget / GROUP / 4))
        drawn = np.clip(rng.lognormal(np.log(mean_len), 0.7, int(budget / mean_len * 2) + 8),
                        20, 2000).astype(np.int64)
        cut = np.searchsorted(np.cumsum(drawn), budget)
        drawn = drawn[:cut + 1]
        drawn[-1] = budget - drawn[:-1].sum()
        drawn = drawn[drawn > 0]
        seq_steps.append(np.full(len(drawn), step, dtype=np.int64))
        lengths.append(drawn)
    return np.concatenate(seq_steps), np.concatenate(lengths)


def make_store(out: str | Path, tokens: int, *, steps: int | None = None, seed: int = 0,
               run: str = "synthetic", replace: bool = True) -> dict:
    """Write run ``run`` of ``tokens`` tokens into the store at ``out`` (created if needed).

    Returns
    -------
    dict
        ``tokens``, ``steps``, ``sequences``, ``seconds``.
    """
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    steps = steps or int(np.clip(tokens // 200_000, 10, 400))
    out = Path(out)
    store = Store.open(out) if (out / "store.json").exists() else Store.create(out)
    seq_step, seq_len = plan_sequences(rng, tokens, steps)
    nseq = len(seq_len)
    sample_ids = pa.array([f"{i:09d}" for i in range(nseq)], pa.string())
    groups = pa.array([f"g{i // GROUP:08d}" for i in range(nseq)], pa.string())
    seq_adv = rng.normal(0.0, 1.0, nseq).astype(np.float32)
    seq_start = np.concatenate([[0], np.cumsum(seq_len)[:-1]])
    vocab = vocabulary()
    zipf_ids = None
    with store.write_run(run, replace=replace) as writer:
        writer.manifest.update({"vocab_size": VOCAB, "temperature": 1.0,
                                "logprob_basis": "sampling"})
        for lo in range(0, tokens, CHUNK):
            hi = min(tokens, lo + CHUNK)
            first = int(np.searchsorted(seq_start, lo, side="right") - 1)
            last = int(np.searchsorted(seq_start, hi, side="left"))
            rows = np.arange(lo, hi)
            seq = np.repeat(np.arange(first, last), np.diff(np.clip(
                np.concatenate([seq_start[first:last], [hi]]), lo, hi)))
            n = hi - lo
            h = entropies(rng, n)
            zipf_ids = np.minimum(rng.zipf(1.2, n) - 1, VOCAB - 1)
            # the sampled token's logprob: near 0 where the entropy is near 0
            logprob = -(h * rng.exponential(1.0, n)).astype(np.float32)
            seq_index = pa.array(seq)
            writer.write_tokens(pa.table({
                "step": pa.array(seq_step[seq]),
                "sample_id": sample_ids.take(seq_index),
                "group_id": groups.take(seq_index),
                "position": pa.array((rows - seq_start[seq]).astype(np.int32)),
                "token_id": pa.array(zipf_ids.astype(np.int64)),
                "token": vocab.take(pa.array(zipf_ids)),
                "logprob": pa.array(logprob),
                "entropy": pa.array(h.astype(np.float32)),
                "advantage": pa.array(seq_adv[seq]),
            }))
        reward = rng.random(nseq) < np.clip(0.2 + 0.6 * seq_step / steps, 0, 1)
        writer.write_sequences(pa.table({
            "step": pa.array(seq_step), "sample_id": sample_ids, "group_id": groups,
            "reward": pa.array(reward.astype(np.float64)),
            "advantage": pa.array(seq_adv.astype(np.float64)),
            "num_tokens": pa.array(seq_len)}))
        step_axis = np.arange(steps)
        entropy_curve = 0.3 + 0.7 * np.exp(-step_axis / max(1, steps / 5))
        reward_curve = np.bincount(seq_step, weights=reward, minlength=steps) / np.maximum(
            np.bincount(seq_step, minlength=steps), 1)
        metric_steps = np.concatenate([step_axis, step_axis])
        writer.write_metrics(pa.table({
            "step": pa.array(metric_steps),
            "metric": pa.array(["policy_entropy"] * steps + ["reward_mean"] * steps),
            "value": pa.array(np.concatenate([entropy_curve, reward_curve])),
            "raw_key": pa.array(["actor/entropy"] * steps + ["critic/score/mean"] * steps)}))
    return {"tokens": tokens, "steps": steps, "sequences": int(nseq),
            "seconds": round(time.perf_counter() - started, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run", default="synthetic")
    args = parser.parse_args()
    print(make_store(args.out, args.tokens, steps=args.steps, seed=args.seed, run=args.run))


if __name__ == "__main__":
    main()
