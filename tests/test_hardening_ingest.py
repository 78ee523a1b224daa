"""Hostile and broken input for every ingest format: the outcome is a valid store or an
EntropylensError naming the file (and the line where there is one), exit code 1 on the CLI.

Profiles: see ``_hardening_helpers.py`` (``ENTROPYLENS_HYPOTHESIS_PROFILE=long`` for more).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

import entropylens as el
from _hardening_helpers import (LONG, SEEDS, SAMPLE_RUN, check_outcome, make_base_store,
                                mutations, seed_bytes, write_seed)
from entropylens.cli import app
from entropylens.errors import EntropylensError
from entropylens.ingest import registry

ALL_FORMATS = {fmt.name for fmt in registry.formats()}


def test_every_format_has_a_seed():
    """A new format must get a hardening seed here."""
    assert ALL_FORMATS <= {fmt for fmt, _, _ in SEEDS.values()}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("hardening") / "store"
    return path, make_base_store(path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seed_is_good_input(name, base, tmp_path):
    """Unmutated, every seed is detected as its format and ingests into a valid run."""
    path = write_seed(tmp_path, name, seed_bytes(name))
    assert registry.detect(path).name == SEEDS[name][0]
    assert check_outcome(path, base[0], base[1]) is None


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SEEDS))
@given(data=st.data())
def test_mutated_input_is_stored_or_refused(name, base, tmp_path_factory, data):
    """Truncation, byte flips, invalid UTF-8, wrong types, missing/extra fields, NaN/inf/-9999,
    mismatched array lengths, duplicated rows: valid store or EntropylensError, never
    another exception, and the run already in the store is untouched."""
    folder = tmp_path_factory.mktemp(name)
    path = write_seed(folder, name, data.draw(mutations(name), label="file"))
    detect = data.draw(st.booleans(), label="auto-detect")
    on_error = data.draw(st.sampled_from(["stop", "skip"]), label="on_error")
    check_outcome(path, base[0], base[1], format=None if detect else SEEDS[name][0],
                  on_error=on_error, run="r")


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_empty_file_is_refused_naming_it(name, tmp_path):
    path = write_seed(tmp_path, name, b"")
    with pytest.raises(EntropylensError) as info:
        el.ingest(path, tmp_path / "store", format=SEEDS[name][0], progress=False)
    assert str(path) in str(info.value)
    assert not (tmp_path / "store").exists(), "a failed first ingest left a store folder"


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_cli_exit_code_one_and_one_line(name, tmp_path):
    """Through the command line: exit 1, one line on stderr naming the file, no traceback."""
    data = seed_bytes(name)
    path = write_seed(tmp_path, name, data[: len(data) // 3] + b"\xff\xfe\x00garbage")
    result = CliRunner().invoke(app, ["ingest", str(path), "--out", str(tmp_path / "s"),
                                      "--format", SEEDS[name][0]])
    assert result.exit_code in (0, 1), result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception,
                                                                     SystemExit)
    if result.exit_code == 1:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0]


# -- specific cases, with independent expectations --------------------------------------------
def _openai_line(tokens, logprobs, id="x"):
    content = [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
               for t, lp in zip(tokens, logprobs)]
    return json.dumps({"id": id, "object": "chat.completion", "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "".join(tokens)},
         "logprobs": {"content": content}, "finish_reason": "stop"}]}, allow_nan=True)


def test_invalid_utf8_names_the_line(tmp_path):
    good, other = (_openai_line(["a", "b"], [-0.1, -0.2], id=i).encode() for i in "xy")
    path = tmp_path / "chat.jsonl"
    path.write_bytes(good + b"\n" + good[:40] + b"\xff\xfe" + good[40:] + b"\n" + other + b"\n")
    with pytest.raises(EntropylensError) as info:
        el.ingest(path, tmp_path / "s", format="openai_chat", progress=False)
    assert info.value.path == str(path) and info.value.line == 2
    runs = el.ingest(path, tmp_path / "s", format="openai_chat", on_error="skip",
                     progress=False)
    manifest = el.open(tmp_path / "s").manifest(runs[0])
    assert manifest["rejected"]["count"] == 1
    assert manifest["rejected"]["examples"][0]["line"] == 2
    assert manifest["counts"]["tokens"] == 4


def test_nan_inf_sentinel_logprobs_become_counted_nulls(tmp_path):
    values = [-0.5, float("nan"), float("inf"), float("-inf"), -9999.0, -12.0]
    path = tmp_path / "chat.jsonl"
    path.write_text(_openai_line(list("abcdef"), values) + "\n")
    runs = el.ingest(path, tmp_path / "s", format="openai_chat", progress=False)
    store = el.open(tmp_path / "s")
    stored = store.read_tokens(runs[0]).column("logprob").to_pylist()
    expected = [v if np.isfinite(v) and v > -9999 else None for v in values]
    assert stored == pytest.approx(expected) if None not in expected else \
        [s is None for s in stored] == [e is None for e in expected]
    assert [s for s in stored if s is not None] == pytest.approx([-0.5, -12.0])
    counts = store.manifest(runs[0])["counts"]
    assert counts["null_logprobs"] == sum(e is None for e in expected)


def test_mismatched_array_lengths_are_refused_at_their_line(tmp_path):
    """A prime-rl record whose 'entropy' array is one short: refused at line 2, skipped and
    counted under --on-error skip, never a shifted column."""
    lines = seed_bytes("prime_rl").decode().splitlines()
    record = json.loads(lines[0])
    broken = dict(record, entropy=record["entropy"][:-1])
    path = write_seed(tmp_path, "prime_rl", "\n".join(
        [lines[0], json.dumps(broken), lines[0]]).encode())
    with pytest.raises(EntropylensError) as info:
        el.ingest(path, tmp_path / "s", format="prime_rl", progress=False)
    assert info.value.line == 2 and "entropy" in str(info.value)
    # lines 1 and 3 are one record logged twice: its tokens are kept once
    runs = el.ingest(path, tmp_path / "s", format="prime_rl", on_error="skip",
                     on_duplicate="keep-last", progress=False)
    store = el.open(tmp_path / "s")
    manifest = store.manifest(runs[0])
    assert manifest["rejected"]["count"] == 1
    tokens = store.read_tokens(runs[0]).to_pandas()
    kept = sum(record["loss_mask"])
    assert len(tokens) == kept == manifest["counts"]["duplicates_dropped"]


def test_list_where_a_number_belongs_names_the_line(tmp_path):
    line = _openai_line(["a", "b"], [-0.1, -0.2])
    bad = line.replace('"logprob": -0.2', '"logprob": [1, 2]')
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join([line, line, bad]) + "\n")
    with pytest.raises(EntropylensError) as info:
        el.ingest(path, tmp_path / "s", format="openai_chat", progress=False)
    assert info.value.line == 3


def test_duplicate_token_rows_are_refused_or_resolved(tmp_path):
    """Rows repeating a (step, sample, position) are an error naming the first repeated key;
    --on-duplicate keeps the first or the last, and the count matches pandas' own."""
    frame = pd.read_parquet(SAMPLE_RUN / "tokens.parquet")
    frame = frame[frame.step <= 1].head(300)
    again = frame.iloc[10:60].assign(logprob=frame.iloc[10:60].logprob - 1.0)
    doubled = pd.concat([frame, again, frame.iloc[100:101]])
    path = tmp_path / "tokens.csv"
    doubled.drop(columns=["top_ids", "top_logprobs"]).to_csv(path, index=False)
    key = ["step", "prompt_idx", "sample_idx", "position"]
    expected = int(doubled.duplicated(key).sum())
    with pytest.raises(EntropylensError) as info:
        el.ingest(path, tmp_path / "s", run="dup", progress=False)
    message = str(info.value)
    assert f"{expected} token rows repeat" in message and "--on-duplicate" in message
    assert info.value.path == str(path) and "\n" not in message
    assert not (tmp_path / "s").exists()
    for keep, pandas_keep in (("keep-first", "first"), ("keep-last", "last")):
        runs = el.ingest(path, tmp_path / "s", run=keep, on_duplicate=keep, progress=False)
        store = el.open(tmp_path / "s")
        counts = store.manifest(runs[0])["counts"]
        assert counts["duplicates_dropped"] == expected == 51
        assert counts["tokens"] == len(frame) and counts["duplicate_tokens"] == 0
        stored = store.read_tokens(runs[0]).to_pandas()
        truth = doubled.drop_duplicates(key, keep=pandas_keep).sort_values(key)
        np.testing.assert_allclose(np.sort(stored["logprob"].to_numpy()),
                                   np.sort(truth["logprob"].to_numpy()), rtol=1e-6)


