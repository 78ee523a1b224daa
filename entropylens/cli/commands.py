"""The ``entropylens`` command line: a thin layer over the Python API.

Exit codes: 0 on success, 2 on usage errors, 1 on bad data (the message names the file and
the line or record). With ``--json`` stdout holds one JSON object and nothing else.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import List, Optional, Tuple

import typer

from ._safe_text import markup, plain
from ._version import __version__
from .base.jsonable import finite as _finite
from .base.jsonable import json_default as _json_default
from .errors import EntropylensError


class _Api:
    """The Python API, imported when a command first calls it: ``--help``, ``--version``
    and ``formats`` do not pay for pandas, scipy and pyarrow."""

    def __getattr__(self, name: str):
        from . import api as module

        return getattr(module, name)


api = _Api()

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Token-level entropy diagnostics for RL training of language models.")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"entropylens {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version,
                                          is_eager=True, help="Print the version and exit.")):
    """Token-level entropy diagnostics for RL training of language models."""


class OnError(str, Enum):
    stop = "stop"
    skip = "skip"


class OnDuplicate(str, Enum):
    error = "error"
    keep_first = "keep-first"
    keep_last = "keep-last"


class StepBasis(str, Enum):
    policy_version = "policy_version"
    logged_step = "logged_step"
    unknown = "unknown"


class Engine(str, Enum):
    local = "local"
    ray = "ray"


def _fail(exc: Exception) -> None:
    message = plain(str(exc).replace("\n", " "))  # data in messages: no terminal escapes
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)


@contextmanager
def _working(what: str):
    """A spinner on stderr while a long command works, when stderr is a terminal."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(what):
        yield


@contextmanager
def _user_errors():
    """Turn bad-data errors, and disk-full or permission errors, into a one-line message
    naming the path and exit code 1."""
    try:
        yield
    except EntropylensError as exc:
        _fail(exc)
    except OSError as exc:  # out of space, no permission, read-only file system
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        _fail(OSError(f"{where}{exc.strerror or exc}"))


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
# --engine ray: Ray Data tasks (pip install 'entropylens[ray]'), results identical to local
RayAddressOption = typer.Option(
    None, "--ray-address", help="Ray cluster for --engine ray (auto, ray://HOST:10001); "
    "default: a new local Ray instance.")


WorkersOption = typer.Option(
    None, "--workers", min=1, help="Processes of the local engine that scan side by side "
    "(each holds one unit of about 800k tokens; default: the CPUs, at most 4, or "
    "$ENTROPYLENS_WORKERS; 1: no extra process).")


def _engine(engine: Engine, ray_address: Optional[str], workers: Optional[int] = None) -> str:
    """The engine name; connects to Ray first for ``--engine ray``."""
    if ray_address and engine is not Engine.ray:
        raise typer.BadParameter("--ray-address needs --engine ray", param_hint="--ray-address")
    if workers is not None:
        if engine is Engine.ray:
            raise typer.BadParameter("--workers is for the local engine (Ray sizes its own)",
                                     param_hint="--workers")
        from .engine import WORKERS_ENV

        os.environ[WORKERS_ENV] = str(workers)   # this process is the command: set it once
    if engine is Engine.ray:
        from .engine import init_ray

        init_ray(ray_address)
    return engine.value
JsonOption = typer.Option(False, "--json", help="Print one JSON object on stdout.")
KeepAfterEosOption = typer.Option(
    False, "--keep-after-eos",
    help="Keep the tokens after the end of their sequence (padding never sampled), which "
         "token analyses leave out by default.")


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
    on_duplicate: OnDuplicate = typer.Option(
        OnDuplicate.error, "--on-duplicate",
        help="Token rows repeating a (step, sample, position) of the run: an error, or keep "
             "the first or last ingested."),
    append: bool = typer.Option(False, "--append",
                                help="Add the steps that are new since the last ingest."),
    alias: Optional[List[str]] = typer.Option(None, "--alias",
                                              help="Metric alias RAW_KEY=CANONICAL."),
    aliases_file: Optional[Path] = typer.Option(
        None, "--aliases", help="TOML or JSON file of metric aliases {raw_key: canonical} "
                                "(--alias wins over it)."),
    step_basis: Optional[StepBasis] = typer.Option(
        None, "--step-basis", metavar="<basis>",
        help="What the sources' steps count: policy_version (step s = policy after s "
             "updates), logged_step (a trainer's 1-based step) or unknown; default: what the "
             "format implies."),
):
    """Read log files into a canonical store."""
    with _user_errors():
        from .aliases import load_alias_file
        aliases = load_alias_file(aliases_file) if aliases_file is not None else {}
        aliases.update(_pairs(alias, "--alias"))
        runs = api.ingest(sources, out, run=run, format=format, mapping=_pairs(map, "--map"),
                          temperature=temperature, vocab_size=vocab_size,
                          on_error=on_error.value, replace=replace,
                          aliases=aliases, on_duplicate=on_duplicate.value,
                          step_basis=step_basis.value if step_basis is not None else None,
                          append=append)
    from .ingest.driver import ingest_report
    store = api.open(out)
    for name in runs:
        lines = ingest_report(store, name)
        typer.echo(f"{lines[0]} -> {out}", err=True)
        for line in lines[1:]:
            typer.echo(line, err=True)
        for warning in store.manifest(name).get("warnings", ()):
            typer.echo(f"warning: {plain(warning)}", err=True)


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
    ray_address: Optional[str] = RayAddressOption,
    workers: Optional[int] = WorkersOption,
    keep_after_eos: bool = KeepAfterEosOption,
    as_json: bool = JsonOption,
):
    """Per-run contents and per-step entropy statistics."""
    with _user_errors():
        result = api.summary(store, run or None, engine=_engine(engine, ray_address, workers),
                             keep_after_eos=keep_after_eos)
    if as_json:
        _emit_json(result.to_dict())
        return
    _print_summary(result)


