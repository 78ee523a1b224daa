"""Watching a run while it trains: incremental diagnosis and the ``watch`` loop.

A refresh appends what is new in the sources (:mod:`entropylens.ingest.append`), then
re-reads the diagnosis's inputs at a cost that grows with the new steps, not the run:

- the per-step token statistics behind the policy-entropy curve are cached per token part
  file in ``STORE/.cache/<run>/``, keyed by the part's name and the SHA-256 the manifest
  records for it (appends never rewrite a part, so a cached result stays valid until the
  part is gone); only parts without a cached result are scanned;
- metrics and sequences are small (one row per step and metric, one per completion) and are
  read whole.

The status comes from :func:`entropylens.analysis.diagnose.diagnose_curves` on the same
curves :func:`entropylens.diagnose` reads, so a watched run reports the same status as a
full diagnosis of the same steps; the token-level explanations of ``diagnose`` (decision
tokens, roles, covariance) are left to it.

The predicted ceiling comes from :func:`entropylens.analysis.saturation.fit_curves`, with
its quality gate: the fit on the first half of the points predicts the second half, and the
ceiling is called predictable only once the gate passes and that prediction error is within
:data:`~entropylens.analysis.saturation.EARLY_GOOD_SHARE` of the metric's range.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .engine import _conform_batch, run_aggregators
from .errors import EntropylensError
from .store import Store, _sha256, write_file_atomic

#: Share of the fitted points whose fit must predict the rest (live early prediction).
PREDICT_SPLIT = 0.5
#: Bootstrap resamples of the live fit (the intervals firm up as points arrive).
LIVE_BOOTSTRAP = 200
_CACHE = ".cache"


# -- incremental per-step statistics ------------------------------------------------------

def cached_step_stats(store: Store, run: str, aggregator) -> pd.DataFrame:
    """``aggregator``'s finished per-step frame over the run's tokens, from per-part caches.

    Parameters
    ----------
    store : Store
    run : str
    aggregator : Aggregator
        One whose :meth:`finish` returns one row per step with a ``step`` column (e.g.
        ``TrainTokens(StepStats(...))``), and whose ``share_key()`` names its settings.

    Returns
    -------
    pandas.DataFrame
        The same rows as running ``aggregator`` over the whole run (rows without a step are
        left out). Steps found in more than one part are recomputed over all their parts.
    """
    folder = store.run_dir(run)
    hashes = dict(store.manifest(run).get("parts") or {})
    parts = sorted((folder / "tokens").glob("part-*.parquet"))
    inner = getattr(aggregator, "inner", aggregator)
    key = inner.share_key() if hasattr(inner, "share_key") else None
    if key is None:  # settings it cannot name: no cache
        return run_aggregators(store, run, {"a": aggregator})["a"]
    tag = _digest(repr((type(aggregator).__name__, key[1:])))
    cache = store.path / _CACHE / run
    frames, kept = [], set()
    for part in parts:
        sha = hashes.get(part.name) or _sha256(part)
        path = cache / f"{part.stem}.{sha[:20]}.{tag}.parquet"
        kept.add(path.name)
        frame = _load(path)
        if frame is None:
            frame = _part_frame(part, aggregator)
            _save(path, frame)
        frames.append(frame)
    if not frames:
        _prune(cache, kept, tag)
        return aggregator.finish(aggregator.start())
    frame = pd.concat([f for f in frames if len(f)] or frames[:1], ignore_index=True)
    shared = sorted(int(s) for s in frame["step"][frame["step"].duplicated()].dropna().unique())
    if shared:
        # steps split over parts (a writer's part boundary inside a step, or an append of a
        # half-written step) are computed over all their parts, once: those parts are sealed
        holders = [f"{p.name}:{hashes.get(p.name)}" for p, f in zip(parts, frames)
                   if f["step"].isin(shared).any()]
        path = cache / f"shared.{_digest(repr((holders, shared)))}.{tag}.parquet"
        kept.add(path.name)
        again = _load(path)
        if again is None:
            again = run_aggregators(store, run, {"a": aggregator}, steps=shared,
                                    workers=1)["a"]
            _save(path, again)
        frame = pd.concat([frame[~frame["step"].isin(shared)], again], ignore_index=True)
    _prune(cache, kept, tag)
    return frame.sort_values("step").reset_index(drop=True)


def _load(path: Path) -> pd.DataFrame | None:
    """A cache entry, or None when missing or damaged (then it is recomputed)."""
    if not path.exists():
        return None
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError, pa.ArrowException):
        return None


def _part_frame(part: Path, aggregator) -> pd.DataFrame:
    """The aggregator over one part file, finished; rows without a step dropped."""
    columns = sorted(set(aggregator.columns) | {"step"})
    state = aggregator.start()
    try:
        for batch in pq.ParquetFile(part).iter_batches(columns=columns, batch_size=256 * 1024):
            state = aggregator.update(state, _conform_batch(batch, columns))
    except OSError as exc:
        raise EntropylensError(f"unreadable token part file: {exc}", path=part) from exc
    frame = aggregator.finish(aggregator.seal(state))
    return frame.dropna(subset=["step"]).reset_index(drop=True)


def _digest(text: str) -> str:
    import hashlib
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _save(path: Path, frame: pd.DataFrame) -> None:
    """Write a cache entry atomically; a read-only store simply goes without a cache."""
    import io
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        write_file_atomic(path, buffer.getvalue())
    except OSError:
        pass


def _prune(cache: Path, kept: set[str], tag: str) -> None:
    """Remove this aggregator's cache entries of parts that are gone (a replaced run,
    earlier split steps)."""
    if not cache.is_dir():
        return
    for entry in cache.iterdir():
        if entry.name.endswith(f".{tag}.parquet") and entry.name not in kept:
            entry.unlink(missing_ok=True)


def drop_cache(store: Store, run: str) -> None:
    """Remove a run's cached per-part results."""
    shutil.rmtree(store.path / _CACHE / run, ignore_errors=True)