def test_ragged_csv_row_names_its_line(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,entropy,reward\n0,1.0,0.5\n1,2.0\n2,3.0,0.1\n")
    with pytest.raises(EntropylensError) as info:
        el.ingest(path, tmp_path / "s", progress=False)
    assert (info.value.path, info.value.line) == (str(path), 3)
    runs = el.ingest(path, tmp_path / "s", on_error="skip", progress=False)
    metrics = el.open(tmp_path / "s").read_metrics(runs[0])
    assert sorted(metrics.step.unique()) == [0, 2]


@pytest.mark.slow
def test_huge_single_line(tmp_path):
    """One line of 100 MB (a crashed job's unterminated buffer) ends in an error naming the
    file, or in a store, without a traceback. The default profile uses 100 MB only when
    writing it is fast here; the long profile always does."""
    size = 100 * 2 ** 20
    path = tmp_path / "chat.jsonl"
    start = time.perf_counter()
    head = _openai_line(["a"], [-0.1]).encode()
    with open(path, "wb") as fh:
        fh.write(head[:-3])
        fh.write(b"x" * size)
    if not LONG and time.perf_counter() - start > 2.0:  # slow disk: the budget comes first
        path.write_bytes(head[:-3] + b"x" * (size // 10))
    for fmt in ("openai_chat", "table", None):
        try:
            el.ingest(path, tmp_path / "s", format=fmt, progress=False, replace=True)
        except EntropylensError as exc:
            assert exc.path is not None and str(path) in str(exc)
