"""Shared pieces of the hardening tests: hypothesis profiles, seed files, mutations, checks.

Profiles: ``default`` keeps the whole hardening set to about a minute on two cores; ``long``
(``ENTROPYLENS_HYPOTHESIS_PROFILE=long``) tries many more examples per format and also runs
the 100 MB single-line case at full size.

Every seed is a small real file (or a real file's first records) of one registered format;
the mutations turn it into the kinds of broken input that crashed jobs and mixed framework
versions leave behind. :func:`check_outcome` states the contract: an ingest either leaves a
valid store or raises an :class:`~entropylens.errors.EntropylensError` that names the file,
and in both cases the runs already in the store are untouched.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import entropylens as el
from entropylens.errors import EntropylensError
from entropylens.schema import SENTINEL_LOGPROB, SEQUENCE_SCHEMA, TOKEN_SCHEMA

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
SAMPLES = FIXTURES / "samples"   # real excerpts, copied from ../shared/samples
SAMPLE_RUN = REPO / "sample_logs" / "vanilla"

settings.register_profile(
    "default", max_examples=12, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.data_too_large])
settings.register_profile(
    "long", max_examples=400, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.data_too_large])
PROFILE = os.environ.get("ENTROPYLENS_HYPOTHESIS_PROFILE", "default")
settings.load_profile(PROFILE)
LONG = PROFILE == "long"


# -- seeds -----------------------------------------------------------------------------------
def _lines(path: Path, n: int) -> bytes:
    with open(path, "rb") as fh:
        return b"".join(fh.readline() for _ in range(n))


def _token_frame(rows: int = 40):
    import pandas as pd

    tokens = pd.read_parquet(SAMPLE_RUN / "tokens.parquet")
    tokens = tokens[(tokens.step <= 1) & (tokens.sample_idx < 2) & (tokens.prompt_idx < 1)]
    return tokens.head(rows).reset_index(drop=True)


def _parquet_bytes(frame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _tensorboard_bytes() -> bytes:
    import tempfile

    from tensorboardX import SummaryWriter

    with tempfile.TemporaryDirectory() as folder:
        writer = SummaryWriter(folder)
        metrics = _lines(SAMPLE_RUN / "metrics.csv", 9).decode().splitlines()
        header = metrics[0].split(",")
        for line in metrics[1:]:
            values = dict(zip(header, line.split(",")))
            for key in ("entropy", "reward", "val_acc"):
                if values[key]:
                    writer.add_scalar(f"train/{key}", float(values[key]), int(values["step"]))
        writer.close()
        (event,) = Path(folder).glob("events.out.tfevents.*")
        return event.read_bytes()


def _seed_table_tokens_csv() -> bytes:
    frame = _token_frame()
    return frame.drop(columns=["top_ids", "top_logprobs"], errors="ignore") \
        .to_csv(index=False).encode()


def _seed_trainer_state() -> bytes:
    state = json.loads((FIXTURES / "metrics" / "trainer_state.json").read_text())
    state["log_history"] = state["log_history"][:6]
    return json.dumps(state, indent=2).encode()


#: name -> (format, file name, bytes factory). File names are the ones producers write, so
#: auto-detection sees what it sees in the field.
SEEDS = {
    "table_tokens_csv": ("table", "tokens.csv", _seed_table_tokens_csv),
    "table_tokens_parquet": ("table", "tokens.parquet",
                             lambda: _parquet_bytes(_token_frame())),
    "table_metrics_csv": ("table", "metrics.csv",
                          lambda: _lines(SAMPLE_RUN / "metrics.csv", 9)),
    "openai_chat": ("openai_chat", "chat.jsonl",
                    lambda: (FIXTURES / "ingest/openai/unicode_chat.jsonl").read_bytes()),
    "openai_chat_json": ("openai_chat", "responses.json",
                         lambda: (SAMPLES / "openai_chat_completion_logprobs.json").read_bytes()),
    "openai_completion": ("openai_completion", "completion.jsonl",
                          lambda: (FIXTURES / "ingest/openai/vllm_completion.jsonl").read_bytes()),
    "sglang_native": ("sglang_native", "generate.jsonl",
                      lambda: _lines(FIXTURES / "ingest/sglang/generate.jsonl", 1)),
    "vllm_offline": ("vllm_offline", "outputs.jsonl",
                     lambda: _lines(FIXTURES / "ingest/vllm/outputs.jsonl", 1)),
    "vllm_offline_repr": ("vllm_offline", "logprobs.txt",
                          lambda: (SAMPLES / "vllm_offline_logprobs_repr.txt").read_bytes()),
    "nemo_rl": ("nemo_rl", "train_data_step1.jsonl",
                lambda: _lines(FIXTURES / "ingest/nemo_rl/train_data_step1.jsonl", 1)),
    "prime_rl": ("prime_rl", "token_exports/step_0/rank_0.jsonl",
                 lambda: _lines(FIXTURES / "ingest/prime_rl/token_exports/step_0/rank_0.jsonl",
                                1)),
    "trl_completions": ("trl_completions", "completions/completions_00001.parquet",
                        lambda: (FIXTURES / "ingest/trl/completions/completions_00001.parquet")
                        .read_bytes()),
    "verl_rollout": ("verl_rollout", "rollout/1.jsonl",
                     lambda: _lines(FIXTURES / "ingest/verl_rollout/rollout/1.jsonl", 2)),
    "hf_console": ("hf_console", "console.txt",
                   lambda: (SAMPLES / "trl_grpo_console_logs.txt").read_bytes()),
    "hf_trainer": ("hf_trainer", "trainer_state.json", _seed_trainer_state),
    "ms_swift": ("ms_swift", "logging.jsonl",
                 lambda: (SAMPLES / "ms_swift_grpo_logging.jsonl").read_bytes()),
    "verl_console": ("verl_console", "train.log",
                     lambda: (SAMPLES / "verl_console_metrics_quickstart.log").read_bytes()),
    "verl_jsonl": ("verl_jsonl", "metrics.jsonl",
                   lambda: _lines(FIXTURES / "metrics/verl_filelogger.jsonl", 4)),
    "wandb": ("wandb", "history.csv",
              lambda: _lines(FIXTURES / "metrics/wandb_history_hf_trainer.csv", 8)),
    "wandb_panel": ("wandb_panel", "panel.csv",
                    lambda: _lines(FIXTURES / "metrics/wandb_panel_train_entropy.csv", 8)),
    "tensorboard": ("tensorboard", "events.out.tfevents.1.host", _tensorboard_bytes),
    "tree_json": ("tree-json", "trees.jsonl",
                  lambda: _lines(REPO / "sample_logs" / "kg_mcts" / "trees.jsonl", 2)),
    "tree_table": ("tree-table", "nodes.csv",
                   lambda: b"tree_id,step,node_id,parent_id,prior,visits\n"
                           b"t,3,r,,,2\nt,3,a,r,0.5,1\nt,3,b,r,0.5,1\nu,3,r,,,1\nu,3,a,r,1.0,1\n"),
    "graph_episodes": ("graph-episodes", "walks.jsonl", lambda: json.dumps(
        {"episode_id": "e1", "step": 2, "reward": 1.0, "hops": [
            {"node": "Paris", "candidates": ["Berlin", "Rome"], "logprobs": [-0.1, -2.4],
             "chosen": "Berlin"},
            {"node": "Berlin", "candidates": ["Warsaw"], "logprobs": [-0.01], "chosen": 0}]}
    ).encode() + b"\n"),
    "slime": ("slime", "rollout_data_0.pt",
              lambda: (FIXTURES / "ingest/slime/rollout_data_0.pt").read_bytes()),
}

_SEED_CACHE: dict[str, bytes] = {}


def seed_bytes(name: str) -> bytes:
    """The seed file's bytes (built once per session)."""
    if name not in _SEED_CACHE:
        _SEED_CACHE[name] = SEEDS[name][2]()
    return _SEED_CACHE[name]