def live_curve(store: Store, run: str) -> pd.DataFrame:
    """The run's policy-entropy curve, as :func:`~entropylens.analysis.curves.policy_entropy`
    gives it, with the token statistics read through :func:`cached_step_stats`."""
    from .analysis.curves import _policy_entropy

    plan = _policy_entropy(store, run, store.manifest(run))
    try:
        request = next(plan)
        while True:
            reply = {name: cached_step_stats(store, run, agg) for name, agg in request.items()}
            request = plan.send(reply)
    except StopIteration as done:
        return done.value


# -- the live diagnosis --------------------------------------------------------------------

@dataclass
class Prediction:
    """The live saturation fit: the ceiling once it earns its place."""

    predictable: bool
    ceiling: float | None = None
    ceiling_ci: list | None = None
    rmse_share_of_range: float | None = None
    points: int = 0
    reason: str | None = None

    def to_dict(self) -> dict:
        return {"predictable": self.predictable, "ceiling": self.ceiling,
                "ceiling_ci": self.ceiling_ci, "rmse_share_of_range": self.rmse_share_of_range,
                "points": self.points, "reason": self.reason}

    def text(self) -> str:
        """One phrase for the live view and the status lines."""
        if self.predictable:
            low, high = self.ceiling_ci or (None, None)
            interval = f" [{low:.3g}, {high:.3g}]" if low is not None else ""
            return (f"ceiling {self.ceiling:.3g}{interval}, later points predicted within "
                    f"{100 * self.rmse_share_of_range:.1f}% of the range")
        return f"not yet predictable: {self.reason}"


