"""Streaming execution of analyses over a run's tokens, on one machine or on Ray Data.

An analysis over tokens is an :class:`Aggregator`: ``start`` makes an empty partial state,
``update`` folds in one Arrow batch, ``seal`` may compact a state whose steps are complete,
``merge`` combines two partial states, and ``finish`` turns a state into the result.

Both engines cut a run into the same *units* (:func:`plan_units`): groups of parquet row
groups, in storage order, chosen from the row-group statistics of the ``step`` column so
that every step lies in exactly one unit ("step-closed"; a row group straddling two units is
read by both, each keeping its own steps). A unit is scanned with column
projection and the step filter, its partial state is sealed (every step in it is complete,
so an aggregator can reduce one step's values to its result and free them), and the unit
states are merged in unit order. The local engine runs the units in this process or in
worker processes (:mod:`entropylens.workers`, one unit each at a time), so memory is bounded
by one unit's data per process plus the sealed states; the Ray engine runs the units in
``ray.data`` ``map_batches`` tasks. Either way the partial states are merged in unit order on
the caller's side. The same batches reach the same ``update`` calls in every engine and the
merges happen in the same order, so their results are identical, floating-point rounding
included.

Tokens after the end of their sequence (padding never sampled, marked ``after_eos`` at
ingest) are left out of every aggregator's batches unless the run option
``keep_after_eos=True`` is given; an aggregator that must count them
(:attr:`Aggregator.after_eos`, the quality checks) gets every row of the same scan.

Analyses that need the data more than once, or several analyses that need it at the same
time, are written as *plans* (generators that yield the aggregators they need and receive
the results): :func:`run_plans` drives several plans together and fuses the scans they ask
for at the same time into one read of the data.

Data that are not tokens (the search trees of the node table) are read by a plan's
:class:`Map` request: one picklable function applied to every item (a node part file, whole
trees), by the same engine (this process, the local workers or Ray tasks), results returned
in item order, so that the two engines agree exactly there too.
"""

from __future__ import annotations

import contextvars
import copy
import os
import pickle
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import (Any, Callable, Generator, Hashable, Iterable, Iterator, Mapping, Sequence,
                    Union)

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .base.encoding import plain_values
from .errors import EntropylensError
from .schema import TOKEN_SCHEMA, mark_after_eos
from .store import Store, reading
from .workers import session

ENGINES = ("local", "ray")
#: Rows a unit gathers (whole steps; one larger step makes a larger unit). Bounds the rows
#: an aggregator may hold before :meth:`Aggregator.seal`.
UNIT_ROWS = 768 * 1024
#: Step key of rows without a step in the planner (they form their own step).
_NULL_KEY = np.iinfo(np.int64).min
#: Environment variable that sets the local engine's worker processes (1: none).
WORKERS_ENV = "ENTROPYLENS_WORKERS"
#: Default ceiling of worker processes (each holds one unit).
MAX_WORKERS = 4
#: Columns read dictionary-encoded: a batch repeats a few thousand token texts and a few
#: hundred completion ids, which Parquet stores as a dictionary and indices. Reading them so
#: and decoding the dictionary costs a third of reading plain strings (which cost more than
#: every other column together); aggregators that count by text need no decoding at all.
DICTIONARY_COLUMNS = ("token", "sample_id")


class Aggregator(ABC):
    """A mergeable computation over token batches.

    Attributes
    ----------
    columns : tuple of str
        Token columns the aggregator reads (the scan projects onto their union).
    """

    columns: tuple[str, ...] = ()
    #: True for an aggregator that must see the tokens after end-of-sequence even when the
    #: scan leaves them out for the others (the quality checks that count them).
    after_eos: bool = False
    #: Text columns (of :data:`DICTIONARY_COLUMNS`) the aggregator takes as Arrow
    #: dictionary arrays as well as plain strings. The scan reads them dictionary-encoded,
    #: as Parquet stores them: such an aggregator can judge each distinct text once, and
    #: the others get the column decoded to plain strings.
    dictionary_columns: tuple[str, ...] = ()

    @abstractmethod
    def start(self) -> Any:
        """An empty partial state."""

    @abstractmethod
    def update(self, state: Any, batch: pa.RecordBatch) -> Any:
        """Fold one batch into ``state`` and return the new state."""

    def seal(self, state: Any) -> Any:
        """Called after the last batch of a unit: every step seen by ``state`` is complete.

        No later batch holds rows of these steps, so an aggregator may replace one step's
        raw values by their result here (bounded memory). The default keeps the state.
        """
        return state

    @abstractmethod
    def merge(self, left: Any, right: Any) -> Any:
        """Combine two partial states (from disjoint sets of batches)."""

    @abstractmethod
    def finish(self, state: Any) -> Any:
        """Turn a final state into the result."""

    def share_key(self) -> Hashable | None:
        """Aggregators with the same key compute the same result from the same rows, so a
        fused scan (:func:`run_plans`) runs one of them and hands each a copy of its
        result. None (the default): never shared."""
        return None