def write_seed(folder: Path, name: str, data: bytes) -> Path:
    """Write ``data`` under ``folder`` with the seed's file name (and a STABLE marker for
    prime-rl step folders); returns the path to ingest."""
    path = folder / SEEDS[name][1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if name == "prime_rl":
        (path.parent / "STABLE").touch()
    return path


# -- hostile values and mutations ------------------------------------------------------------
#: Values that logs really contain where a number or a string is expected.
HOSTILE_VALUES = [None, "", "oops", "NaN", "-inf", -9999, -9999.0, float("nan"), float("inf"),
                  float("-inf"), 1e308, -1e308, -1, 0, 2 ** 63, -(2 ** 63) - 1, True, [], {},
                  [None], [1, 2, 3], {"a": 1}, "token_id:abc", "<script>alert(1)</script>",
                  "\u0000", "\ud83d", "数学 🙂", 3.5]
#: Strings a CSV cell can hold instead of a number.
HOSTILE_CELLS = ["", "nan", "NaN", "inf", "-inf", "-9999", "1e999", "abc", "1,5", "\"",
                 "\x00", "<b>x</b>", "None", "-0", "99999999999999999999999"]


def _json_dumps(value) -> str:
    # allow_nan: the literal NaN/Infinity that Python's json writes is what real logs hold
    return json.dumps(value, allow_nan=True, ensure_ascii=False)


def _nodes(obj, path=()):
    """Every (path, value) inside a JSON value."""
    yield path, obj
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _nodes(value, path + (key,))
    elif isinstance(obj, list):
        for i, value in enumerate(obj[:50]):
            yield from _nodes(value, path + (i,))


def _parent(obj, path):
    for key in path[:-1]:
        obj = obj[key]
    return obj


@st.composite
def json_mutation(draw, records: list):
    """Mutate one node of one JSON record: wrong type, missing or extra field, bad number,
    list of the wrong length. Returns the mutated records."""
    records = json.loads(json.dumps(records))
    index = draw(st.integers(0, len(records) - 1))
    nodes = [p for p, _ in _nodes(records[index]) if p]
    if not nodes:
        return records
    path = draw(st.sampled_from(nodes))
    parent = _parent(records[index], path)
    key = path[-1]
    action = draw(st.sampled_from(["replace", "delete", "extra", "shorten", "lengthen"]))
    if action == "replace":
        parent[key] = draw(st.sampled_from(HOSTILE_VALUES))
    elif action == "delete":
        del parent[key]
    elif action == "extra":
        target = parent if isinstance(parent, dict) else records[index]
        if isinstance(target, dict):
            target[draw(st.sampled_from(["extra", "token", "logprob", "step", "__proto__"]))] = \
                draw(st.sampled_from(HOSTILE_VALUES))
    else:
        value = parent[key]
        if isinstance(value, list) and value:
            if action == "shorten":
                parent[key] = value[:draw(st.integers(0, len(value) - 1))]
            else:
                parent[key] = value + value[:draw(st.integers(1, len(value)))]
        else:
            parent[key] = draw(st.sampled_from(HOSTILE_VALUES))
    return records


def split_json(data: bytes):
    """(records, is_jsonl) of a JSON or JSONL seed, or None when it is neither."""
    text = data.decode("utf-8")
    try:
        return [json.loads(text)], False
    except ValueError:
        pass
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()], True
    except ValueError:
        return None