def predict_ceiling(curve: pd.DataFrame | None, perf: pd.DataFrame | None) -> Prediction:
    """The saturation law fitted so far, judged by how its first half predicted the rest."""
    from .analysis.saturation import EARLY_GOOD_SHARE, MIN_FIT_POINTS, fit_curves

    if curve is None or perf is None or len(curve) < 2 or len(perf) < MIN_FIT_POINTS:
        n = 0 if perf is None else len(perf)
        return Prediction(False, points=n,
                          reason=f"{n} performance point(s) (at least {MIN_FIT_POINTS})")
    try:
        fit = fit_curves(curve, perf, bootstrap=LIVE_BOOTSTRAP, early_fraction=PREDICT_SPLIT)
    except EntropylensError as exc:
        return Prediction(False, points=len(perf), reason=exc.message)
    share = fit.early.get("rmse_share_of_range")
    if fit.ceiling is None:
        return Prediction(False, points=fit.n, rmse_share_of_range=share,
                          reason=fit.ceiling_reason)
    if share is None:
        return Prediction(False, points=fit.n, reason=fit.early.get("reason")
                          or "no later points to check the prediction on")
    if share > EARLY_GOOD_SHARE:
        return Prediction(False, points=fit.n, rmse_share_of_range=share,
                          reason=f"the fit on the first {fit.early['n_fit']} points missed the "
                                 f"later ones by {100 * share:.1f}% of the range (at most "
                                 f"{100 * EARLY_GOOD_SHARE:.0f}%)")
    return Prediction(True, ceiling=fit.ceiling, ceiling_ci=fit.ceiling_ci,
                      rmse_share_of_range=share, points=fit.n)


def live_diagnosis(store: Store, run: str, *, val_size: int | None = None,
                   reward: str | None = None):
    """The run's status (a :class:`~entropylens.analysis.diagnose.RunDiagnosis`) and the
    live :class:`Prediction`, at a cost that grows with the new steps only."""
    from .analysis.curves import _metric_series, performance
    from .analysis.diagnose import (diagnose_curves, run_settings, validation_size)

    manifest = store.manifest(run)
    settings = run_settings(store, run)
    try:
        curve = live_curve(store, run)
    except EntropylensError:
        curve = None
    try:
        perf = performance(store, run, reward)
    except EntropylensError:
        perf = None
    extras: dict = {}
    if manifest.get("counts", {}).get("metrics"):
        length, _, _ = _metric_series(store.read_metrics(run), "response_length_mean")
        if len(length):
            extras["length"] = length
    if curve is not None and "entropy_seq_mean" in curve:
        extras["seq_curve"] = curve.dropna(subset=["entropy_seq_mean"])
    diagnosis = diagnose_curves(curve, perf, run=run,
                                val_size=val_size or validation_size(settings),
                                settings=settings, extras=extras)
    return diagnosis, predict_ceiling(curve, perf)


# -- the watch loop ------------------------------------------------------------------------

@dataclass
class Refresh:
    """What one refresh of :class:`Watcher` found."""

    status: str | None
    previous: str | None
    last_step: int | None
    new_steps: list[int]
    headline: str = ""
    prediction: Prediction | None = None
    events: list = field(default_factory=list)
    seconds: float = 0.0
    entropy: list = field(default_factory=list)
    performance: list = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.status is not None and self.status != self.previous

    def to_dict(self) -> dict:
        return {"status": self.status, "previous": self.previous, "last_step": self.last_step,
                "new_steps": self.new_steps, "headline": self.headline,
                "prediction": self.prediction.to_dict() if self.prediction else None,
                "events": self.events}