# -- planning ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Unit:
    """A step-closed slice of a run, scanned by one task.

    Attributes
    ----------
    index : int
        Position in the plan (the merge order).
    pieces : tuple of (str, tuple of int)
        Part file path and the row groups read from it, in storage order.
    first_step, last_step : int or None
        The unit's rows are those with ``first_step <= step <= last_step``; both None for
        the unit of the rows without a step. A row group straddling two units is read by
        both, each keeping its own steps.
    rows : int
        Rows of those row groups (an upper bound of the unit's rows).
    """

    index: int
    pieces: tuple[tuple[str, tuple[int, ...]], ...]
    first_step: int | None
    last_step: int | None
    rows: int


def _row_group_keys(metadata: pq.FileMetaData, column: int, group: int):
    """(min step, max step, has nulls) of a row group; None bounds when it is all null."""
    stats = metadata.row_group(group).column(column).statistics
    rows = metadata.row_group(group).num_rows
    if stats is not None and stats.has_null_count and stats.null_count == rows:
        return None, None, True
    nulls = stats is None or not stats.has_null_count or stats.null_count > 0
    if stats is None or not stats.has_min_max:
        # no statistics: the group may hold any step, so every unit reads it
        return _NULL_KEY + 1, np.iinfo(np.int64).max, nulls
    return int(stats.min), int(stats.max), nulls


def plan_units(store: Store, run: str, *, steps: Iterable[int] | None = None,
               unit_rows: int = UNIT_ROWS) -> list[Unit]:
    """Cut a run's tokens into step-closed units from the row-group statistics.

    Parameters
    ----------
    store : Store
    run : str
    steps : iterable of int, optional
        Only row groups that may hold these steps are planned (rows without a step are
        left out, as by the step filter).
    unit_rows : int
        A unit gathers whole steps until its row groups hold about this many rows.

    Returns
    -------
    list of Unit
        The unit of rows without a step first, then by increasing steps.
    """
    wanted = None if steps is None else np.unique(np.asarray(list(steps), dtype=np.int64))
    groups = []   # (order, file, row group, lo, hi, has_nulls, rows)
    for path, metadata in store.token_parts(run):  # checked: readable, canonical columns
        column = metadata.schema.to_arrow_schema().get_field_index("step")
        for g in range(metadata.num_row_groups):
            lo, hi, nulls = _row_group_keys(metadata, column, g)
            if wanted is not None:
                if lo is None:
                    continue
                first = np.searchsorted(wanted, lo, side="left")
                if first >= len(wanted) or wanted[first] > hi:
                    continue
                nulls = False
            groups.append((len(groups), str(path), g, lo, hi, nulls,
                           metadata.row_group(g).num_rows))
    units: list[Unit] = []

    def add(members: list, first: int | None, last: int | None) -> None:
        members = sorted(members)   # storage order
        pieces: dict[str, list[int]] = {}
        for m in members:
            pieces.setdefault(m[1], []).append(m[2])
        units.append(Unit(len(units), tuple((f, tuple(g)) for f, g in pieces.items()),
                          first, last, sum(m[6] for m in members)))

    null_groups = [g for g in groups if g[5]]
    if null_groups:
        add(null_groups, None, None)
    ranged = sorted((g for g in groups if g[3] is not None), key=lambda g: (g[3], g[4]))
    # cut points: a unit ends just before the low step of the group that overflows it
    start, held, cuts = None, 0, []
    for g in ranged:
        if start is None:
            start = g[3]
        elif held >= unit_rows and g[3] > start:
            cuts.append((start, g[3] - 1))
            start, held = g[3], 0
        held += g[6]
    if start is not None:
        cuts.append((start, max(g[4] for g in ranged)))
    for first, last in cuts:
        members = [g for g in ranged if g[3] <= last and g[4] >= first]
        add(members, first, last)
    return units


