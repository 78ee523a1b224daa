"""Planning versus execution tokens and the two-phase learning dynamic (arXiv 2509.03646).

HICRA calls a generated token a *planning* token when it is part of a strategic gram ("wait",
"let me", "the key insight is", ...) and an *execution* token otherwise
(:mod:`~entropylens.analysis.lexicon` finds the grams on decoded tokens), and observes two
overlapping phases in RL training: execution tokens consolidate first (their perplexity and
entropy drop, then flatten), then the diversity of planning grams rises.

Per step and class (``planning``, ``execution``) :func:`roles` reports the token count, the
mean token entropy (nats, from the run's best entropy source, named in ``Roles.runs``), the
perplexity ``exp(mean(-logprob))`` and the relative perplexity (divided by the class's first
step with a perplexity). Per step it reports the **semantic entropy**: the Shannon entropy, in
nats, of the frequency distribution of the strategic grams matched in the step's completions
(every match counts once; overlapping phrases resolve to the longest), and the **conditional
entropy** ``H(next gram | gram)`` of the gram that follows a gram within a completion.

The phases are detected by :func:`~entropylens.analysis.roles_phases.detect_phases` (its
module gives the rule).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..base.jsonable import records as _records
from ..base.pieces import CONVENTIONS, detect_convention
from ..base.steps import NO_STEP, step_array
from ..engine import Aggregator, Plan
from ..errors import EntropylensError
from ..estimators import best_entropy_source, columns_for, token_entropy
from ..store import Store
from .lexicon import Lexicon, load_lexicon
from .lexicon_matching import PlanningMatcher
from .registry import NEEDS, Analysis, FigureSpec, Finding, register, run_analysis
from .roles_phases import detect_phases
from .sequences import inside_runs, run_keys, sequence_starts, step_groups

CLASSES = ("planning", "execution")
STEP_COLUMNS = ["run", "step", "cls", "tokens", "mean_entropy", "perplexity",
                "relative_perplexity"]
SEMANTIC_COLUMNS = ["run", "step", "sequences", "sequences_with_grams", "semantic_entropy",
                    "distinct_grams", "gram_count", "conditional_entropy", "transitions"]
GRAM_COLUMNS = ["run", "gram", "count", "steps"]
PHASE_COLUMNS = ["run", "name", "detected", "start_step", "end_step", "signal", "window",
                 "reason"]
RUN_COLUMNS = ["run", "entropy_source", "perplexity", "convention", "lexicon_size",
               "lexicon_source", "tokens", "planning_tokens", "semantic_from"]
#: Tokens read to detect the tokenizer convention.
DETECT_TOKENS = 200_000
#: Columns of the per-(step, class) accumulator.
_COUNT, _ENT_SUM, _ENT_N, _NLL_SUM, _NLL_N = range(5)


# --------------------------------------------------------------------------------------
# The aggregator
# --------------------------------------------------------------------------------------

@dataclass
class _RolesState:
    classes: dict = field(default_factory=dict)      # step -> float64 array (2, 5)
    grams: dict = field(default_factory=dict)        # step -> int64 array (G,)
    transitions: dict = field(default_factory=dict)  # step -> Counter{a * G + b: count}
    sequences: dict = field(default_factory=dict)    # step -> [sequences, with a gram]
    tables: list = field(default_factory=list)       # training tokens not yet matched


def _in_completion_order(table: pa.Table) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """``table`` with each completion's rows together, by position (stored order already
    is: then the table is returned as it is), with its steps and completion starts."""
    steps = step_array(table.column("step"))
    starts = sequence_starts(steps, table.column("sample_id"))
    positions = table.column("position").to_numpy(zero_copy_only=False)
    keys = run_keys(steps, table.column("sample_id"), starts)
    contiguous = len(keys.group_by(["step", "sample_id"]).aggregate([])) == len(starts)
    ordered = not len(positions) or (np.diff(positions)[inside_runs(starts, len(positions))]
                                     > 0).all()
    if contiguous and ordered:
        return table, steps, starts
    table = table.take(pc.sort_indices(table, sort_keys=[("step", "ascending"),
                                                         ("sample_id", "ascending"),
                                                         ("position", "ascending")]))
    steps = step_array(table.column("step"))
    return table, steps, sequence_starts(steps, table.column("sample_id"))


class RolesAggregator(Aggregator):
    """Per-step planning/execution statistics and strategic-gram counts.

    Training tokens wait in the state until :meth:`seal`: the engine's units are
    step-closed, so every completion of a unit is complete there, and the unit's completions
    are decoded and matched in one pass (memory: one unit's token texts). Rows come in
    stored order (step, sample_id, position); a unit whose completions are not contiguous
    (an unsorted ingest) is sorted first. Only training tokens count: a token with a step
    whose split is ``val`` or ``inference`` is skipped.

    Parameters
    ----------
    lexicon : Lexicon
    convention : {"bytelevel", "sentencepiece", "text"}
    source : {"exact", "topk", "surprisal"} or None
        Entropy source; None when the run has no entropy at all.
    has_logprob : bool
        Whether to compute perplexities.
    vocab_size : int, optional
        For the top-k estimate.
    """

    dictionary_columns = ("token",)   # each distinct piece decoded once

    def __init__(self, lexicon: Lexicon, convention: str, source: str | None, *,
                 has_logprob: bool = True, vocab_size: int | None = None):
        self.lexicon = lexicon
        self.convention = convention
        self.source = source
        self.has_logprob = has_logprob
        self.vocab_size = vocab_size
        self.matcher = PlanningMatcher(lexicon, convention)
        cols = {"step", "split", "sample_id", "position", "token"}
        if source is not None:
            cols.update(columns_for(source))
        if has_logprob:
            cols.add("logprob")
        self.columns = tuple(sorted(cols))

    def share_key(self) -> tuple | None:
        """The same phrases, convention and columns give the same tallies: the roles
        analysis and the diagnosis that reads them match the tokens once."""
        if type(self) is not RolesAggregator:
            return None
        return (RolesAggregator, self.lexicon.phrases, self.convention, self.source,
                self.has_logprob, self.vocab_size)

    def start(self) -> _RolesState:
        return _RolesState()

    # -- streaming -----------------------------------------------------------------------
    def update(self, state: _RolesState, batch: pa.RecordBatch) -> _RolesState:
        table = pa.Table.from_batches([batch]).select(list(self.columns))
        split = table.column("split")
        if split.null_count < len(split):
            keep = pc.or_kleene(pc.or_kleene(pc.is_null(split), pc.equal(split, "train")),
                                pc.is_null(table.column("step")))
            table = table.filter(pc.fill_null(keep, True))
        if table.num_rows:
            state.tables.append(table)
        return state

    def seal(self, state: _RolesState) -> _RolesState:
        """Match every completion waiting in the state (all complete: see the class notes)."""
        if state.tables:
            # the batches' token dictionaries differ: one dictionary for the unit
            table = pa.concat_tables(state.tables).unify_dictionaries().combine_chunks()
            state.tables = []
            self._process(state, *_in_completion_order(table))
        return state

    def merge(self, left: _RolesState, right: _RolesState) -> _RolesState:
        for step, values in right.classes.items():
            if step in left.classes:
                left.classes[step] += values
            else:
                left.classes[step] = values
        for step, values in right.grams.items():
            left.grams[step] = left.grams[step] + values if step in left.grams else values
        for step, counter in right.transitions.items():
            left.transitions.setdefault(step, Counter()).update(counter)
        for step, (seqs, with_grams) in right.sequences.items():
            mine = left.sequences.setdefault(step, [0, 0])
            mine[0] += seqs
            mine[1] += with_grams
        left.tables.extend(right.tables)
        return left

    # -- one set of complete sequences --------------------------------------------------
    def _process(self, state: _RolesState, table: pa.Table, steps: np.ndarray,
                 starts: np.ndarray) -> None:
        n = table.num_rows
        if not n:
            return
        result = self.matcher.match(table.column("token"), starts)
        planning = result.planning

        unique_steps, step_index = step_groups(steps)
        n_steps = len(unique_steps)
        key = step_index * 2 + np.where(planning, 0, 1)
        acc = np.zeros((n_steps * 2, 5))
        acc[:, _COUNT] = np.bincount(key, minlength=n_steps * 2)

        def sums(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            # (sum, count) of the finite values per key; no masking when all are finite
            ok = np.isfinite(values)
            if ok.all():
                return np.bincount(key, weights=values, minlength=n_steps * 2), acc[:, _COUNT]
            return (np.bincount(key[ok], weights=values[ok], minlength=n_steps * 2),
                    np.bincount(key[ok], minlength=n_steps * 2))

        if self.source is not None:
            acc[:, _ENT_SUM], acc[:, _ENT_N] = sums(
                token_entropy(table, self.source, vocab_size=self.vocab_size))
        if self.has_logprob:
            acc[:, _NLL_SUM], acc[:, _NLL_N] = sums(
                -table.column("logprob").to_numpy(zero_copy_only=False).astype(np.float64))
        acc = acc.reshape(n_steps, 2, 5)

        n_grams = len(self.lexicon)
        seq_step = step_index[starts]
        match_step = seq_step[result.sequence] if len(result.sequence) else result.sequence
        gram_counts = np.bincount(match_step * n_grams + result.gram,
                                  minlength=n_steps * n_grams).reshape(n_steps, n_grams)
        seqs = np.bincount(seq_step, minlength=n_steps)
        with_grams = np.bincount(seq_step[np.unique(result.sequence)], minlength=n_steps) \
            if len(result.sequence) else np.zeros(n_steps, np.int64)
        same = result.sequence[1:] == result.sequence[:-1]
        pair_codes = (result.gram[:-1] * n_grams + result.gram[1:])[same]
        pair_steps = match_step[:-1][same]
        if len(pair_codes):
            # one int64 key per (step, pair): a 1-D unique, much cheaper than axis=1
            keys, counts = np.unique(pair_steps.astype(np.int64) * n_grams * n_grams
                                     + pair_codes, return_counts=True)
            pairs = np.stack([keys // (n_grams * n_grams), keys % (n_grams * n_grams)])
        else:
            pairs, counts = np.zeros((2, 0), np.int64), np.zeros(0, np.int64)
        for i, step in enumerate(unique_steps.tolist()):
            if step in state.classes:
                state.classes[step] += acc[i]
                state.grams[step] += gram_counts[i]
            else:
                state.classes[step] = acc[i].copy()
                state.grams[step] = gram_counts[i].copy()
            counter = state.sequences.setdefault(step, [0, 0])
            counter[0] += int(seqs[i])
            counter[1] += int(with_grams[i])
        for (s_idx, code), count in zip(pairs.T.tolist(), counts.tolist()):
            state.transitions.setdefault(int(unique_steps[s_idx]), Counter())[code] += count

    def finish(self, state: _RolesState) -> dict:
        """Match the tokens still waiting, then return the raw per-step tallies."""
        self.seal(state)
        return {"classes": state.classes, "grams": state.grams,
                "transitions": state.transitions, "sequences": state.sequences}


# --------------------------------------------------------------------------------------
# From tallies to tables
# --------------------------------------------------------------------------------------

def shannon_entropy(counts) -> float:
    """Shannon entropy in nats of a frequency vector (NaN when it is all zero)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return float("nan")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def conditional_entropy(pair_counts: dict[tuple, int] | Counter) -> float:
    """``H(B | A)`` in nats from counts of pairs ``(a, b)`` (NaN without pairs)."""
    if not pair_counts:
        return float("nan")
    pairs = np.array(list(pair_counts.values()), dtype=np.float64)
    firsts: Counter = Counter()
    for (a, _), count in pair_counts.items():
        firsts[a] += count
    return shannon_entropy(pairs) - shannon_entropy(list(firsts.values()))


def _step_value(step: int):
    return None if step == NO_STEP else int(step)


def _tables(run: str, tallies: dict, lexicon: Lexicon) -> tuple[pd.DataFrame, pd.DataFrame,
                                                                 pd.DataFrame]:
    n_grams = len(lexicon)
    step_rows, sem_rows = [], []
    for step in sorted(tallies["classes"]):
        acc = tallies["classes"][step]
        for c, name in enumerate(CLASSES):
            count, ent_sum, ent_n, nll_sum, nll_n = acc[c]
            step_rows.append({
                "run": run, "step": _step_value(step), "cls": name, "tokens": int(count),
                "mean_entropy": ent_sum / ent_n if ent_n else float("nan"),
                "perplexity": math.exp(nll_sum / nll_n) if nll_n else float("nan")})
    for step in sorted(tallies["sequences"]):
        grams = tallies["grams"].get(step, np.zeros(n_grams, np.int64))
        pairs = {divmod(code, n_grams): c
                 for code, c in tallies["transitions"].get(step, {}).items()}
        seqs, with_grams = tallies["sequences"][step]
        sem_rows.append({"run": run, "step": _step_value(step), "sequences": seqs,
                         "sequences_with_grams": with_grams,
                         "semantic_entropy": shannon_entropy(grams),
                         "distinct_grams": int(np.count_nonzero(grams)),
                         "gram_count": int(grams.sum()),
                         "conditional_entropy": conditional_entropy(pairs),
                         "transitions": int(sum(pairs.values()))})
    steps = pd.DataFrame(step_rows, columns=STEP_COLUMNS[:-1])
    steps["relative_perplexity"] = np.nan
    for name in CLASSES:
        rows = steps["cls"] == name
        valid = steps.loc[rows, "perplexity"].dropna()
        if len(valid):
            steps.loc[rows, "relative_perplexity"] = steps.loc[rows, "perplexity"] / valid.iloc[0]
    steps["step"] = steps["step"].astype("Int64")
    semantic = pd.DataFrame(sem_rows, columns=SEMANTIC_COLUMNS)
    semantic["step"] = semantic["step"].astype("Int64")
    total = np.zeros(n_grams, np.int64)
    in_steps = np.zeros(n_grams, np.int64)
    for counts in tallies["grams"].values():
        total += counts
        in_steps += counts > 0
    used = np.flatnonzero(total)
    grams = pd.DataFrame({"run": run, "gram": [lexicon.phrases[i] for i in used],
                          "count": total[used], "steps": in_steps[used]}, columns=GRAM_COLUMNS)
    grams = grams.sort_values(["count", "gram"], ascending=[False, True],
                              kind="mergesort").reset_index(drop=True)
    return steps[STEP_COLUMNS], semantic, grams


def _semantic_from_sequences(store: Store, run: str, lexicon: Lexicon) -> dict:
    """Gram tallies from the sequences table's completions (runs without tokens)."""
    table = store.read_sequences(run, columns=["step", "split", "sample_id", "completion"])
    split = table.column("split")
    keep = pc.fill_null(pc.or_kleene(pc.is_null(split), pc.equal(split, "train")), True)
    table = table.filter(pc.and_(keep, pc.is_valid(table.column("completion"))))
    tallies = {"classes": {}, "grams": {}, "transitions": {}, "sequences": {}}
    if not table.num_rows:
        return tallies
    steps = step_array(table.column("step"))
    matcher = PlanningMatcher(lexicon, "text")
    # Each completion is one "token" of its own sequence.
    result = matcher.match(table.column("completion"), np.arange(table.num_rows))
    unique_steps, step_index = np.unique(steps, return_inverse=True)
    g = len(lexicon)
    match_step = step_index[result.sequence]
    counts = np.bincount(match_step * g + result.gram, minlength=len(unique_steps) * g) \
        .reshape(len(unique_steps), g)
    seqs = np.bincount(step_index, minlength=len(unique_steps))
    with_grams = np.bincount(step_index[np.unique(result.sequence)],
                             minlength=len(unique_steps))
    same = result.sequence[1:] == result.sequence[:-1]
    for s, code in zip(match_step[:-1][same].tolist(),
                       (result.gram[:-1] * g + result.gram[1:])[same].tolist()):
        tallies["transitions"].setdefault(int(unique_steps[s]), Counter())[code] += 1
    for i, step in enumerate(unique_steps.tolist()):
        tallies["grams"][step] = counts[i]
        tallies["sequences"][step] = [int(seqs[i]), int(with_grams[i])]
    return tallies


# --------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------

@dataclass
class Roles:
    """Result of :func:`roles`.

    Attributes
    ----------
    runs : pandas.DataFrame
        One row per run: ``run, entropy_source, perplexity`` (whether logprobs gave one),
        ``convention`` (tokenizer convention used), ``lexicon_size, lexicon_source, tokens,
        planning_tokens, semantic_from`` (``tokens`` or ``completions``).
    steps : pandas.DataFrame
        ``run, step, cls, tokens, mean_entropy, perplexity, relative_perplexity``, one row
        per run, step and class (``planning`` / ``execution``); entropies in nats.
    semantic : pandas.DataFrame
        ``run, step, sequences, sequences_with_grams, semantic_entropy, distinct_grams,
        gram_count, conditional_entropy, transitions`` (entropies in nats).
    grams : pandas.DataFrame
        ``run, gram, count, steps``: the strategic grams found, most frequent first.
    phases : dict
        Run name to the list of phase dicts of :func:`detect_phases`.
    """

    runs: pd.DataFrame
    steps: pd.DataFrame
    semantic: pd.DataFrame
    grams: pd.DataFrame
    phases: dict = field(default_factory=dict)

    @property
    def phase_table(self) -> pd.DataFrame:
        """The phases as one table: ``run, name, detected, start_step, end_step, ...``."""
        rows = [{"run": run, **{k: v for k, v in phase.items() if k != "evidence"}}
                for run, phases in self.phases.items() for phase in phases]
        return pd.DataFrame(rows, columns=PHASE_COLUMNS)

    def wide(self, run: str) -> pd.DataFrame:
        """One row per step of ``run`` with both classes side by side and the semantic row."""
        steps = self.steps[self.steps["run"] == run]
        frame = None
        for name in CLASSES:
            part = steps[steps["cls"] == name].drop(columns=["run", "cls"]).set_index("step")
            part.columns = [f"{name}_{c}" for c in part.columns]
            frame = part if frame is None else frame.join(part, how="outer")
        sem = self.semantic[self.semantic["run"] == run].drop(columns="run").set_index("step")
        frame = sem if frame is None or frame.empty else frame.join(sem, how="outer")
        frame = frame.reset_index()
        # A run read from completions alone has no class rows: keep the columns, empty.
        for name in CLASSES:
            for column in STEP_COLUMNS[3:]:
                if f"{name}_{column}" not in frame:
                    frame[f"{name}_{column}"] = np.nan
        if "planning_tokens" in frame and "execution_tokens" in frame:
            total = frame["planning_tokens"] + frame["execution_tokens"]
            frame["planning_share"] = frame["planning_tokens"] / total.where(total > 0)
        return frame

    def to_dict(self) -> dict:
        """The JSON shape of ``entropylens roles --json`` (DESIGN.md section 6)."""
        out = []
        for row in _records(self.runs):
            run = row["run"]
            wide = self.wide(run).rename(columns={"planning_mean_entropy": "planning_entropy",
                                                  "execution_mean_entropy": "execution_entropy"})
            grams = self.grams[self.grams["run"] == run].drop(columns="run").head(30)
            out.append({**row, "steps": _records(wide), "phases": self.phases.get(run, []),
                        "top_grams": _records(grams)})
        return {"runs": out}


def roles(store: Store | str, runs: str | Sequence[str] | None = None, *,
          lexicon=None, lexicon_mode: str = "replace", convention: str = "auto",
          window: int | None = None, engine: str = "local", workers: int | None = None,
          **engine_options) -> Roles:
    """Planning versus execution tokens per step, semantic entropy and the two phases.

    Parameters
    ----------
    store : Store or path
    runs : str or sequence of str, optional
        Default: every run.
    lexicon : path, sequence of str, Lexicon or None
        Strategic grams (see :func:`~entropylens.analysis.lexicon.load_lexicon`); None is the
        249 grams of HICRA.
    lexicon_mode : {"replace", "extend"}
        Use ``lexicon`` alone or add it to the default lexicon.
    convention : {"auto", "bytelevel", "sentencepiece", "text"}
        Tokenizer convention of the ``token`` column; ``auto`` detects it per run.
    window : int, optional
        Window of the phase rule (default ``max(5, ceil(steps / 10))``).
    engine : {"local", "ray"}
    workers : int, optional
        Worker processes of the local engine (1: none).

    Returns
    -------
    Roles

    Notes
    -----
    A run without tokens but with completions in its sequences table gets the semantic
    entropy from the completions (``semantic_from = "completions"``) and no class rows.
    """
    lex = load_lexicon(lexicon, mode=lexicon_mode)
    if convention != "auto" and convention not in CONVENTIONS:
        raise EntropylensError(f"unknown tokenizer convention {convention!r} (one of auto, "
                               f"{', '.join(CONVENTIONS)})")
    return run_analysis("roles", store, runs, engine=engine, workers=workers, lexicon=lex,
                        convention=convention, window=window, **engine_options)


def roles_plan(store: Store, run: str, *, lexicon: Lexicon | None = None,
               convention: str = "auto", window: int | None = None) -> Plan:
    """One run's part of :func:`roles`, as a plan (see :func:`entropylens.engine.run_plans`);
    :func:`roles_from_parts` joins parts."""
    lex = lexicon if isinstance(lexicon, Lexicon) else load_lexicon(lexicon)
    manifest = store.manifest(run)
    counts = manifest.get("counts", {})
    n_tokens = counts.get("tokens", 0)
    source = best_entropy_source(manifest) if n_tokens else None
    has_logprob = bool(counts.get("tokens_with_logprob", 0))
    conv = convention
    if n_tokens:
        tokens = store.head_tokens(run, DETECT_TOKENS, columns=["token"]).column("token")
        if tokens.null_count == len(tokens):
            raise EntropylensError(f"run {run!r} has no token text (only token ids); "
                                   "roles needs decoded tokens", path=store.run_dir(run))
        if conv == "auto":
            conv = detect_convention(tokens.to_pylist())
        agg = RolesAggregator(lex, conv, source, has_logprob=has_logprob,
                              vocab_size=manifest.get("vocab_size"))
        tallies = (yield {"roles": agg})["roles"]
        semantic_from = "tokens"
    else:
        conv = "text"
        tallies = _semantic_from_sequences(store, run, lex)
        semantic_from = "completions" if tallies["sequences"] else None
    steps, semantic, grams = _tables(run, tallies, lex)
    planning = int(steps.loc[steps["cls"] == "planning", "tokens"].sum())
    row = {"run": run, "entropy_source": source, "perplexity": has_logprob and bool(n_tokens),
           "convention": conv, "lexicon_size": len(lex), "lexicon_source": lex.source,
           "tokens": int(steps["tokens"].sum()), "planning_tokens": planning,
           "semantic_from": semantic_from}
    return row, steps, semantic, grams, detect_phases(steps, semantic, window=window)


def roles_from_parts(parts: list[tuple]) -> Roles:
    """The :class:`Roles` result of runs from the results of their plans."""
    return Roles(runs=pd.DataFrame([p[0] for p in parts], columns=RUN_COLUMNS),
                 steps=pd.concat([p[1] for p in parts], ignore_index=True),
                 semantic=pd.concat([p[2] for p in parts], ignore_index=True),
                 grams=pd.concat([p[3] for p in parts], ignore_index=True),
                 phases={p[0]["run"]: p[4] for p in parts})


def phase_rows(result: Roles, run: str) -> pd.DataFrame:
    """The planning/execution phases of ``run``: ``name, detected, start_step, end_step,
    signal, window, reason`` (``detected`` a plain boolean)."""
    rows = [{k: v for k, v in phase.items() if k != "evidence"}
            for phase in result.phases.get(run, [])]
    frame = pd.DataFrame(rows, columns=["name", "detected", "start_step", "end_step", "signal",
                                        "window", "reason"])
    frame["detected"] = frame["detected"].fillna(False).astype(bool)
    return frame


class RolesAnalysis(Analysis):
    """Registered form of :func:`roles`."""

    name = "roles"
    title = "Planning vs execution tokens"
    order = 50
    skip_runs = False   # every run asked for, or its error

    def plan(self, store: Store, run: str, inputs, *, lexicon=None, convention: str = "auto",
             window: int | None = None) -> Plan:
        return roles_plan(store, run, lexicon=lexicon, convention=convention, window=window)

    def combine(self, parts, *, skipped=(), **options) -> Roles:
        return roles_from_parts(list(parts))

    def figures(self, result: Roles, run: str) -> list[FigureSpec]:
        from ..plots import planning_execution

        if _of_run(result.steps, run).empty:
            return []
        detected = phase_rows(result, run)
        detected = detected[detected["detected"]] if len(detected) else detected
        return [FigureSpec(
            "roles", f"{run}: planning vs execution tokens",
            "Mean entropy of planning and execution tokens per step; semantic entropy of the "
            "strategic grams dashed, on the right axis"
            + ("; detected phases shaded." if len(detected) else "."),
            lambda ax: planning_execution(result.steps, run=run, semantic=result.semantic,
                                          phases=detected, ax=ax))]

    def section(self, result: Roles, run: str) -> dict:
        row = _of_run(result.runs, run)
        if row.empty or not row["tokens"].iloc[0]:
            # completions alone give a semantic entropy but no planning/execution split
            raise EntropylensError(NEEDS["tokens"])
        return {"steps": _records(_of_run(result.steps, run)),
                "semantic": _records(_of_run(result.semantic, run)),
                "phases": _records(phase_rows(result, run))}

    def findings(self, result: Roles, run: str) -> list[Finding]:
        steps = _of_run(result.steps, run).dropna(subset=["mean_entropy", "tokens"])
        means, counts = {}, {}
        for cls in ("planning", "execution"):
            rows = steps[steps["cls"] == cls]
            total = float(rows["tokens"].sum())
            if total > 0:
                counts[cls] = total
                means[cls] = float((rows["mean_entropy"] * rows["tokens"]).sum() / total)
        if len(means) < 2:
            return []
        share = counts["planning"] / (counts["planning"] + counts["execution"])
        text = (f"planning tokens average {means['planning']:.2f} nats of entropy, execution "
                f"tokens {means['execution']:.2f} ({share:.1%} of tokens are planning tokens)")
        numbers = {"planning_entropy": means["planning"],
                   "execution_entropy": means["execution"], "planning_share": share}
        phases = result.phases.get(run, [])
        found = [p for p in phases if p.get("detected")]
        if found:
            text += "; " + ", ".join(f"{p['name']} phase from step {p['start_step']} to "
                                     f"{p['end_step']}" for p in found)
            numbers["phases"] = [{"name": p["name"], "start_step": p["start_step"],
                                  "end_step": p["end_step"]} for p in found]
        elif phases:
            text += "; neither the consolidation nor the exploration phase is detected"
        return [Finding("roles", text, numbers=numbers)]


def _of_run(frame: pd.DataFrame, run: str) -> pd.DataFrame:
    return frame[frame["run"] == run] if "run" in frame.columns else frame


register(RolesAnalysis())
