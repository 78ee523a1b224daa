"""The ``entropylens`` commands: each one parses its options, calls its function of the
Python API (:mod:`entropylens.api`) and prints the result with :mod:`.render` or, with
``--json``, as ``result.to_dict()``.

Analysis commands declare only their own options; :func:`.options.analysis_command` adds the
store and the shared ones. Exit codes: 0 on success, 2 on usage errors, 1 on bad data (the
message names the file and the line or record), 3 for ``diagnose --fail-on``.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional, Tuple

import typer

from .._safe_text import plain
from .._version import __version__
from ..base.lazy import LazyModule
from . import render
from .options import (AnalysisOptions, JsonOption, OnDuplicate, OnError, OnErrorOption,
                      ReplaceOption, RunOption, StepBasis, analysis_command, duration,
                      emit_json, pairs, user_errors, working)

# pandas, scipy and pyarrow load when a command first calls the API: not for --help,
# --version or formats
api = LazyModule("entropylens.api")

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


# -- ingest, formats, demo ---------------------------------------------------------------------
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
    on_error: OnError = OnErrorOption,
    replace: bool = ReplaceOption,
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
    with user_errors():
        from ..aliases import load_alias_file
        aliases = load_alias_file(aliases_file) if aliases_file is not None else {}
        aliases.update(pairs(alias, "--alias"))
        runs = api.ingest(sources, out, run=run, format=format, mapping=pairs(map, "--map"),
                          temperature=temperature, vocab_size=vocab_size,
                          on_error=on_error.value, replace=replace,
                          aliases=aliases, on_duplicate=on_duplicate.value,
                          step_basis=step_basis.value if step_basis is not None else None,
                          append=append)
    from ..ingest.driver import ingest_report
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
    from ..ingest.registry import formats  # not through the API: no pandas, no scipy

    for fmt in formats():
        typer.echo(f"{fmt.name:<20} {fmt.description}")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_report"), "--out", help="Report folder."),
    store: Path = typer.Option(Path("demo_store"), "--store", help="Store folder."),
    samples: Path = typer.Option(Path("sample_logs"), "--samples",
                                 help="Folder of sample runs (one subfolder per run)."),
):
    """Ingest the sample logs and show what entropylens finds."""
    with user_errors():
        result = api.demo(samples=samples, store=store, out=out)
    render.summary(result.summary)
    if result.report_path is not None:
        typer.echo(f"report: {result.report_path}")


# -- analyses ----------------------------------------------------------------------------------
@app.command()
@analysis_command()
def summary(options: AnalysisOptions):
    """Per-run contents and per-step entropy statistics."""
    options.show(options.call(api.summary), render.summary)


@app.command()
@analysis_command()
def phases(options: AnalysisOptions):
    """Collapse phases of the entropy curve: segments, early drop, arrival step, alarm."""
    options.show(options.call(api.phases), render.phases)


RewardOption = typer.Option(None, "--reward", help="Performance metric (default: "
                                                   "val_accuracy, else reward_mean).")


@app.command()
@analysis_command()
def fit(options: AnalysisOptions, reward: Optional[str] = RewardOption):
    """Fit the saturation law R = -a*exp(H) + b and its ceiling b - a."""
    options.show(options.call(api.fit_saturation, reward=reward), render.saturation)


@app.command()
@analysis_command()
def compare(options: AnalysisOptions,
            reward: Optional[str] = typer.Option(None, "--reward",
                                                 help="Performance metric.")):
    """Runs side by side: entropy drop, phases, saturation fit, final performance."""
    options.show(options.call(api.compare, reward=reward), render.comparison)


@app.command()
@analysis_command()
def covariance(options: AnalysisOptions):
    """Covariance of token logprob and advantage by group, and its link to entropy change."""
    options.show(options.call(api.covariance), render.covariance)


class Scope(str, Enum):
    step = "step"
    global_ = "global"
    sequence = "sequence"
    batch = "batch"


@app.command()
@analysis_command()
def forks(
    options: AnalysisOptions,
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
):
    """Forking tokens: top-rho entropy thresholds, most frequent forking tokens, overlap."""
    if scope is Scope.batch and batch_size is None:
        raise typer.BadParameter("scope 'batch' needs --batch-size N", param_hint="--batch-size")
    if scope is not Scope.batch and batch_size is not None:
        raise typer.BadParameter("--batch-size applies to --scope batch only",
                                 param_hint="--batch-size")
    if not 0 < ratio < 1:
        raise typer.BadParameter("must lie strictly between 0 and 1", param_hint="--ratio")
    thresholds = dict(ratio=ratio, scope=scope.value, batch_size=batch_size)
    result = options.call(api.forking_tokens, min_count=min_count, top_n=top, **thresholds)
    pair = None
    if overlap:
        engine = options.engine_options()
        with user_errors():
            pair = api.forking_overlap(options.store, overlap[0], overlap[1], **thresholds,
                                       **engine).to_dict()
    if options.as_json:
        emit_json({**result.to_dict(), **({"overlap": pair} if pair is not None else {})})
    else:
        render.forking(result, pair)


@app.command()
@analysis_command(as_json=False)
def report(options: AnalysisOptions,
           out: Path = typer.Option(..., "--out", help="Report folder (created when missing).")):
    """Write the diagnostic report: index.html, report.md, report.json and figures/."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed, whatever the environment says
    engine = options.engine_options()
    with user_errors(), working("writing the report"):
        result = api.report(options.store, out, options.runs or None, **engine)
    render.report_gaps(result)