def _print_summary(result) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for row in result.runs.itertuples():
        source = row.entropy_source or "nothing (no tokens, no policy_entropy metric)"
        after = f", {row.tokens_after_eos} tokens after end-of-sequence " \
            f"{'kept' if row.after_eos == 'kept' else 'left out'}" if row.tokens_after_eos else ""
        table = Table(title=f"{row.run}: {row.tokens} tokens, {row.sequences} sequences, "
                            f"{row.steps} steps, entropy from {source}{after}")
        for column in ("step", "tokens", "token mean", "seq mean", "p50", "p80", "<0.01"):
            table.add_column(column, justify="right")
        steps = result.steps[result.steps["run"] == row.run]
        for step in steps.itertuples():
            # a run without training steps is one "step" of inference: labelled so
            label = "inference" if _fmt(step.step) == "-" else step.step
            table.add_row(*[_fmt(v) for v in (label, step.tokens, step.entropy_token_mean,
                                              step.entropy_seq_mean, step.p50, step.p80,
                                              step.frac_below_0_01)])
        console.print(table)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {markup(warning)}", highlight=False,
                      markup=True)


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
    with _user_errors():
        result = api.demo(samples=samples, store=store, out=out)
    _print_summary(result.summary)
    if result.report_path is not None:
        typer.echo(f"report: {result.report_path}")


# -- trend analyses: phases, fit, compare, covariance ----------------------------------------
def _num(value, digits: int = 3) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}g}"


@app.command()
def phases(
    store: Path = typer.Argument(..., help="Store folder."),
    run: Optional[List[str]] = RunOption,
    engine: Engine = EngineOption,
    ray_address: Optional[str] = RayAddressOption,
    workers: Optional[int] = WorkersOption,
    keep_after_eos: bool = KeepAfterEosOption,
    as_json: bool = JsonOption,
):
    """Collapse phases of the entropy curve: segments, early drop, arrival step, alarm."""
    with _user_errors():
        result = api.phases(store, run or None, engine=_engine(engine, ray_address, workers),
                            keep_after_eos=keep_after_eos)
    if as_json:
        _emit_json(result.to_dict())
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for item in result.runs:
        table = Table(title=f"{item.run}: entropy from {item.entropy_source}, early drop "
                            f"fraction {_num(item.early_drop_fraction)}, within 10% of the "
                            f"floor {_num(item.floor)} at step {_fmt(item.arrival_step)}")
        for column in ("start", "end", "phase", "entropy from", "to", "slope/step"):
            table.add_column(column, justify="right")
        for seg in item.segments.itertuples():
            table.add_row(str(seg.start_step), str(seg.end_step), seg.label,
                          f"{seg.start_entropy:.3f}", f"{seg.end_entropy:.3f}",
                          f"{seg.slope:+.4f}")
        console.print(table)
        if item.note:
            console.print(f"note: {plain(item.note)}", highlight=False, markup=False)
        colour = "red" if item.alarm else "dim"
        console.print(f"[{colour}]{markup(item.alarm_message)}[/{colour}]", highlight=False)


@app.command()
def fit(
    store: Path = typer.Argument(..., help="Store folder."),
    run: Optional[List[str]] = RunOption,
    reward: Optional[str] = typer.Option(None, "--reward",
                                         help="Performance metric (default: val_accuracy, "
                                              "else reward_mean)."),
    engine: Engine = EngineOption,
    ray_address: Optional[str] = RayAddressOption,
    workers: Optional[int] = WorkersOption,
    keep_after_eos: bool = KeepAfterEosOption,
    as_json: bool = JsonOption,
):
    """Fit the saturation law R = -a*exp(H) + b and its ceiling b - a."""
    with _user_errors():
        result = api.fit_saturation(store, run or None, reward=reward,
                                    engine=_engine(engine, ray_address, workers),
                                    keep_after_eos=keep_after_eos)
    fits = getattr(result, "fits", [result])
    if as_json:
        _emit_json(result.to_dict())
        return
    for item in fits:
        if item.error:
            typer.echo(f"{item.run}: no fit: {plain(item.error)}")
            continue
        a_ci, b_ci, c_ci = (item.a_ci or [None, None], item.b_ci or [None, None],
                            item.ceiling_ci or [None, None])
        typer.echo(f"{item.run}: {item.y} = -a*exp(H) + b, H = {item.x}, n = {item.n}")
        typer.echo(f"  a = {_num(item.a, 4)} [{_num(a_ci[0])}, {_num(a_ci[1])}]   "
                   f"b = {_num(item.b, 4)} [{_num(b_ci[0])}, {_num(b_ci[1])}]   "
                   f"R^2 = {_num(item.r2)}")
        if item.ceiling is None:
            typer.echo(f"  no ceiling: {item.ceiling_reason}")
        else:
            typer.echo(f"  fitted performance at zero entropy (ceiling b - a) = "
                       f"{_num(item.ceiling, 4)} [{_num(c_ci[0])}, {_num(c_ci[1])}]; "
                       f"{item.above_ceiling} of {item.n} observations above it")
        share = item.early.get("rmse_share_of_range")
        typer.echo(f"  early prediction (first {item.early.get('n_fit')} points) RMSE = "
                   f"{_num(item.early.get('rmse'))}"
                   + (f" ({share:.1%} of the metric's range)" if share is not None else ""))
        for note in item.notes:
            typer.echo(f"  note: {plain(note)}")