# -- scanning a unit ----------------------------------------------------------------------

def _unit_mask(step: pa.Array, unit: Unit, wanted: pa.Array | None):
    """Rows of the batch that belong to the unit (None: all of them)."""
    if unit.first_step is None:
        mask = pc.is_null(step)
    else:
        low, high = pc.min_max(step).values()
        inside = step.null_count == 0 and low.is_valid and low.as_py() >= unit.first_step \
            and high.as_py() <= unit.last_step
        mask = None if inside else pc.fill_null(pc.and_(
            pc.greater_equal(step, unit.first_step), pc.less_equal(step, unit.last_step)),
            False)
    if wanted is not None:
        keep = pc.fill_null(pc.is_in(step, value_set=wanted), False)
        mask = keep if mask is None else pc.and_(mask, keep)
    return mask


def scan_unit(unit: Unit, columns: Sequence[str], *, steps: Iterable[int] | None = None,
              batch_size: int = 256 * 1024,
              eos_columns: bool = False) -> Iterator[pa.RecordBatch]:
    """Stream a unit's rows (projected onto ``columns``, filtered to ``steps``).

    With ``eos_columns`` the batches also carry ``after_eos`` (null in part files written
    before it existed, which then also give the columns it is told from), after ``columns``.
    The columns of :data:`DICTIONARY_COLUMNS` come as dictionary arrays of strings
    (:func:`decoded` turns them into plain strings).
    """
    base = list(columns) if "step" in columns else [*columns, "step"]
    wanted = None if steps is None else pa.array(sorted({int(s) for s in steps}), pa.int64())
    for path, row_groups in unit.pieces:
        with reading(path, "token part"):
            handle = pq.ParquetFile(path, read_dictionary=list(DICTIONARY_COLUMNS))
            read, marked = base, True
            if eos_columns:
                marked = "after_eos" in handle.schema_arrow.names
                extra = AFTER_EOS_COLUMNS if marked else _EOS_FALLBACK_COLUMNS
                read = base + [c for c in extra if c not in base]
            out = list(columns) + [c for c in read if c not in columns] if eos_columns \
                else list(columns)
            batches = handle.iter_batches(batch_size=batch_size, row_groups=list(row_groups),
                                          columns=read)
            for batch in batches:
                batch = _conform_batch(batch, read)
                mask = _unit_mask(batch.column("step"), unit, wanted)
                if mask is not None:
                    batch = batch.filter(mask)
                if not marked:
                    batch = batch.append_column(TOKEN_SCHEMA.field("after_eos"),
                                                pa.nulls(batch.num_rows, pa.bool_()))
                    out = out + ["after_eos"] if "after_eos" not in out else out
                if list(batch.schema.names) != out:
                    batch = batch.select(out)
                if batch.num_rows:
                    yield batch


def _conform_batch(batch: pa.RecordBatch, names: Sequence[str]) -> pa.RecordBatch:
    """Cast columns to the canonical token types (older part files may differ); columns of
    :data:`DICTIONARY_COLUMNS` read dictionary-encoded keep their encoding."""
    fields = [_read_field(batch.schema.field(n), TOKEN_SCHEMA.field(n)) for n in names]
    if all(batch.schema.field(n).type == f.type for n, f in zip(names, fields)):
        return batch
    return pa.RecordBatch.from_arrays([batch.column(n).cast(f.type) for n, f in
                                       zip(names, fields)], schema=pa.schema(fields))


def _read_field(read: pa.Field, canonical: pa.Field) -> pa.Field:
    """The type a column is handed on as: the canonical one, or dictionary-encoded values
    of it for a dictionary column read so."""
    if pa.types.is_dictionary(read.type) and canonical.name in DICTIONARY_COLUMNS:
        return pa.field(canonical.name, pa.dictionary(read.type.index_type, canonical.type))
    return canonical


def decoded(batch: pa.RecordBatch, keep: Iterable[str] = ()) -> pa.RecordBatch:
    """``batch`` with its dictionary-encoded columns (but those in ``keep``) as plain
    arrays of their values."""
    keep = set(keep)
    names = batch.schema.names
    if not any(pa.types.is_dictionary(c.type) and n not in keep
               for n, c in zip(names, batch.columns)):
        return batch
    plain = [c if n in keep else plain_values(c) for n, c in zip(names, batch.columns)]
    return pa.RecordBatch.from_arrays(plain, names=names)


