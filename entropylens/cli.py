"""The ``entropylens`` command line: a thin layer over the Python API.

Exit codes: 0 on success, 2 on usage errors, 1 on bad data (the message names the file and
the line or record). With ``--json`` stdout holds one JSON object and nothing else.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from . import api
from .errors import EntropylensError
from .store import _finite, _json_default

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Token-level entropy diagnostics for RL training of language models.")


class OnError(str, Enum):
    stop = "stop"
    skip = "skip"


class Engine(str, Enum):
    local = "local"
    ray = "ray"


def _fail(exc: Exception) -> None:
    message = str(exc).replace("\n", " ")
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)


def _emit_json(obj) -> None:
    typer.echo(json.dumps(_finite(obj), default=_json_default, allow_nan=False))


def _pairs(values: Optional[List[str]], option: str) -> dict[str, str]:
    pairs = {}
    for value in values or []:
        key, sep, target = value.partition("=")
        if not sep or not key.strip() or not target.strip():
            raise typer.BadParameter(f"expected NAME=VALUE, got {value!r}", param_hint=option)
        pairs[key.strip()] = target.strip()
    return pairs


RunOption = typer.Option(None, "--run", help="Run name (repeat for several; default: all).")
EngineOption = typer.Option(Engine.local, "--engine", help="Where to compute.")
JsonOption = typer.Option(False, "--json", help="Print one JSON object on stdout.")


@app.command()
def ingest(
    sources: List[Path] = typer.Argument(..., help="Log files or folders."),
    out: Path = typer.Option(..., "--out", help="Store folder (created when missing)."),
    format: Optional[str] = typer.Option(None, "--format",
                                         help="Format name (default: auto-detect)."),
    run: Optional[str] = typer.Option(None, "--run", help="Run name (default: from the source)."),
    map: Optional[List[str]] = typer.Option(None, "--map",
                                            help="Column map CANONICAL=SOURCE (a+b joins)."),
    temperature: Optional[float] = typer.Option(None, "--temperature",
                                                help="Sampling temperature of the logprobs."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size",
                                             help="Vocabulary size V (top-k bounds)."),
    on_error: OnError = typer.Option(OnError.stop, "--on-error",
                                     help="Stop at the first bad record or skip bad records."),
    replace: bool = typer.Option(False, "--replace", help="Overwrite a run that exists."),
    alias: Optional[List[str]] = typer.Option(None, "--alias",
                                              help="Metric alias RAW_KEY=CANONICAL."),
):
    """Read log files into a canonical store."""
    try:
        runs = api.ingest(sources, out, run=run, format=format, mapping=_pairs(map, "--map"),
                          temperature=temperature, vocab_size=vocab_size,
                          on_error=on_error.value, replace=replace,
                          aliases=_pairs(alias, "--alias"))
    except EntropylensError as exc:
        _fail(exc)
    store = api.open(out)
    for name in runs:
        manifest = store.manifest(name)
        counts = manifest["counts"]
        rejected = manifest["rejected"]["count"]
        note = f", {rejected} bad records skipped" if rejected else ""
        typer.echo(f"{name}: {counts['tokens']} tokens, {counts['sequences']} sequences, "
                   f"{counts['metrics']} metric points{note} -> {out}", err=True)


@app.command("formats")
def formats_command():
    """List the formats entropylens reads."""
    for fmt in api.formats():
        typer.echo(f"{fmt.name:<20} {fmt.description}")


@app.command()
def summary(
    store: Path = typer.Argument(..., help="Store folder."),
    run: Optional[List[str]] = RunOption,
    engine: Engine = EngineOption,
    as_json: bool = JsonOption,
):
    """Per-run contents and per-step entropy statistics."""
    try:
        result = api.summary(store, run or None, engine=engine.value)
    except EntropylensError as exc:
        _fail(exc)
    if as_json:
        _emit_json(result.to_dict())
        return
    _print_summary(result)


def _print_summary(result) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for row in result.runs.itertuples():
        table = Table(title=f"{row.run}: {row.tokens} tokens, {row.sequences} sequences, "
                            f"{row.steps} steps, entropy from {row.entropy_source}")
        for column in ("step", "tokens", "token mean", "seq mean", "p50", "p80", "<0.01"):
            table.add_column(column, justify="right")
        steps = result.steps[result.steps["run"] == row.run]
        for step in steps.itertuples():
            table.add_row(*[_fmt(v) for v in (step.step, step.tokens, step.entropy_token_mean,
                                              step.entropy_seq_mean, step.p50, step.p80,
                                              step.frac_below_0_01)])
        console.print(table)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, markup=True)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    try:
        import pandas as pd
        if value is pd.NA:
            return "-"
    except ImportError:
        pass
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_report"), "--out", help="Report folder."),
    store: Path = typer.Option(Path("demo_store"), "--store", help="Store folder."),
    samples: Path = typer.Option(Path("sample_logs"), "--samples",
                                 help="Folder of sample runs (one subfolder per run)."),
):
    """Ingest the sample logs and show what entropylens finds."""
    try:
        result = api.demo(samples=samples, store=store, out=out)
    except EntropylensError as exc:
        _fail(exc)
    _print_summary(result.summary)
    if result.report_path is not None:
        typer.echo(f"report: {result.report_path}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