@app.command()
def compare(
    store: Path = typer.Argument(..., help="Store folder."),
    run: Optional[List[str]] = RunOption,
    reward: Optional[str] = typer.Option(None, "--reward", help="Performance metric."),
    engine: Engine = EngineOption,
    ray_address: Optional[str] = RayAddressOption,
    workers: Optional[int] = WorkersOption,
    keep_after_eos: bool = KeepAfterEosOption,
    as_json: bool = JsonOption,
):
    """Runs side by side: entropy drop, phases, saturation fit, final performance."""
    with _user_errors():
        result = api.compare(store, run or None, reward=reward,
                             engine=_engine(engine, ray_address, workers),
                             keep_after_eos=keep_after_eos)
    if as_json:
        _emit_json(result.to_dict())
        return
    for row in result.table.to_dict(orient="records"):
        collapse = "-" if _fmt(row["collapse_start"]) == "-" else \
            f"steps {_fmt(row['collapse_start'])}-{_fmt(row['collapse_end'])}"
        typer.echo(f"{row['run']}: {_fmt(row['steps'])} steps, entropy "
                   f"({_fmt(row['entropy_source'])}) {_num(row['first_entropy'])} -> "
                   f"{_num(row['last_entropy'])}, early drop fraction "
                   f"{_num(row['early_drop_fraction'])}, within 10% of floor at step "
                   f"{_fmt(row['arrival_step'])}, rapid collapse {collapse}, alarm "
                   f"{_fmt(row['alarm'])}")
        typer.echo(f"  {_fmt(row['performance_metric'])} {_num(row['first_performance'])} -> "
                   f"{_num(row['final_performance'])}, saturation ceiling "
                   f"{_num(row['ceiling'])} (R^2 {_num(row['r2'])}, n {_fmt(row['fit_n'])})")
        if isinstance(row["note"], str):
            typer.echo(f"  note: {plain(row['note'])}")


@app.command()
def covariance(
    store: Path = typer.Argument(..., help="Store folder."),
    run: Optional[List[str]] = RunOption,
    engine: Engine = EngineOption,
    ray_address: Optional[str] = RayAddressOption,
    workers: Optional[int] = WorkersOption,
    keep_after_eos: bool = KeepAfterEosOption,
    as_json: bool = JsonOption,
):
    """Covariance of token logprob and advantage by group, and its link to entropy change."""
    with _user_errors():
        result = api.covariance(store, run or None, engine=_engine(engine, ray_address, workers),
                                keep_after_eos=keep_after_eos)
    if as_json:
        _emit_json(result.to_dict())
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    means = result.groups.groupby(["run", "group"], sort=False)["mean_cov"].mean()
    for corr in result.correlation.itertuples():
        typer.echo(f"{corr.run}: correlation of a step's mean covariance with the next "
                   f"entropy change: Pearson {_num(corr.pearson_r)}, Spearman "
                   f"{_num(corr.spearman_r)}, n = {corr.n} steps")
        table = Table(title="group means of covariance, averaged over steps")
        table.add_column("group")
        table.add_column("mean cov", justify="right")
        for (name, group), value in means.items():
            if name == corr.run:
                table.add_row(group, f"{value:.4f}")
        console.print(table)
    for reason in result.skipped:
        typer.echo(f"skipped: {plain(reason)}")
# -- end trend analyses -----------------------------------------------------------------------


# -- token analyses: forking tokens ----------------------------------------------------------
class Scope(str, Enum):
    step = "step"
    global_ = "global"
    sequence = "sequence"
    batch = "batch"


