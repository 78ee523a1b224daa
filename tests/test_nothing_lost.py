"""Nothing lost, ever: inputs that used to end with exit 0 and values silently gone.

Each test reproduces one case of the hostile round (issue 23) and checks the stored values
against an independent reading of the same data (pandas, json, the TFRecord layout).
"""

from __future__ import annotations

import gzip
import json
import struct
import warnings

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import entropylens as el
from entropylens.errors import FormatError
from entropylens.ingest._records import iter_json_records
from _hardening_helpers import _tensorboard_bytes


def _history_rows(runs=("a", "b"), steps=30):
    return [{"_step": i + k * steps, "_runtime": float(i), "_timestamp": 1.7e9 + i,
             "run_name": run, "train/reward": float(i) + 100 * k, "train/entropy": 1.0 / (i + 1)}
            for k, run in enumerate(runs) for i in range(steps)]


# -- W&B: the run column is text under pandas 2 (object) and pandas 3 (str) -------------------
@pytest.mark.parametrize("infer_string", [False, True], ids=["object-dtype", "str-dtype"])
@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_wandb_run_column_splits_runs_under_both_string_dtypes(tmp_path, infer_string, suffix):
    rows = _history_rows()
    path = tmp_path / f"history{suffix}"
    frame = pd.DataFrame(rows)
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        frame.to_parquet(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pandas 3 deprecates the option it still honours
        with pd.option_context("future.infer_string", infer_string):
            runs = el.ingest(path, tmp_path / "s", format="wandb", progress=False)
    assert runs == ["a", "b"]
    store = el.open(tmp_path / "s")
    for run in runs:
        got = store.read_metrics(run, pivot=True)["reward_mean"]
        want = frame[frame.run_name == run].set_index("_step")["train/reward"]
        assert got.to_dict() == want.to_dict()


# -- W&B steps are integers, exactly ---------------------------------------------------------
BIG_STEPS = [2 ** 62, 2 ** 62 + 1, 2 ** 63 - 1, 2 ** 53 + 1]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".parquet"])
@pytest.mark.parametrize("column", ["_step", "train/global_step"])
def test_wandb_steps_beyond_2_53_stay_exact(tmp_path, suffix, column):
    rows = [{"_step": i, "_runtime": 1.0, column: step, "reward": float(i)}
            for i, step in enumerate(BIG_STEPS)]
    rows.append({"_step": len(rows), "_runtime": 1.0, "val/acc": 0.5})  # a row without a step
    if column == "_step":
        for row, step in zip(rows, BIG_STEPS):
            row["_step"] = step
        rows[-1]["_step"] = None
    path = tmp_path / f"history{suffix}"
    if suffix == ".csv":  # by hand: pandas would write the steps as floats
        names = list(dict.fromkeys(k for row in rows for k in row))
        path.write_text(",".join(names) + "\n" + "".join(
            ",".join("" if row.get(k) is None else str(row.get(k, "")) for k in names) + "\n"
            for row in rows))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        table = pa.Table.from_pylist(rows, schema=pa.schema(
            [("_step", pa.int64()), ("_runtime", pa.float64()), (column, pa.int64()),
             ("reward", pa.float64()), ("val/acc", pa.float64())]) if column != "_step"
            else None)
        pq.write_table(table, path)
    el.ingest(path, tmp_path / "s", run="r", format="wandb", progress=False)
    metrics = el.open(tmp_path / "s").read_metrics("r")
    reward = metrics[metrics.metric == "reward_mean"].set_index("step")["value"]
    assert sorted(reward.index.tolist()) == sorted(BIG_STEPS)
    assert {int(k): v for k, v in reward.items()} == {s: float(i) for i, s in
                                                      enumerate(BIG_STEPS)}


# -- a bad first JSON line is one bad record, not a bad file ---------------------------------
def _chat_line(i: int) -> str:
    content = [{"token": "a", "logprob": -0.1 * (i + 1), "bytes": [97], "top_logprobs": []}]
    return json.dumps({"id": f"r{i}", "object": "chat.completion", "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "a"},
         "logprobs": {"content": content}, "finish_reason": "stop"}]})


def test_skip_with_a_bad_first_line_keeps_the_rest_of_the_file(tmp_path):
    first = tmp_path / "a.jsonl"
    first.write_text('{"id": "r-1", "choices": [\n'
                     + "\n".join(_chat_line(i) for i in range(30)) + "\n")
    second = tmp_path / "b.jsonl"
    # other responses than the first file's (the same ones twice would be duplicate tokens)
    second.write_text("\n".join(_chat_line(i) for i in range(30, 61)) + "\n")
    with pytest.raises(FormatError) as info:
        el.ingest([first, second], tmp_path / "s", run="r", format="openai_chat",
                  progress=False)
    assert (info.value.path, info.value.line) == (str(first), 1)
    el.ingest([first, second], tmp_path / "s", run="r", format="openai_chat",
              on_error="skip", progress=False)
    store = el.open(tmp_path / "s")
    manifest = store.manifest("r")
    assert manifest["counts"]["sequences"] == 61
    assert manifest["rejected"]["count"] == 1
    assert manifest["rejected"]["examples"][0]["line"] == 1


