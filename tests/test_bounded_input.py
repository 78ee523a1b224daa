"""Bounded memory on hostile tables (issue 23): Parquet decompression bombs, files of a
million columns, and JSON Lines tables whose bad lines are named by their true line.

The bombs here are the real ones scaled down: the limits are lowered through their
environment variables so that a bomb of a few MB trips them; the readers take the same path
as with the defaults (measured figures for the full-size bombs are in the README).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import entropylens as el
from entropylens.errors import FormatError
from entropylens.ingest import _io
from _hardening_helpers import SAMPLE_RUN


def _repeated_text_parquet(path: Path, rows: int, text_bytes: int, **columns) -> Path:
    """One long string repeated in every row: a dictionary page and run-length indices, so
    the file stays kilobytes whatever it decodes to."""
    text = pa.array(["x" * text_bytes] * rows)  # Parquet dictionary-encodes it
    table = pa.table({**columns, "note": text})
    pq.write_table(table, path, compression="zstd")
    return path


def _wandb_bomb(path: Path, rows: int = 2000, text_bytes: int = 20_000) -> Path:
    steps = np.arange(rows)
    return _repeated_text_parquet(path, rows, text_bytes, _step=steps,
                                  _runtime=steps.astype(float), **{"train/reward": steps * 0.5})


# -- Parquet decompression bombs --------------------------------------------------------------
def test_metadata_estimate_misses_a_dictionary_bomb_that_the_reader_measures(tmp_path):
    """Why the batches are measured: the metadata of a repeated-string column is tiny."""
    path = _wandb_bomb(tmp_path / "history.parquet")
    decoded = pq.read_table(path).nbytes
    assert decoded > 40e6 and path.stat().st_size < 100_000
    assert _io.parquet_decoded_estimate(pq.ParquetFile(path).metadata) < decoded / 50
    with pytest.raises(FormatError, match="decompression bomb") as info:
        list(_io.iter_parquet_batches(path, limit=10 << 20))
    assert info.value.path == str(path)


def test_wandb_parquet_bomb_is_refused_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ENTROPYLENS_MAX_DOCUMENT_MB", "8")  # W&B histories are read whole
    path = _wandb_bomb(tmp_path / "history.parquet")  # 40 MB decoded
    with pytest.raises(FormatError, match="decompression bomb.*ENTROPYLENS_MAX_DOCUMENT_MB") \
            as info:
        el.ingest(path, tmp_path / "s", format="wandb", progress=False)
    assert info.value.path == str(path)
    assert not (tmp_path / "s").exists()


def test_table_parquet_run_length_bomb_is_refused_before_reading(tmp_path, monkeypatch):
    """10^7 constant rows: a few kB on disk, 160 MB decoded; refused on the metadata alone."""
    monkeypatch.setattr(_io, "_EXPANSION_FLOOR", 1 << 20)
    rows = 10_000_000
    path = tmp_path / "metrics.parquet"
    pq.write_table(pa.table({"step": np.zeros(rows, dtype=np.int64),
                             "reward": np.zeros(rows)}), path, compression="zstd")
    assert path.stat().st_size < 200_000
    read = []
    monkeypatch.setattr(pq.ParquetFile, "iter_batches",
                        lambda self, *a, **k: read.append(1) or iter(()))
    with pytest.raises(FormatError, match=r"decodes to at least 153 MiB in 10,000,000 rows") as info:
        el.ingest(path, tmp_path / "s", format="table", run="r", progress=False)
    assert info.value.path == str(path) and not read


def test_table_tokens_bomb_stops_while_streaming(tmp_path, monkeypatch):
    monkeypatch.setattr(_io, "_EXPANSION_FLOOR", 1 << 20)
    monkeypatch.setenv("ENTROPYLENS_MAX_EXPANSION", "50")
    rows = 20_000
    path = _repeated_text_parquet(
        tmp_path / "tokens.parquet", rows, 4000, step=np.zeros(rows, dtype=np.int64),
        sample_id=np.array(["s"] * rows), position=np.arange(rows), logprob=np.full(rows, -0.5))
    path = path.rename(tmp_path / "tokens.parquet")
    with pytest.raises(FormatError, match="decompression bomb") as info:
        el.ingest(path, tmp_path / "s", format="table", run="r", progress=False)
    assert info.value.path == str(path)


def test_a_row_over_the_record_limit_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("ENTROPYLENS_MAX_RECORD_MB", "1")
    path = tmp_path / "seq.parquet"
    completions = ["short", "y" * (2 << 20), "short"]
    pq.write_table(pa.table({"step": [1, 1, 1], "sample_id": ["a", "b", "c"],
                             "completion": completions}), path)
    with pytest.raises(FormatError, match="a row of 2 MiB") as info:
        el.ingest(path, tmp_path / "s", format="table", run="r", progress=False)
    assert (info.value.path, info.value.line) == (str(path), 2)


def test_bounded_batches_read_the_same_values(monkeypatch):
    """Cut into batches of at most ~64 kB, the real token file reads back identical."""
    monkeypatch.setattr(_io, "PARQUET_BATCH_BYTES", 64 * 1024)
    path = SAMPLE_RUN / "tokens.parquet"
    batches = list(_io.iter_parquet_batches(path))
    assert len(batches) > 5
    widest = max(int(_io._row_bytes(b).max()) for b in batches)
    assert all(_io._row_bytes(b).sum() <= 64 * 1024 + widest for b in batches)
    got = pa.Table.from_batches(batches)
    want = pq.read_table(path)
    assert got.schema == want.schema and got.equals(want)


def test_compressed_wandb_parquet_still_reads(tmp_path):
    """The W&B reader's compressed Parquet path (bytes, not a file) goes through the same
    checks."""
    import gzip

    frame = pd.DataFrame({"_step": [0, 1, 2], "_runtime": [1.0, 2.0, 3.0],
                          "train/reward": [0.1, 0.2, 0.3]})
    raw = tmp_path / "h.parquet"
    frame.to_parquet(raw)
    path = tmp_path / "history.parquet.gz"
    path.write_bytes(gzip.compress(raw.read_bytes()))
    el.ingest(path, tmp_path / "s", format="wandb", run="r", progress=False)
    got = el.open(tmp_path / "s").read_metrics("r", pivot=True)["reward_mean"]
    assert got.to_dict() == {0: 0.1, 1: 0.2, 2: 0.3}


# -- a million columns ----------------------------------------------------------------------
def _wide_csv(path: Path, columns: int) -> Path:
    names = ",".join(f"m{i}" for i in range(columns))
    path.write_text(f"step,{names}\n0,{','.join('1' for _ in range(columns))}\n")
    return path


@pytest.mark.parametrize("fmt", ["table", "wandb"])
def test_csv_with_too_many_columns_is_refused_at_the_header(tmp_path, monkeypatch, fmt):
    monkeypatch.setenv("ENTROPYLENS_MAX_COLUMNS", "1000")
    path = _wide_csv(tmp_path / "wide.csv", 5000)
    with pytest.raises(FormatError, match="5,001 columns, more than 1,000.*"
                                          "ENTROPYLENS_MAX_COLUMNS") as info:
        el.ingest(path, tmp_path / "s", format=fmt, run="r", progress=False)
    assert (info.value.path, info.value.line) == (str(path), 1)


def test_quoted_delimiters_do_not_count_as_columns(tmp_path, monkeypatch):
    monkeypatch.setenv("ENTROPYLENS_MAX_COLUMNS", "3")
    path = tmp_path / "m.csv"
    path.write_text('step,reward,"entropy, nats"\n0,0.5,1.0\n')
    el.ingest(path, tmp_path / "s", format="table", run="r", progress=False)
    assert set(el.open(tmp_path / "s").read_metrics("r")["metric"]) >= {"reward_mean"}


def test_parquet_with_too_many_columns_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ENTROPYLENS_MAX_COLUMNS", "50")
    path = tmp_path / "wide.parquet"
    pq.write_table(pa.table({"step": [0], **{f"m{i}": [1.0] for i in range(100)}}), path)
    with pytest.raises(FormatError, match="101 columns, more than 50") as info:
        el.ingest(path, tmp_path / "s", format="table", run="r", progress=False)
    assert info.value.path == str(path)


def test_cli_million_column_csv_is_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from entropylens.cli import app

    monkeypatch.setenv("ENTROPYLENS_MAX_COLUMNS", "100")
    path = _wide_csv(tmp_path / "wide.csv", 10_000)
    result = CliRunner().invoke(app, ["ingest", str(path), "--out", str(tmp_path / "s"),
                                      "--run", "r"])
    assert result.exit_code == 1
    assert result.output.startswith(f"error: {path}:1: 10,001 columns")
    assert len(result.output.strip().splitlines()) == 1


# -- table JSON Lines: bad lines named by their line in the file, skippable ----------------
def _token_lines(count: int) -> list[str]:
    return [json.dumps({"step": i // 50, "sample_id": f"s{i % 5}", "position": i,
                        "token": f"t{i}", "logprob": -0.01 * (i % 97)}) for i in range(count)]


def _hostile_jsonl(tmp_path: Path) -> tuple[Path, dict[int, str]]:
    lines = _token_lines(3000)
    bad = {1500: '{"step": 30, "sample_id": ',  # truncated
           2200: '{"step": "late", "sample_id": "s0", "position": 1, "token": "x", '
                 '"logprob": -1.0}',  # valid JSON, a string where the step is a number
           2900: "[1, 2, 3]"}
    for number, text in bad.items():
        lines[number - 1] = text
    path = tmp_path / "tokens.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, bad


def test_table_jsonl_bad_line_is_named_by_its_file_line(tmp_path, monkeypatch):
    from entropylens.ingest import table

    monkeypatch.setattr(table, "JSON_BLOCK_BYTES", 20_000, raising=False)  # several blocks
    path, bad = _hostile_jsonl(tmp_path)
    with pytest.raises(FormatError, match="not valid JSON") as info:
        el.ingest(path, tmp_path / "s", format="table", run="r", progress=False)
    assert (info.value.path, info.value.line) == (str(path), 1500)
    lines = path.read_text().splitlines()
    for number in (1500, 2900):  # every kind of bad line, named by its own number
        lines[number - 1] = _token_lines(number)[-1]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(FormatError, match="changed from number to string") as info:
        el.ingest(path, tmp_path / "s", format="table", run="r", progress=False)
    assert info.value.line == 2200


def test_table_jsonl_skip_keeps_every_good_line(tmp_path, monkeypatch):
    from entropylens.ingest import table

    monkeypatch.setattr(table, "JSON_BLOCK_BYTES", 20_000, raising=False)
    path, bad = _hostile_jsonl(tmp_path)
    el.ingest(path, tmp_path / "s", format="table", run="r", progress=False, on_error="skip")
    store = el.open(tmp_path / "s")
    want = pd.DataFrame([json.loads(line) for number, line in
                         enumerate(path.read_text().splitlines(), 1) if number not in bad])
    got = store.read_tokens("r").to_pandas().sort_values("position").reset_index(drop=True)
    assert len(got) == len(want) == 2997
    assert got["position"].tolist() == want["position"].tolist()
    np.testing.assert_allclose(got["logprob"], want["logprob"], rtol=1e-6)
    rejected = store.manifest("r")["rejected"]
    assert rejected["count"] == 3
    assert sorted(e["line"] for e in rejected["examples"]) == sorted(bad)


# -- values beyond any sane range: left out of curves and fits, counted, never a crash ------
def _metrics_with(tmp_path: Path, column: str, value: float) -> tuple[Path, pd.DataFrame]:
    steps = np.arange(40)
    frame = pd.DataFrame({"step": steps, "entropy": 2.0 * np.exp(-steps / 10) + 0.1,
                          "reward": 0.9 - 0.8 * np.exp(-steps / 10)})
    frame["val/accuracy"] = frame["reward"] * 0.9
    frame.loc[20, column] = value
    frame.to_csv(tmp_path / "metrics.csv", index=False)
    el.ingest(tmp_path / "metrics.csv", tmp_path / "s", run="r", progress=False)
    return tmp_path / "s", frame.drop(index=20)


def _no_non_finite(path: Path) -> None:
    found = []
    json.loads(path.read_text(), parse_constant=found.append)
    assert not found, found


@pytest.mark.parametrize("column,value", [("entropy", 1e308), ("entropy", -1e308),
                                          ("entropy", 1000.0), ("val/accuracy", 1e308),
                                          ("val/accuracy", -1e308)])
def test_huge_metric_values_are_left_out_and_counted(tmp_path, column, value):
    import warnings

    store, clean = _metrics_with(tmp_path, column, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no overflow anywhere
        fit = el.fit_saturation(store, "r", bootstrap=50)
        phases = el.phases(store)
        el.compare(store)
        el.report(store, tmp_path / "report")
    # the fit is the least-squares fit of the sane points (independent: numpy lstsq); a
    # performance point whose entropy was left out takes a neighbouring step's (the join)
    data = fit.data.set_index("step")
    assert set(clean["step"]) <= set(data.index) and data["H"].abs().max() < 2.2
    joined = clean.set_index("step")
    assert np.allclose(data.loc[joined.index, "H"], joined["entropy"])
    h, r = data["H"].to_numpy(), data["R"].to_numpy()
    (a, b), *_ = np.linalg.lstsq(np.column_stack([-np.exp(h), np.ones_like(h)]), r, rcond=None)
    assert fit.n == (40 if column == "entropy" and abs(value) > 1e100 else 39)
    assert fit.a == pytest.approx(a, rel=1e-9) and fit.b == pytest.approx(b, rel=1e-9)
    assert any("left out" in note for note in fit.notes), fit.notes
    assert phases.runs[0].to_dict()["run"] == "r"
    _no_non_finite(tmp_path / "report" / "report.json")


def test_token_entropy_beyond_any_vocabulary_is_a_counted_null(tmp_path):
    path = tmp_path / "tokens.csv"
    path.write_text("step,sample_id,position,token,logprob,entropy\n"
                    "1,s,0,a,-0.5,1e38\n1,s,1,b,-0.1,0.5\n1,s,2,c,-0.25,3e3\n"
                    "1,s,3,d,-0.2,12.5\n")
    el.ingest(path, tmp_path / "s", run="r", progress=False)
    store = el.open(tmp_path / "s")
    assert store.read_tokens("r").column("entropy").to_pylist() == [None, 0.5, None, 12.5]
    assert store.manifest("r")["counts"]["sentinel_entropys"] == 2
    summary = el.summary(tmp_path / "s")
    assert summary.steps["entropy_token_mean"].tolist() == pytest.approx([(0.5 + 12.5) / 2])