def join_json(records, jsonl: bool) -> bytes:
    if jsonl:
        return ("\n".join(_json_dumps(r) for r in records) + "\n").encode("utf-8", "surrogatepass")
    return _json_dumps(records[0]).encode("utf-8", "surrogatepass")


@st.composite
def byte_mutation(draw, data: bytes):
    """Truncate, flip, insert (invalid UTF-8, NUL, CR), delete or duplicate bytes."""
    action = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "duplicate_line",
                                   "empty", "crlf"]))
    if action == "empty":
        return b""
    if action == "crlf":
        return data.replace(b"\n", b"\r\n")
    if action == "truncate":
        return data[:draw(st.integers(0, max(len(data) - 1, 0)))]
    if action == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] ^= draw(st.integers(1, 255))
        return bytes(out)
    if action == "insert":
        i = draw(st.integers(0, len(data)))
        junk = draw(st.sampled_from([b"\xff\xfe", b"\xc3", b"\x00", b"\r", b"\n\n",
                                     b"\xed\xa0\x80", b"\n{\"a\": 1}\n", b"\n,,,\n"]))
        return data[:i] + junk + data[i:]
    if action == "delete":
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        j = draw(st.integers(i, min(len(data), i + 64)))
        return data[:i] + data[j:]
    lines = data.splitlines(keepends=True)
    if not lines:
        return data
    i = draw(st.integers(0, len(lines) - 1))
    return b"".join(lines[:i + 1] + [lines[i]] + lines[i + 1:])


