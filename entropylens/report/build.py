"""Assemble the report: analyses -> figures, verdicts, token view -> HTML, Markdown, JSON."""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .. import __version__
from ..errors import EntropylensError
from ..store import Store, _finite, _json_default, write_file_atomic, writing
from .collect import Part, RunResults, analysis, collect
from .figures import FigureFile, compare_figure, role_phases, run_figures, write_figures
from .render import render_html, render_markdown
from .tokens import pick_examples
from .verdicts import verdicts

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


def records(frame: pd.DataFrame | None) -> list[dict]:
    """Rows of a DataFrame as JSON-ready dicts (NaN and NA become None)."""
    if frame is None:
        return []
    out = []
    for row in frame.astype(object).where(frame.notna(), None).to_dict(orient="records"):
        out.append({str(k): _plain(v) for k, v in row.items()})
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (pd.Timestamp, _dt.datetime, _dt.date)):
        return value.isoformat()
    if value is pd.NA:
        return None
    return value


def _result_dict(value: Any) -> dict:
    to_dict = getattr(value, "to_dict", None)
    return _plain(to_dict()) if callable(to_dict) else {}


def _section(part: Part, figure: FigureFile | None = None, **content) -> dict:
    section = {"available": part.ok, "reason": part.reason,
               "figure": figure.to_dict() if figure is not None else None}
    if part.ok:
        section.update(content)
    return section


def slug(run: str, index: int) -> str:
    """An HTML id fragment for a run: ``r0-vanilla``."""
    return f"r{index}-" + (re.sub(r"[^a-z0-9]+", "-", run.lower()).strip("-") or "run")


def _run_rows(frame: pd.DataFrame, run: str) -> pd.DataFrame:
    return frame[frame["run"] == run] if "run" in frame.columns else frame


def _run_model(entry: RunResults, s: str, figures: dict[str, FigureFile],
               examples: Part) -> dict:
    curve, perf, phases = entry.part("curve"), entry.part("performance"), entry.part("phases")
    fit, dist, forking = entry.part("fit"), entry.part("distribution"), entry.part("forking")
    roles, cov = entry.part("roles"), entry.part("covariance")
    model = {
        "run": entry.run, "slug": s, "tokens": entry.tokens, "sequences": entry.sequences,
        "entropy_source": entry.entropy_source,
        "entropy": _section(curve, figures.get("entropy"),
                            curve=records(curve.value) if curve.ok else [],
                            performance=records(perf.value) if perf.ok else [],
                            performance_reason=perf.reason,
                            phases=_result_dict(phases.value) if phases.ok else None,
                            phases_reason=phases.reason),
        "distribution": _section(dist, figures.get("quantiles"),
                                 steps=records(_run_rows(dist.value.steps, entry.run))
                                 if dist.ok else [],
                                 global_quantiles=records(_run_rows(
                                     getattr(dist.value, "global_quantiles", None),
                                     entry.run)) if dist.ok and getattr(
                                     dist.value, "global_quantiles", None) is not None else []),
        "fit": _section(fit, figures.get("fit"), result=_result_dict(fit.value)
                        if fit.ok else None),
        "forking": _section(forking, figures.get("forking"),
                            ratio=getattr(forking.value, "ratio", None),
                            scope=getattr(forking.value, "scope", None),
                            top_tokens=_token_rows(_run_rows(forking.value.top_tokens,
                                                             entry.run)) if forking.ok else [],
                            composition=records(_run_rows(getattr(
                                forking.value, "composition", pd.DataFrame()), entry.run))
                            if forking.ok else []),
        "roles": _section(roles, figures.get("roles"),
                          steps=records(_run_rows(roles.value.steps, entry.run))
                          if roles.ok else [],
                          semantic=records(_run_rows(roles.value.semantic, entry.run))
                          if roles.ok and getattr(roles.value, "semantic", None) is not None
                          else [],
                          phases=records(role_phases(roles.value, entry.run))
                          if roles.ok else []),
        "covariance": _section(cov, figures.get("covariance"),
                               groups=records(_run_rows(cov.value.groups, entry.run))
                               if cov.ok else [],
                               correlation=records(_run_rows(cov.value.correlation, entry.run))
                               if cov.ok else []),
        "examples": {"available": examples.ok, "reason": examples.reason,
                     "note": _examples_note(entry, examples),
                     "items": [e.to_dict() for e in examples.value] if examples.ok else []},
    }
    return model


