"""The report: files, JSON, verdicts against independent numbers, escaping, degraded runs."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from typer.testing import CliRunner

import entropylens as el
from entropylens.cli import app
from entropylens.errors import EntropylensError
from entropylens.report import build_report
from entropylens.report.render import md_escape
from entropylens.store import Store
from _eos import after_eos, before_eos

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "<script>alert(1)</script>"
MD_SPECIALS = "**bold** _it_ [link](http://example.com/x) | # `code` ![img](y.png) & <b>b</b>"
TOP_KEYS = {"title", "store", "generated", "entropylens_version", "runs", "verdicts",
            "overview", "summary_steps", "warnings", "compare", "quality", "token_scale",
            "figures", "unavailable", "definitions", "sections"}
#: The registered analyses the report shows per run (report.json: run["sections"][name]).
RUN_SECTIONS = ("diagnose", "phases", "distribution", "saturation", "forking", "roles",
                "covariance", "diversity")


def tricky_store(path: Path) -> Store:
    """A small run whose completions and prompts hold HTML and Markdown specials."""
    rng = np.random.default_rng(7)
    store = Store.create(path)
    completion = f"Let me think. {SCRIPT} then {MD_SPECIALS}\nDone: 4."
    pieces = [completion[i:i + 4] for i in range(0, len(completion), 4)]
    tokens, sequences = [], []
    for step in range(8):
        for sample in range(4):
            sid = f"{step}:{sample}"
            entropy = rng.uniform(0, 3, len(pieces)) * np.exp(-step / 3)
            tokens.append(pd.DataFrame({
                "step": step, "sample_id": sid, "group_id": str(sample // 2),
                "position": np.arange(len(pieces), dtype=np.int32), "token": pieces,
                "entropy": entropy, "logprob": -entropy * rng.uniform(0.5, 1.5, len(pieces)),
                "advantage": float(sample % 2) - 0.5}))
            sequences.append({"step": step, "sample_id": sid, "group_id": str(sample // 2),
                              "prompt": f"Say {SCRIPT} & {MD_SPECIALS}", "completion": completion,
                              "reward": float(sample % 2), "advantage": float(sample % 2) - 0.5})
    metrics = [{"step": s, "metric": m, "value": v, "raw_key": m}
               for s in range(8) for m, v in (("reward_mean", 0.1 + 0.1 * s),
                                              ("val_accuracy", 0.05 + 0.11 * s))]
    with store.write_run("my_run+1") as writer:
        writer.write_tokens(pa.Table.from_pandas(pd.concat(tokens), preserve_index=False))
        writer.write_sequences(pa.Table.from_pylist(sequences))
        writer.write_metrics(pa.Table.from_pylist(metrics))
    return store


class _Page(HTMLParser):
    """Visible text, element ids and every src/href of an HTML page."""

    def __init__(self):
        super().__init__()
        self.text, self.ids, self.links, self.tags = [], set(), [], []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        for key in ("src", "href"):
            if key in attrs:
                self.links.append(attrs[key])
        if tag in ("style", "title"):
            self._skip += 1

    def handle_endtag(self, tag):
        if tag in ("style", "title"):
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.text.append(data)


def parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    return page


@pytest.fixture(scope="module")
def sample_report(sample_store, tmp_path_factory):
    return build_report(sample_store, tmp_path_factory.mktemp("report") / "out")


def test_files_json_keys_and_figures(sample_report):
    out = sample_report.out
    model = json.loads((out / "report.json").read_text())
    assert set(model) == TOP_KEYS
    assert [r["run"] for r in model["runs"]] == ["top20", "vanilla"]
    assert [s["name"] for s in model["sections"]] == [*RUN_SECTIONS, "origins", "branches"]
    for run in model["runs"]:
        assert list(run["sections"]) == list(RUN_SECTIONS)
        for name, section in run["sections"].items():
            assert section["available"], (run["run"], name, section["reason"])
            assert section["name"] == name and section["title"]
        assert run["examples"]["available"]
    assert model["unavailable"] == []
    assert [run["examples"]["note"] for run in model["runs"]] == [None, None]
    assert model["compare"]["available"] and model["quality"]["available"]
    files = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert files == sorted(Path(f["file"]).name for f in model["figures"])
    assert len(files) == 23  # eleven per run (diagnosis 1, diversity 4) and the comparison
    for path in (out / "figures").glob("*.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "index.html").read_text()
    page = parse(html)
    # one file: every image inline, every link an anchor of this page
    assert page.tags.count("img") == len(files)
    assert all(link.startswith("data:image/png;base64,") or link.startswith("#")
               for link in page.links)
    assert "script" not in page.tags
    for link in page.links:
        if link.startswith("#"):
            assert link[1:] in page.ids, link
    assert (out / "report.md").read_text().startswith("# entropylens report")


def test_verdicts_match_independent_numbers(sample_report, sample_store):
    verdicts = {(v["run"], v["kind"]): v for v in sample_report.model["verdicts"]}
    collapsed = verdicts[("vanilla", "entropy")]
    assert collapsed["text"].startswith("entropy collapsed")
    # the share of the drop reached at the arrival step, from the raw tokens with numpy
    raw = before_eos(pd.read_parquet(REPO / "sample_logs" / "vanilla" / "tokens.parquet"))
    curve = raw.groupby("step")["entropy"].apply(lambda h: h.to_numpy(np.float64).mean())
    numbers = collapsed["numbers"]
    phases = el.phases(sample_store, "vanilla").runs[0]
    assert numbers["arrival_step"] == phases.arrival_step
    assert numbers["start_entropy"] == pytest.approx(curve.iloc[0], rel=1e-9)
    floor = curve.iloc[-max(3, int(np.ceil(len(curve) / 10))):].mean()
    assert numbers["floor"] == pytest.approx(floor, rel=1e-9)
    share = (curve.iloc[0] - curve.loc[phases.arrival_step]) / (curve.iloc[0] - floor)
    assert numbers["drop_share_by_arrival"] == pytest.approx(share, rel=1e-9)
    assert f"{share:.0%} of the drop happened by step {phases.arrival_step}" in collapsed["text"]
    assert collapsed["anchor"] == "sec-phases-r1-vanilla"
    # top20's entropy did not fall: no entropy verdict (the diagnosis says it is not learning)
    assert ("top20", "entropy") not in verdicts
    # the fitted ceiling the verdict states is the fit's b - a
    fit = el.fit_saturation(sample_store, "vanilla")
    assert verdicts[("vanilla", "fit")]["numbers"]["ceiling"] == pytest.approx(fit.b - fit.a)
    assert f"ceiling of {fit.ceiling:.2f}" in verdicts[("vanilla", "fit")]["text"]
    # plateau alarms come from the diagnosis' findings (noise-aware), not from a verdict rule
    assert not any(v["kind"] == "alarm" for v in sample_report.model["verdicts"])


def _numbers_in(value, out: list[float]) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        out.append(float(value))
    elif isinstance(value, str):
        for digits, percent in re.findall(r"(\d+(?:\.\d+)?(?:e[-+]?\d+)?)(%?)", value):
            out.append(float(digits) / (100 if percent else 1))
    elif isinstance(value, dict):
        for v in value.values():
            _numbers_in(v, out)
    elif isinstance(value, list):
        for v in value:
            _numbers_in(v, out)


#: Per-step tables and per-token values: figure data, never printed as text on the page.
FIGURE_DATA = {"summary_steps", "curve", "performance", "steps", "semantic", "groups",
               "curves", "tokens"}


def _page_numbers(model) -> np.ndarray:
    """Numbers of report.json that the page may print (figure data left out)."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()
                    if not (k in FIGURE_DATA and isinstance(v, list))}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    found: list[float] = []
    _numbers_in(strip(model), found)
    return np.unique(np.abs(np.array(found)))