class Watcher:
    """Appends a run's growing sources to a store and re-diagnoses it on each refresh.

    Parameters
    ----------
    sources : sequence of paths
    store : path
        Created when missing.
    run : str
    on_change : str, optional
        Shell command run on every status change, with ``ENTROPYLENS_STATUS``,
        ``ENTROPYLENS_PREVIOUS_STATUS``, ``ENTROPYLENS_RUN``, ``ENTROPYLENS_STEP`` and
        ``ENTROPYLENS_HEADLINE`` in its environment.
    hold_last_step : bool
        Keep back the newest step of a source that is still growing (read whole; see
        :func:`entropylens.ingest.append.append`) until it stops changing.
    ingest_options : dict
        ``format``, ``mapping``, ``temperature``, ``vocab_size``, ``aliases`` as for ingest.
    """

    def __init__(self, sources: Sequence[str | Path], store: str | Path, run: str, *,
                 on_change: str | None = None, val_size: int | None = None,
                 reward: str | None = None, hold_last_step: bool = True, **ingest_options):
        from .store import validate_run_name

        self.sources = [Path(s) for s in sources]
        self.store_path = Path(store)
        self.run = validate_run_name(run)
        self.on_change = on_change
        self.val_size = val_size
        self.reward = reward
        self.hold_last_step = hold_last_step
        self.ingest_options = ingest_options
        self.status: str | None = None
        self.last_growth = time.monotonic()

    def _append(self) -> list[int]:
        from .ingest.append import append
        from .ingest.driver import IngestOptions, resolve_sources

        # a source the trainer has not written yet (missing or empty) is skipped until it has
        present = [s for s in self.sources
                   if (s.is_dir() and any(p.is_file() for p in s.rglob("*")))
                   or (s.is_file() and s.stat().st_size > 0)]
        if not present:
            return []
        opts = self.ingest_options
        resolved = resolve_sources(present, opts.get("format"), opts.get("mapping"))
        options = IngestOptions(mapping=dict(opts.get("mapping") or {}),
                                temperature=opts.get("temperature"),
                                vocab_size=opts.get("vocab_size"), on_error="stop",
                                aliases=dict(opts.get("aliases") or {}))
        store = Store.create(self.store_path)
        reads = append(resolved, store, self.run, options=options,
                       hold_last_step=self.hold_last_step,
                       temperature=opts.get("temperature"), vocab_size=opts.get("vocab_size"))
        new = sorted({s for r in reads for s in r.new_steps})
        if new or any(r.held_step is not None for r in reads):
            self.last_growth = time.monotonic()
        return new

    def refresh(self) -> Refresh:
        """Append what is new, then diagnose; runs ``on_change`` when the status changed."""
        started = time.perf_counter()
        new = self._append()
        previous = self.status
        try:
            store = Store.open(self.store_path)
        except EntropylensError:
            store = None
        if store is None or not store.has_run(self.run):
            return Refresh(None, previous, None, new, seconds=time.perf_counter() - started)
        diagnosis, prediction = live_diagnosis(store, self.run, val_size=self.val_size,
                                               reward=self.reward)
        self.status = diagnosis.status
        curve, perf = diagnosis.curve, diagnosis.perf
        last = None
        if curve is not None and len(curve):
            last = int(curve["step"].max())
        if perf is not None and len(perf):
            last = max(last or 0, int(perf["step"].max()))
        result = Refresh(diagnosis.status, previous, last, new, headline=diagnosis.headline,
                         prediction=prediction, events=list(diagnosis.events),
                         seconds=time.perf_counter() - started,
                         entropy=[] if curve is None else curve["entropy"].tolist(),
                         performance=[] if perf is None else perf["value"].tolist())
        if result.changed and self.on_change:
            self._run_hook(result)
        return result

    def _run_hook(self, result: Refresh) -> None:
        env = dict(os.environ, ENTROPYLENS_STATUS=result.status or "",
                   ENTROPYLENS_PREVIOUS_STATUS=result.previous or "",
                   ENTROPYLENS_RUN=self.run, ENTROPYLENS_STEP=str(result.last_step or ""),
                   ENTROPYLENS_HEADLINE=result.headline)
        done = subprocess.run(self.on_change, shell=True, env=env, check=False)
        if done.returncode:
            print(f"entropylens watch: --on-change exited with {done.returncode}",
                  file=sys.stderr)

    def idle_for(self) -> float:
        """Seconds since the sources last grew."""
        return time.monotonic() - self.last_growth


def status_line(result: Refresh, run: str) -> str:
    """The line printed for a status change when stdout is not a terminal."""
    from ._safe_text import plain

    step = "?" if result.last_step is None else result.last_step
    parts = [f"step {step}", f"{run}: {result.previous or 'start'} -> {result.status}",
             result.headline]
    if result.prediction is not None:
        parts.append(result.prediction.text())
    return plain(" | ".join(parts))


_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], width: int = 40) -> str:
    """Unicode block sparkline of the last ``width`` finite values."""
    data = np.asarray([v for v in values if v is not None and np.isfinite(v)][-width:], float)
    if not len(data):
        return ""
    low, high = float(data.min()), float(data.max())
    span = high - low or 1.0
    return "".join(_BARS[min(len(_BARS) - 1, int((v - low) / span * len(_BARS)))]
                   for v in data)