def _token_rows(frame: pd.DataFrame) -> list[dict]:
    from ..plots._display import token_label

    rows = records(frame)
    for row in rows:
        row["label"] = token_label(row.get("token"))
    return rows


def _examples(store: Store, entry: RunResults) -> Part:
    source = entry.entropy_source if entry.entropy_source in ("exact", "topk", "surprisal") \
        else None
    forking = entry.part("forking")
    mask = analysis("forking_mask") if forking.ok else None
    try:
        items = pick_examples(store, entry.run, source=source, vocab_size=entry.vocab_size,
                              forking=forking.value if forking.ok else None, forking_mask=mask)
    except EntropylensError as exc:
        return Part(reason=exc.message)
    if not items:
        return Part(reason="the run has no completions or tokens to show")
    return Part(value=items)


def _examples_note(entry: RunResults, examples: Part) -> str | None:
    """Say so when a run has tokens but none of its shown completions could be matched."""
    if examples.ok and entry.tokens and not any(e.tokens for e in examples.value):
        return ("no token rows share (step, sample_id) with these completions, so they are "
                "shown as plain text without entropies")
    return None


def _unavailable(model: dict) -> list[dict]:
    out = []
    for run in model["runs"]:
        for name in ("entropy", "distribution", "fit", "forking", "roles", "covariance",
                     "examples"):
            if not run[name]["available"]:
                out.append({"run": run["run"], "section": name, "reason": run[name]["reason"]})
    for name in ("compare", "quality"):
        if not model[name]["available"]:
            out.append({"run": None, "section": name, "reason": model[name]["reason"]})
    return out


def build_report(store: Store | str, out: str | Path, runs: str | Sequence[str] | None = None,
                 *, engine: str = "local", title: str = "entropylens report",
                 keep_after_eos: bool = False) -> Report:
    """Write the diagnostic report of ``runs`` of ``store`` into the folder ``out``.

    Parameters
    ----------
    store : Store or path
    out : path
        Report folder (created; files of an earlier report are overwritten).
    runs : str or sequence of str, optional
        Default: every run.
    engine : {"local", "ray"}
    title : str
    keep_after_eos : bool
        Keep the tokens after the end of their sequence in the token analyses (left out by
        default; their count is reported either way).

    Returns
    -------
    Report
    """
    store = store if isinstance(store, Store) else Store.open(store)
    names = store.resolve_runs(runs)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EntropylensError("report output exists and is not a folder", path=out)
    results = collect(store, names, engine=engine, keep_after_eos=keep_after_eos)

    figures: list[FigureFile] = []
    run_models = []
    anchors: dict = {None: {"compare": "compare", "quality": "quality"}}
    for index, entry in enumerate(results.runs):
        s = slug(entry.run, index)
        run_figs = run_figures(entry, s)
        figures.extend(run_figs.values())
        examples = _examples(store, entry)
        run_models.append(_run_model(entry, s, run_figs, examples))
        anchors[entry.run] = {
            "entropy": f"fig-entropy-{s}" if "entropy" in run_figs else f"run-{s}",
            "fit": f"fig-fit-{s}", "forking": f"forks-{s}", "roles": f"fig-roles-{s}",
            "covariance": f"fig-covariance-{s}"}
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
        "verdicts": [v.to_dict() for v in verdicts(results, anchors)],
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
