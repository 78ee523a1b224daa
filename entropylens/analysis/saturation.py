"""The entropy-performance saturation law R = -a * exp(H) + b (arXiv 2505.22617, Eq. 6).

``H`` is the per-step policy entropy (:func:`~entropylens.analysis.curves.policy_entropy`:
token mean from the run's tokens when it has them, else its ``policy_entropy`` metric; ``x``
in the result says which) and ``R`` the performance (:func:`~entropylens.analysis.curves.
performance`: validation accuracy, else mean training reward, or the metric asked for).

The law is linear in ``(a, b)`` given ``H``, so the least-squares fit is solved exactly
(``numpy.linalg.lstsq`` on the columns ``-exp(H)`` and 1). The predicted ceiling is the
performance at zero entropy, ``b - a``.

Joining H and R
---------------
Validation is often logged every few steps and not always at a step with an entropy. Each
performance point at step ``s`` takes:

- the entropy logged at ``s`` when there is one (``exact``);
- else, inside the range of entropy steps, the entropy linearly interpolated between the
  neighbouring entropy steps (``interpolated``);
- else, after the last entropy step by at most the median spacing of entropy steps, the last
  entropy (``carried``: a final validation logged one step after the last training step);
- otherwise the point is dropped (``dropped``).

The result's ``join`` counts each case.

Quality gate
------------
The ceiling ``b - a`` is stated only when the fit passes every test: R² at least
:data:`MIN_R2`, ``a > 0`` (performance falls as entropy rises), at least
:data:`MIN_FIT_POINTS` points, and ``a`` and ``b`` identified: the bootstrap interval of ``a``
excludes 0 and the ceiling's interval is narrower than the metric's range (1 for a fraction,
else the range it covered). Otherwise ``ceiling`` is None everywhere (JSON ``null``) and
``ceiling_reason`` says why. ``above_ceiling`` counts the observations above a stated
ceiling. The early prediction's RMSE is also given as a share of the metric's range.

Uncertainty and early prediction
--------------------------------
``a_ci``, ``b_ci`` and ``ceiling_ci`` are bootstrap 95% percentile intervals: the points
(steps) are resampled with replacement ``bootstrap`` times with a seeded generator, and
resamples whose entropies are all equal are skipped. ``early`` fits the law on the first
``max(3, ceil(0.15 n))`` points in step order and reports the root-mean-square error of its
predictions on the remaining points (the paper reports about 1%).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from ..engine import Plan
from ..errors import EntropylensError
from ..store import Store
from .curves import entropy_label, open_store, performance_curve
from .noise import metric_range
from .registry import Analysis, FigureSpec, Finding, register, required, run_analysis

#: Fewer points than this cannot be fitted with a residual left to judge the fit.
MIN_POINTS = 3
#: The quality gate (one for the CLI, JSON, figures and report): below it no ceiling is
#: stated anywhere. A fit explaining less than half the variance describes noise ...
MIN_R2 = 0.5
#: ... and five points leave two degrees of freedom after a and b plus a residual to judge.
MIN_FIT_POINTS = 5
#: The early prediction is "good" when its RMSE is within this share of the metric's range.
EARLY_GOOD_SHARE = 0.05
#: The entropy H of the fit (the sequence-mean fit is reported beside it).
X_DEFINITION = "entropy_token_mean: token mean per training step"
SEQ_DEFINITION = ("entropy_seq_mean: mean over sequences of each sequence's token mean "
                  "(arXiv 2505.22617, Eq. 5)")
CEILING_MEANING = "fitted performance at zero entropy (b - a), an extrapolation of the law"
#: Entropies (nats) above this are no per-token entropy and are left out of the fit, counted:
#: exp(H) and its square must stay finite in the least squares (exp(100) is 2.7e43).
MAX_FIT_ENTROPY = 100.0
EARLY_FRACTION = 0.15
BOOTSTRAP = 1000


@dataclass
class SaturationFit:
    """A fit of R = -a * exp(H) + b for one run.

    Attributes
    ----------
    run : str
    x, y : str
        What H and R are, e.g. ``"policy_entropy (exact tokens)"`` and ``"val_accuracy"``.
    a, b, ceiling : float
        Coefficients and the predicted performance at zero entropy, ``b - a``.
    r2 : float
        Coefficient of determination of the fit (None when R is constant).
    n : int
        Points used.
    a_ci, b_ci, ceiling_ci : list of two floats
        Bootstrap 95% intervals.
    rmse : float
        Root-mean-square residual of the fit.
    early : dict
        ``fraction``, ``n_fit``, ``rmse`` (on the points after the first ``n_fit``), or
        ``rmse`` None with a ``reason`` when too few points remain.
    join : dict
        How performance points met entropy points (see the module docstring).
    data : pandas.DataFrame
        ``step, H, R``: the points fitted.
    notes : list of str
    error : str or None
        Set instead of the numbers when :func:`fit_saturation` could not fit one run of
        several.
    """

    run: str | None
    x: str | None
    y: str | None
    a: float | None
    b: float | None
    ceiling: float | None
    r2: float | None
    n: int
    a_ci: list | None
    b_ci: list | None
    ceiling_ci: list | None = None
    rmse: float | None = None
    early: dict = field(default_factory=dict)
    join: dict = field(default_factory=dict)
    data: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["step", "H", "R"]))
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    ceiling_reason: str | None = None
    above_ceiling: int | None = None
    seq_mean_fit: dict | None = None

    def predict(self, h) -> np.ndarray | float:
        """Predicted performance at entropy ``h`` (a number or an array)."""
        if self.a is None or self.b is None:
            raise EntropylensError(f"run {self.run!r} has no fit: {self.error}")
        result = -self.a * np.exp(np.asarray(h, dtype=float)) + self.b
        return float(result) if np.ndim(result) == 0 else result

    def to_dict(self) -> dict:
        """The JSON shape of ``entropylens fit --json`` for one run."""
        out = {"run": self.run, "x": self.x, "y": self.y, "a": _num(self.a), "b": _num(self.b),
               "ceiling": _num(self.ceiling), "r2": _num(self.r2), "n": int(self.n),
               "a_ci": _pair(self.a_ci), "b_ci": _pair(self.b_ci),
               "ceiling_ci": _pair(self.ceiling_ci), "rmse": _num(self.rmse),
               "early": {k: (_num(v) if isinstance(v, float) else v)
                         for k, v in self.early.items()},
               "join": dict(self.join), "notes": list(self.notes),
               "ceiling_reason": self.ceiling_reason, "ceiling_meaning": CEILING_MEANING,
               "above_ceiling": self.above_ceiling, "x_definition": X_DEFINITION,
               "entropy_seq_mean_fit": self.seq_mean_fit}
        if self.error is not None:
            out["error"] = self.error
        return out


def _num(value) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _pair(values) -> list | None:
    return None if values is None else [_num(v) for v in values]


# -- the fit on arrays -----------------------------------------------------------------------
def solve(h: np.ndarray, r: np.ndarray) -> tuple[float, float]:
    """Least-squares ``(a, b)`` of ``r = -a * exp(h) + b``.

    Raises
    ------
    EntropylensError
        With fewer than :data:`MIN_POINTS` points or when every ``h`` is the same.
    """
    h = np.asarray(h, dtype=float)
    r = np.asarray(r, dtype=float)
    if len(h) < MIN_POINTS:
        raise EntropylensError(f"too few points to fit the saturation law: {len(h)} "
                               f"(at least {MIN_POINTS} steps with both entropy and performance)")
    u = np.exp(h)
    if np.ptp(u) <= 1e-12 * max(1.0, float(np.abs(u).max())):
        raise EntropylensError("entropy is the same at every point: the saturation law "
                               "cannot be fitted")
    design = np.column_stack([-u, np.ones_like(u)])
    (a, b), *_ = np.linalg.lstsq(design, r, rcond=None)
    return float(a), float(b)


def _bootstrap(h: np.ndarray, r: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """``(a, b)`` of each bootstrap resample: simple regression of r on -exp(h), vectorised."""
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(h), size=(resamples, len(h)))
    u = -np.exp(h)[index]
    rr = r[index]
    u_mean = u.mean(axis=1, keepdims=True)
    r_mean = rr.mean(axis=1, keepdims=True)
    var = ((u - u_mean) ** 2).sum(axis=1)
    cov = ((u - u_mean) * (rr - r_mean)).sum(axis=1)
    ok = var > 1e-12 * np.maximum(1.0, (u ** 2).max(axis=1))
    a = cov[ok] / var[ok]
    b = r_mean[ok, 0] - a * u_mean[ok, 0]
    return np.column_stack([a, b])


def fit_arrays(h: Sequence[float], r: Sequence[float], *, steps: Sequence[int] | None = None,
               bootstrap: int = BOOTSTRAP, seed: int = 0,
               early_fraction: float = EARLY_FRACTION) -> SaturationFit:
    """Fit the law on paired entropy and performance values (in step order).

    Parameters
    ----------
    h, r : sequences of float
        Entropy (nats) and performance at the same steps.
    steps : sequence of int, optional
        The steps, for ``data`` and the early split (default: 0, 1, ...).
    bootstrap : int
        Resamples for the intervals (0: no intervals).
    seed : int
    early_fraction : float

    Returns
    -------
    SaturationFit
        With ``run``, ``x``, ``y`` left None.
    """
    h = np.asarray(h, dtype=float)
    r = np.asarray(r, dtype=float)
    steps = np.arange(len(h)) if steps is None else np.asarray(steps)
    keep = np.isfinite(h) & np.isfinite(r)
    too_high = keep & (h > MAX_FIT_ENTROPY)
    keep &= ~too_high
    h, r, steps = h[keep], r[keep], steps[keep]
    order = np.argsort(steps, kind="stable")
    h, r, steps = h[order], r[order], steps[order]
    a, b = solve(h, r)
    predicted = -a * np.exp(h) + b
    residual = r - predicted
    total = float(((r - r.mean()) ** 2).sum())
    r2 = 1.0 - float((residual ** 2).sum()) / total if total > 0 else None
    a_ci = b_ci = ceiling_ci = None
    if bootstrap:
        draws = _bootstrap(h, r, bootstrap, seed)
        if len(draws):
            a_ci = np.percentile(draws[:, 0], [2.5, 97.5]).tolist()
            b_ci = np.percentile(draws[:, 1], [2.5, 97.5]).tolist()
            ceiling_ci = np.percentile(draws[:, 1] - draws[:, 0], [2.5, 97.5]).tolist()
    n_fit = max(MIN_POINTS, math.ceil(early_fraction * len(h)))
    early: dict = {"fraction": early_fraction, "n_fit": n_fit, "rmse": None}
    if n_fit >= len(h):
        early["reason"] = f"{len(h)} points leave none to predict after the first {n_fit}"
    else:
        try:
            ea, eb = solve(h[:n_fit], r[:n_fit])
            rest = -ea * np.exp(h[n_fit:]) + eb - r[n_fit:]
            early.update(rmse=float(np.sqrt(np.mean(rest ** 2))), a=ea, b=eb)
        except EntropylensError as exc:
            early["reason"] = exc.message
    scale = metric_range(r)
    if early.get("rmse") is not None and scale > 0:
        early.update(range=scale, rmse_share_of_range=early["rmse"] / scale,
                     good=early["rmse"] / scale <= EARLY_GOOD_SHARE)
    notes = [f"{int(too_high.sum())} point(s) with an entropy above {MAX_FIT_ENTROPY:g} nats "
             "left out (no per-token entropy; exp(H) overflows)"] if too_high.any() else []
    fit = SaturationFit(run=None, x=None, y=None, a=a, b=b, ceiling=b - a, r2=r2, n=len(h),
                        a_ci=a_ci, b_ci=b_ci, ceiling_ci=ceiling_ci,
                        rmse=float(np.sqrt(np.mean(residual ** 2))), early=early,
                        data=pd.DataFrame({"step": steps.astype("int64"), "H": h, "R": r}),
                        notes=notes)
    reason = ceiling_gate(fit, scale)
    if reason is not None:
        fit.ceiling = fit.ceiling_ci = None
        fit.ceiling_reason = reason
    else:
        fit.above_ceiling = int((r > fit.ceiling).sum())
    return fit


def ceiling_gate(fit: SaturationFit, scale: float) -> str | None:
    """Why the fit states no ceiling (the quality gate of the module docstring), or None."""
    reasons = []
    if fit.n < MIN_FIT_POINTS:
        reasons.append(f"{fit.n} points (at least {MIN_FIT_POINTS})")
    if fit.r2 is None or fit.r2 < MIN_R2:
        reasons.append("R² " + ("undefined" if fit.r2 is None else f"{fit.r2:.3g}")
                       + f" < {MIN_R2}")
    if fit.a is None or fit.a <= 0:
        reasons.append("a ≤ 0: performance does not fall as entropy rises")
    elif fit.a_ci is not None and fit.a_ci[0] <= 0:
        reasons.append(f"a's 95% interval [{fit.a_ci[0]:.3g}, {fit.a_ci[1]:.3g}] includes 0: "
                       "a and b are not identified")
    if fit.ceiling_ci is not None and scale > 0 and \
            fit.ceiling_ci[1] - fit.ceiling_ci[0] > scale:
        reasons.append("the ceiling's 95% interval is wider than the metric's range")
    return "; ".join(reasons) or None


# -- joining a run's curves ------------------------------------------------------------------
def join_curves(entropy: pd.DataFrame, perf: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Pair each performance point with an entropy (see the module docstring).

    Parameters
    ----------
    entropy : pandas.DataFrame
        ``step, entropy`` sorted by step.
    perf : pandas.DataFrame
        ``step, value``.

    Returns
    -------
    (DataFrame[step, H, R], dict of counts: exact, interpolated, carried, dropped)
    """
    x = entropy["step"].to_numpy(dtype=float)
    h = entropy["entropy"].to_numpy(dtype=float)
    spacing = float(np.median(np.diff(x))) if len(x) > 1 else 1.0
    counts = {"exact": 0, "interpolated": 0, "carried": 0, "dropped": 0}
    rows = []
    at_step = dict(zip(x.tolist(), h.tolist()))
    for step, value in zip(perf["step"].to_numpy(dtype=float), perf["value"].to_numpy(float)):
        if step in at_step:
            counts["exact"] += 1
            rows.append((step, at_step[step], value))
        elif len(x) and x[0] < step < x[-1]:
            counts["interpolated"] += 1
            rows.append((step, float(np.interp(step, x, h)), value))
        elif len(x) and x[-1] < step <= x[-1] + spacing:
            counts["carried"] += 1
            rows.append((step, float(h[-1]), value))
        else:
            counts["dropped"] += 1
    frame = pd.DataFrame(rows, columns=["step", "H", "R"])
    frame["step"] = frame["step"].astype("int64")
    return frame, counts


