"""Data-quality checks: what in a run could make its entropy numbers wrong.

Every check warns and never drops data: the statistics of entropylens always use every token
stored, and these checks say which of them look suspicious. Checks (``check`` column):

``tokens_after_eos``
    Tokens at a position after the first end-of-sequence token (:data:`EOS_TOKENS`) of their
    sequence: padding that was logged, and often trained on (a masking bug).
``entropy_out_of_range``
    Entropies below 0 or above ``log V`` (V from the manifest; only the lower limit when V is
    unknown), or not finite, beyond :data:`ENTROPY_TOLERANCE` of float rounding; includes
    those the ingest stored as null (manifest count ``sentinel_entropys``).
``positive_logprob``
    Logprobs above :data:`LOGPROB_TOLERANCE`.
``topk_mass_above_one``
    Top-k probabilities summing above ``1 + TOPK_MASS_TOLERANCE``.
``duplicate_positions`` / ``missing_positions``
    A position logged twice in a sequence, or gaps in ``0 .. last position``.
``thin_steps``
    Steps with fewer than ``max(10, 10% of the median step)`` tokens: their quantiles are noise.
``approximate_metric``
    Step metrics whose source key only approximates the canonical quantity (the alias table of
    :mod:`entropylens.aliases` flags them, e.g. NeMo-RL ``train/approx_entropy``).
``metric_collisions`` (info)
    Raw keys that kept their raw name because another key of the source fills the same
    canonical metric (from the manifest notes).
``rejected_records``
    Records skipped at ingest (``--on-error skip``), from the manifest.
``null_logprobs`` (info)
    Sentinel (-9999, -inf) or NaN logprobs and top-k logprobs the ingest stored as null
    (manifest counts ``sentinel_logprobs`` and ``sentinel_top_logprobs``).
``topk_without_vocab`` (info), ``surprisal_source`` (info)
    How far the run's entropy source can be trusted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..aliases import canonical_metric
from ..engine import Aggregator, Plan
from ..estimators import best_entropy_source
from ..schema import eos_mask
from ..store import Store
from ..base.encoding import plain_values
from ..base.steps import NO_STEP, step_array
from .registry import Analysis, register, run_analysis
from .sequences import inside_runs, run_keys, run_lengths, sequence_starts, step_rows

#: Entropies this far outside [0, log V] count as out of range (float32 rounding is smaller).
ENTROPY_TOLERANCE = 1e-4
#: Logprobs above this count as positive.
LOGPROB_TOLERANCE = 1e-5
#: Top-k probabilities may sum to this much above 1 (rounding of logged logprobs).
TOPK_MASS_TOLERANCE = 1e-3
#: A step is thin below max(MIN_STEP_TOKENS, THIN_STEP_FRACTION x median tokens per step).
MIN_STEP_TOKENS = 10
THIN_STEP_FRACTION = 0.1

QUALITY_COLUMNS = ["run", "check", "severity", "count", "message"]
_SCAN_COLUMNS = ("step", "sample_id", "position", "token", "entropy", "logprob",
                 "top_logprobs")
_SEQ_KEYS = ["step", "sample_id"]
#: First-EOS position of a sequence without one.
_NO_EOS = np.iinfo(np.int64).max
#: Per-sequence frames kept before they are folded into one.
_COMPACT_EVERY = 64


@dataclass
class _ScanState:
    sequences: list          # tables of open completions: step, sample_id, rows, distinct,
    #                          first, last, first_eos (several rows per completion)
    steps: dict              # step -> tokens
    entropy_low: int = 0
    entropy_high: int = 0
    entropy_nonfinite: int = 0
    positive_logprob: int = 0
    topk_over: int = 0
    eos_names: dict = None   # eos text -> count
    # complete completions, reduced by seal
    completions: int = 0
    duplicate_tokens: int = 0
    duplicate_completions: int = 0
    missing_positions: int = 0
    gapped_completions: int = 0
    suspects: list = field(default_factory=list)   # tables: completions with tokens after EOS

    @property
    def after_eos(self) -> pd.DataFrame:
        """``step, sample_id, first_eos, last`` of the completions with tokens after EOS."""
        tables = [t for t in self.suspects if t.num_rows]
        if not tables:
            return pd.DataFrame(columns=["step", "sample_id", "first_eos", "last"])
        return pa.concat_tables(tables).to_pandas()


_SEQ_FIELDS = ["step", "sample_id", "rows", "first", "last", "first_eos", "distinct"]


def _fold_sequences(tables: list[pa.Table]) -> pa.Table:
    """One row per completion from partial rows (a completion split across batches, or
    across runs of unsorted rows, has several)."""
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if table.num_rows < 2:
        return table
    grouped = table.group_by(_SEQ_KEYS, use_threads=False).aggregate([
        ("rows", "sum"), ("distinct", "sum"), ("first", "min"), ("last", "max"),
        ("first_eos", "min")])
    return grouped.rename_columns({
        "rows_sum": "rows", "distinct_sum": "distinct", "first_min": "first",
        "last_max": "last", "first_eos_min": "first_eos"}).select(_SEQ_FIELDS)


class QualityScan(Aggregator):
    """One streaming pass collecting the token-level checks of a run.

    Parameters
    ----------
    vocab_size : int, optional
        V, for the ``log V`` upper limit of entropies.
    logprob, top_logprobs : bool
        Whether to read those columns for their checks (:func:`quality_scan` leaves out
        those the Parquet statistics already clear).

    Notes
    -----
    State: per-completion rows of the completions still open (position counts, first and
    last position, first EOS) and one count per step. The engine's units are step-closed, so
    :meth:`seal` reduces a unit's completions to the counts the checks report and keeps only
    those with tokens after an EOS (for the second pass): memory does not grow with the
    number of completions. Duplicates are counted exactly within each scanned batch; a
    duplicate whose copies fall in different batches is still caught (at least once) by
    comparing the completion's rows with its position range.
    """

    after_eos = True   # the checks count the tokens after EOS that analyses leave out

    # EOS judged once per distinct text, completions told apart by index
    dictionary_columns = ("token", "sample_id")

    def __init__(self, vocab_size: int | None = None, *, logprob: bool = True,
                 top_logprobs: bool = True):
        self.vocab_size = vocab_size
        self.logprob, self.top_logprobs = logprob, top_logprobs
        skipped = {name for name, read in (("logprob", logprob),
                                            ("top_logprobs", top_logprobs)) if not read}
        self.columns = tuple(c for c in _SCAN_COLUMNS if c not in skipped)

    def start(self) -> _ScanState:
        return _ScanState(sequences=[], steps={}, eos_names={})

    def update(self, state: _ScanState, batch: pa.RecordBatch) -> _ScanState:
        steps = step_array(batch.column("step"))
        positions = batch.column("position").to_numpy(zero_copy_only=False).astype(np.int64)
        token = batch.column("token")
        is_eos = eos_mask(token)
        if is_eos.any():
            names = pd.Series(token.filter(pa.array(is_eos)).to_pylist()).value_counts()
            for name, count in names.items():
                state.eos_names[name] = state.eos_names.get(name, 0) + int(count)
        state.sequences.append(self._per_sequence(steps, batch.column("sample_id"),
                                                  positions, is_eos))
        if len(state.sequences) >= _COMPACT_EVERY:
            state.sequences = [_fold_sequences(state.sequences)]
        for step, rows in step_rows(steps):
            count = rows.stop - rows.start if isinstance(rows, slice) else len(rows)
            state.steps[step] = state.steps.get(step, 0) + count
        self._values(state, batch)
        return state

    @staticmethod
    def _per_sequence(steps: np.ndarray, samples: pa.Array, positions: np.ndarray,
                      is_eos: np.ndarray) -> pa.Table:
        """Rows, distinct positions, first and last position and first EOS per completion.

        Runs of consecutive rows are reduced with numpy; a batch whose positions do not
        increase within a run (duplicates, unsorted input) is hashed by Arrow instead, so
        that distinct positions stay exact.
        """
        starts = sequence_starts(steps, samples)
        n = len(steps)
        eos_position = np.where(is_eos, positions, _NO_EOS)
        within = np.diff(positions) > 0
        if n < 2 or (within | ~inside_runs(starts, n)).all():
            rows = run_lengths(starts, n)
            return run_keys(steps, samples, starts).append_column(
                "rows", pa.array(rows)).append_column(
                "first", pa.array(positions[starts])).append_column(
                "last", pa.array(positions[starts + rows - 1])).append_column(
                "first_eos", pa.array(np.minimum.reduceat(eos_position, starts))).append_column(
                "distinct", pa.array(rows))
        table = pa.table({"step": pa.array(steps), "sample_id": plain_values(samples),
                          "position": pa.array(positions),
                          "eos_position": pa.array(eos_position)})
        grouped = table.group_by(_SEQ_KEYS, use_threads=False).aggregate([
            ("position", "count"), ("position", "count_distinct"), ("position", "min"),
            ("position", "max"), ("eos_position", "min")])
        return grouped.rename_columns({
            "position_count": "rows", "position_count_distinct": "distinct",
            "position_min": "first", "position_max": "last",
            "eos_position_min": "first_eos"}).select(_SEQ_FIELDS)

    def _values(self, state: _ScanState, batch: pa.RecordBatch) -> None:
        entropy = batch.column("entropy")
        if entropy.null_count < len(entropy):
            h = entropy.drop_null().to_numpy(zero_copy_only=False).astype(np.float64)
            finite = np.isfinite(h)
            state.entropy_nonfinite += int((~finite).sum())
            state.entropy_low += int((h[finite] < -ENTROPY_TOLERANCE).sum())
            if self.vocab_size:
                limit = np.log(self.vocab_size) + ENTROPY_TOLERANCE
                state.entropy_high += int((h[finite] > limit).sum())
        if self.logprob:
            self._logprob_values(state, batch.column("logprob"))
        if self.top_logprobs:
            self._topk_values(state, batch.column("top_logprobs"))

    @staticmethod
    def _logprob_values(state: _ScanState, logprob: pa.Array) -> None:
        if logprob.null_count < len(logprob):
            lp = logprob.drop_null().to_numpy(zero_copy_only=False)
            state.positive_logprob += int((lp > LOGPROB_TOLERANCE).sum())

    @staticmethod
    def _topk_values(state: _ScanState, top: pa.Array) -> None:
        if top.null_count < len(top):
            lengths = pc.list_value_length(top).fill_null(0).to_numpy(zero_copy_only=False)
            flat = pc.list_flatten(top).fill_null(-np.inf).to_numpy(zero_copy_only=False)
            rows = np.repeat(np.arange(len(top)), lengths)
            with np.errstate(over="ignore"):
                mass = np.bincount(rows, weights=np.exp(flat.astype(np.float64)),
                                   minlength=len(top))
            state.topk_over += int((mass > 1 + TOPK_MASS_TOLERANCE).sum())

    def seal(self, state: _ScanState) -> _ScanState:
        """Every completion of a step-closed unit is complete: reduce them to the counts the
        checks report, keeping only the completions with tokens after an EOS (for the
        second pass). Memory: the suspects, not every completion of the run."""
        if not state.sequences:
            return state
        sequences = _fold_sequences(state.sequences)
        state.sequences = []
        rows, distinct, first, last, first_eos = (
            sequences.column(name).to_numpy().astype(np.int64, copy=False)
            for name in ("rows", "distinct", "first", "last", "first_eos"))
        duplicates = np.maximum(rows - distinct, rows - (last - first + 1)).clip(min=0)
        expected = last - np.minimum(first, 0) + 1
        missing = (expected - (rows - duplicates)).clip(min=0)
        state.completions += len(rows)
        state.duplicate_tokens += int(duplicates.sum())
        state.duplicate_completions += int((duplicates > 0).sum())
        state.missing_positions += int(missing.sum())
        state.gapped_completions += int((missing > 0).sum())
        after = (first_eos != _NO_EOS) & (last > first_eos)
        if after.any():
            state.suspects.append(sequences.filter(pa.array(after)).select(
                ["step", "sample_id", "first_eos", "last"]))
        return state

    def merge(self, left: _ScanState, right: _ScanState) -> _ScanState:
        # open completions of unsealed states may continue each other: fold them at seal
        left.sequences = left.sequences + right.sequences
        left.suspects = left.suspects + right.suspects
        for attr in ("completions", "duplicate_tokens", "duplicate_completions",
                     "missing_positions", "gapped_completions"):
            setattr(left, attr, getattr(left, attr) + getattr(right, attr))
        for step, count in right.steps.items():
            left.steps[step] = left.steps.get(step, 0) + count
        for name, count in right.eos_names.items():
            left.eos_names[name] = left.eos_names.get(name, 0) + count
        for attr in ("entropy_low", "entropy_high", "entropy_nonfinite", "positive_logprob",
                     "topk_over"):
            setattr(left, attr, getattr(left, attr) + getattr(right, attr))
        return left

    def finish(self, state: _ScanState) -> _ScanState:
        """The sealed state: counts of the checks and the completions with tokens after EOS
        (:attr:`_ScanState.after_eos`)."""
        return self.seal(state)


class AfterEos(Aggregator):
    """Second pass: count tokens after the first EOS of their sequence, and which they are.

    Parameters
    ----------
    first_eos : pandas.DataFrame
        ``step, sample_id, first_eos`` of the sequences holding an EOS token.
    """

    columns = ("step", "sample_id", "position", "token")
    after_eos = True

    def __init__(self, first_eos: pd.DataFrame):
        self.index = pd.MultiIndex.from_frame(first_eos[_SEQ_KEYS])
        self.first = first_eos["first_eos"].to_numpy(np.int64)

    def start(self):
        return {"tokens": 0, "texts": pd.Series(dtype="int64")}

    def update(self, state, batch: pa.RecordBatch):
        steps = step_array(batch.column("step"))
        samples = batch.column("sample_id").to_numpy(zero_copy_only=False)
        where = self.index.get_indexer(pd.MultiIndex.from_arrays([steps, samples]))
        positions = batch.column("position").to_numpy(zero_copy_only=False)
        after = (where >= 0) & (positions > self.first[np.maximum(where, 0)])
        if after.any():
            state["tokens"] += int(after.sum())
            texts = pd.Series(batch.column("token").filter(pa.array(after)).to_pylist(),
                              dtype=object).fillna("<no text>").value_counts()
            state["texts"] = state["texts"].add(texts, fill_value=0)
        return state

    def merge(self, left, right):
        return {"tokens": left["tokens"] + right["tokens"],
                "texts": left["texts"].add(right["texts"], fill_value=0)}

    def finish(self, state):
        return state


def _row(run, check, count, message, severity="warning") -> dict:
    return {"run": run, "check": check, "severity": severity, "count": int(count),
            "message": message}


def _show(values, limit: int = 5) -> str:
    values = list(values)
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def _token_checks(store: Store, run: str, manifest: dict, scan: _ScanState) -> Plan:
    """Rows of the token checks (a plan: tokens after EOS need a second scan)."""
    rows = []
    suspects = scan.after_eos
    if len(suspects):
        after = (yield {"a": AfterEos(suspects)})["a"]
        texts = after["texts"].sort_values(ascending=False)
        common = _show([f"{t!r} ({int(c)})" for t, c in texts.items()], 3)
        eos = _show(sorted(scan.eos_names, key=scan.eos_names.get, reverse=True), 3)
        rows.append(_row(run, "tokens_after_eos", after["tokens"],
                         f"{after['tokens']} tokens in {len(suspects)} of "
                         f"{scan.completions} sequences come after an end-of-sequence token "
                         f"({eos}); most common: {common}. Token analyses leave them out "
                         "unless asked to keep them (--keep-after-eos); if the trainer's "
                         "loss mask also kept them, the policy was trained on padding"))
    if scan.duplicate_tokens:
        rows.append(_row(run, "duplicate_positions", scan.duplicate_tokens,
                         f"{scan.duplicate_tokens} tokens repeat a position already logged "
                         f"in their sequence ({scan.duplicate_completions} sequences)"))
    if scan.missing_positions:
        rows.append(_row(run, "missing_positions", scan.missing_positions,
                         f"{scan.missing_positions} positions are missing from "
                         f"{scan.gapped_completions} sequences (gaps in 0 .. last "
                         "position): a truncated or filtered log"))
    nulled = int((manifest.get("counts") or {}).get("sentinel_entropys", 0))
    if scan.entropy_low or scan.entropy_high or scan.entropy_nonfinite or nulled:
        vocab = manifest.get("vocab_size")
        parts = []
        if scan.entropy_low:
            parts.append(f"{scan.entropy_low} below 0")
        if scan.entropy_high:
            parts.append(f"{scan.entropy_high} above log V = {np.log(vocab):.3f} (V={vocab})")
        if scan.entropy_nonfinite:
            parts.append(f"{scan.entropy_nonfinite} not finite")
        if nulled:
            parts.append(f"{nulled} negative or not finite in the source, stored as null")
        rows.append(_row(run, "entropy_out_of_range",
                         scan.entropy_low + scan.entropy_high + scan.entropy_nonfinite + nulled,
                         f"entropies outside [0, log V]: {', '.join(parts)}; check the units "
                         "(nats) and the vocabulary size"))
    if scan.positive_logprob:
        rows.append(_row(run, "positive_logprob", scan.positive_logprob,
                         f"{scan.positive_logprob} logprobs are above 0: not log-probabilities "
                         "(logits or scores?)"))
    if scan.topk_over:
        rows.append(_row(run, "topk_mass_above_one", scan.topk_over,
                         f"{scan.topk_over} tokens have top-k probabilities summing above 1: "
                         "the alternatives are not log-probabilities of one distribution"))
    if scan.steps:
        counts = pd.Series(scan.steps)
        limit = max(MIN_STEP_TOKENS, THIN_STEP_FRACTION * float(counts.median()))
        thin = counts[counts < limit].sort_index()
        if len(thin):
            names = ["none" if s == NO_STEP else f"{s} ({n})" for s, n in thin.items()]
            rows.append(_row(run, "thin_steps", len(thin),
                             f"{len(thin)} steps have fewer than {limit:.0f} tokens (10% of the "
                             f"median step): {_show(names)}; their quantiles are noise"))
    return rows


def _manifest_checks(store: Store, run: str, manifest: dict) -> list[dict]:
    rows = []
    metrics = store.read_metrics(run)
    notes = manifest.get("notes") or {}
    if len(metrics):
        # the alias table's flag, plus keys the ingest noted (user aliases included)
        noted = set(notes.get("approximate_metrics") or ())
        keys = metrics.groupby("raw_key", dropna=True).size()
        for key, count in keys.items():
            if key in noted or canonical_metric(str(key)).approximate:
                metric = metrics.loc[metrics["raw_key"] == key, "metric"].iloc[0]
                rows.append(_row(run, "approximate_metric", count,
                                 f"metric {metric} comes from {key!r}, which only "
                                 f"approximates it ({count} points)"))
    collisions = notes.get("metric_collisions") or {}
    if collisions:
        rows.append(_row(run, "metric_collisions", len(collisions),
                         f"{len(collisions)} raw keys map onto a canonical metric another key "
                         f"already fills and keep their raw names: "
                         f"{_show(f'{k} ({v})' for k, v in collisions.items())}",
                         severity="info"))
    rejected = manifest.get("rejected") or {}
    if rejected.get("count"):
        examples = rejected.get("examples") or []
        first = examples[0] if examples else {}
        where = f"; first: {first.get('file')}:{first.get('line')}: {first.get('message')}" \
            if first else ""
        rows.append(_row(run, "rejected_records", rejected["count"],
                         f"{rejected['count']} bad records were skipped at ingest{where}"))
    counts = manifest.get("counts") or {}
    nulled = {name: int(counts.get(key, 0)) for name, key in
              (("logprobs", "sentinel_logprobs"), ("top-k logprobs", "sentinel_top_logprobs"))}
    if any(nulled.values()):
        parts = [f"{n} {name}" for name, n in nulled.items() if n]
        rows.append(_row(run, "null_logprobs", sum(nulled.values()),
                         f"{' and '.join(parts)} were sentinels (-9999), -inf or NaN in the "
                         "source and are stored as null", severity="info"))
    source = best_entropy_source(manifest) if counts.get("tokens") else None
    if source == "topk" and not manifest.get("vocab_size"):
        rows.append(_row(run, "topk_without_vocab", counts.get("tokens", 0),
                         "entropy comes from top-k logprobs without a vocabulary size: no "
                         "rigorous upper bound, and the point estimate assumes V = 65,536 "
                         "(ingest with --vocab-size V)", severity="info"))
    if source == "surprisal":
        basis = manifest.get("logprob_basis", "unknown")
        rows.append(_row(run, "surprisal_source", counts.get("tokens", 0),
                         "entropy is estimated by surprisal (-logprob): noise per token; its "
                         "mean estimates the mean entropy only for untruncated sampling from "
                         f"the logged distribution (logprob basis: {basis}, temperature: "
                         f"{manifest.get('temperature')})", severity="info"))
    return rows


def quality_plan(store: Store, run: str, manifest: dict, scan: _ScanState | None) -> Plan:
    """The checks of one run from a finished :class:`QualityScan` (None: no tokens), as a
    plan (see :func:`entropylens.engine.run_plans`)."""
    rows = []
    if scan is not None:
        rows += yield from _token_checks(store, run, manifest, scan)
    rows += _manifest_checks(store, run, manifest)
    return pd.DataFrame(rows, columns=QUALITY_COLUMNS)


def quality_scan(store: Store, run: str, manifest: dict) -> QualityScan:
    """The token checks of one run, reading only the columns its Parquet statistics do not
    already clear: a run whose footers prove that no logprob is above
    :data:`LOGPROB_TOLERANCE`, or that it logged no top-k lists, is not read for them."""
    largest = store.token_column_max(run, "logprob")
    return QualityScan(manifest.get("vocab_size"),
                       logprob=largest is None or largest > LOGPROB_TOLERANCE,
                       top_logprobs=not store.token_column_empty(run, "top_logprobs"))


def _quality_run(store: Store, run: str) -> Plan:
    manifest = store.manifest(run)
    scan = None
    if (manifest.get("counts") or {}).get("tokens"):
        scan = (yield {"q": quality_scan(store, run, manifest)})["q"]
    return (yield from quality_plan(store, run, manifest, scan))


@dataclass
class Quality:
    """Result of :func:`quality`.

    Attributes
    ----------
    checks : pandas.DataFrame
        ``run, check, severity, count, message``: one row per problem found (severity
        ``warning`` or ``info``); no row when a run is clean.
    """

    checks: pd.DataFrame

    @property
    def warnings(self) -> pd.DataFrame:
        """The rows of severity ``warning``."""
        return self.checks[self.checks["severity"] == "warning"]

    def to_dict(self) -> dict:
        """JSON-ready: ``{"checks": [...]}``."""
        from ..base.jsonable import records as _records

        return {"checks": _records(self.checks)}


def quality_from_parts(parts: Sequence[pd.DataFrame]) -> Quality:
    """The :class:`Quality` of runs from their check tables (in run order)."""
    frames = [frame for frame in parts if len(frame)]
    checks = pd.concat(frames, ignore_index=True) if frames else \
        pd.DataFrame(columns=QUALITY_COLUMNS)
    return Quality(checks=checks)


class QualityAnalysis(Analysis):
    """Registered form of :func:`quality`. The report takes the checks from the summary's
    scan (:func:`~entropylens.analysis.summary.summary_plan` runs the same checks), so it
    does not run this one."""

    name = "quality"
    title = "Data quality"
    in_report = False
    order = 1
    skip_runs = False   # every run asked for, or its error

    def plan(self, store: Store, run: str, inputs) -> Plan:
        return _quality_run(store, run)

    def combine(self, parts, *, skipped=(), **options) -> Quality:
        return quality_from_parts(parts)


register(QualityAnalysis())


def quality(store: Store | str, runs=None, *, engine: str = "local",
            workers: int | None = None, **engine_options) -> Quality:
    """Data-quality checks of runs (see the module notes for the list).

    Parameters
    ----------
    store : Store or path
    runs : str or sequence of str, optional
        Default: every run.
    engine : {"local", "ray"}
    workers : int, optional
        Worker processes of the local engine (1: none).

    Returns
    -------
    Quality
        ``.checks``: ``run, check, severity, count, message``, one row per problem found.
        Nothing is dropped from the data.
    """
    return run_analysis("quality", store, runs, engine=engine, workers=workers,
                        **engine_options)