@app.command()
def forks(
    store: Path = typer.Argument(..., help="Store folder."),
    ratio: float = typer.Option(0.2, "--ratio", min=0.0, max=1.0,
                                help="Share of highest-entropy tokens that fork (rho)."),
    scope: Scope = typer.Option(Scope.step, "--scope", help="Where thresholds are taken."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1,
                                             help="Tokens per batch (scope batch)."),
    overlap: Optional[Tuple[str, str]] = typer.Option(
        None, "--overlap", metavar="RUN_A RUN_B",
        help="Also report the overlap of forking positions of two runs."),
    min_count: int = typer.Option(5, "--min-count", min=1,
                                  help="Minimum occurrences to rank a token by rate."),
    top: int = typer.Option(30, "--top", min=1, help="Tokens listed per run."),
    run: Optional[List[str]] = RunOption,
    engine: Engine = EngineOption,
    ray_address: Optional[str] = RayAddressOption,
    workers: Optional[int] = WorkersOption,
    keep_after_eos: bool = KeepAfterEosOption,
    as_json: bool = JsonOption,
):
    """Forking tokens: top-rho entropy thresholds, most frequent forking tokens, overlap."""
    if scope is Scope.batch and batch_size is None:
        raise typer.BadParameter("scope 'batch' needs --batch-size N", param_hint="--batch-size")
    if scope is not Scope.batch and batch_size is not None:
        raise typer.BadParameter("--batch-size applies to --scope batch only",
                                 param_hint="--batch-size")
    if not 0 < ratio < 1:
        raise typer.BadParameter("must lie strictly between 0 and 1", param_hint="--ratio")
    with _user_errors():
        result = api.forking_tokens(store, run or None, ratio=ratio, scope=scope.value,
                                    batch_size=batch_size, min_count=min_count, top_n=top,
                                    engine=_engine(engine, ray_address, workers),
                                    keep_after_eos=keep_after_eos)
        pair = api.forking_overlap(store, overlap[0], overlap[1], ratio=ratio,
                                   scope=scope.value, batch_size=batch_size,
                                   engine=_engine(engine, ray_address, workers),
                                   keep_after_eos=keep_after_eos).to_dict() \
            if overlap else None
    if as_json:
        out = result.to_dict()
        if pair is not None:
            out["overlap"] = pair
        _emit_json(out)
        return
    _print_forks(result, pair)


def _print_forks(result, pair) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for row in result.runs.itertuples():
        thresholds = result.thresholds[result.thresholds["run"] == row.run]["threshold"]
        console.print(f"[bold]{row.run}[/bold]: {row.forking_tokens} of {row.tokens} tokens "
                      f"fork ({row.forking_fraction:.1%}), entropy from {row.entropy_source}; "
                      f"{row.units} {result.scope} threshold(s), median "
                      f"{thresholds.median():.3f} nats (range {thresholds.min():.3f} to "
                      f"{thresholds.max():.3f})", highlight=False)
        for title, frame in (("most forking tokens", result.top_tokens),
                             (f"highest forking rate (seen >= {result.min_count} times)",
                              result.top_by_rate)):
            table = Table(title=f"{row.run}: {title}")
            for column in ("token", "count", "forking", "rate", "special"):
                table.add_column(column, justify="right")
            for item in frame[frame["run"] == row.run].head(15).itertuples():
                table.add_row(markup(repr(item.token)), str(item.count),
                              str(item.forking_count), f"{item.forking_rate:.2f}",
                              "special" if item.special else "")
            console.print(table)
        shares = result.composition[result.composition["run"] == row.run]
        console.print("forking share vs all tokens: " + ", ".join(
            f"{item.category} {_fmt(item.forking_share)} vs {_fmt(item.all_share)}"
            for item in shares.itertuples()), highlight=False)
    if pair is not None:
        console.print(f"overlap of forking positions {pair['run_a']} -> {pair['run_b']}: "
                      f"{_fmt(pair['overlap'])} (Jaccard {_fmt(pair['jaccard'])}) over "
                      f"{pair['shared_positions']} shared positions", highlight=False)
        if pair["warning"]:
            console.print(f"[yellow]warning:[/yellow] {markup(pair['warning'])}",
                          highlight=False)
# -- end token analyses ----------------------------------------------------------------------


