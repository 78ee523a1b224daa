"""The analysis registry: one place that knows every analysis, and one runner for all.

An analysis is a subclass of :class:`Analysis`, registered once with :func:`register`. It
declares

- its ``name`` (the key of its result everywhere: the API function, the CLI command, the
  report section and the JSON key), a ``title`` and what a run must hold (``needs``);
- ``plan(store, run, inputs, **options)``: the per-run work, a generator over shared scans
  (:data:`entropylens.engine.Plan`: it yields the aggregators it needs, receives their
  results and returns the run's *part*); ``requires`` names analyses whose per-run results
  it reads (handed over in ``inputs``, each an :class:`Outcome`; :func:`required` gives the
  value or raises the reason it is missing);
- ``combine(parts, skipped=..., **options)``: the result dataclass (with ``to_dict()``) of
  one or several runs' parts;
- optionally its report: ``figures(result, run)`` (:class:`FigureSpec`, drawn by the report),
  ``section(result, run)`` (the JSON-ready content of its report block, rendered by the
  templates ``report/templates/sections/<name>.html.j2`` and ``.md.j2``) and
  ``findings(result, run)`` (:class:`Finding` sentences for the top of the report).

:func:`run_analysis` is the one runner: it opens the store, resolves runs, keeps the engine's
workers alive across runs, runs required analyses first, turns a run that cannot have the
analysis into a ``skipped`` reason (or raises when that run was the only one asked for) and
combines the parts. :func:`run_parts` runs several analyses of one run together, so that the
scans they ask for at the same time are read once (the report uses it).

Adding an analysis is one module with its subclass and ``register(...)``, one import line
in :data:`MODULES`, and (for the report) its two template blocks.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

from ..engine import Failed, Plan, run_plans
from ..errors import EntropylensError, StoreReadError
from ..store import Store, open_store
from ..workers import session

#: Modules that register analyses, imported on first use of the registry (so that importing
#: the package stays cheap and a broken optional analysis cannot break the others).
MODULES: list[str] = [
    "entropylens.analysis.curves",
    "entropylens.analysis.summary",
    "entropylens.analysis.quality",
    "entropylens.analysis.phases",
    "entropylens.analysis.distribution",
    "entropylens.analysis.saturation",
    "entropylens.analysis.forking",
    "entropylens.analysis.roles",
    "entropylens.analysis.covariance",
    "entropylens.analysis.compare",
    "entropylens.analysis.diagnose",
    "entropylens.analysis.diversity",
    "entropylens.analysis.origins",
    "entropylens.analysis.branches",
]

#: What a run can hold, as counted in its manifest (``counts``), and how to say it is missing.
NEEDS = {
    "tokens": "the run has no tokens (only step metrics)",
    "sequences": "the run has no completions (sequences)",
    "metrics": "the run has no step metrics",
    "nodes": "the run has no search-tree nodes",
}

#: Keyword options of the engine rather than of an analysis (see
#: :func:`entropylens.engine.run_aggregators`); results never depend on them.
ENGINE_OPTIONS = ("batch_size", "unit_rows", "ray_address", "workers")
#: Keyword options that select the tokens every scan sees, also handled by the engine:
#: ``keep_after_eos`` keeps the tokens after the end of their sequence.
SCAN_OPTIONS = ("keep_after_eos",)

_REGISTRY: dict[str, "Analysis"] = {}
_LOADED = False


@dataclass
class Outcome:
    """One analysis result for one run, or the reason it is missing.

    Attributes
    ----------
    value : object
        The combined result of that run alone (None when missing).
    reason : str or None
        Why the result is missing, in plain words; None when it is there.
    error : Exception or None
        The error behind ``reason`` (an analysis that requires this one re-raises it, so the
        caller sees the original message and path).
    """

    value: Any = None
    reason: str | None = None
    error: BaseException | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.reason is None


@dataclass
class FigureSpec:
    """A figure an analysis asks the report to draw.

    Attributes
    ----------
    kind : str
        Short key, unique within the run (``"covariance"``); the figure's file and HTML id are
        ``<kind>-<run slug>``.
    title, caption : str
    draw : callable
        ``draw(ax)`` (or ``draw(axes)`` with ``ncols > 1``) draws on matplotlib Axes; it
        calls a function of :mod:`entropylens.plots`.
    figsize : tuple of float
    ncols : int
    """

    kind: str
    title: str
    caption: str
    draw: Callable[[Any], Any]
    figsize: tuple[float, float] = (7.5, 3.8)
    ncols: int = 1


@dataclass
class Finding:
    """One sentence about a run for the report's findings, with the numbers it states.

    Attributes
    ----------
    kind : str
        What it is about (``"forking"``, ``"diversity"``, ...); the report links it to that
        analysis' section of the run.
    text : str
        Plain words; numbers rounded for reading.
    severity : {"info", "good", "warning", "alarm"}
    tier : {"key", "detail"}
        Key findings head the report; details follow.
    numbers : dict
        The unrounded numbers the text states (kept in report.json).
    """

    kind: str
    text: str
    severity: str = "info"
    tier: str = "detail"
    numbers: dict = field(default_factory=dict)


class Analysis:
    """Base class of a registered analysis (see the module docstring).

    Class attributes
    ----------------
    name : str
        Registry key: the result's name in the API, CLI, report and JSON.
    title : str
        Heading of its report section.
    needs : tuple of str
        Keys of :data:`NEEDS` that a run must hold (non-zero manifest count); otherwise the
        run gets that reason without the plan being started.
    requires : tuple of str
        Analyses whose per-run :class:`Outcome` this one reads (``inputs``).
    in_report : bool
        Whether the report runs it.
    order : int
        Position of its section in the report (smaller first).
    headline : bool
        Its section is shown at the top of the report, one block per run, before the
        details (the diagnosis).
    skip_runs : bool
        With several runs asked for, a run that cannot have the analysis is left out (its
        reason in the result's ``skipped``, or a :meth:`placeholder` part). False: its error
        is raised, as for a single run (the summary and data-quality checks describe every
        run or fail).
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ()
    in_report: ClassVar[bool] = True
    order: ClassVar[int] = 100
    headline: ClassVar[bool] = False
    only_where_present: ClassVar[bool] = False
    skip_runs: ClassVar[bool] = True

    def plan(self, store: Store, run: str, inputs: Mapping[str, Outcome], **options) -> Plan:
        """The run's part, as a plan. Raise :class:`EntropylensError` when the run cannot
        have this analysis: its message becomes the reason the report shows."""
        raise NotImplementedError

    def combine(self, parts: Sequence[Any], *, skipped: Sequence[str] = (), **options) -> Any:
        """The result (a dataclass with ``to_dict()``) of the parts of one or more runs, in
        run order; ``skipped`` holds why other runs asked for were left out."""
        raise NotImplementedError

    # -- report hooks (optional) --
    def figures(self, result: Any, run: str) -> list[FigureSpec]:
        """Figures of ``run`` in its report section (``result`` holds that run only)."""
        return []

    def section(self, result: Any, run: str) -> dict | None:
        """JSON-ready content of ``run``'s report block (None: no block)."""
        return None

    def findings(self, result: Any, run: str) -> list[Finding]:
        """Sentences for the report's list of findings about ``run``."""
        return []

    def placeholder(self, run: str, reason: str) -> Any:
        """The part standing for a run left out of a several-run result (None: the run is
        only listed in ``skipped``). Analyses whose results keep one entry per run asked for
        (phases, the saturation fits) return an entry that carries ``reason``."""
        return None

    def missing(self, manifest: Mapping) -> str | None:
        """Why a run with this manifest cannot have the analysis, from :attr:`needs`."""
        counts = manifest.get("counts", {})
        for need in self.needs:
            if not counts.get(need):
                return NEEDS.get(need, f"the run has no {need}")
        return None

    def __repr__(self) -> str:
        return f"<analysis {self.name!r}>"


def register(analysis: Analysis) -> Analysis:
    """Add ``analysis`` to the registry (replacing one of the same name) and return it."""
    if not isinstance(analysis, Analysis) or not analysis.name:
        raise TypeError("register() takes an Analysis instance with a name")
    _REGISTRY[analysis.name] = analysis
    return analysis


def _load() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for module in MODULES:
            importlib.import_module(module)


def get(name: str) -> Analysis:
    """The registered analysis ``name``."""
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise EntropylensError(f"no analysis named {name!r} (known: "
                               f"{', '.join(sorted(_REGISTRY))})") from None


def registered(*, in_report: bool | None = None) -> list[Analysis]:
    """Every registered analysis in report order (only those with ``in_report`` when given)."""
    _load()
    found = sorted(_REGISTRY.values(), key=lambda a: (a.order, a.name))
    return [a for a in found if in_report is None or a.in_report == in_report]


def _reason(error: BaseException) -> str:
    if isinstance(error, StoreReadError):  # a damaged store is no note: it stops the command
        raise error
    if isinstance(error, EntropylensError):
        return error.message
    return f"failed: {type(error).__name__}: {error}"


def _closure(analyses: Iterable[Analysis]) -> list[Analysis]:
    """The analyses and everything they require, each after what it requires."""
    ordered: list[Analysis] = []
    visiting: set[str] = set()

    def visit(analysis: Analysis) -> None:
        if analysis in ordered:
            return
        if analysis.name in visiting:
            raise EntropylensError(f"analysis {analysis.name!r} requires itself")
        visiting.add(analysis.name)
        for name in analysis.requires:
            visit(get(name))
        visiting.discard(analysis.name)
        ordered.append(analysis)

    for analysis in analyses:
        visit(analysis)
    return ordered


def run_parts(store: Store, run: str, analyses: Sequence[Analysis | str], *,
              options: Mapping[str, Mapping] | None = None, engine: str = "local",
              **engine_options) -> dict[str, Any]:
    """The parts of several analyses of one run, their scans fused.

    Analyses whose requirements are met run together (their scans read once,
    :func:`entropylens.engine.run_plans`); those that require others run in a later round.

    Parameters
    ----------
    store : Store
    run : str
    analyses : sequence of Analysis or str
        Required analyses are added.
    options : mapping of str to mapping, optional
        Keyword options of each analysis' :meth:`Analysis.plan`, by name.
    engine : {"local", "ray"}
    **engine_options
        ``workers``, ``batch_size``, ...

    Returns
    -------
    dict
        Name to the run's part, or :class:`entropylens.engine.Failed` with the error (a
        missing need or requirement is an :class:`EntropylensError` with the reason).
    """
    options = options or {}
    wanted = _closure(get(a) if isinstance(a, str) else a for a in analyses)
    manifest = store.manifest(run)
    done: dict[str, Any] = {}
    outcomes: dict[str, Outcome] = {}
    pending = list(wanted)
    while pending:
        ready = [a for a in pending if all(r in done for r in a.requires)]
        pending = [a for a in pending if a not in ready]
        plans: dict[str, Plan] = {}
        for analysis in ready:
            reason = analysis.missing(manifest)
            if reason is not None:
                done[analysis.name] = Failed(EntropylensError(reason, path=store.run_dir(run)))
                continue
            inputs = {name: outcomes[name] for name in analysis.requires}
            try:
                plans[analysis.name] = analysis.plan(store, run, inputs,
                                                     **options.get(analysis.name, {}))
            except EntropylensError as exc:
                done[analysis.name] = Failed(exc)
        done.update(run_plans(store, run, plans, engine=engine, **engine_options))
        for analysis in ready:
            outcomes[analysis.name] = outcome(analysis, done[analysis.name], **options.get(
                analysis.name, {}))
    return done


def outcome(analysis: Analysis, part: Any, **options) -> Outcome:
    """One run's part as an :class:`Outcome` (its combined result, or the reason)."""
    if isinstance(part, Failed):
        return Outcome(reason=_reason(part.error), error=part.error)
    try:
        return Outcome(value=analysis.combine([part], **options))
    except Exception as exc:  # noqa: BLE001 - one analysis must not sink the others
        return Outcome(reason=_reason(exc), error=exc)


def run_analysis(analysis: Analysis | str, store: Store | str,
                 runs: str | Sequence[str] | None = None, *, engine: str = "local",
                 workers: int | None = None, **options) -> Any:
    """Run one analysis over ``runs`` of ``store`` and combine the runs' parts.

    Parameters
    ----------
    analysis : Analysis or str
    store : Store or path
    runs : str or sequence of str, optional
        Default: every run. When several are asked for, a run that cannot have the analysis
        is left out with its reason in the result's ``skipped``; when only one is, its
        :class:`EntropylensError` is raised.
    engine : {"local", "ray"}
    workers : int, optional
        Worker processes of the local engine (default: ``ENTROPYLENS_WORKERS``, else the
        CPUs up to 4; 1: none).
    **options
        The analysis' own options (passed to ``plan`` and ``combine``); the engine's
        (:data:`ENGINE_OPTIONS`: ``batch_size``, ``unit_rows``) go to the engine unless
        the analysis' ``plan`` takes an option of that name; the token selection
        (:data:`SCAN_OPTIONS`: ``keep_after_eos``) goes to the engine.

    Returns
    -------
    The analysis' result dataclass.
    """
    analysis = get(analysis) if isinstance(analysis, str) else analysis
    store = open_store(store)
    names = store.resolve_runs(runs)
    # an analysis' own option of the same name as an engine option (forking's batch_size:
    # tokens per batch) stays the analysis'
    own = inspect.signature(analysis.plan).parameters
    engine_options = {k: options.pop(k) for k in (*ENGINE_OPTIONS, *SCAN_OPTIONS)
                      if k in options and k not in own}
    if workers is not None:
        engine_options["workers"] = workers
    parts, skipped = [], []
    with session():   # one set of engine workers serves every run
        for run in names:
            part = run_parts(store, run, [analysis], options={analysis.name: options},
                             engine=engine, **engine_options)[analysis.name]
            if isinstance(part, Failed):
                if len(names) == 1 or not analysis.skip_runs \
                        or not isinstance(part.error, EntropylensError):
                    raise part.error
                skipped.append(f"{run}: {part.error.message}")
                part = analysis.placeholder(run, part.error.message)
                if part is None:
                    continue
            parts.append(part)
    if len(skipped) == len(names):
        raise EntropylensError(f"no run can have the {analysis.name} analysis: "
                               + "; ".join(skipped), path=store.path)
    return analysis.combine(parts, skipped=skipped, **options)


def required(inputs: Mapping[str, Outcome], name: str) -> Any:
    """The value of the required analysis ``name`` for this run, or its error raised again
    (so a run without, say, a policy-entropy curve fails every analysis built on it with the
    curve's own message)."""
    found = inputs[name]
    if found.ok:
        return found.value
    if isinstance(found.error, EntropylensError):
        raise found.error
    raise EntropylensError(found.reason)
