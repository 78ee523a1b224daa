"""Benchmark: ingest of a large ``openai_chat`` JSONL file with top-20 alternatives.

Generates (in a temporary folder, never the repository) Chat Completions responses with
``logprobs.content[]`` and 20 ``top_logprobs`` per token, as vLLM and OpenAI write them, then
times in this process

1. the floor: plain JSON parsing of every line with ``msgspec.json.decode`` (untyped, the
   parser the reader uses; it builds every object). ``json.loads`` from the standard
   library is timed too and reported as ``stdlib_json_s``;
2. ``entropylens.ingest`` of the file into a fresh store, in a child process so that its
   peak resident memory is measured on its own (``ru_maxrss`` of the child; the time is
   taken inside the child around the ingest call, imports excluded).

Prints one JSON object: ``mb``, ``tokens``, ``json_parse_s``, ``ingest_s``, ``ratio``
(ingest / floor), ``tokens_per_s``, ``peak_rss_mb`` and a few more. Targets: ratio <= 2,
peak memory under 1 GB.

Usage::

    .venv/bin/python benchmarks/ingest_bench.py            # 1000 MB (takes minutes)
    .venv/bin/python benchmarks/ingest_bench.py --mb 50    # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: A small vocabulary with multi-byte and partial-UTF-8 tokens, as real logs have.
WORDS = [" the", " a", " of", " to", "ing", " and", " is", " =", " 1", " 2", " 3", " +", "\n",
         " Let", " x", " wait", " answer", " so", ".", ",", " we", " number", " apples", "é",
         " 数", "学", " 🙂", "\\xe6\\x95", " Therefore", " check", " step", ":", " total"]
WORD_BYTES = {w: list(w.encode("utf-8")) for w in WORDS}
WORD_BYTES["\\xe6\\x95"] = [230, 149]


def generate(path: Path, megabytes: float, top_k: int = 20, seed: int = 0) -> int:
    """Write Chat Completions responses until the file holds ``megabytes`` MB; returns the
    number of tokens written."""
    rng = random.Random(seed)
    target = int(megabytes * 1_000_000)
    written = tokens = 0
    response = 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < target:
            content = []
            text = []
            for _ in range(rng.randint(100, 600)):
                alternatives = []
                total = 0.0
                for rank in range(top_k):
                    word = WORDS[rng.randrange(len(WORDS))]
                    logprob = -abs(rng.gauss(0.0, 1.5)) - 0.6 * rank
                    alternatives.append((logprob, word))
                alternatives.sort(key=lambda a: -a[0])
                logprob, word = alternatives[0] if rng.random() < 0.8 else \
                    alternatives[rng.randrange(top_k)]
                text.append(word)
                total += 1
                content.append({
                    "token": word, "logprob": round(logprob, 7), "bytes": WORD_BYTES[word],
                    "top_logprobs": [{"token": w, "logprob": round(lp, 7),
                                      "bytes": WORD_BYTES[w]} for lp, w in alternatives]})
            tokens += len(content)
            record = {
                "id": f"chatcmpl-{response:08d}", "object": "chat.completion",
                "created": 1750000000 + response, "model": "bench-model",
                "choices": [{"index": 0,
                             "message": {"role": "assistant", "content": "".join(text)},
                             "logprobs": {"content": content}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 20, "completion_tokens": len(content),
                          "total_tokens": 20 + len(content)}}
            line = json.dumps(record, ensure_ascii=False) + "\n"
            fh.write(line)
            written += len(line.encode("utf-8"))
            response += 1
    return tokens


def parse_floor(path: Path) -> float:
    """Seconds to parse every line with msgspec's untyped JSON decoder."""
    import msgspec

    decode = msgspec.json.decode
    start = time.perf_counter()
    with open(path, "rb") as fh:
        for line in fh:
            decode(line)
    return time.perf_counter() - start


def stdlib_floor(path: Path) -> float:
    """Seconds to parse every line with ``json.loads``."""
    start = time.perf_counter()
    with open(path, "rb") as fh:
        for line in fh:
            json.loads(line)
    return time.perf_counter() - start


_CHILD = """
import json, resource, sys, time
import entropylens as el
source, store = sys.argv[1], sys.argv[2]
start = time.perf_counter()
el.ingest(source, store, run="bench", progress=False)
seconds = time.perf_counter() - start
tokens = el.open(store).manifest("bench")["counts"]["tokens"]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"ingest_s": seconds, "tokens": tokens, "peak_rss_mb": peak}))
"""


def ingest_child(path: Path, store: Path) -> dict:
    """Run the ingest in a fresh interpreter; returns its time, token count and peak RSS."""
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(store)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=1000.0, help="file size in MB")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="temporary folder (default: a new one in the system temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="entropylens-bench-", dir=args.workdir))
    try:
        source = workdir / "responses.jsonl"
        t0 = time.perf_counter()
        generated_tokens = generate(source, args.mb, args.top_k)
        generate_s = time.perf_counter() - t0
        size_mb = source.stat().st_size / 1e6
        floor = parse_floor(source)
        stdlib = stdlib_floor(source)
        child = ingest_child(source, workdir / "store")
        assert child["tokens"] == generated_tokens, (child["tokens"], generated_tokens)
        result = {
            "mb": round(size_mb, 1),
            "tokens": child["tokens"],
            "top_k": args.top_k,
            "json_parse_s": round(floor, 2),
            "parser": "msgspec.json.decode (untyped)",
            "stdlib_json_s": round(stdlib, 2),
            "ingest_s": round(child["ingest_s"], 2),
            "ratio": round(child["ingest_s"] / floor, 2),
            "ratio_vs_stdlib_json": round(child["ingest_s"] / stdlib, 2),
            "tokens_per_s": round(child["tokens"] / child["ingest_s"]),
            "peak_rss_mb": round(child["peak_rss_mb"], 1),
            "generate_s": round(generate_s, 1),
            "cpus": os.cpu_count(),
        }
        print(json.dumps(result))
        return result
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