# -- report ------------------------------------------------------------------------------------
@app.command()
def report(
    store: Path = typer.Argument(..., help="Store folder."),
    out: Path = typer.Option(..., "--out", help="Report folder (created when missing)."),
    run: Optional[List[str]] = RunOption,
    engine: Engine = EngineOption,
    ray_address: Optional[str] = RayAddressOption,
    workers: Optional[int] = WorkersOption,
    keep_after_eos: bool = KeepAfterEosOption,
):
    """Write the diagnostic report: index.html, report.md, report.json and figures/."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed, whatever the environment says
    with _user_errors(), _working("writing the report"):
        result = api.report(store, out, run or None, engine=_engine(engine, ray_address, workers),
                            keep_after_eos=keep_after_eos)
    for missing in result.model["unavailable"]:
        where = f"{missing['run']}: " if missing["run"] else ""
        typer.echo(f"{where}{missing['section']} not available: "
                   f"{plain(missing['reason'])}", err=True)
    typer.echo(str(result.path))
# -- end report --------------------------------------------------------------------------------


# -- roles: planning versus execution tokens, lexicon mining -----------------------------------
class LexiconMode(str, Enum):
    replace = "replace"
    extend = "extend"


class Convention(str, Enum):
    auto = "auto"
    bytelevel = "bytelevel"
    sentencepiece = "sentencepiece"
    text = "text"


@app.command()
def roles(
    store: Path = typer.Argument(..., help="Store folder."),
    lexicon: Optional[Path] = typer.Option(
        None, "--lexicon", help="Strategic grams, one phrase a line (default: the 249 HICRA "
                                "grams)."),
    lexicon_mode: LexiconMode = typer.Option(
        LexiconMode.replace, "--lexicon-mode", help="Use --lexicon alone or add it to the "
                                                    "default lexicon."),
    convention: Convention = typer.Option(
        Convention.auto, "--convention", help="Tokenizer convention of the token text."),
    window: Optional[int] = typer.Option(None, "--window", min=3,
                                         help="Steps per window of the phase rule."),
    run: Optional[List[str]] = RunOption,
    engine: Engine = EngineOption,
    ray_address: Optional[str] = RayAddressOption,
    workers: Optional[int] = WorkersOption,
    keep_after_eos: bool = KeepAfterEosOption,
    as_json: bool = JsonOption,
):
    """Planning versus execution tokens per step, semantic entropy and the two phases."""
    with _user_errors():
        result = api.roles(store, run or None, lexicon=lexicon,
                           lexicon_mode=lexicon_mode.value, convention=convention.value,
                           window=window, engine=_engine(engine, ray_address, workers),
                           keep_after_eos=keep_after_eos)
    if as_json:
        _emit_json(result.to_dict())
        return
    _print_roles(result)


def _print_roles(result) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for row in result.runs.itertuples():
        table = Table(title=f"{row.run}: {row.planning_tokens} of {row.tokens} tokens planning "
                            f"({row.lexicon_size} grams, {row.convention} tokens), entropy "
                            f"from {row.entropy_source}, nats")
        for column in ("step", "plan tok", "exec tok", "plan H", "exec H", "plan rel PPL",
                       "exec rel PPL", "semantic H", "grams"):
            table.add_column(column, justify="right")
        for step in result.wide(row.run).itertuples():
            table.add_row(*[_fmt(getattr(step, name, None)) for name in (
                "step", "planning_tokens", "execution_tokens", "planning_mean_entropy",
                "execution_mean_entropy", "planning_relative_perplexity",
                "execution_relative_perplexity", "semantic_entropy", "gram_count")])
        console.print(table)
        for phase in result.phases.get(row.run, []):
            where = (f"steps {phase['start_step']}-{phase['end_step']}" if phase["detected"]
                     else "not detected")
            console.print(f"{phase['name']}: {where}: {phase['reason']}", highlight=False,
                          markup=False)


@app.command("mine-lexicon")
def mine_lexicon(
    store: Path = typer.Argument(..., help="Store folder."),
    run: Optional[List[str]] = RunOption,
    reward_threshold: float = typer.Option(0.5, "--reward-threshold",
                                           help="Solutions have a reward above this."),
    min_n: int = typer.Option(1, "--min-n", min=1, help="Shortest n-gram, in words."),
    max_n: int = typer.Option(5, "--max-n", min=1, help="Longest n-gram, in words."),
    min_df: float = typer.Option(0.05, "--min-df", min=0.0, max=1.0,
                                 help="Smallest share of solutions containing an n-gram."),
    top: int = typer.Option(100, "--top", min=1, help="N-grams kept."),
    out: Optional[Path] = typer.Option(None, "--out",
                                       help="Write the phrases as a lexicon file for --lexicon."),
    as_json: bool = JsonOption,
):
    """Rank n-grams of successful completions as candidate strategic grams (offline)."""
    with _user_errors():
        result = api.mine_lexicon(store, run or None, reward_threshold=reward_threshold,
                                  min_n=min_n, max_n=max_n, min_df=min_df, top_n=top)
        if out is not None:
            result.write(out)
    if as_json:
        _emit_json(result.to_dict())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result.documents} solutions (reward > {result.reward_threshold:g}), "
                        f"{result.others} other completions")
    for column in ("gram", "df", "per solution", "score", "df others"):
        table.add_column(column, justify="right" if column != "gram" else "left")
    for row in result.table.itertuples():
        table.add_row(row.gram, _fmt(row.df), _fmt(row.mean_per_solution), _fmt(row.score),
                      _fmt(row.df_other))
    Console().print(table)
    if out is not None:
        typer.echo(f"lexicon: {out}", err=True)
# -- end roles ---------------------------------------------------------------------------------


# -- rescore: exact per-token entropy of text completions, scored with a model -----------------
class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class EosMode(str, Enum):
    auto = "auto"
    always = "always"
    never = "never"


@app.command()
def rescore(
    src: Path = typer.Argument(..., help="A store (with --source-run) or a sequence file: "
                                         "verl rollout JSONL, TRL completions Parquet, a table "
                                         "with prompt/completion columns."),
    model: Path = typer.Option(..., "--model", help="Hugging Face model folder or .gguf file."),
    out: Path = typer.Option(..., "--out", help="Store to write the run into."),
    run: Optional[str] = typer.Option(None, "--run", help="Run name (default: SOURCE-rescored)."),
    source_run: Optional[str] = typer.Option(None, "--source-run",
                                             help="Run of the source store to rescore."),
    format: Optional[str] = typer.Option(None, "--format",
                                         help="Format of a sequence file (default: detect)."),
    temperature: float = typer.Option(1.0, "--temperature",
                                      help="Score softmax(logits / T)."),
    device: Optional[Device] = typer.Option(None, "--device",
                                            help="Default: cuda when available, else cpu."),
    batch_size: int = typer.Option(8, "--batch-size", min=1,
                                   help="Completions per forward pass."),
    top_k: int = typer.Option(20, "--top-k", min=0, help="Alternatives stored per token."),
    no_chat_template: bool = typer.Option(False, "--no-chat-template",
                                          help="Encode prompts as they are."),
    eos: EosMode = typer.Option(EosMode.auto, "--eos",
                                help="Append the end-of-turn token: auto (when the completion "
                                     "stopped on it), always or never."),
    source_tokens: bool = typer.Option(False, "--source-tokens",
                                       help="Score the token ids the source run logged "
                                            "instead of re-tokenising the text."),
    step: Optional[List[int]] = typer.Option(None, "--step",
                                             help="Only these steps (repeat for several)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1,
                                        help="Only the first N completions."),
    on_error: OnError = typer.Option(OnError.stop, "--on-error",
                                     help="Stop at a record that cannot be scored, or skip it."),
    replace: bool = typer.Option(False, "--replace", help="Overwrite a run that exists."),
    as_json: bool = JsonOption,
):
    """Score completions with a model: exact per-token entropy, logprob and top-k, as a run."""
    if not temperature > 0:
        raise typer.BadParameter("must be positive", param_hint="--temperature")
    with _user_errors():
        result = api.rescore(src, model, out, run=run, source_run=source_run, format=format,
                             temperature=temperature,
                             device=device.value if device else None, batch_size=batch_size,
                             top_k=top_k, chat_template=not no_chat_template, eos=eos.value,
                             tokens="source" if source_tokens else "text",
                             steps=step or None, limit=limit, on_error=on_error.value,
                             replace=replace)
    if as_json:
        _emit_json(result.to_dict())
        return
    retok = result.retokenised
    note = (f"; {retok['different']} of {retok['compared']} completions re-tokenised "
            "differently from the logged ids" if retok else "")
    skipped = f", {result.skipped} skipped" if result.skipped else ""
    typer.echo(f"{result.run}: {result.tokens} tokens of {result.sequences} completions scored "
               f"on {result.device} ({result.tokens_per_second:.0f} tokens/s){skipped}{note} "
               f"-> {out}", err=True)
# -- end rescore -------------------------------------------------------------------------------


# -- diagnosis: one status per run ----------------------------------------------------------
#: Exit code of ``diagnose --fail-on`` when a run has one of the named statuses.
FAIL_ON_EXIT = 3


def _statuses(text: Optional[str]) -> set[str]:
    from .analysis.diagnose import STATUSES

    wanted = {s.strip() for s in (text or "").split(",") if s.strip()}
    unknown = sorted(wanted - set(STATUSES))
    if unknown:
        raise typer.BadParameter(f"unknown status {', '.join(unknown)} (known: "
                                 f"{', '.join(STATUSES)})", param_hint="--fail-on")
    return wanted


@app.command()
def diagnose(
    store: Path = typer.Argument(..., help="Store folder."),
    run: Optional[List[str]] = RunOption,
    fail_on: Optional[str] = typer.Option(
        None, "--fail-on", help="Comma-separated statuses (e.g. collapsed_plateau,"
        "entropy_explosion): exit 3 when a run has one, so a script or CI job can stop it."),
    val_size: Optional[int] = typer.Option(
        None, "--val-size", min=1, help="Validation prompts behind each accuracy point "
        "(binomial noise; default: from the run's config, else the curve's scatter)."),
    reward: Optional[str] = typer.Option(None, "--reward", help="Performance metric "
                                         "(default: val_accuracy, else reward_mean)."),
    engine: Engine = EngineOption,
    ray_address: Optional[str] = RayAddressOption,
    workers: Optional[int] = WorkersOption,
    as_json: bool = JsonOption,
):
    """One status per run (learning, collapsing, collapsed_plateau, entropy_explosion,
    not_learning, insufficient_data) with evidence, causes and actions."""
    failing = _statuses(fail_on)
    with _user_errors():
        result = api.diagnose(store, run or None, val_size=val_size, reward=reward,
                              engine=_engine(engine, ray_address, workers))
    if as_json:
        _emit_json(result.to_dict())
    else:
        from rich.console import Console
        from rich.markup import escape

        console = Console(highlight=False)
        colours = {"learning": "green", "collapsing": "yellow", "collapsed_plateau": "red",
                   "entropy_explosion": "red", "not_learning": "red",
                   "insufficient_data": "dim"}
        for item in result.runs:
            console.print(f"[bold]{escape(item.run)}[/bold]: [{colours[item.status]}]"
                          f"{item.status}[/{colours[item.status]}]")
            for line in item.evidence:
                console.print(f"  evidence: {escape(line)}")
            for line in item.causes:
                console.print(f"  cause: {escape(line)}")
            for action in item.actions:
                console.print(f"  try: {escape(action['text'])} ({escape(action['reference'])})")
        for reason in result.skipped:
            console.print(f"skipped: {escape(reason)}")
    hit = sorted({item.status for item in result.runs} & failing)
    if hit:
        if not as_json:
            typer.echo(f"failing: {', '.join(hit)}", err=True)
        raise typer.Exit(code=FAIL_ON_EXIT)
# -- end diagnosis ---------------------------------------------------------------------------


# -- diversity: pass@k, best@k, distinct answers, test-time variance -------------------------
@app.command()
def diversity(
    store: Path = typer.Argument(..., help="Store folder."),
    run: Optional[List[str]] = RunOption,
    k: Optional[str] = typer.Option(None, "--k", help="k of pass@k and best@k, e.g. 1,2,4 "
                                    "(default: powers of two up to the samples per prompt)."),
    answer_regex: Optional[str] = typer.Option(
        None, "--answer-regex", help="Regular expression with one group capturing the final "
        "answer (last match); default: the last \\boxed{...}, else the last number."),
    correct: float = typer.Option(1.0, "--correct",
                                  help="A completion is correct when its reward is at least "
                                       "this."),
    compare: bool = typer.Option(False, "--compare",
                                 help="Compare the two runs given with --run (e.g. one "
                                      "checkpoint evaluated at two temperatures)."),
    engine: Engine = EngineOption,
    ray_address: Optional[str] = RayAddressOption,
    workers: Optional[int] = WorkersOption,
    as_json: bool = JsonOption,
):
    """Diversity across a prompt's samples: pass@k, best@k, distinct answers, signal."""
    if compare and len(run or []) != 2:
        raise typer.BadParameter("needs exactly two runs: --run A --run B", param_hint="--compare")
    with _user_errors():
        options = dict(k=k, answer_regex=answer_regex, correct=correct,
                       engine=_engine(engine, ray_address, workers))
        result = (api.diversity_compare(store, run[0], run[1], **options) if compare
                  else api.diversity(store, run or None, **options))
    if as_json:
        _emit_json(result.to_dict())
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    whole = result.diversity if compare else result
    console.print(escape(f"correct: reward >= {whole.correct:g}; answers: {whole.answer_rule}"))
    for item in whole.to_dict()["runs"]:
        table = Table(title=escape(f"{item['run']}: diversity per step"))
        for column in ("step", "split", "prompts", "pass@k", "distinct answers",
                       "zero-var groups", "reward var", "entropy"):
            table.add_column(column, justify="left" if column == "split" else "right")
        for row in item["steps"]:
            passes = " ".join(f"{key}:{_num(value, 2)}" for key, value in row["pass_at_k"].items())
            table.add_row(_fmt(row["step"]), escape(str(row["split"])), str(row["prompts"]),
                          passes, _num(row["distinct_answers_mean"], 2),
                          f"{row['zero_variance_groups']}/{row['prompts']}",
                          _num(row["reward_variance_mean"]), _num(row["entropy"]))
        console.print(table)
    if compare:
        table = Table(title=escape(f"pass@k of {result.run_b} minus {result.run_a}"))
        for column in ("step", "split", "k", "difference", "se", "beyond noise"):
            table.add_column(column, justify="right")
        for row in result.pass_at_k.itertuples():
            table.add_row(_fmt(row.step), escape(str(row.split)), str(row.k),
                          _num(row.difference), _num(row.difference_se),
                          "yes" if row.significant else "no")
        console.print(table)
    for reason in whole.skipped:
        typer.echo(f"skipped: {reason}")


