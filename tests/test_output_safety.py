"""Output safety: log strings are escaped in the HTML and Markdown reports, the page loads
nothing from outside, and run names or file names cannot escape the chosen folders."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from typer.testing import CliRunner

import entropylens as el
from _hardening_helpers import SAMPLE_RUN
from entropylens.cli import app
from entropylens.errors import EntropylensError

EVIL = ['<script>alert(1)</script>', '<img src="http://evil.example/x.png">',
        '[x](javascript:alert(1))', '![t](https://evil.example/t.png)', '<!--', '&amp;',
        '<b onmouseover=alert(2)>']


@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory):
    """A report over real tokens whose text, prompts, completions, metric names and source
    file names carry markup."""
    folder = tmp_path_factory.mktemp("hostile")
    tokens = pd.read_parquet(SAMPLE_RUN / "tokens.parquet")
    tokens = tokens[tokens.step <= 7].copy()
    for i, text in enumerate(EVIL):
        tokens.loc[tokens.index[i::len(EVIL) * 3], "token"] = text
    src = folder / ('tok<img src=x onerror=alert(3)>')
    src.mkdir()
    tokens.to_parquet(src / "tokens.parquet")
    sequences = pd.read_parquet(SAMPLE_RUN / "sequences.parquet")
    sequences = sequences[sequences.step <= 7].copy()
    sequences["prompt"] = EVIL[0] + sequences["prompt"]
    sequences["completion"] = sequences["completion"] + EVIL[1] + EVIL[2]
    sequences.to_parquet(src / "sequences.parquet")
    metrics = pd.read_csv(SAMPLE_RUN / "metrics.csv").head(8)
    metrics["<i>evil</i> metric"] = 1.0
    metrics.to_csv(src / "metrics.csv", index=False)
    store = folder / "store"
    el.ingest(src, store, run="r1", progress=False)
    out = folder / "report"
    el.report(store, out)
    return out


def test_html_escapes_every_log_string(hostile_report):
    html = (hostile_report / "index.html").read_text()
    for text in EVIL:
        if "<" in text:
            assert text not in html, text
    assert "<script" not in html.lower()
    assert "<img src=x" not in html and "<i>evil</i>" not in html
    assert not re.search(r"<img[^>]+src=(?![\"']?data:)", html, re.IGNORECASE)


def test_html_loads_no_external_resource(hostile_report):
    html = (hostile_report / "index.html").read_text()
    tags = re.findall(r"<[a-zA-Z][^>]*>", html)
    assert tags
    for tag in tags:
        for attribute, value in re.findall(r"\s(src|href|action|srcset|poster)\s*=\s*"
                                           r"[\"']?([^\"' >]*)", tag, re.I):
            assert value.startswith(("data:", "#")), (attribute, value)
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", html, re.I)
    assert not re.search(r"@import", html, re.I)


def test_markdown_escapes_every_log_string(hostile_report):
    markdown = (hostile_report / "report.md").read_text()
    assert "<script" not in markdown and "<img" not in markdown and "<b " not in markdown
    assert "](javascript:" not in markdown and "](https://evil" not in markdown


def test_report_writes_only_inside_its_folder(hostile_report):
    parent = hostile_report.parent
    for path in parent.rglob("*"):
        rel = path.relative_to(parent)
        assert rel.parts[0] in ("report", "store", "tok<img src=x onerror=alert(3)>"), rel


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".hidden", "/abs", "x\\y", "",
                                  "a" * 201, "ok\x00"])
def test_run_names_cannot_leave_the_store(name, tmp_path):
    with pytest.raises(EntropylensError):
        el.ingest(SAMPLE_RUN / "metrics.csv", tmp_path / "store", run=name, progress=False)
    result = CliRunner().invoke(app, ["ingest", str(SAMPLE_RUN / "metrics.csv"), "--out",
                                      str(tmp_path / "store"), "--run", name])
    assert result.exit_code in (1, 2) and "Traceback" not in result.output
    assert not (tmp_path / "escape").exists() and not (tmp_path / "b").exists()


def test_run_names_from_log_content_stay_inside(tmp_path):
    """A W&B panel export names its runs in the header: hostile names become safe folders."""
    path = tmp_path / "panel.csv"
    path.write_text('"Step","../../../pwned - train/entropy","/etc/x - train/entropy"\n'
                    '"1","0.5","0.4"\n"2","0.4","0.3"\n')
    store_path = tmp_path / "deep" / "store"
    runs = el.ingest(path, store_path, progress=False)
    store = el.open(store_path)
    for run in runs:
        folder = (store.runs_dir / run).resolve()
        assert folder.parent == store.runs_dir.resolve() and "/" not in run
    assert sorted(p.name for p in tmp_path.rglob("pwned*")) == \
        sorted(r for r in runs if "pwned" in r)