@st.composite
def csv_mutation(draw, data: bytes):
    """Replace cells with hostile strings, drop a column, or duplicate a row of a CSV seed."""
    rows = list(csv.reader(io.StringIO(data.decode("utf-8"))))
    header, body = rows[0], rows[1:]
    action = draw(st.sampled_from(["cells", "drop_column", "duplicate_row", "ragged"]))
    if action == "cells" and body:
        for _ in range(draw(st.integers(1, 4))):
            r = draw(st.integers(0, len(body) - 1))
            c = draw(st.integers(0, len(body[r]) - 1))
            body[r][c] = draw(st.sampled_from(HOSTILE_CELLS))
    elif action == "drop_column":
        c = draw(st.integers(0, len(header) - 1))
        header = header[:c] + header[c + 1:]
        body = [row[:c] + row[c + 1:] for row in body]
    elif action == "duplicate_row" and body:
        r = draw(st.integers(0, len(body) - 1))
        body.insert(r, list(body[r]))
    elif body:
        r = draw(st.integers(0, len(body) - 1))
        body[r] = body[r][:-1] if draw(st.booleans()) else body[r] + ["1"]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([header] + body)
    return out.getvalue().encode("utf-8", "surrogatepass")


@st.composite
def parquet_mutation(draw, data: bytes):
    """Rewrite a Parquet seed with a column dropped, retyped, filled with NaN/inf/-9999,
    duplicate rows, or list columns of mismatched lengths."""
    import pandas as pd

    frame = pd.read_parquet(io.BytesIO(data))
    column = draw(st.sampled_from(list(frame.columns)))
    action = draw(st.sampled_from(["drop", "as_text", "bad_numbers", "duplicate_rows",
                                   "list_lengths", "nulls"]))
    if action == "drop":
        frame = frame.drop(columns=[column])
    elif action == "as_text":
        frame[column] = frame[column].astype(str)
    elif action == "bad_numbers":
        values = [float("nan"), float("inf"), float("-inf"), -9999.0, 1e308]
        if pd.api.types.is_float_dtype(frame[column]):
            frame.loc[frame.index[::3], column] = draw(st.sampled_from(values))
        else:
            frame[column] = draw(st.sampled_from(values))
    elif action == "duplicate_rows":
        frame = pd.concat([frame, frame.iloc[: draw(st.integers(1, len(frame)))]])
    elif action == "list_lengths":
        lists = [c for c in frame.columns if len(frame) and isinstance(frame[c].iloc[0],
                                                                       (list, np.ndarray))]
        if lists:
            name = draw(st.sampled_from(lists))
            frame[name] = [list(v)[:-1] for v in frame[name]]
    else:
        frame[column] = None
    return _parquet_bytes(frame)