def fit_curves(curve: pd.DataFrame, perf: pd.DataFrame, *, run: str | None = None,
               bootstrap: int = BOOTSTRAP, seed: int = 0,
               early_fraction: float = EARLY_FRACTION) -> SaturationFit:
    """Fit the law to a run's curves as returned by ``policy_entropy`` and ``performance``."""
    data, counts = join_curves(curve, perf)
    source = str(curve["source"].iloc[0])
    notes = [note for note in (curve.attrs.get("note"), perf.attrs.get("note")) if note]
    if counts["dropped"]:
        notes.append(f"{counts['dropped']} {perf.attrs['metric']} point(s) have no entropy "
                     "step near them and were left out")
    fit = fit_arrays(data["H"], data["R"], steps=data["step"], bootstrap=bootstrap,
                     seed=seed, early_fraction=early_fraction)
    fit.run = run
    fit.x = entropy_label(source)
    fit.y = perf.attrs["metric"] + (" (percent / 100)" if perf.attrs.get("scaled") else "")
    fit.join = counts
    fit.notes = notes + fit.notes
    fit.seq_mean_fit = _seq_mean_fit(curve, perf, bootstrap=bootstrap, seed=seed,
                                     early_fraction=early_fraction)
    return fit


def _seq_mean_fit(curve: pd.DataFrame, perf: pd.DataFrame, **options) -> dict | None:
    """The law fitted with the other definition of H, the sequence mean (arXiv 2505.22617,
    Eq. 5), under the same quality gate; None when the curve does not have it."""
    if "entropy_seq_mean" not in curve:
        return None
    seq = curve.dropna(subset=["entropy_seq_mean"])
    if len(seq) < MIN_POINTS:
        return None
    data, _ = join_curves(seq.assign(entropy=seq["entropy_seq_mean"]), perf)
    try:
        other = fit_arrays(data["H"], data["R"], steps=data["step"], **options)
    except EntropylensError as exc:
        return {"x_definition": SEQ_DEFINITION, "error": exc.message}
    return {"x_definition": SEQ_DEFINITION, "a": _num(other.a), "b": _num(other.b),
            "ceiling": _num(other.ceiling), "ceiling_reason": other.ceiling_reason,
            "r2": _num(other.r2), "n": other.n, "above_ceiling": other.above_ceiling}