def render_view(result: Refresh, run: str, source: str):
    """The live terminal view (a rich renderable) of one refresh."""
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    from ._safe_text import plain

    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("status", Text(str(result.status or "waiting for data"),
                                 style=_STATUS_STYLE.get(result.status or "", "")))
    table.add_row("last step", Text(str(result.last_step if result.last_step is not None
                                        else "-")))
    table.add_row("evidence", Text(plain(result.headline)))
    if result.entropy:
        table.add_row("entropy", Text(f"{sparkline(result.entropy)}  {result.entropy[-1]:.3g}"))
    if result.performance:
        table.add_row("performance",
                      Text(f"{sparkline(result.performance)}  {result.performance[-1]:.3g}"))
    if result.prediction is not None:
        table.add_row("ceiling", Text(result.prediction.text()))
    for event in result.events[-3:]:
        table.add_row("event", Text(plain(f"{event.get('kind')} steps "
                                          f"{event.get('start_step')}-{event.get('end_step')}")))
    table.add_row("refresh", Text(f"{result.seconds:.2f} s"))
    return Panel(table, title=Text(plain(f"entropylens watch: {run}")),
                 subtitle=Text(plain(source)))


_STATUS_STYLE = {"learning": "green", "collapsing": "bold yellow",
                 "collapsed_plateau": "bold red", "entropy_explosion": "bold red",
                 "not_learning": "yellow", "insufficient_data": "dim"}


def watch(sources: Sequence[str | Path], store: str | Path, run: str, *,
          every: float = 30.0, until_idle: float | None = None, on_change: str | None = None,
          live: bool | None = None, echo: Callable[[str], None] | None = None,
          on_refresh: Callable[[Refresh], None] | None = None, max_refreshes: int | None = None, **options) -> Refresh | None:
    """Poll ``sources``, append them to ``run`` and re-diagnose it until idle or Ctrl-C.

    Parameters
    ----------
    sources : sequence of paths
    store : path
    run : str
    every : float
        Seconds between refreshes.
    until_idle : float, optional
        Stop once the sources have not grown for this many seconds (default: never).
    on_change : str, optional
        Shell command run on each status change (see :class:`Watcher`).
    live : bool, optional
        Show the rich live view (default: when stdout is a terminal); otherwise print one
        line per status change.
    echo : callable, optional
        Where the status lines go (default: print to stdout).
    on_refresh : callable, optional
        Called with every :class:`Refresh`.
    max_refreshes : int, optional
        Stop after this many refreshes.
    **options
        Ingest options (``format``, ``mapping``, ``temperature``, ``vocab_size``,
        ``aliases``) and ``val_size``, ``reward``.

    Returns
    -------
    Refresh or None
        The last refresh (None when interrupted before the first). Every append is atomic,
        so an interruption at any point leaves the store consistent.
    """
    watcher = Watcher(sources, store, run, on_change=on_change, **options)
    live = sys.stdout.isatty() if live is None else live
    echo = echo or (lambda line: print(line, flush=True))
    last: Refresh | None = None
    view = None
    count = 0
    try:
        if live:
            from rich.live import Live
            view = Live(auto_refresh=False)
            view.start()
        while True:
            last = watcher.refresh()
            count += 1
            if on_refresh is not None:
                on_refresh(last)
            if view is not None:
                view.update(render_view(last, run, ", ".join(map(str, watcher.sources))),
                            refresh=True)
            elif last.changed:
                echo(status_line(last, run))
            if max_refreshes is not None and count >= max_refreshes:
                break
            if until_idle is not None and watcher.idle_for() >= until_idle:
                # the sources went quiet: flush a held-back last step, then stop
                last = watcher.refresh()
                if on_refresh is not None:
                    on_refresh(last)
                if view is None and last.changed:
                    echo(status_line(last, run))
                break
            time.sleep(every)
    except KeyboardInterrupt:
        pass
    finally:
        if view is not None:
            view.stop()
    return last