class LexiconMode(str, Enum):
    replace = "replace"
    extend = "extend"


class Convention(str, Enum):
    auto = "auto"
    bytelevel = "bytelevel"
    sentencepiece = "sentencepiece"
    text = "text"


@app.command()
@analysis_command()
def roles(
    options: AnalysisOptions,
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
):
    """Planning versus execution tokens per step, semantic entropy and the two phases."""
    options.show(options.call(api.roles, lexicon=lexicon, lexicon_mode=lexicon_mode.value,
                              convention=convention.value, window=window), render.roles)


#: Exit code of ``diagnose --fail-on`` when a run has one of the named statuses.
FAIL_ON_EXIT = 3


def _statuses(text: Optional[str]) -> set[str]:
    from ..analysis.diagnose import STATUSES

    wanted = {s.strip() for s in (text or "").split(",") if s.strip()}
    unknown = sorted(wanted - set(STATUSES))
    if unknown:
        raise typer.BadParameter(f"unknown status {', '.join(unknown)} (known: "
                                 f"{', '.join(STATUSES)})", param_hint="--fail-on")
    return wanted


@app.command()
@analysis_command(keep_after_eos=False)
def diagnose(
    options: AnalysisOptions,
    fail_on: Optional[str] = typer.Option(
        None, "--fail-on", help="Comma-separated statuses (e.g. collapsed_plateau,"
        "entropy_explosion): exit 3 when a run has one, so a script or CI job can stop it."),
    val_size: Optional[int] = typer.Option(
        None, "--val-size", min=1, help="Validation prompts behind each accuracy point "
        "(binomial noise; default: from the run's config, else the curve's scatter)."),
    reward: Optional[str] = RewardOption,
):
    """One status per run (learning, collapsing, collapsed_plateau, entropy_explosion,
    not_learning, insufficient_data) with evidence, causes and actions."""
    failing = _statuses(fail_on)
    result = options.call(api.diagnose, val_size=val_size, reward=reward)
    options.show(result, render.diagnosis)
    hit = sorted({item.status for item in result.runs} & failing)
    if hit:
        if not options.as_json:
            typer.echo(f"failing: {', '.join(hit)}", err=True)
        raise typer.Exit(code=FAIL_ON_EXIT)


@app.command()
@analysis_command(keep_after_eos=False)
def diversity(
    options: AnalysisOptions,
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
):
    """Diversity across a prompt's samples: pass@k, best@k, distinct answers, signal."""
    if compare and len(options.runs or []) != 2:
        raise typer.BadParameter("needs exactly two runs: --run A --run B", param_hint="--compare")
    settings = dict(k=k, answer_regex=answer_regex, correct=correct)
    if compare:
        engine = options.engine_options()
        with user_errors():
            result = api.diversity_compare(options.store, *options.runs, **settings, **engine)
    else:
        result = options.call(api.diversity, **settings)
    options.show(result, render.diversity)


@app.command()
@analysis_command(keep_after_eos=False)
def origins(options: AnalysisOptions):
    """Token entropy, forking share and covariance per step, split by token origin."""
    options.show(options.call(api.origins), render.origins)


@app.command()
@analysis_command(keep_after_eos=False)
def branches(
    options: AnalysisOptions,
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
):
    """Branch entropy of search trees: policy priors versus search visits, by depth and step."""
    if not threshold > 0:
        raise typer.BadParameter("must be positive", param_hint="--threshold")
    if not 0 < survive <= 1:
        raise typer.BadParameter("must be in (0, 1]", param_hint="--survive")
    options.show(options.call(api.branches, threshold=threshold, survive=survive,
                              shallow=shallow, nodes=nodes), render.branches)


# -- commands that write: mine-lexicon, rescore, watch -----------------------------------------
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
    with user_errors():
        result = api.mine_lexicon(store, run or None, reward_threshold=reward_threshold,
                                  min_n=min_n, max_n=max_n, min_df=min_df, top_n=top)
        if out is not None:
            result.write(out)
    if as_json:
        emit_json(result.to_dict())
        return
    render.mined_lexicon(result)
    if out is not None:
        typer.echo(f"lexicon: {out}", err=True)


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
    replace: bool = ReplaceOption,
    as_json: bool = JsonOption,
):
    """Score completions with a model: exact per-token entropy, logprob and top-k, as a run."""
    if not temperature > 0:
        raise typer.BadParameter("must be positive", param_hint="--temperature")
    with user_errors():
        result = api.rescore(src, model, out, run=run, source_run=source_run, format=format,
                             temperature=temperature,
                             device=device.value if device else None, batch_size=batch_size,
                             top_k=top_k, chat_template=not no_chat_template, eos=eos.value,
                             tokens="source" if source_tokens else "text",
                             steps=step or None, limit=limit, on_error=on_error.value,
                             replace=replace)
    if as_json:
        emit_json(result.to_dict())
    else:
        render.rescored(result, out)


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
    period = duration(every, "--every")
    idle = duration(until_idle, "--until-idle")

    def emit(result) -> None:  # --json: one object per status change, nothing else
        if result.changed:
            emit_json({"run": run, **result.to_dict()})

    with user_errors():
        api.watch(sources, out, run, every=period, until_idle=idle, on_change=on_change,
                   live=False if as_json else None,
                   echo=(lambda line: None) if as_json else None,
                   on_refresh=emit if as_json else None,
                   format=format, mapping=pairs(map, "--map"),
                   aliases=pairs(alias, "--alias"), val_size=val_size, reward=reward)


def main() -> None:  # pragma: no cover - console entry point
    app()
