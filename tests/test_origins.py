"""Token statistics by origin, against pandas on the real run with mapped origin labels."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from _eos import before_eos
import entropylens as el
from entropylens.cli import app
from entropylens.errors import EntropylensError

runner = CliRunner()


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, shared_run):
    """The real top20 tokens with samples 6-7 of every group labelled as refinements (the
    label lives in a column ``src`` that ingest maps with ``--map origin=src``)."""
    raw = pd.read_parquet(shared_run / "top20" / "tokens.parquet")
    raw["src"] = np.where(raw["sample_idx"] >= 6, "refinement", "on_policy")
    folder = tmp_path_factory.mktemp("origins")
    raw.to_parquet(folder / "tokens.parquet")
    result = runner.invoke(app, ["ingest", str(folder / "tokens.parquet"), "--out",
                                 str(folder / "store"), "--run", "crit", "--map", "origin=src"])
    assert result.exit_code == 0, result.output
    # the analyses leave the padding after end-of-sequence out: so does the pandas reference
    return el.open(folder / "store"), before_eos(raw)


def _pandas_rows(raw: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for step, tokens in raw.groupby("step"):
        entropy = tokens["entropy"].to_numpy(np.float64)
        threshold = np.quantile(entropy, 0.8)
        lp = tokens["logprob"].to_numpy(np.float64)
        adv = tokens["advantage"].to_numpy(np.float64)
        cov = (lp - lp.mean()) * (adv - adv.mean())
        for origin in ("on_policy", "refinement"):
            mine = (tokens["src"] == origin).to_numpy()
            rows.append({"step": step, "origin": origin, "tokens": int(mine.sum()),
                         "entropy_mean": entropy[mine].mean(),
                         "p20": np.quantile(entropy[mine], 0.2),
                         "p50": np.quantile(entropy[mine], 0.5),
                         "p80": np.quantile(entropy[mine], 0.8),
                         "forking_share": (entropy[mine] > threshold).mean(),
                         "covariance_mean": cov[mine].mean()})
    return pd.DataFrame(rows)


def test_split_by_origin_equals_pandas(labelled):
    store, raw = labelled
    got = el.origins(store).steps
    expected = _pandas_rows(raw)
    assert got[["step", "origin", "tokens"]].values.tolist() == \
        expected[["step", "origin", "tokens"]].values.tolist()
    for column in ("entropy_mean", "p20", "p50", "p80", "forking_share", "covariance_mean"):
        np.testing.assert_allclose(got[column], expected[column], rtol=1e-9, atol=1e-12,
                                   err_msg=column)
    # the threshold is the step's, over every origin: the shares average to about 20%
    shares = (got["forking_share"] * got["tokens"]).groupby(got["step"]).sum() / \
        got.groupby("step")["tokens"].sum()
    np.testing.assert_allclose(shares, 0.2, atol=1e-3)


def test_one_step_per_unit_gives_the_same_rows(labelled):
    store, _ = labelled
    whole = el.origins(store)
    stepwise = el.origins(store, unit_rows=1, workers=1)
    pd.testing.assert_frame_equal(whole.steps, stepwise.steps, check_exact=True)


def test_runs_without_origins_are_a_clear_error(shared_store):
    with pytest.raises(EntropylensError, match="no token origins"):
        el.origins(shared_store, "vanilla")
    result = runner.invoke(app, ["origins", str(shared_store.path), "--run", "vanilla"])
    assert result.exit_code == 1 and "--map origin=COLUMN" in result.output


def test_footers_tell_a_run_without_origins_before_any_scan(labelled, shared_store,
                                                           monkeypatch):
    store, _ = labelled
    assert not store.token_column_empty("crit", "origin")
    assert shared_store.token_column_empty("vanilla", "origin")

    def no_scan(*args, **kwargs):
        raise AssertionError("the tokens were scanned")

    monkeypatch.setattr("entropylens.engine.scan_unit", no_scan)
    with pytest.raises(EntropylensError, match="no token origins"):
        el.origins(shared_store, "vanilla", workers=1)


def test_footers_without_null_counts_leave_it_to_the_scan(tmp_path, labelled):
    # a part written without statistics proves nothing: the column may hold values
    import shutil

    import pyarrow.parquet as pq

    store, _ = labelled
    copy = tmp_path / "store"
    shutil.copytree(store.path, copy)
    for part in (copy / "runs" / "crit" / "tokens").glob("part-*.parquet"):
        table = pq.read_table(part)
        table = table.set_column(table.schema.get_field_index("origin"), "origin",
                                 pa.nulls(table.num_rows, pa.string()))
        pq.write_table(table, part, write_statistics=False)
    assert not el.open(copy).token_column_empty("crit", "origin")


def test_cli_and_report_hooks(labelled):
    store, _ = labelled
    result = runner.invoke(app, ["origins", str(store.path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["ratio"] == 0.2 and {r["origin"] for r in data["steps"]} == {"on_policy",
                                                                             "refinement"}
    from entropylens.analysis.origins import OriginsAnalysis

    analysis = OriginsAnalysis()
    origins = el.origins(store)
    section = analysis.section(origins, "crit")
    assert [o["origin"] for o in section["origins"]] == ["on_policy", "refinement"]
    counts = store.manifest("crit")["counts"]
    assert sum(o["tokens"] for o in section["origins"]) == \
        counts["tokens"] - counts["tokens_after_eos"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (spec,) = analysis.figures(origins, "crit")
    fig, axes = plt.subplots(1, 2)
    spec.draw(axes)
    assert all(len(ax.lines) == 2 for ax in axes)
    plt.close(fig)


def test_report_blocks_escape_origin_labels(labelled):
    from entropylens.analysis.origins import OriginsAnalysis
    from test_diversity import render_block

    store, _ = labelled
    section = OriginsAnalysis().section(el.origins(store), "crit")
    section["origins"][0]["origin"] = "<b>on|policy</b>"
    html = render_block("origins", section, "crit", markdown=False)
    md = render_block("origins", section, "crit", markdown=True)
    assert "<b>" not in html and "&lt;b&gt;on|policy" in html
    assert "<b>" not in md and "on\\|policy" in md   # a label cannot break the table
    assert "refinement" in html and "refinement" in md


def test_ray_engine_gives_identical_rows(labelled):
    ray = pytest.importorskip("ray")
    from entropylens.engine import init_ray

    store, _ = labelled
    started = not ray.is_initialized()
    init_ray(num_cpus=2)
    try:
        local = el.origins(store, unit_rows=20_000)
        remote = el.origins(store, engine="ray", unit_rows=20_000)
    finally:
        if started:
            ray.shutdown()
    pd.testing.assert_frame_equal(local.steps, remote.steps, check_exact=True)
