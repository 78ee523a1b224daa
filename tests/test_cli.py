import json

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from entropylens.cli import app
from _eos import before_eos

runner = CliRunner()


def test_ingest_then_summary_json_matches_numpy(tmp_path, shared_run):
    src = shared_run / "vanilla" / "tokens.parquet"
    result = runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "S"), "--run", "v"])
    assert result.exit_code == 0, result.output
    raw = pd.read_parquet(src)
    for flags, rows in (([], before_eos(raw)), (["--keep-after-eos"], raw)):
        result = runner.invoke(app, ["summary", str(tmp_path / "S"), "--json", *flags])
        assert result.exit_code == 0
        data = json.loads(result.stdout)
        assert set(data["runs"][0]) >= {"run", "tokens", "sequences", "steps", "entropy_source",
                                        "tokens_after_eos", "after_eos"}
        assert data["runs"][0]["tokens_after_eos"] == len(raw) - len(before_eos(raw)) > 0
        by_step = rows.groupby("step")["entropy"]
        steps = data["steps"]
        assert [s["tokens"] for s in steps] == by_step.size().tolist()
        np.testing.assert_allclose([s["entropy_token_mean"] for s in steps],
                                   by_step.apply(lambda s: s.to_numpy(np.float64).mean()),
                                   rtol=1e-9)
        assert set(steps[0]) >= {"run", "step", "tokens", "entropy_token_mean",
                                 "entropy_seq_mean", "p50", "p80", "frac_below_0_01"}
    # the table says how many and what was done with them
    result = runner.invoke(app, ["summary", str(tmp_path / "S")])
    assert "tokens after end-of-sequence left out" in " ".join(result.stdout.split())


def test_bad_input_exits_1_with_one_line_naming_file(tmp_path):
    for args in (["/no/such/file.parquet"], [str(tmp_path / "bad.parquet")]):
        (tmp_path / "bad.parquet").write_bytes(b"not parquet")
        result = runner.invoke(app, ["ingest", *args, "--out", str(tmp_path / "S")])
        assert result.exit_code == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and args[0] in lines[0]
        assert not (tmp_path / "S").exists()


def test_usage_error_exits_2(tmp_path):
    result = runner.invoke(app, ["ingest", str(tmp_path), "--map", "nonsense",
                                 "--out", str(tmp_path / "S")])
    assert result.exit_code == 2


def test_formats_lists_table():
    result = runner.invoke(app, ["formats"])
    assert result.exit_code == 0 and "table" in result.stdout
