"""How each command's result reads in a terminal: rich tables and lines, one function per
result type. Everything from the data is escaped (``markup``/``escape`` for rich, ``plain``
for plain lines), since token text and run names can hold anything.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .._safe_text import markup, plain

#: Colour of each diagnosis status.
STATUS_COLOURS = {"learning": "green", "collapsing": "yellow", "collapsed_plateau": "red",
                  "entropy_explosion": "red", "not_learning": "red",
                  "insufficient_data": "dim"}


def fmt(value) -> str:
    """A table cell: ``-`` for missing values, three decimals for floats."""
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


def num(value, digits: int = 3) -> str:
    """A number with ``digits`` significant digits, ``-`` when missing."""
    return "-" if value is None or value != value else f"{value:.{digits}g}"


def summary(result) -> None:
    """Per-run contents and per-step entropy statistics (:class:`~entropylens.Summary`)."""
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
            label = "inference" if fmt(step.step) == "-" else step.step
            table.add_row(*[fmt(v) for v in (label, step.tokens, step.entropy_token_mean,
                                             step.entropy_seq_mean, step.p50, step.p80,
                                             step.frac_below_0_01)])
        console.print(table)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {markup(warning)}", highlight=False,
                      markup=True)


def phases(result) -> None:
    """Collapse phases of each run (:class:`~entropylens.Phases`)."""
    console = Console()
    for item in result.runs:
        table = Table(title=f"{item.run}: entropy from {item.entropy_source}, early drop "
                            f"fraction {num(item.early_drop_fraction)}, within 10% of the "
                            f"floor {num(item.floor)} at step {fmt(item.arrival_step)}")
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


def saturation(result) -> None:
    """Saturation-law fits (:class:`~entropylens.SaturationFits` or one fit)."""
    for item in getattr(result, "fits", [result]):
        if item.error:
            typer.echo(f"{item.run}: no fit: {plain(item.error)}")
            continue
        a_ci, b_ci, c_ci = (item.a_ci or [None, None], item.b_ci or [None, None],
                            item.ceiling_ci or [None, None])
        typer.echo(f"{item.run}: {item.y} = -a*exp(H) + b, H = {item.x}, n = {item.n}")
        typer.echo(f"  a = {num(item.a, 4)} [{num(a_ci[0])}, {num(a_ci[1])}]   "
                   f"b = {num(item.b, 4)} [{num(b_ci[0])}, {num(b_ci[1])}]   "
                   f"R^2 = {num(item.r2)}")
        if item.ceiling is None:
            typer.echo(f"  no ceiling: {item.ceiling_reason}")
        else:
            typer.echo(f"  fitted performance at zero entropy (ceiling b - a) = "
                       f"{num(item.ceiling, 4)} [{num(c_ci[0])}, {num(c_ci[1])}]; "
                       f"{item.above_ceiling} of {item.n} observations above it")
        share = item.early.get("rmse_share_of_range")
        typer.echo(f"  early prediction (first {item.early.get('n_fit')} points) RMSE = "
                   f"{num(item.early.get('rmse'))}"
                   + (f" ({share:.1%} of the metric's range)" if share is not None else ""))
        for note in item.notes:
            typer.echo(f"  note: {plain(note)}")


def comparison(result) -> None:
    """Runs side by side (:class:`~entropylens.Comparison`)."""
    for row in result.table.to_dict(orient="records"):
        collapse = "-" if fmt(row["collapse_start"]) == "-" else \
            f"steps {fmt(row['collapse_start'])}-{fmt(row['collapse_end'])}"
        typer.echo(f"{row['run']}: {fmt(row['steps'])} steps, entropy "
                   f"({fmt(row['entropy_source'])}) {num(row['first_entropy'])} -> "
                   f"{num(row['last_entropy'])}, early drop fraction "
                   f"{num(row['early_drop_fraction'])}, within 10% of floor at step "
                   f"{fmt(row['arrival_step'])}, rapid collapse {collapse}, alarm "
                   f"{fmt(row['alarm'])}")
        typer.echo(f"  {fmt(row['performance_metric'])} {num(row['first_performance'])} -> "
                   f"{num(row['final_performance'])}, saturation ceiling "
                   f"{num(row['ceiling'])} (R^2 {num(row['r2'])}, n {fmt(row['fit_n'])})")
        if isinstance(row["note"], str):
            typer.echo(f"  note: {plain(row['note'])}")


def covariance(result) -> None:
    """Covariance of logprob and advantage by group (:class:`~entropylens.Covariance`)."""
    console = Console()
    means = result.groups.groupby(["run", "group"], sort=False)["mean_cov"].mean()
    for corr in result.correlation.itertuples():
        typer.echo(f"{corr.run}: correlation of a step's mean covariance with the next "
                   f"entropy change: Pearson {num(corr.pearson_r)}, Spearman "
                   f"{num(corr.spearman_r)}, n = {corr.n} steps")
        table = Table(title="group means of covariance, averaged over steps")
        table.add_column("group")
        table.add_column("mean cov", justify="right")
        for (name, group), value in means.items():
            if name == corr.run:
                table.add_row(group, f"{value:.4f}")
        console.print(table)
    for reason in result.skipped:
        typer.echo(f"skipped: {plain(reason)}")


def forking(result, overlap: dict | None = None) -> None:
    """Forking tokens of each run (:class:`~entropylens.Forking`) and, when given, the
    overlap of two runs' forking positions (``ForkingOverlap.to_dict()``)."""
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
            f"{item.category} {fmt(item.forking_share)} vs {fmt(item.all_share)}"
            for item in shares.itertuples()), highlight=False)
    if overlap is not None:
        console.print(f"overlap of forking positions {overlap['run_a']} -> {overlap['run_b']}: "
                      f"{fmt(overlap['overlap'])} (Jaccard {fmt(overlap['jaccard'])}) over "
                      f"{overlap['shared_positions']} shared positions", highlight=False)
        if overlap["warning"]:
            console.print(f"[yellow]warning:[/yellow] {markup(overlap['warning'])}",
                          highlight=False)