def _unknown_numbers(text: str, known: np.ndarray) -> list[str]:
    unknown = []
    for digits, percent in re.findall(r"(?<![\w.])(\d+(?:\.\d+)?(?:e[-+]?\d+)?)(%?)", text):
        value = float(digits) / (100 if percent else 1)
        decimals = len(digits.split(".")[1]) if "." in digits and "e" not in digits else 0
        # half a unit of the last printed digit (of the percentage for percentages)
        tolerance = 0.5 * 10.0 ** (-decimals) / (100 if percent else 1) * 1.0001
        if "e" in digits:
            tolerance = abs(value) * 0.005
        if not np.any(np.abs(known - value) <= tolerance):
            unknown.append(digits + percent)
    return unknown


def test_every_number_on_the_page_is_in_the_json(sample_report):
    known = _page_numbers(sample_report.model)
    text = " ".join(parse(sample_report.html.read_text()).text)
    assert len(re.findall(r"\d+", text)) > 300
    assert _unknown_numbers(text, known) == []
    # the check is sharp enough to notice numbers that the JSON does not hold
    assert _unknown_numbers("a 12.345 b 7.77% c 0.4321 d 654", known) == \
        ["12.345", "7.77%", "0.4321", "654"]


def test_completion_text_is_escaped_in_html_and_markdown(tmp_path):
    report = build_report(tricky_store(tmp_path / "store"), tmp_path / "out")
    html = report.html.read_text()
    page = parse(html)
    assert "script" not in page.tags and "b" not in page.tags
    assert SCRIPT not in html and "<b>b</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # the prompt, in one piece
    token_text = "".join(page.text)
    assert SCRIPT in token_text and MD_SPECIALS.replace("<b>b</b>", "") in token_text
    assert all(link.startswith(("data:", "#")) for link in page.links)
    markdown = report.markdown.read_text()
    assert "<script" not in markdown and "<b>" not in markdown
    assert "&lt;script&gt;alert\\(1\\)&lt;/script&gt;" in markdown
    assert "\\*\\*bold\\*\\*" in markdown and "\\[link\\]\\(http" in markdown
    assert "[link](" not in markdown and "**bold**" not in markdown
    assert "\\\\_" not in markdown  # escaped once, never twice
    assert "my\\_run+1" in markdown  # the run name's underscore is escaped too
    # the Markdown text is what md_escape makes of the completion, line break and all
    completion = report.model["runs"][0]["examples"]["items"][0]["completion"]
    assert md_escape(completion) in markdown
    assert "\n" in completion and "\n" not in md_escape(completion)
    model = json.loads(report.json.read_text())
    assert model["runs"][0]["run"] == "my_run+1"


