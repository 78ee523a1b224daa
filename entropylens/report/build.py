"""Assemble the report: analyses -> figures, verdicts, token view -> HTML, Markdown, JSON."""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .._version import __version__
from ..base.jsonable import plain as _plain
from ..base.jsonable import records
from ..analysis.registry import Analysis, Outcome
from ..errors import EntropylensError
from ..store import Store, _finite, _json_default, open_store, write_file_atomic, writing
from .collect import RunResults, collect
from .figures import FigureFile, compare_figure, figure_file, write_figures
from .render import render_html, render_markdown
from .tokens import pick_examples
from .verdicts import Verdict, from_finding, verdicts

#: Constants the page's sentences name ("the first twelfth", "within 10% of the floor").
DEFINITIONS = {"early_fraction": 1 / 12, "arrival_band": 0.1, "collapsed_share": 0.25,
               "min_r2_for_ceiling": 0.5, "rise_share": 0.1, "ceiling_entropy": 0.0}
#: Entropy that saturates the token view's colour scale is at least this (nats).
MIN_SCALE = 0.5


@dataclass
class Report:
    """What :func:`build_report` wrote.

    Attributes
    ----------
    out : Path
        The report folder.
    html, markdown, json : Path
        ``index.html``, ``report.md`` and ``report.json`` inside it.
    figures : list of Path
        ``figures/*.png``.
    model : dict
        The content of ``report.json``: every number the page shows.
    """

    out: Path
    html: Path
    markdown: Path
    json: Path
    figures: list[Path]
    model: dict = field(repr=False)

    @property
    def path(self) -> Path:
        """The page to open: ``index.html``."""
        return self.html

    def to_dict(self) -> dict:
        return {"out": str(self.out), "html": str(self.html), "markdown": str(self.markdown),
                "json": str(self.json), "figures": [str(p) for p in self.figures],
                "verdicts": self.model["verdicts"]}


def _section(part: Outcome, figure: FigureFile | None = None, **content) -> dict:
    """A report part that spans runs (comparison, data quality)."""
    section = {"available": part.ok, "reason": part.reason,
               "figure": figure.to_dict() if figure is not None else None}
    if part.ok:
        section.update(content)
    return section


def slug(run: str, index: int) -> str:
    """An HTML id fragment for a run: ``r0-vanilla``."""
    return f"r{index}-" + (re.sub(r"[^a-z0-9]+", "-", run.lower()).strip("-") or "run")


def anchor(name: str, s: str) -> str:
    """The page id of analysis ``name``'s section of the run with slug ``s``."""
    return f"sec-{name}-{s}"


@dataclass
class RunSections:
    """What the analyses give the report about one run."""

    sections: dict[str, dict]
    figures: list[FigureFile]
    findings: list[Verdict]


def run_sections(entry: RunResults, analyses: Sequence[Analysis], s: str) -> RunSections:
    """Each analysis' section of one run, its figures drawn and its findings.

    The section of analysis ``name`` is ``{"name", "title", "available", "reason",
    "figures", **section(result, run)}``. A section whose hooks raise is "not available"
    with the reason (an :class:`EntropylensError` says it in plain words, such as a run
    whose tokens hold no entropy), so one broken section never costs the report.
    """
    sections, figures, findings = {}, [], []
    for analysis in analyses:
        outcome = entry.part(analysis.name)
        if not outcome.ok and analysis.only_where_present:
            continue   # a run without search trees or token origins has no such section
        section = {"name": analysis.name, "title": analysis.title, "available": outcome.ok,
                   "reason": outcome.reason, "figures": []}
        if outcome.ok:
            try:
                content = _plain(analysis.section(outcome.value, entry.run) or {})
                drawn = [figure_file(spec, s)
                         for spec in analysis.figures(outcome.value, entry.run)]
                found = analysis.findings(outcome.value, entry.run)
            except Exception as exc:  # noqa: BLE001 - a report section must not sink the report
                section.update(available=False, reason=exc.message
                               if isinstance(exc, EntropylensError)
                               else f"failed: {type(exc).__name__}: {exc}")
            else:
                section.update(content)
                section["figures"] = [f.to_dict() for f in drawn]
                figures.extend(drawn)
                findings.extend(from_finding(f, entry.run, anchor(analysis.name, s))
                                for f in found)
        sections[analysis.name] = section
    return RunSections(sections, figures, findings)


def _run_model(entry: RunResults, s: str, sections: dict, examples: Outcome) -> dict:
    return {"run": entry.run, "slug": s, "tokens": entry.tokens, "sequences": entry.sequences,
            "entropy_source": entry.entropy_source, "sections": sections,
            "examples": {"available": examples.ok, "reason": examples.reason,
                         "note": _examples_note(entry, examples),
                         "items": [e.to_dict() for e in examples.value]
                         if examples.ok else []}}