def report_gaps(result) -> None:
    """The sections a report could not show, on stderr, then the report's path."""
    for missing in result.model["unavailable"]:
        where = f"{missing['run']}: " if missing["run"] else ""
        typer.echo(f"{where}{missing['section']} not available: "
                   f"{plain(missing['reason'])}", err=True)
    typer.echo(str(result.path))


def roles(result) -> None:
    """Planning versus execution tokens per step (:class:`~entropylens.Roles`)."""
    console = Console()
    for row in result.runs.itertuples():
        table = Table(title=f"{row.run}: {row.planning_tokens} of {row.tokens} tokens planning "
                            f"({row.lexicon_size} grams, {row.convention} tokens), entropy "
                            f"from {row.entropy_source}, nats")
        for column in ("step", "plan tok", "exec tok", "plan H", "exec H", "plan rel PPL",
                       "exec rel PPL", "semantic H", "grams"):
            table.add_column(column, justify="right")
        for step in result.wide(row.run).itertuples():
            table.add_row(*[fmt(getattr(step, name, None)) for name in (
                "step", "planning_tokens", "execution_tokens", "planning_mean_entropy",
                "execution_mean_entropy", "planning_relative_perplexity",
                "execution_relative_perplexity", "semantic_entropy", "gram_count")])
        console.print(table)
        for phase in result.phases.get(row.run, []):
            where = (f"steps {phase['start_step']}-{phase['end_step']}" if phase["detected"]
                     else "not detected")
            console.print(f"{phase['name']}: {where}: {phase['reason']}", highlight=False,
                          markup=False)


def mined_lexicon(result) -> None:
    """Candidate strategic grams (:class:`~entropylens.MinedLexicon`)."""
    table = Table(title=f"{result.documents} solutions (reward > {result.reward_threshold:g}), "
                        f"{result.others} other completions")
    for column in ("gram", "df", "per solution", "score", "df others"):
        table.add_column(column, justify="right" if column != "gram" else "left")
    for row in result.table.itertuples():
        table.add_row(escape(row.gram), fmt(row.df), fmt(row.mean_per_solution),
                      fmt(row.score), fmt(row.df_other))
    Console().print(table)


def rescored(result, out) -> None:
    """One line on stderr: what a rescoring wrote (:class:`~entropylens.RescoreResult`)."""
    retok = result.retokenised
    note = (f"; {retok['different']} of {retok['compared']} completions re-tokenised "
            "differently from the logged ids" if retok else "")
    skipped = f", {result.skipped} skipped" if result.skipped else ""
    typer.echo(f"{result.run}: {result.tokens} tokens of {result.sequences} completions scored "
               f"on {result.device} ({result.tokens_per_second:.0f} tokens/s){skipped}{note} "
               f"-> {out}", err=True)