@app.command()
def origins(
    store: Path = typer.Argument(..., help="Store folder."),
    run: Optional[List[str]] = RunOption,
    engine: Engine = EngineOption,
    ray_address: Optional[str] = RayAddressOption,
    workers: Optional[int] = WorkersOption,
    as_json: bool = JsonOption,
):
    """Token entropy, forking share and covariance per step, split by token origin."""
    with _user_errors():
        result = api.origins(store, run or None, engine=_engine(engine, ray_address, workers))
    if as_json:
        _emit_json(result.to_dict())
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    for name, rows in result.steps.groupby("run", sort=False):
        table = Table(title=escape(f"{name}: tokens by origin (totals over steps)"))
        for column in ("origin", "tokens", "entropy mean", "p50", "forking share",
                       "covariance mean"):
            table.add_column(column, justify="left" if column == "origin" else "right")
        for origin, part in rows.groupby("origin", sort=True):
            weights = part["tokens"]
            table.add_row(escape(str(origin)), str(int(weights.sum())),
                          _num((part["entropy_mean"] * weights).sum() / weights.sum()),
                          _num(part["p50"].median()),
                          _num((part["forking_share"] * weights).sum() / weights.sum()),
                          _num(part["covariance_mean"].mean()))
        console.print(table)
    for reason in result.skipped:
        typer.echo(f"skipped: {reason}")