def run_unit(unit: Unit, aggregators: Mapping[str, Aggregator], columns: Sequence[str], *,
             steps: Iterable[int] | None = None, batch_size: int = 256 * 1024,
             keep_after_eos: bool = False) -> dict:
    """Sealed partial states of every aggregator over one unit.

    Unless ``keep_after_eos``, tokens after the end of their sequence are left out of the
    batches of every aggregator but those that ask for them (:attr:`Aggregator.after_eos`).
    """
    states = {name: agg.start() for name, agg in aggregators.items()}
    drop = not keep_after_eos and not all(agg.after_eos for agg in aggregators.values())
    cut = _BeforeEos() if drop else None
    # the dictionary columns each aggregator takes as read, or does not read at all; the
    # ones it reads as plain strings are decoded for it
    as_read = {name: frozenset(c for c in DICTIONARY_COLUMNS
                               if c in getattr(agg, "dictionary_columns", ())
                               or c not in agg.columns) for name, agg in aggregators.items()}
    for batch in scan_unit(unit, columns, steps=steps, batch_size=batch_size,
                           eos_columns=drop):
        kept = batch
        if cut is not None:
            batch, kept = cut.split(batch, columns)
        plain: dict[tuple, pa.RecordBatch] = {}   # each decoding once per batch
        for name, agg in aggregators.items():
            key = (agg.after_eos, as_read[name])
            if key not in plain:
                plain[key] = decoded(batch if agg.after_eos else kept, keep=as_read[name])
            seen = plain[key]
            if seen.num_rows:
                states[name] = agg.update(states[name], seen)
    return {name: agg.seal(states[name]) for name, agg in aggregators.items()}


#: Columns the after-EOS filter reads: the ingest's mark, else what it is told from (runs
#: ingested before tokens were marked).
AFTER_EOS_COLUMNS = ("after_eos",)
_EOS_FALLBACK_COLUMNS = ("step", "sample_id", "position", "token")


class _BeforeEos:
    """Splits a unit's batches into all rows and the rows up to the end of their sequence.

    Uses the ``after_eos`` mark set at ingest (:func:`entropylens.schema.mark_after_eos`);
    part files written before the mark existed are marked here with the same function, the
    first EOS of each completion carried over the unit's batches (a unit is step-closed, so
    every row of a completion is in it).
    """

    def __init__(self):
        self.first_eos: pa.Table | None = None

    def split(self, batch: pa.RecordBatch, columns: Sequence[str]):
        marks = batch.column("after_eos")
        if marks.null_count == batch.num_rows and "token" in batch.schema.names \
                and batch.column("token").null_count < batch.num_rows:
            table, self.first_eos = mark_after_eos(pa.Table.from_batches([batch]),
                                                   self.first_eos, forget=False)
            marks = table.column("after_eos").combine_chunks()
        project = list(columns)
        full = batch.select(project) if list(batch.schema.names) != project else batch
        if not pc.any(pc.fill_null(marks, False)).as_py():
            return full, full
        return full, full.filter(pc.invert(pc.fill_null(marks, False)))


# -- engines ------------------------------------------------------------------------------