@dataclass
class SaturationFits:
    """Result of :func:`fit_saturation` over several runs: one fit per run, in run order.

    Iterating, ``len`` and indexing go over :attr:`fits`.

    Attributes
    ----------
    fits : list of SaturationFit
        A run that cannot be fitted has ``error`` set and no numbers.
    skipped : list of str
        ``"RUN: reason"`` for those runs.
    """

    fits: list[SaturationFit]
    skipped: list[str] = field(default_factory=list)

    def __iter__(self):
        return iter(self.fits)

    def __len__(self) -> int:
        return len(self.fits)

    def __getitem__(self, index):
        return self.fits[index]

    def to_dict(self) -> dict:
        """The JSON of ``entropylens fit --json`` for several runs."""
        return {"fits": [fit.to_dict() for fit in self.fits]}


def fit_saturation(store: Store | str, runs: str | Sequence[str] | None = None, *,
                   reward: str | None = None, bootstrap: int = BOOTSTRAP, seed: int = 0,
                   early_fraction: float = EARLY_FRACTION, engine: str = "local",
                   workers: int | None = None, run: str | Sequence[str] | None = None,
                   **engine_options) -> SaturationFit | SaturationFits:
    """Fit the saturation law R = -a * exp(H) + b to each run.

    Parameters
    ----------
    store : Store or path
    runs : str or sequence of str, optional
        Default: every run.
    reward : str, optional
        Performance metric to use instead of ``val_accuracy`` / ``reward_mean``.
    bootstrap : int
        Bootstrap resamples for the 95% intervals.
    seed : int
        Seed of the bootstrap.
    early_fraction : float
        Share of the first points the early prediction is fitted on.
    engine : {"local", "ray"}
    workers : int, optional
        Worker processes of the local engine (1: none).
    run : str or sequence of str, optional
        Deprecated spelling of ``runs``.

    Returns
    -------
    SaturationFit or SaturationFits
        One fit when one run is asked for or the store holds one run, else one per run
        (:class:`SaturationFits`, which iterates like the list it used to be). There, a run
        that cannot be fitted has ``error`` set and no numbers; a single run that cannot be
        fitted, or several where none can, raises.

    Raises
    ------
    EntropylensError
        Too few points, constant entropy, or no entropy or performance curve (single run).
    """
    if run is not None:
        warnings.warn("fit_saturation(run=...) is deprecated: use runs=", DeprecationWarning,
                      stacklevel=2)
        if runs is not None:
            raise EntropylensError("pass runs= only (run= is its deprecated spelling)")
        runs = run
    return run_analysis("saturation", open_store(store), runs, engine=engine, workers=workers,
                        reward=reward, bootstrap=bootstrap, seed=seed,
                        early_fraction=early_fraction, **engine_options)