# -- end diversity ----------------------------------------------------------------------------


# -- search trees: branch entropy of tree search and graph traversal ---------------------------
@app.command()
def branches(
    store: Path = typer.Argument(..., help="Store folder."),
    run: Optional[List[str]] = RunOption,
    nodes: bool = typer.Option(False, "--nodes",
                               help="Add per-tree rows and one row per branching node."),
    threshold: float = typer.Option(0.2, "--threshold",
                                    help="Nats below which a node's visits are concentrated "
                                         "(and its priors collapsed)."),
    survive: float = typer.Option(0.1, "--survive",
                                  help="Share of its siblings' visits a child needs to stay "
                                       "on a surviving path."),
    shallow: int = typer.Option(1, "--shallow", min=0,
                                help="Deepest branching depth counted as shallow (planning)."),
    engine: Engine = EngineOption,
    ray_address: Optional[str] = RayAddressOption,
    workers: Optional[int] = WorkersOption,
    as_json: bool = JsonOption,
):
    """Branch entropy of search trees: policy priors versus search visits, by depth and step."""
    if not threshold > 0:
        raise typer.BadParameter("must be positive", param_hint="--threshold")
    if not 0 < survive <= 1:
        raise typer.BadParameter("must be in (0, 1]", param_hint="--survive")
    with _user_errors():
        result = api.branches(store, run or None, engine=_engine(engine, ray_address, workers),
                              threshold=threshold, survive=survive, shallow=shallow,
                              nodes=nodes)
    if as_json:
        _emit_json(result.to_dict())
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    for part in result.runs:
        summary = part.summary
        change = summary["shallow_vs_deep"]
        console.print(f"{escape(part.run)}: {summary['trees']} trees, "
                      f"{summary['branching_nodes']} branching nodes; concentrated "
                      f"{_num(summary['concentrated_share'])}, priors collapsed "
                      f"{_num(summary['collapsed_share'])}, search keeps a spread at "
                      f"{_num(summary['maintained_share'])} of those; shallow vs deep: "
                      f"{escape(change['verdict'])}", highlight=False)
        table = Table(title="by depth (all steps)")
        for column in ("depth", "nodes", "prior H", "visit H", "concentrated"):
            table.add_column(column, justify="right")
        for row in part.depth_totals.itertuples():
            table.add_row(str(row.depth), str(row.nodes), _num(row.prior_entropy_mean),
                          _num(row.visit_entropy_mean), _num(row.concentrated_share))
        console.print(table)
    for reason in result.skipped:
        typer.echo(f"skipped: {reason}")
