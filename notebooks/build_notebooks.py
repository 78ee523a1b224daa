"""Build the example notebooks from the cell texts below.

The notebooks are stored without outputs; ``tests/test_notebooks.py`` executes each one in a
fresh kernel and checks that this script still produces exactly the committed files.

    .venv/bin/python notebooks/build_notebooks.py          # rewrite the .ipynb files
    .venv/bin/python notebooks/build_notebooks.py --check  # exit 1 when a file is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

# Every notebook starts with this cell: it finds sample_logs/ from notebooks/ or the repository
# root and keeps stores and reports in a temporary folder, so a run never touches the checkout.
SETUP = '''\
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

import entropylens as el
import entropylens.plots as elp

REPO = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "sample_logs").is_dir())
SAMPLES = REPO / "sample_logs"
WORK = Path(tempfile.mkdtemp(prefix="entropylens-notebook-"))
STORE = WORK / "store"

pd.set_option("display.width", 110, "display.max_columns", 12, "display.precision", 3)
plt.rcParams.update({"figure.dpi": 72})'''

# The sample runs were sampled at T = 1.0 from SmolLM2-135M (V = 49,152); see sample_logs/.
INGEST_BOTH = '''\
for name in ("vanilla", "top20"):
    el.ingest(SAMPLES / name, STORE, run=name, temperature=1.0, vocab_size=49152,
              progress=False)
store = el.open(STORE)
store.runs()'''

NOTEBOOKS: dict[str, list[tuple[str, str]]] = {}

NOTEBOOKS["01_quickstart.ipynb"] = [
    ("md", '''\
# 01 · Quickstart: from log files to a report

`sample_logs/` holds two real GRPO runs of SmolLM2-135M-Instruct on word arithmetic, logged
token by token with exact entropies: `vanilla` (plain GRPO) and `top20` (policy gradient only
through the 20% highest-entropy tokens, arXiv 2506.01939). This notebook reads them into a
store, summarises them and writes the diagnostic report. Everything goes to a temporary
folder.'''),
    ("code", SETUP),
    ("md", '''\
## Ingest

`el.ingest` detects the format of each file (here the generic `table` format: Parquet tokens
and sequences, a CSV of step metrics) and writes one run into the store. `el.formats()` lists
every format it knows.'''),
    ("code", '''\
", ".join(fmt.name for fmt in el.formats())'''),
    ("code", INGEST_BOTH),
    ("md", '''\
Each run has a manifest: where every number came from (files with sha256), the temperature,
which entropy sources exist, counts and rejected records.'''),
    ("code", '''\
manifest = store.manifest("vanilla")
{key: manifest[key] for key in ("temperature", "vocab_size", "top_k", "entropy_sources",
                                "counts", "rejected")}'''),
    ("md", '''\
## Summary

One row per run, one row per run and step. `entropy_token_mean` is the plain mean over tokens
(verl's `token-mean`), `entropy_seq_mean` the mean of per-sequence means (arXiv 2505.22617,
Eq. 5); `frac_below_0_01` is the share of near-deterministic tokens.'''),
    ("code", '''\
summary = el.summary(store)
summary.runs'''),
    ("code", '''\
steps = summary.steps[["run", "step", "tokens", "entropy_token_mean", "entropy_seq_mean",
                       "p50", "p80", "frac_below_0_01"]]
steps.groupby("run").nth([0, 1, -2, -1])  # first and last steps of each run'''),
    ("md", '''\
The summary also runs data-quality checks. These runs carry one `<|im_start|>` token after
`<|im_end|>` in most completions (the trainer's mask kept it): every token analysis leaves
such tokens out and counts them (`tokens_after_eos`); `keep_after_eos=True` keeps them.'''),
    ("code", '''\
for warning in summary.warnings:
    print(warning[:160])'''),
    ("md", '''\
## One figure

Every plot function takes an analysis result and `ax=`, so figures compose with matplotlib.'''),
    ("code", '''\
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
for ax, run in zip(axes, ("vanilla", "top20")):
    elp.entropy_curve(el.policy_entropy(store, run), performance=el.performance(store, run),
                      ax=ax)
    ax.set_title(run)
fig.tight_layout()'''),
    ("md", '''\
## The report

`el.report` writes `index.html` (one self-contained page), `report.md`, `report.json` and
`figures/*.png`. Its verdicts are plain sentences with the numbers behind them.'''),
    ("code", '''\
report = el.report(store, WORK / "report")
print(report.path.relative_to(WORK))
sorted(p.name for p in report.path.parent.iterdir())'''),
    ("code", '''\
for verdict in report.model["verdicts"]:
    print(f"{verdict['run'] or 'all runs':>8} [{verdict['severity']}] {verdict['text'][:150]}")'''),
    ("md", '''\
## The diagnosis

`el.diagnose` gives each run one status (learning, collapsing, collapsed_plateau,
entropy_explosion, not_learning, insufficient_data), judged beyond the sampling noise of its
performance, with the evidence, the likely causes and what to try.'''),
    ("code", '''\
for item in el.diagnose(store).runs:
    print(f"{item.run:>8} [{item.status}] {item.headline[:150]}")'''),
    ("md", '''\
The same from a shell:

```bash
entropylens ingest sample_logs/vanilla --out store --run vanilla
entropylens summary store
entropylens report store --out report
```'''),
]

NOTEBOOKS["02_diagnose_collapse.ipynb"] = [
    ("md", '''\
# 02 · Diagnosing entropy collapse

Questions for a run whose entropy falls: in which phases, how early, when it reached its
floor, whether performance stopped improving there, and what performance the entropy left can
still buy. The saturation law of arXiv 2505.22617 (R = −a·exp(H) + b) answers the last one:
at H = 0 it predicts the ceiling b − a.'''),
    ("code", SETUP),
    ("code", INGEST_BOTH),
    ("md", '''\
## Phases

`el.phases` segments each run's per-step entropy curve with change-point detection (ruptures
PELT, piecewise-linear cost, BIC-style penalty) and labels each segment by its slope:
rapid collapse, slow decline, plateau or rise.'''),
    ("code", '''\
phases = el.phases(store)
phases.segments'''),
    ("code", '''\
pd.DataFrame([{"run": r.run, "entropy_source": r.entropy_source,
               "start_entropy": r.start_entropy, "floor": r.floor,
               "early_drop_fraction": r.early_drop_fraction,
               "arrival_step": r.arrival_step, "alarm": r.alarm} for r in phases.runs])'''),
    ("md", '''\
`early_drop_fraction` is the share of the total drop that happened in the first twelfth of
training (73% in 2505.22617's Qwen2.5 runs); `arrival_step` is the first step within 10% of
the floor. The alarm fires when entropy sits near its floor while performance has
plateaued:'''),
    ("code", '''\
for r in phases.runs:
    print(f"{r.run}: {r.alarm_message}")'''),
    ("code", '''\
vanilla = phases.runs[[r.run for r in phases.runs].index("vanilla")]
ax = elp.entropy_curve(el.policy_entropy(store, "vanilla"), phases=vanilla.segments,
                       performance=el.performance(store, "vanilla"),
                       arrival_step=vanilla.arrival_step)
ax.set_title("vanilla: phases, arrival at the floor, validation accuracy");'''),
    ("md", '''\
## Saturation law

Fit R = −a·exp(H) + b over the steps that have both an entropy H and a performance R
(validation accuracy here, every 4th step). Intervals are bootstrap 95%.'''),
    ("code", '''\
fit = el.fit_saturation(store, "vanilla")
{key: fit.to_dict()[key] for key in ("x", "y", "n", "a", "b", "ceiling", "ceiling_ci", "r2")}'''),
    ("code", '''\
ax = elp.saturation_fit(fit)
ax.set_title("vanilla: R = -a exp(H) + b");'''),
    ("md", '''\
## Early prediction

Fit on the first 15% of the points and predict the rest (the paper reports about 1% RMSE
with hundreds of points). The check below recomputes the error from the fitted `a`, `b` with
plain numpy, so the number is not taken on trust.'''),
    ("code", '''\
import numpy as np


def holdout_rmse(fit):
    points = fit.data.sort_values("step")
    rest = points.iloc[fit.early["n_fit"]:]
    predicted = -fit.early["a"] * np.exp(rest["H"]) + fit.early["b"]
    return float(np.sqrt(np.mean((rest["R"] - predicted) ** 2)))


rows = []
for fraction in (0.15, 0.3, 0.5):
    early_fit = el.fit_saturation(store, "vanilla", early_fraction=fraction, bootstrap=200)
    rows.append({"fraction": fraction, "points_fitted": early_fit.early["n_fit"],
                 "rmse_reported": early_fit.early["rmse"],
                 "rmse_numpy": holdout_rmse(early_fit)})
pd.DataFrame(rows)'''),
    ("md", '''\
With 19 validation points, 15% is three points taken before entropy moved, and the
extrapolation fails; from about half of the points on the prediction is usable. A run that
logs validation more often gets an earlier prediction.

## Verdict

The report turns the same results into sentences, per run:'''),
    ("code", '''\
report = el.report(store, WORK / "report")
for verdict in report.model["verdicts"]:
    if verdict["kind"] in ("alarm", "entropy", "fit"):
        print(f"{verdict['run']:>8} [{verdict['severity']}] {verdict['text']}\\n")'''),
]

NOTEBOOKS["03_forking_tokens.ipynb"] = [
    ("md", '''\
# 03 · Forking tokens

arXiv 2506.01939 finds that a minority of high-entropy "forking" tokens steer reasoning:
in Qwen3-8B (T = 1) 50.64% of tokens have entropy below 0.01 nats and the 80th percentile is
0.672. This notebook looks at the token-entropy distribution of the sample runs, the top-20%
thresholds under each scope trainers use, which tokens fork, and one completion token by
token.'''),
    ("code", SETUP),
    ("code", INGEST_BOTH),
    ("md", "## Distributions"),
    ("code", '''\
dist = el.distribution(store)
dist.runs'''),
    ("code", '''\
dist.global_quantiles.pivot(index="q", columns="run", values="value")'''),
    ("code", '''\
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), sharey=True)
for ax, run in zip(axes, ("vanilla", "top20")):
    elp.quantile_fan(dist.steps, run=run, ax=ax)
    ax.set_title(run)
fig.tight_layout()'''),
    ("md", '''\
As vanilla trains, its median falls below 0.01 nats and the mean ends above the 80th
percentile: most tokens become deterministic and the entropy that is left sits on a few
tokens. top20 keeps its whole distribution.

## Thresholds by scope

A token forks when its entropy is above the (1 − ρ) quantile of its scope: the step
(default), the whole run, the sequence, or fixed-size batches (trainers select per
micro-batch).'''),
    ("code", '''\
rows = []
for scope, batch_size in (("step", None), ("global", None), ("sequence", None),
                          ("batch", 512)):
    result = el.forking_tokens(store, ratio=0.2, scope=scope, batch_size=batch_size)
    for run, group in result.thresholds.groupby("run"):
        row = result.runs.set_index("run").loc[run]
        rows.append({"scope": scope, "run": run, "units": int(row["units"]),
                     "median_threshold": group["threshold"].median(),
                     "forking_fraction": row["forking_fraction"]})
pd.DataFrame(rows).pivot(index="scope", columns="run",
                         values=["units", "median_threshold", "forking_fraction"])'''),
    ("md", '''\
For top20, whose entropy did not collapse, every scope gives about the same threshold. For
vanilla the scope matters: one global threshold sits far above the entropies of the late,
collapsed steps, so those steps contribute almost no forking tokens, while per-step,
per-batch and per-sequence thresholds fall with the entropy and always flag 20% of their
tokens, forks or not.

## The tokens that fork'''),
    ("code", '''\
forks = el.forking_tokens(store)
forks.top_tokens.groupby("run").head(8)'''),
    ("md", '''\
The ranking leaves out the tokens after the end of a sequence. Kept, vanilla's most frequent
forking token is `<|im_start|>` (marked `special`): the token after `<|im_end|>` that the
model never sampled but the trainer's mask kept (the data-quality warning of notebook 01).
Its entropy is high because what follows the end of a turn is never sampled, so the
distribution there is not sharpened:'''),
    ("code", '''\
kept = el.forking_tokens(store, "vanilla", keep_after_eos=True)
kept.top_tokens.head(3)'''),
    ("md", '''\
Whitespace, punctuation and digits fork less often than their share of all tokens:'''),
    ("code", '''\
forks.composition'''),
    ("code", '''\
fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
for ax, run in zip(axes, ("vanilla", "top20")):
    elp.forking_tokens_bar(forks.top_tokens, run=run, top_n=15, ax=ax)
    ax.set_title(run)
fig.tight_layout()'''),
    ("md", '''\
## The token view

One completion of vanilla at step 10, coloured by entropy (darker is higher), forking tokens
outlined. `el.forking_mask` applies the thresholds of `forks` to any token rows.'''),
    ("code", '''\
import html

import pyarrow.compute as pc
from IPython.display import HTML

tokens = store.read_tokens("vanilla", steps=[10])
one = tokens.filter(pc.equal(tokens["sample_id"], tokens["sample_id"][0]))
view = pd.DataFrame({"token": one.column("token").to_pylist(),
                     "entropy": one.column("entropy").to_numpy(),
                     "fork": el.forking_mask(one, forks, run="vanilla")})
# SmolLM2 uses byte-level BPE: Ġ is a leading space and Ċ a newline
view["text"] = view["token"].str.replace("Ġ", " ").str.replace("Ċ", "\\n")
scale = view["entropy"].max()
spans = "".join(
    f'<span title="{h:.3f} nats" style="background: rgba(214,39,40,{h / scale:.2f});'
    f'{"outline: 1px solid black;" if fork else ""}">{html.escape(text)}</span>'
    for text, h, fork in zip(view["text"], view["entropy"], view["fork"]))
HTML(f'<div style="white-space: pre-wrap; font-family: monospace">{spans}</div>')'''),
    ("code", '''\
view.loc[view["fork"], ["text", "entropy"]].head(12)'''),
]

NOTEBOOKS["04_compare_runs.ipynb"] = [
    ("md", '''\
# 04 · Comparing runs: vanilla against top20

The same base model trained two ways: plain GRPO (`vanilla`) and policy gradient only
through the top-20% entropy tokens (`top20`, arXiv 2506.01939). Curves, phases, law fits,
token distributions, planning tokens and covariance side by side.'''),
    ("code", SETUP),
    ("code", INGEST_BOTH),
    ("md", "## One row per run"),
    ("code", '''\
comparison = el.compare(store)
comparison.table.set_index("run")[["steps", "entropy_source", "first_entropy", "last_entropy",
                                   "early_drop_fraction", "arrival_step", "alarm",
                                   "final_performance", "ceiling", "r2"]].T'''),
    ("code", '''\
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
elp.run_overlay(comparison.curves, metric="policy_entropy", ax=axes[0])
elp.run_overlay(comparison.curves, metric="val_accuracy", ax=axes[1])
fig.tight_layout()'''),
    ("md", '''\
## Saturation fits

With several runs and no `runs=`, `el.fit_saturation` returns one fit per run. A fit with a
low R² or a ≤ 0 says the law does not describe that run (entropy did not fall): read its
ceiling as "no prediction".'''),
    ("code", '''\
fits = el.fit_saturation(store, bootstrap=200)
pd.DataFrame([{k: f.to_dict()[k] for k in ("run", "y", "n", "a", "b", "ceiling", "r2")}
              for f in fits])'''),
    ("md", "## Token distributions and forking tokens"),
    ("code", '''\
dist = el.distribution(store)
forks = el.forking_tokens(store)
dist.runs.merge(forks.runs[["run", "forking_fraction"]], on="run")'''),
    ("md", '''\
## Planning and execution tokens (arXiv 2509.03646)

Tokens inside a strategic gram ("let me", "wait", "the answer is" ...) are planning tokens;
all others execute. `el.roles` gives their entropy per step and the semantic entropy of the
gram frequencies.'''),
    ("code", '''\
roles = el.roles(store)
roles.runs'''),
    ("code", '''\
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), sharey=True)
for ax, run in zip(axes, ("vanilla", "top20")):
    elp.planning_execution(roles.steps, run=run, semantic=roles.semantic, ax=ax)
    ax.set_title(run)
fig.tight_layout()
roles.phase_table[["run", "name", "detected", "start_step", "end_step"]]'''),
    ("md", '''\
## Covariance of logprob and advantage (arXiv 2505.22617)

The entropy change of a step is approximately −η·Cov(log π, A): a positive covariance
drains entropy. Mean covariance by group of tokens, averaged over steps:'''),
    ("code", '''\
cov = el.covariance(store)
cov.groups.groupby(["group", "run"], sort=False)["mean_cov"].mean().unstack("run")'''),
    ("code", '''\
cov.correlation'''),
]


def build(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """One notebook without outputs, with a stable kernelspec and cell ids."""
    notebook = new_notebook()
    notebook.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    stem = name.split("_")[0]
    for index, (kind, text) in enumerate(cells):
        cell = new_markdown_cell(text) if kind == "md" else new_code_cell(text)
        cell["id"] = f"nb{stem}-{index:02d}"  # fixed ids keep rebuilds byte-identical
        notebook.cells.append(cell)
    nbformat.validate(notebook)
    return notebook


def render(name: str) -> str:
    return nbformat.writes(build(name, NOTEBOOKS[name])) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="report stale notebooks instead of writing them")
    args = parser.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        path = HERE / name
        text = render(name)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
    for name in stale:
        print(f"stale: notebooks/{name} (run notebooks/build_notebooks.py)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