def diagnosis(result) -> None:
    """One status per run with evidence, causes and actions (:class:`Diagnosis`)."""
    console = Console(highlight=False)
    for item in result.runs:
        colour = STATUS_COLOURS[item.status]
        console.print(f"[bold]{escape(item.run)}[/bold]: [{colour}]{item.status}[/{colour}]")
        for line in item.evidence:
            console.print(f"  evidence: {escape(line)}")
        for line in item.causes:
            console.print(f"  cause: {escape(line)}")
        for action in item.actions:
            console.print(f"  try: {escape(action['text'])} ({escape(action['reference'])})")
    for reason in result.skipped:
        console.print(f"skipped: {escape(reason)}")


def diversity(result) -> None:
    """pass@k, distinct answers and zero-variance groups per step (:class:`Diversity`), or
    two runs compared (:class:`DiversityComparison`)."""
    compared = hasattr(result, "pass_at_k") and hasattr(result, "diversity")
    whole = result.diversity if compared else result
    console = Console()
    console.print(escape(f"correct: reward >= {whole.correct:g}; answers: {whole.answer_rule}"))
    for item in whole.to_dict()["runs"]:
        table = Table(title=escape(f"{item['run']}: diversity per step"))
        for column in ("step", "split", "prompts", "pass@k", "distinct answers",
                       "zero-var groups", "reward var", "entropy"):
            table.add_column(column, justify="left" if column == "split" else "right")
        for row in item["steps"]:
            passes = " ".join(f"{key}:{num(value, 2)}" for key, value in row["pass_at_k"].items())
            table.add_row(fmt(row["step"]), escape(str(row["split"])), str(row["prompts"]),
                          passes, num(row["distinct_answers_mean"], 2),
                          f"{row['zero_variance_groups']}/{row['prompts']}",
                          num(row["reward_variance_mean"]), num(row["entropy"]))
        console.print(table)
    if compared:
        table = Table(title=escape(f"pass@k of {result.run_b} minus {result.run_a}"))
        for column in ("step", "split", "k", "difference", "se", "beyond noise"):
            table.add_column(column, justify="right")
        for row in result.pass_at_k.itertuples():
            table.add_row(fmt(row.step), escape(str(row.split)), str(row.k),
                          num(row.difference), num(row.difference_se),
                          "yes" if row.significant else "no")
        console.print(table)
    for reason in whole.skipped:
        typer.echo(f"skipped: {plain(reason)}")


def origins(result) -> None:
    """Token statistics split by token origin, totalled over steps (:class:`Origins`)."""
    console = Console()
    for name, rows in result.steps.groupby("run", sort=False):
        table = Table(title=escape(f"{name}: tokens by origin (totals over steps)"))
        for column in ("origin", "tokens", "entropy mean", "p50", "forking share",
                       "covariance mean"):
            table.add_column(column, justify="left" if column == "origin" else "right")
        for origin, part in rows.groupby("origin", sort=True):
            weights = part["tokens"]
            table.add_row(escape(str(origin)), str(int(weights.sum())),
                          num((part["entropy_mean"] * weights).sum() / weights.sum()),
                          num(part["p50"].median()),
                          num((part["forking_share"] * weights).sum() / weights.sum()),
                          num(part["covariance_mean"].mean()))
        console.print(table)
    for reason in result.skipped:
        typer.echo(f"skipped: {plain(reason)}")


def branches(result) -> None:
    """Branch entropy of search trees by depth (:class:`~entropylens.Branches`)."""
    console = Console()
    for part in result.runs:
        totals = part.summary
        change = totals["shallow_vs_deep"]
        console.print(f"{escape(part.run)}: {totals['trees']} trees, "
                      f"{totals['branching_nodes']} branching nodes; concentrated "
                      f"{num(totals['concentrated_share'])}, priors collapsed "
                      f"{num(totals['collapsed_share'])}, search keeps a spread at "
                      f"{num(totals['maintained_share'])} of those; shallow vs deep: "
                      f"{escape(change['verdict'])}", highlight=False)
        table = Table(title="by depth (all steps)")
        for column in ("depth", "nodes", "prior H", "visit H", "concentrated"):
            table.add_column(column, justify="right")
        for row in part.depth_totals.itertuples():
            table.add_row(str(row.depth), str(row.nodes), num(row.prior_entropy_mean),
                          num(row.visit_entropy_mean), num(row.concentrated_share))
        console.print(table)
    for reason in result.skipped:
        typer.echo(f"skipped: {plain(reason)}")