def mutations(name: str):
    """Every mutation strategy that fits the seed's encoding."""
    data = seed_bytes(name)
    options = [byte_mutation(data)]
    if data[:4] == b"PAR1":
        options.append(parquet_mutation(data))
    elif SEEDS[name][1].endswith(".csv"):
        options.append(csv_mutation(data))
    else:
        parsed = split_json(data) if name not in ("tensorboard", "slime") else None
        if parsed is not None:
            records, jsonl = parsed
            options.append(json_mutation(records).map(lambda r, j=jsonl: join_json(r, j)))
    return st.one_of(*options)


# -- the contract ----------------------------------------------------------------------------
def make_base_store(path: Path) -> dict:
    """A store holding one small good run ``keep``; returns a fingerprint of it."""
    el.ingest(SAMPLE_RUN / "metrics.csv", path, run="keep", progress=False)
    return store_fingerprint(path, "keep")


def store_fingerprint(path: Path, run: str) -> dict:
    """Every file of a run with its bytes' hash, to prove a run was not touched."""
    import hashlib

    folder = Path(path) / "runs" / run
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_valid_run(store, run: str) -> None:
    """A committed run reads back with canonical schemas, clean values and true counts."""
    manifest = store.manifest(run)
    tokens = store.read_tokens(run)
    assert tokens.schema.equals(TOKEN_SCHEMA), run
    sequences = store.read_sequences(run)
    assert sequences.schema.equals(SEQUENCE_SCHEMA)
    metrics = store.read_metrics(run)
    counts = manifest["counts"]
    assert counts["tokens"] == tokens.num_rows
    assert counts["sequences"] == sequences.num_rows
    assert counts["metrics"] == len(metrics)
    nodes = store.read_nodes(run) if counts.get("nodes") else None
    assert counts.get("nodes", 0) == (nodes.num_rows if nodes is not None else 0)
    assert tokens.num_rows + sequences.num_rows + len(metrics) + counts.get("nodes", 0) > 0
    assert tokens.column("sample_id").null_count == 0
    assert tokens.column("position").null_count == 0
    for name in ("logprob", "entropy"):
        values = tokens.column(name).drop_null().to_numpy()
        assert np.isfinite(values).all(), f"{name} holds NaN or infinities"
    logprobs = tokens.column("logprob").drop_null().to_numpy()
    assert (logprobs > SENTINEL_LOGPROB).all(), "sentinel logprobs stored as numbers"
    assert (tokens.column("entropy").drop_null().to_numpy() >= -1e-4).all()
    top = pc.list_flatten(tokens.column("top_logprobs")).drop_null().to_numpy()
    assert np.isfinite(top).all() and (top > SENTINEL_LOGPROB).all()
    # the manifest must be standard JSON (no NaN literals), so other tools can read it
    text = (store.runs_dir / run / "manifest.json").read_text()
    json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


def check_outcome(source: Path, store_path: Path, keep: dict, **options):
    """Ingest ``source`` into the base store and check the contract; returns the error or
    None. Any exception that is not an :class:`EntropylensError` propagates and fails."""
    error = None
    try:
        runs = el.ingest(source, store_path, progress=False, replace=True, **options)
    except EntropylensError as exc:
        error = exc
        assert exc.path is not None, f"error names no file: {exc}"
        assert str(exc).strip()
    store = el.open(store_path)
    assert store_fingerprint(store_path, "keep") == keep, "an earlier run was changed"
    assert not [p for p in store.runs_dir.iterdir() if p.name.startswith(".tmp-")], \
        "a temporary run folder was left behind"
    if error is None:
        for run in runs:
            assert_valid_run(store, run)
        for run in runs:  # leave only the base run for the next example
            store.delete_run(run)
    return error


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