def run_aggregators(store: Store, run: str, aggregators: Mapping[str, Aggregator], *,
                    steps: Iterable[int] | None = None, engine: str = "local",
                    batch_size: int = 256 * 1024, unit_rows: int = UNIT_ROWS,
                    ray_address: str | None = None,
                    workers: int | None = None, keep_after_eos: bool = False) -> dict[str, Any]:
    """Run several aggregators over one run's tokens in a single scan.

    Parameters
    ----------
    store : Store
    run : str
    aggregators : mapping of str to Aggregator
    steps : iterable of int, optional
        Only these steps.
    engine : {"local", "ray"}
        ``local`` streams the units in this process; ``ray`` runs them as Ray Data tasks
        (needs ``pip install 'entropylens[ray]'``) and merges on this process.
    batch_size : int
        Rows per batch of the scan.
    unit_rows : int
        Rows per unit (see :func:`plan_units`); the same in both engines.
    ray_address : str, optional
        Ray cluster to join (``auto``, ``ray://host:10001``); default: the Ray instance
        already started in this process, else a new local one.
    workers : int, optional
        Local engine: processes that scan units side by side (see :func:`local_workers`);
        1 scans in this process.
    keep_after_eos : bool
        Keep the tokens after the end of their sequence (padding the model never sampled),
        which every aggregator but the quality checks is spared by default.

    Returns
    -------
    dict
        The finished result of each aggregator, by the same keys.
    """
    if engine not in ENGINES:
        raise EntropylensError(f"unknown engine {engine!r} (one of {', '.join(ENGINES)})")
    steps = None if steps is None else [int(s) for s in steps]
    columns = sorted({c for agg in aggregators.values() for c in agg.columns})
    units = plan_units(store, run, steps=steps, unit_rows=unit_rows)
    with session():
        return _run_units(units, aggregators, columns, steps=steps, engine=engine,
                          batch_size=batch_size, ray_address=ray_address, workers=workers,
                          keep_after_eos=keep_after_eos)


def _run_units(units: list[Unit], aggregators: Mapping[str, Aggregator], columns, *, steps,
               engine, batch_size, ray_address, workers, keep_after_eos) -> dict[str, Any]:
    if engine == "ray" and units:
        partials = _ray_partials(units, aggregators, columns, steps=steps,
                                 batch_size=batch_size, ray_address=ray_address,
                                 keep_after_eos=keep_after_eos)
    elif local_workers(workers) > 1 and len(units) > 1 and _shippable(aggregators):
        partials = _pool_partials(units, aggregators, columns, steps=steps,
                                  batch_size=batch_size, workers=local_workers(workers),
                                  keep_after_eos=keep_after_eos)
    else:
        partials = (run_unit(u, aggregators, columns, steps=steps, batch_size=batch_size,
                             keep_after_eos=keep_after_eos)
                    for u in units)
    states = {name: agg.start() for name, agg in aggregators.items()}
    try:
        for partial in partials:
            for name, agg in aggregators.items():
                states[name] = agg.merge(states[name], partial[name])
    finally:
        partials.close()   # a failed merge must not leave units in flight
    return {name: agg.finish(states[name]) for name, agg in aggregators.items()}


def run_map(function: Callable[[Any], Any], items: Sequence[Any], *, engine: str = "local",
            ray_address: str | None = None, workers: int | None = None,
            **_scan_options) -> list[Any]:
    """``function(item)`` for every item, by the chosen engine, in item order.

    Parameters
    ----------
    function : callable
        A module-level function (workers and Ray tasks import it).
    items : sequence
    engine : {"local", "ray"}
    ray_address : str, optional
    workers : int, optional
        Local engine: processes that run items side by side (1: this process).
    **_scan_options
        Options of token scans (``batch_size``, ``unit_rows``): they do not apply here.

    Returns
    -------
    list
    """
    if engine not in ENGINES:
        raise EntropylensError(f"unknown engine {engine!r} (one of {', '.join(ENGINES)})")
    items = list(items)
    if engine == "ray" and items:
        ray = init_ray(ray_address)
        task = ray.remote(_call_pickled)
        # the function travels pickled, as the local workers get it
        payload = pickle.dumps(function, protocol=pickle.HIGHEST_PROTOCOL)
        return [pickle.loads(r) for r in ray.get([task.remote(payload, item)
                                                  for item in items])]
    count = local_workers(workers)
    if count > 1 and len(items) > 1 and _shippable({"map": function}):
        from .workers import pool

        with session():
            # the same pool as the token scans (one pool per size): workers are reused;
            # this process is one of the ``count``
            return list(pool(count - 1).map(function, ((i,) for i in items), caller=True))
    return [function(item) for item in items]


def _call_pickled(payload: bytes, item: Any) -> bytes:
    """Ray task body of :func:`run_map`: the result pickled like the local engine's."""
    return pickle.dumps(pickle.loads(payload)(item), protocol=pickle.HIGHEST_PROTOCOL)