class _Ctx:
    def __init__(self):
        self.rejected = []

    def reject(self, line, message, **_):
        self.rejected.append(line)


def test_json_records_tell_a_document_from_lines_with_a_bad_first_line(tmp_path):
    import io

    lines = b'{"a": 1, "b": [\n' + b"\n".join(b'{"a": %d}' % i for i in range(5)) + b"\n"
    ctx = _Ctx()
    assert [r["a"] for _, r in iter_json_records(io.BufferedReader(io.BytesIO(lines)), ctx)] \
        == [0, 1, 2, 3, 4]
    assert ctx.rejected == [1]
    for document in (b'[\n {"a": 0}\n]\n', b'{\n "a": 0\n}\n', b'[{"a": 0},\n{"a": 1}]\n'):
        ctx = _Ctx()
        got = [r["a"] for _, r in iter_json_records(io.BufferedReader(io.BytesIO(document)),
                                                    ctx)]
        assert got[0] == 0 and ctx.rejected == [], document


# -- run names from file content that collide after sanitising -------------------------------
def test_source_runs_with_one_safe_name_stay_apart(tmp_path):
    rows = _history_rows(runs=("exp/1", "exp:1"))
    path = tmp_path / "history.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    runs = el.ingest(path, tmp_path / "s", format="wandb", progress=False)
    assert len(runs) == 2 and "exp-1" in runs
    store = el.open(tmp_path / "s")
    by_source = {store.manifest(run)["source_run"]: run for run in runs}
    assert set(by_source) == {"exp/1", "exp:1"}
    for k, source in enumerate(("exp/1", "exp:1")):
        reward = store.read_metrics(by_source[source], pivot=True)["reward_mean"]
        assert reward.tolist() == [float(i) + 100 * k for i in range(30)]


# -- TensorBoard: a damaged record is named or counted, never a silent end -------------------
def _event_records(data: bytes) -> list[tuple[int, int]]:
    """(offset, total length) of each TFRecord, read from the layout itself."""
    out, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        out.append((offset, 12 + length + 4))
        offset += 12 + length + 4
    return out


def _scalar_count(data: bytes) -> int:
    from tensorboard.compat.proto import event_pb2

    count = 0
    for offset, size in _event_records(data):
        event = event_pb2.Event.FromString(data[offset + 12:offset + size - 4])
        count += len(event.summary.value)
    return count