class SaturationAnalysis(Analysis):
    """Registered form of :func:`fit_saturation`."""

    name = "saturation"
    title = "Saturation law"
    requires = ("policy_entropy", "performance")
    order = 30

    def plan(self, store: Store, run: str, inputs, *, reward: str | None = None,
             bootstrap: int = BOOTSTRAP, seed: int = 0,
             early_fraction: float = EARLY_FRACTION) -> Plan:
        curve = required(inputs, "policy_entropy").of(run)
        perf = required(inputs, "performance").of(run) if reward is None \
            else performance_curve(store, run, reward)
        try:
            return fit_curves(curve, perf, run=run, bootstrap=bootstrap, seed=seed,
                              early_fraction=early_fraction)
        except EntropylensError as exc:
            raise EntropylensError(f"run {run!r}: {exc.message}",
                                   path=store.run_dir(run)) from None
        yield  # no scan of its own: the curves are its inputs

    def placeholder(self, run: str, reason: str) -> SaturationFit:
        return SaturationFit(run=run, x=None, y=None, a=None, b=None, ceiling=None, r2=None,
                             n=0, a_ci=None, b_ci=None, error=reason)

    def combine(self, parts, *, skipped=(), **options) -> SaturationFit | SaturationFits:
        if len(parts) == 1 and not skipped:
            return parts[0]
        if all(fit.error for fit in parts):
            raise EntropylensError("no run could be fitted: "
                                   + "; ".join(fit.error for fit in parts))
        return SaturationFits(fits=list(parts), skipped=list(skipped))

    def figures(self, result: SaturationFit, run: str) -> list[FigureSpec]:
        from ..plots import saturation_fit

        return [FigureSpec("fit", f"{run}: saturation law",
                           "Performance against policy entropy per step, the fitted law "
                           "R = −a·exp(H) + b, its interval band and the predicted ceiling at "
                           "H = 0.", lambda ax: saturation_fit(result, ax=ax))]

    def section(self, result: SaturationFit, run: str) -> dict:
        if result.a is None:
            raise EntropylensError(result.error or "the law could not be fitted")
        return {"result": result.to_dict()}

    def findings(self, result: SaturationFit, run: str) -> list[Finding]:
        fit = result
        if fit.a is None:
            return []
        numbers = {"a": fit.a, "b": fit.b, "ceiling": fit.ceiling, "r2": fit.r2, "n": fit.n,
                   "performance": fit.y, "ceiling_reason": fit.ceiling_reason}
        if not _finite(fit.ceiling):
            # the fit's own quality gate (ceiling_gate) refused a ceiling
            text = (f"the saturation law R = −a·exp(H) + b does not describe this run "
                    f"({fit.ceiling_reason or 'no fit'}, {fit.n} points): no ceiling is "
                    "predicted")
            return [Finding("fit", text, tier="key", numbers=numbers)]
        text = (f"the fitted saturation law R = −a·exp(H) + b predicts a ceiling of "
                f"{fit.ceiling:.2f} {fit.y} (the fitted performance at zero entropy; R² "
                f"{fit.r2:.2f}, {fit.n} points, {fit.above_ceiling} observations above it)")
        observed = fit.data["R"].dropna()
        if len(observed):
            best = float(observed.max())
            numbers["best_observed"] = best
            text += f"; the best value reached so far is {best:.2f}"
        early = fit.early or {}
        if _finite(early.get("rmse")) and early.get("fraction"):
            numbers.update(early_fraction=early["fraction"], early_rmse=early["rmse"])
            text += (f"; fitted on the first {early['fraction']:.0%} of points it predicts the "
                     f"rest with RMSE {early['rmse']:.3f}")
        return [Finding("fit", text, tier="key", numbers=numbers)]


def _finite(value) -> bool:
    try:
        return value is not None and value is not pd.NA and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


register(SaturationAnalysis())