# -- end search trees --------------------------------------------------------------------------


# -- watch -----------------------------------------------------------------------------------
def _duration(text: Optional[str], option: str) -> Optional[float]:
    """Seconds in ``30``, ``30s``, ``10m`` or ``1h`` (None stays None)."""
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600}
    value, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(value) * units[unit]
    except ValueError:
        raise typer.BadParameter(f"expected a duration such as 30s, 10m or 1h, got {text!r}",
                                 param_hint=option) from None
    if not seconds > 0 or seconds == float("inf"):
        raise typer.BadParameter(f"must be positive, got {text!r}", param_hint=option)
    return seconds


@app.command()
def watch(
    sources: List[Path] = typer.Argument(..., help="Log files or folders the trainer writes."),
    out: Path = typer.Option(..., "--out", help="Store folder (created when missing)."),
    run: str = typer.Option(..., "--run", help="Run name."),
    every: str = typer.Option("30s", "--every", help="Time between refreshes (30s, 2m)."),
    until_idle: Optional[str] = typer.Option(
        None, "--until-idle", help="Stop once the sources have not grown for this long (10m)."),
    on_change: Optional[str] = typer.Option(
        None, "--on-change", help="Shell command run on each status change, with "
        "ENTROPYLENS_STATUS, ENTROPYLENS_PREVIOUS_STATUS, ENTROPYLENS_RUN, ENTROPYLENS_STEP "
        "and ENTROPYLENS_HEADLINE in its environment."),
    format: Optional[str] = typer.Option(None, "--format",
                                         help="Format name (default: auto-detect)."),
    map: Optional[List[str]] = typer.Option(None, "--map",
                                            help="Column map CANONICAL=SOURCE (a+b joins)."),
    alias: Optional[List[str]] = typer.Option(None, "--alias",
                                              help="Metric alias RAW_KEY=CANONICAL."),
    val_size: Optional[int] = typer.Option(
        None, "--val-size", min=1, help="Validation prompts behind each accuracy point."),
    reward: Optional[str] = typer.Option(None, "--reward", help="Performance metric "
                                         "(default: val_accuracy, else reward_mean)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per status "
                                 "change (and no live view)."),
):
    """Follow a run while it trains: append new steps, re-diagnose, report status changes."""
    period = _duration(every, "--every")
    idle = _duration(until_idle, "--until-idle")

    def emit(result) -> None:  # --json: one object per status change, nothing else
        if result.changed:
            _emit_json({"run": run, **result.to_dict()})

    with _user_errors():
        api.watch(sources, out, run, every=period, until_idle=idle, on_change=on_change,
                   live=False if as_json else None,
                   echo=(lambda line: None) if as_json else None,
                   on_refresh=emit if as_json else None,
                   format=format, mapping=_pairs(map, "--map"),
                   aliases=_pairs(alias, "--alias"), val_size=val_size, reward=reward)
# -- end watch -------------------------------------------------------------------------------


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