def _shippable(aggregators: Mapping[str, Aggregator]) -> bool:
    """Whether worker processes can rebuild the aggregators: not when they (or anything
    they hold) are defined in the caller's script or notebook, which a worker cannot
    import; those run in this process."""
    try:
        return b"__main__" not in pickle.dumps(dict(aggregators),
                                               protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - unpicklable: only this process can run them
        return False


# -- plans: analyses that ask for scans ----------------------------------------------------

@dataclass(frozen=True)
class Scan:
    """One scan a plan asks for: aggregators over a run's tokens (some steps only).

    Attributes
    ----------
    aggregators : mapping of str to Aggregator
    steps : tuple of int, optional
        Only these steps (default: all).
    """

    aggregators: Mapping[str, Aggregator]
    steps: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Map:
    """A request of a plan for data other than tokens: ``function(item)`` for every item.

    The plan receives the list of results, in item order. Each item should be small (a
    file path) and each call bounded (one part file): the local engine runs the calls in
    this process or in its worker processes (one item each at a time), the Ray engine as
    Ray tasks, and either way the results come back in item order, so an analysis that
    folds them in that order gets the same numbers from both engines.

    Attributes
    ----------
    function : callable
        Importable (a module-level function) so that workers can run it.
    items : tuple
    """

    function: Callable[[Any], Any]
    items: tuple = ()


#: An analysis of one run written as a generator: it yields a :class:`Scan` (or a bare
#: mapping of aggregators) each time it needs the tokens, or a :class:`Map` for other data,
#: receives the finished results, and returns its result.
Plan = Generator[Union[Scan, Map, Mapping[str, Aggregator]], Any, Any]


def together(plans: Mapping[str, Plan]) -> Plan:
    """Several plans as one plan whose scans are read together.

    Each round gathers the requests of the unfinished plans: token scans over the same steps
    become one request (aggregator keys prefixed by the plan's name), anything else is
    asked alone. Returns ``{name: result or Failed}``, like :func:`run_plans`, so that one
    sub-plan that raises does not stop the others.
    """
    outcomes: dict[str, Any] = {}
    waiting: dict[str, Any] = {}

    def advance(name: str, reply) -> None:
        plan = plans[name]
        try:
            request = next(plan) if reply is None else (
                plan.throw(reply) if isinstance(reply, Exception) else plan.send(reply))
            waiting[name] = request if isinstance(request, (Scan, Map)) \
                else Scan(dict(request))
        except StopIteration as stop:
            outcomes[name] = stop.value
        except Exception as exc:  # noqa: BLE001 - one sub-plan's failure is its own
            outcomes[name] = Failed(exc)

    for name in plans:
        advance(name, None)
    while waiting:
        current, groups = dict(waiting), {}
        waiting.clear()
        for name, request in current.items():
            key = ("scan", request.steps) if isinstance(request, Scan) else ("alone", name)
            groups.setdefault(key, []).append(name)
        for (kind, _), names in groups.items():
            if kind == "alone":
                name = names[0]
                try:
                    reply = yield current[name]
                except Exception as exc:  # noqa: BLE001
                    reply = exc
                advance(name, reply)
                continue
            fused = {f"{name}\x00{key}": aggregator for name in names
                     for key, aggregator in current[name].aggregators.items()}
            try:
                results = yield Scan(fused, current[names[0]].steps)
            except Exception as exc:  # noqa: BLE001
                for name in names:
                    advance(name, exc)
                continue
            for name in names:
                advance(name, {key: results[f"{name}\x00{key}"]
                               for key in current[name].aggregators})
    return outcomes


@dataclass
class Failed:
    """The outcome of a plan that raised."""

    error: Exception


def run_plan(store: Store, run: str, plan: Plan, **engine_options) -> Any:
    """Drive one plan over one run and return its result (or raise its error)."""
    outcome = run_plans(store, run, {"plan": plan}, **engine_options)["plan"]
    if isinstance(outcome, Failed):
        raise outcome.error
    return outcome


def run_plans(store: Store, run: str, plans: Mapping[str, Plan],
              **engine_options) -> dict[str, Any]:
    """Drive several plans over one run, reading the data once for all that ask at once.

    Each round gathers the scan every unfinished plan is waiting for and runs the scans over
    the same steps as one (:func:`run_aggregators` with all their aggregators): an analysis
    that needs two passes costs two rounds, however many analyses share them.

    Parameters
    ----------
    store : Store
    run : str
    plans : mapping of str to Plan
    **engine_options
        Passed to :func:`run_aggregators` (``engine``, ``workers``, ...).

    Returns
    -------
    dict
        The result of every plan, or :class:`Failed` with the error it raised. When a fused
        scan fails, its scans are run again one by one, so that the error reaches only the
        plan whose data or aggregator caused it; the others go on.
    """
    outcomes: dict[str, Any] = {}
    waiting: dict[str, Scan] = {}
    # plans that remember results across calls key them on what the scans will select
    selection = _SELECTION.set({"keep_after_eos": bool(engine_options.get("keep_after_eos"))})

    def advance(name: str, reply: dict | Exception | None) -> None:
        plan = plans[name]
        try:
            if reply is None:
                request = next(plan)
            elif isinstance(reply, Exception):
                request = plan.throw(reply)
            else:
                request = plan.send(reply)
            waiting[name] = request if isinstance(request, (Scan, Map)) \
                else Scan(dict(request))
        except StopIteration as stop:
            outcomes[name] = stop.value
        except Exception as exc:  # noqa: BLE001 - one plan's failure is its own outcome
            outcomes[name] = Failed(exc)
            plan.close()

    try:
        with session():
            for name in plans:
                advance(name, None)
            _drive(store, run, waiting, advance, engine_options)
    finally:
        _SELECTION.reset(selection)
    return outcomes


#: The token selection of the scans of the plans being driven (see :func:`scan_selection`).
_SELECTION: contextvars.ContextVar[dict] = contextvars.ContextVar("entropylens_selection",
                                                                  default={})


def scan_selection() -> dict:
    """Which tokens the scans of the plans being driven see: ``{"keep_after_eos": bool}``.

    A plan that remembers its results across calls (the policy-entropy curve) keys them on
    this, since the option reaches the engine, not the plan.
    """
    return {"keep_after_eos": False, **_SELECTION.get()}


def _drive(store: Store, run: str, waiting: dict, advance, engine_options) -> None:
    """Rounds of fused scans until no plan waits."""
    while waiting:
        current = dict(waiting)
        waiting.clear()
        by_steps: dict[tuple[int, ...] | None, list[str]] = {}
        for name, scan in list(current.items()):
            if isinstance(scan, Map):
                del current[name]
                try:
                    reply = run_map(scan.function, scan.items, **engine_options)
                except Exception as exc:  # noqa: BLE001 - the plan's own outcome
                    reply = exc
                advance(name, reply)
                continue
            steps = None if scan.steps is None else tuple(int(s) for s in scan.steps)
            by_steps.setdefault(steps, []).append(name)
        for steps, names in by_steps.items():
            for name, reply in _fused_scan(store, run, {n: current[n] for n in names},
                                           steps, engine_options).items():
                advance(name, reply)


def _fused_scan(store: Store, run: str, scans: Mapping[str, Scan], steps, engine_options):
    """Results (or the error) of each plan's scan, read together; aggregators that share a
    key (:meth:`Aggregator.share_key`) run once."""
    fused: dict[str, Aggregator] = {}
    same_as: dict[str, str] = {}
    first_with: dict[Hashable, str] = {}
    for name, scan in scans.items():
        for key, aggregator in scan.aggregators.items():
            label = f"{name}\x00{key}"
            share = aggregator.share_key()
            if share is not None and share in first_with:
                same_as[label] = first_with[share]
                continue
            fused[label] = aggregator
            if share is not None:
                first_with[share] = label
    try:
        results = run_aggregators(store, run, fused, steps=steps, **engine_options)
    except Exception as exc:  # noqa: BLE001
        if len(scans) == 1:
            return {name: exc for name in scans}
        return {name: _single_scan(store, run, scan, steps, engine_options)
                for name, scan in scans.items()}
    # a copy for each further plan: plans may change the results they are handed
    for label, original in same_as.items():
        results[label] = copy.deepcopy(results[original])
    return {name: {key: results[f"{name}\x00{key}"] for key in scan.aggregators}
            for name, scan in scans.items()}


def _single_scan(store: Store, run: str, scan: Scan, steps, engine_options):
    try:
        return run_aggregators(store, run, scan.aggregators, steps=steps, **engine_options)
    except Exception as exc:  # noqa: BLE001
        return exc


def local_workers(workers: int | None = None) -> int:
    """Worker processes of the local engine.

    ``workers`` when given, else the environment variable ``ENTROPYLENS_WORKERS``, else the
    usable CPUs up to :data:`MAX_WORKERS`. Each worker holds one unit at a time, so memory
    grows with the workers, not with the data.
    """
    if workers is None:
        value = os.environ.get(WORKERS_ENV, "").strip()
        if value:
            try:
                workers = int(value)
            except ValueError as exc:
                raise EntropylensError(f"{WORKERS_ENV} must be a whole number, not "
                                       f"{value!r}") from exc
        else:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
                else (os.cpu_count() or 1)
            workers = min(cpus, MAX_WORKERS)
    if workers < 1:
        raise EntropylensError(f"workers must be at least 1, not {workers}")
    return workers


def _unit_state(unit: Unit, aggregators, columns, steps, batch_size,
                keep_after_eos=False) -> dict:
    """Worker side: one unit's sealed states."""
    return run_unit(unit, aggregators, columns, steps=steps, batch_size=batch_size,
                    keep_after_eos=keep_after_eos)


def _pool_partials(units: list[Unit], aggregators, columns, *, steps, batch_size,
                   workers: int, keep_after_eos: bool = False) -> Iterator[dict]:
    """Partial states of the units from ``workers`` processes, this one among them (it
    scans units while no answer waits, so a small run is done before the others have
    started), yielded in unit order."""
    from .workers import pool

    aggregators, columns = dict(aggregators), list(columns)
    yield from pool(workers - 1).map(
        _unit_state, ((unit, aggregators, columns, steps, batch_size, keep_after_eos)
                      for unit in units), caller=True)


def init_ray(address: str | None = None, *, num_cpus: int | None = None):
    """Connect to Ray (or start a local instance) once per process; returns the module.

    Raises
    ------
    EntropylensError
        When Ray is not installed or the cluster cannot be reached.
    """
    try:
        import ray
        import ray.data  # noqa: F401  (the data extra)
    except ImportError as exc:
        raise EntropylensError("the ray engine needs Ray Data: pip install "
                               "'entropylens[ray]'") from exc
    if not ray.is_initialized():
        options = {"address": address, "include_dashboard": False,
                   "log_to_driver": False, "ignore_reinit_error": True}
        if address is None and num_cpus is not None:
            options["num_cpus"] = num_cpus
        try:
            ray.init(**options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = address or "a new local instance"
            raise EntropylensError(f"cannot connect to Ray at {where}: {exc}") from exc
        ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


class _UnitTask:
    """The ``map_batches`` function: a batch of unit indices to pickled sealed states."""

    def __init__(self, units, aggregators, columns, steps, batch_size, keep_after_eos=False):
        self.units, self.aggregators = units, aggregators
        self.columns, self.steps, self.batch_size = columns, steps, batch_size
        self.keep_after_eos = keep_after_eos

    def __call__(self, batch: dict) -> dict:
        indices = [int(i) for i in batch["unit"]]
        states = [pickle.dumps(run_unit(self.units[i], self.aggregators, self.columns,
                                        steps=self.steps, batch_size=self.batch_size,
                                        keep_after_eos=self.keep_after_eos),
                               protocol=pickle.HIGHEST_PROTOCOL) for i in indices]
        out = np.empty(len(states), dtype=object)
        out[:] = states
        return {"unit": np.asarray(indices, dtype=np.int64), "state": out}


def _ray_partials(units: list[Unit], aggregators, columns, *, steps, batch_size,
                  ray_address, keep_after_eos=False) -> Iterator[dict]:
    """Partial states of the units computed by Ray Data, yielded in unit order."""
    ray = init_ray(ray_address)
    items = [{"unit": u.index} for u in units]
    try:
        dataset = ray.data.from_items(items, override_num_blocks=len(items))
    except TypeError:   # Ray < 2.10 names it parallelism
        dataset = ray.data.from_items(items, parallelism=len(items))
    task = _UnitTask(units, dict(aggregators), list(columns), steps, batch_size,
                     keep_after_eos)
    results = dataset.map_batches(task, batch_size=1, batch_format="numpy")
    waiting: dict[int, dict] = {}
    following = 0
    # merge in unit order whatever order the tasks finish in; hold only the early ones
    for row in results.iter_rows():
        waiting[int(row["unit"])] = pickle.loads(row["state"])
        while following in waiting:
            yield waiting.pop(following)
            following += 1
    if waiting or following != len(units):
        raise EntropylensError(f"the ray engine returned {following} of {len(units)} units")