@pytest.mark.parametrize("where", ["data", "length"])
def test_tensorboard_damaged_record_is_named_or_counted(tmp_path, where):
    data = _tensorboard_bytes()
    records = _event_records(data)
    offset, size = records[len(records) // 2]
    damaged = bytearray(data)
    damaged[offset + (14 if where == "data" else 2)] ^= 0xFF
    path = tmp_path / "events.out.tfevents.1.host"
    path.write_bytes(bytes(damaged))
    number = len(records) // 2 + 1
    with pytest.raises(FormatError) as info:
        el.ingest(path, tmp_path / "s", run="r", progress=False)
    assert (info.value.path, info.value.line) == (str(path), number)
    assert "CRC" in str(info.value)
    el.ingest(path, tmp_path / "s", run="r", on_error="skip", progress=False)
    store = el.open(tmp_path / "s")
    manifest = store.manifest("r")
    assert manifest["rejected"]["count"] == 1
    assert manifest["rejected"]["examples"][0]["line"] == number
    intact = bytes(data[:offset] + data[offset + size:])
    assert len(store.read_metrics("r")) == _scalar_count(intact)


def test_tensorboard_truncated_file_is_named(tmp_path):
    data = _tensorboard_bytes()
    path = tmp_path / "events.out.tfevents.1.host"
    path.write_bytes(data[:-7])
    with pytest.raises(FormatError, match="truncated") as info:
        el.ingest(path, tmp_path / "s", run="r", progress=False)
    assert info.value.line == len(_event_records(data))
    assert not (tmp_path / "s").exists()


# -- bounded memory: long lines, documents and decompression bombs ---------------------------
def test_gzip_line_bomb_stops_at_the_record_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("ENTROPYLENS_MAX_RECORD_MB", "1")
    path = tmp_path / "chat.jsonl.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(_chat_line(0).encode() + b"\n" + b'{"id": "' + b"x" * (8 << 20) + b'"}\n')
    with pytest.raises(FormatError, match="longer than 1 MiB") as info:
        el.ingest(path, tmp_path / "s", format="openai_chat", progress=False)
    assert (info.value.path, info.value.line) == (str(path), 2)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    import importlib

    io_module = importlib.import_module("entropylens.ingest._io")

    monkeypatch.setattr(io_module, "_EXPANSION_FLOOR", 1 << 20)
    path = tmp_path / "chat.jsonl.gz"
    with gzip.open(path, "wb") as fh:
        for _ in range(2000):
            fh.write(_chat_line(0).encode() + b"\n" + b" " * 4096 + b"\n")
    with pytest.raises(FormatError, match="decompression bomb") as info:
        el.ingest(path, tmp_path / "s", format="openai_chat", progress=False)
    assert info.value.path == str(path)


# -- values beyond float32 are counted nulls, not infinities --------------------------------
def test_entropy_beyond_float32_is_a_counted_null(tmp_path):
    path = tmp_path / "tokens.csv"
    path.write_text("step,sample_id,position,token,logprob,entropy\n"
                    "1,s,0,a,-0.5,1e39\n1,s,1,b,-1e39,0.5\n1,s,2,c,-0.25,0.75\n")
    el.ingest(path, tmp_path / "s", run="r", progress=False)
    store = el.open(tmp_path / "s")
    tokens = store.read_tokens("r")
    assert tokens.column("entropy").to_pylist() == [None, 0.5, 0.75]
    assert tokens.column("logprob").to_pylist() == [-0.5, None, -0.25]
    counts = store.manifest("r")["counts"]
    assert counts["sentinel_entropys"] == 1 and counts["sentinel_logprobs"] == 1


# -- terminal output: control characters and rich markup from data are shown, not obeyed ----
def test_cli_error_escapes_control_characters(tmp_path):
    """A metric name that clears the screen and sets the window title, listed by an error."""
    from typer.testing import CliRunner

    from entropylens.cli import app

    path = tmp_path / "m.csv"
    path.write_text("step,entropy,\x1b[2J\x1b]0;owned\x07reward\n0,1.0,0.5\n1,0.9,0.6\n")
    el.ingest(path, tmp_path / "s", run="r", progress=False)
    result = CliRunner().invoke(app, ["fit", str(tmp_path / "s"), "--reward", "nosuch"])
    assert result.exit_code == 1
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "\\x1b]0;owned\\x07reward" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_markup_in_data_is_escaped():
    from rich.console import Console

    from entropylens._safe_text import markup, plain

    console = Console(record=True, force_terminal=True, width=200)
    hostile = "[link=https://evil.example]click[/link] \x1b]8;;x"
    console.print("token " + markup(hostile))
    text = console.export_text()
    assert "[link=https://evil.example]click[/link]" in text
    assert "\x1b" not in plain("\x1b[31m\x9b\u202e")
    assert plain("a\tb") == "a\tb"


def test_report_replaces_a_planted_symlink_instead_of_following_it(tmp_path, sample_store):
    target = tmp_path / "victim.txt"
    target.write_text("precious")
    out = tmp_path / "report"
    out.mkdir()
    (out / "index.html").symlink_to(target)
    (out / "figures").symlink_to(tmp_path)
    el.report(sample_store.path, out, runs=["vanilla"])
    assert target.read_text() == "precious"
    assert not (out / "index.html").is_symlink() and (out / "index.html").stat().st_size > 0
    assert not (out / "figures").is_symlink()
    assert not list(tmp_path.glob("*.png"))


# -- damaged stores: one line naming the file, exit 1 ---------------------------------------
@pytest.mark.parametrize("damage", ["store-json-list", "runs-is-a-file"])
def test_damaged_store_is_one_line_naming_the_file(tmp_path, damage):
    from typer.testing import CliRunner

    from entropylens.cli import app

    path = tmp_path / "s"
    el.Store.create(path)
    if damage == "store-json-list":
        (path / "store.json").write_text("[1, 2]")
        named = path / "store.json"
    else:
        (path / "runs").rmdir()
        (path / "runs").write_text("")
        named = path / "runs"
    result = CliRunner().invoke(app, ["summary", str(path)])
    assert result.exit_code == 1
    assert result.output.startswith(f"error: {named}") and len(result.output.splitlines()) == 1


# -- a full disk: one line naming the path, no partial run, the store usable afterwards ------
def test_disk_full_midway_leaves_no_partial_run(tmp_path, monkeypatch):
    import errno
    import os

    import entropylens.store as store_module
    from _hardening_helpers import SAMPLE_RUN, make_base_store, store_fingerprint
    from entropylens.errors import StoreError

    path = tmp_path / "s"
    before = make_base_store(path)
    real = store_module.pq.write_table

    def full(table, where, **kwargs):
        if "metrics.parquet" in str(where):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))
        return real(table, where, **kwargs)

    monkeypatch.setattr(store_module.pq, "write_table", full)
    with pytest.raises(StoreError, match="No space left on device") as info:
        el.ingest([SAMPLE_RUN / "tokens.parquet", SAMPLE_RUN / "metrics.csv"], path, run="new",
                  progress=False)
    assert "metrics.parquet" in info.value.path
    store = el.open(path)
    assert store.runs() == ["keep"] and store_fingerprint(path, "keep") == before
    assert not [p for p in store.runs_dir.iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(store_module.pq, "write_table", real)  # space freed
    el.ingest(SAMPLE_RUN / "metrics.csv", path, run="new", progress=False)
    assert el.open(path).runs() == ["keep", "new"]