def test_a_run_with_tokens_but_no_completions_shows_its_first_and_last_step(tmp_path):
    store = Store.create(tmp_path / "s")
    pieces = ["Ġso", "Ġthe", "Ġanswer", "Ġis", "Ġ<", "b", ">"]
    rows = [{"step": step, "sample_id": sid, "position": i, "token": piece,
             "entropy": 0.1 * (i + 1) + step}
            for step in (3, 5, 9) for sid in ("b", "a") for i, piece in enumerate(pieces)]
    with store.write_run("tok") as writer:
        writer.write_tokens(pa.Table.from_pylist(rows))
    report = build_report(store, tmp_path / "out")
    items = report.model["runs"][0]["examples"]["items"]
    assert [(e["label"], e["step"], e["sample_id"]) for e in items] == \
        [("earliest step", 3, "a"), ("latest step", 9, "a")]
    assert items[0]["completion"] == " so the answer is <b>"
    assert [t["entropy"] for t in items[1]["tokens"]] == pytest.approx(
        [9.1, 9.2, 9.3, 9.4, 9.5, 9.6, 9.7])
    html = report.html.read_text()
    assert "<b>" not in html and "&lt;" in html
    # no reward or accuracy metric: no fit, said so
    assert not report.model["runs"][0]["sections"]["saturation"]["available"]


def test_completions_that_match_no_tokens_are_shown_as_text_with_a_note(tmp_path):
    store = Store.create(tmp_path / "s")
    with store.write_run("r") as writer:
        writer.write_tokens(pa.Table.from_pylist(
            [{"step": 0, "sample_id": "0:0", "position": i, "token": "x", "entropy": 1.0}
             for i in range(3)]))
        writer.write_sequences(pa.Table.from_pylist(
            [{"step": 0, "sample_id": "0", "completion": "xxx", "reward": 1.0}]))
    examples = build_report(store, tmp_path / "out").model["runs"][0]["examples"]
    assert examples["items"][0]["completion"] == "xxx" and examples["items"][0]["tokens"] == []
    assert examples["note"].startswith("no token rows share (step, sample_id)")


def test_single_run_store_has_no_comparison(sample_store, tmp_path):
    report = build_report(sample_store, tmp_path / "out", runs="vanilla")
    model = report.model
    assert [r["run"] for r in model["runs"]] == ["vanilla"]
    assert model["compare"] == {"available": False, "reason": "the report holds a single run",
                                "figure": None}
    assert {"run": None, "section": "compare", "reason": "the report holds a single run"} \
        in model["unavailable"]
    assert len(list((tmp_path / "out" / "figures").glob("*.png"))) == 11
    assert "Not available: the report holds a single run" in report.html.read_text()


def test_metric_only_run_degrades_section_by_section(tmp_path, shared_run):
    el.ingest(shared_run / "vanilla" / "metrics.csv", tmp_path / "s", run="m")
    report = build_report(tmp_path / "s", tmp_path / "out")
    run = report.model["runs"][0]
    sections = run["sections"]
    assert sections["phases"]["available"] and sections["saturation"]["available"]
    assert {row["source"] for row in sections["phases"]["curve"]} == {"metric"}
    for name in ("distribution", "forking", "roles", "covariance"):
        assert sections[name] == {"name": name, "title": sections[name]["title"],
                                  "available": False, "figures": [],
                                  "reason": "the run has no tokens (only step metrics)"}
    assert not run["examples"]["available"]
    assert sorted(p.name for p in (tmp_path / "out" / "figures").glob("*.png")) == \
        ["diagnose-r0-m.png", "entropy-r0-m.png", "fit-r0-m.png"]
    html = report.html.read_text()
    assert html.count("Not available: the run has no tokens (only step metrics)") == 4
    kinds = {v["kind"] for v in report.model["verdicts"]}
    assert {"entropy", "fit"} <= kinds