def _examples(store: Store, entry: RunResults) -> Outcome:
    """Example completions of the run, their forking tokens marked when it has them."""
    from ..analysis.forking import forking_mask

    source = entry.entropy_source if entry.entropy_source in ("exact", "topk", "surprisal") \
        else None
    forking = entry.part("forking")
    try:
        items = pick_examples(store, entry.run, source=source, vocab_size=entry.vocab_size,
                              forking=forking.value if forking.ok else None,
                              forking_mask=forking_mask if forking.ok else None)
    except EntropylensError as exc:
        return Outcome(reason=exc.message)
    if not items:
        return Outcome(reason="the run has no completions or tokens to show")
    return Outcome(value=items)


def _examples_note(entry: RunResults, examples: Outcome) -> str | None:
    """Say so when a run has tokens but none of its shown completions could be matched."""
    if examples.ok and entry.tokens and not any(e.tokens for e in examples.value):
        return ("no token rows share (step, sample_id) with these completions, so they are "
                "shown as plain text without entropies")
    return None


def _unavailable(model: dict) -> list[dict]:
    out = []
    for run in model["runs"]:
        for name, section in run["sections"].items():
            if not section["available"]:
                out.append({"run": run["run"], "section": name, "reason": section["reason"]})
        if not run["examples"]["available"]:
            out.append({"run": run["run"], "section": "examples",
                        "reason": run["examples"]["reason"]})
    for name in ("compare", "quality"):
        if not model[name]["available"]:
            out.append({"run": None, "section": name, "reason": model[name]["reason"]})
    return out


def build_report(store: Store | str, out: str | Path, runs: str | Sequence[str] | None = None,
                 *, engine: str = "local", workers: int | None = None,
                 title: str = "entropylens report", keep_after_eos: bool = False) -> Report:
    """Write the diagnostic report of ``runs`` of ``store`` into the folder ``out``.

    Parameters
    ----------
    store : Store or path
    out : path
        Report folder (created; files of an earlier report are overwritten).
    runs : str or sequence of str, optional
        Default: every run.
    engine : {"local", "ray"}
    workers : int, optional
        Processes of the local engine.
    title : str
    keep_after_eos : bool
        Keep the tokens after the end of their sequence in the token analyses (left out by
        default; their count is reported either way).

    Returns
    -------
    Report
    """
    store = open_store(store)
    names = store.resolve_runs(runs)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EntropylensError("report output exists and is not a folder", path=out)
    results = collect(store, names, engine=engine, workers=workers,
                      keep_after_eos=keep_after_eos)

    figures: list[FigureFile] = []
    run_models, findings = [], []
    for index, entry in enumerate(results.runs):
        s = slug(entry.run, index)
        made = run_sections(entry, results.sections, s)
        figures.extend(made.figures)
        findings.extend(made.findings)
        run_models.append(_run_model(entry, s, made.sections, _examples(store, entry)))
    compare = results.part("compare")
    compare_fig = compare_figure(results) if compare.ok else None
    if compare_fig is not None:
        figures.append(compare_fig)
    quality = results.part("quality")

    scale = [t["entropy"] for r in run_models for e in r["examples"]["items"]
             for t in e["tokens"] if t["entropy"] is not None]
    model = {
        "title": title,
        "store": str(store.path),
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "entropylens_version": __version__,
        "runs": run_models,
        "verdicts": [v.to_dict() for v in verdicts(
            findings, results, {"compare": "compare", "quality": "quality"})],
        "sections": [{"name": a.name, "title": a.title, "headline": a.headline}
                     for a in results.sections],
        "overview": records(results.summary.runs),
        "summary_steps": records(results.summary.steps),
        "warnings": list(results.summary.warnings),
        "compare": _section(compare, compare_fig,
                            table=records(compare.value.table) if compare.ok else [],
                            curves=records(compare.value.curves) if compare.ok else []),
        "quality": _section(quality, checks=records(quality.value) if quality.ok else []),
        "token_scale": {"min": 0.0, "max": max(MIN_SCALE, float(np.quantile(scale, 0.99)))
                        if scale else MIN_SCALE, "colormap": "YlOrRd"},
        "figures": [f.to_dict() for f in figures],
        "definitions": DEFINITIONS,
    }
    model["unavailable"] = _unavailable(model)
    model = _finite(json.loads(json.dumps(model, default=_json_default)))

    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
        write_figures(figures, out)
    html_path, md_path, json_path = out / "index.html", out / "report.md", out / "report.json"
    # each file replaces what is there (a planted symbolic link too) instead of writing
    # through it
    with writing(out):
        write_file_atomic(html_path, render_html(
            model, {f.id: f.data_uri for f in figures}).encode("utf-8"))
        write_file_atomic(md_path, render_markdown(model).encode("utf-8"))
        write_file_atomic(json_path,
                          json.dumps(model, indent=1, allow_nan=False).encode("utf-8"))
    return Report(out=out, html=html_path, markdown=md_path, json=json_path,
                  figures=[out / f.file for f in figures], model=model)