def test_token_view_picks_and_marks_from_the_raw_tokens(sample_report):
    run = next(r for r in sample_report.model["runs"] if r["run"] == "vanilla")
    items = {e["label"]: e for e in run["examples"]["items"]}
    assert list(items) == ["highest reward", "lowest reward", "earliest step", "latest step"]
    sequences = pd.read_parquet(REPO / "sample_logs" / "vanilla" / "sequences.parquet")
    assert items["highest reward"]["reward"] == sequences["reward"].max()
    assert items["lowest reward"]["reward"] == sequences["reward"].min()
    assert items["earliest step"]["step"] == sequences["step"].min()
    assert items["latest step"]["step"] == sequences["step"].max()
    assert len({(e["step"], e["sample_id"]) for e in items.values()}) == 4
    raw = pd.read_parquet(REPO / "sample_logs" / "vanilla" / "tokens.parquet")
    for example in items.values():
        step = example["step"]
        prompt, sample = (int(x) for x in example["sample_id"].split(":"))
        mine = raw[(raw.step == step) & (raw.prompt_idx == prompt) & (raw.sample_idx == sample)]
        mine = mine.sort_values("position")
        got = example["tokens"]
        np.testing.assert_allclose([t["entropy"] for t in got], mine["entropy"], rtol=1e-6)
        # forking: strictly above the 80th percentile (numpy's linear rule) of the step's
        # tokens up to their end of sequence; the padding after it never forks
        kept = before_eos(raw)
        threshold = np.quantile(kept.loc[kept.step == step, "entropy"].to_numpy(np.float64),
                                0.8)
        padding = after_eos(raw).loc[mine.index].to_numpy()
        assert [t["fork"] for t in got] == list(
            (mine["entropy"].to_numpy(np.float64) > threshold) & ~padding)
        # the displayed text is the decoded byte-level pieces
        assert "".join(t["text"] for t in got).startswith(
            mine["token"].iloc[0].replace("Ġ", " ").replace("Ċ", "\n"))
        assert not any("Ġ" in t["text"] for t in got)


def test_cli_report_writes_and_prints_the_page(sample_store, tmp_path):
    result = CliRunner().invoke(app, ["report", str(sample_store.path), "--out",
                                      str(tmp_path / "r"), "--run", "top20"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "r" / "index.html")
    model = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [r["run"] for r in model["runs"]] == ["top20"]


def test_bad_input_is_a_one_line_error(tmp_path, sample_store):
    with pytest.raises(EntropylensError, match="no entropylens store"):
        build_report(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(EntropylensError, match="not a folder"):
        build_report(sample_store, tmp_path / "file")
    result = CliRunner().invoke(app, ["report", str(sample_store.path), "--out",
                                      str(tmp_path / "o"), "--run", "nope"])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "no run named 'nope'" in result.stderr


@pytest.mark.slow  # several seconds: `make test` runs it
def test_demo_writes_the_report(tmp_path):
    result = el.demo(samples=REPO / "sample_logs", store=tmp_path / "store",
                     out=tmp_path / "report")
    assert result.report_path == tmp_path / "report" / "index.html"
    assert result.report_path.exists() and (tmp_path / "report" / "report.json").exists()


def test_tokens_after_eos_are_counted_and_said(sample_report, sample_store):
    overview = {row["run"]: row for row in sample_report.model["overview"]}
    for run in ("vanilla", "top20"):
        raw = pd.read_parquet(REPO / "sample_logs" / run / "tokens.parquet")
        assert overview[run]["tokens_after_eos"] == after_eos(raw).sum() > 0
        assert overview[run]["after_eos"] == "excluded"
    html = " ".join((sample_report.out / "index.html").read_text().split())
    assert "left out of every token analysis" in html and "--keep-after-eos" in html
    markdown = (sample_report.out / "report.md").read_text()
    assert "(left out) |" in markdown
    vanilla = next(r for r in sample_report.model["runs"] if r["run"] == "vanilla")
    rows = vanilla["sections"]["forking"]["top_tokens"]
    assert rows and all("special" in row for row in rows)
    assert "<|im_start|>" not in {row["token"] for row in rows}
