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
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import EntropylensError
from ..store import Store
from .curves import entropy_label, open_store, performance, policy_entropy

#: Fewer points than this cannot be fitted with a residual left to judge the fit.
MIN_POINTS = 3
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
               "join": dict(self.join), "notes": list(self.notes)}
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
    notes = [f"{int(too_high.sum())} point(s) with an entropy above {MAX_FIT_ENTROPY:g} nats "
             "left out (no per-token entropy; exp(H) overflows)"] if too_high.any() else []
    return SaturationFit(run=None, x=None, y=None, a=a, b=b, ceiling=b - a, r2=r2, n=len(h),
                         a_ci=a_ci, b_ci=b_ci, ceiling_ci=ceiling_ci,
                         rmse=float(np.sqrt(np.mean(residual ** 2))), early=early,
                         data=pd.DataFrame({"step": steps.astype("int64"), "H": h, "R": r}),
                         notes=notes)


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


def _fit_run(store: Store, run: str, reward: str | None, *, bootstrap: int, seed: int,
             early_fraction: float, engine: str, engine_options: dict) -> SaturationFit:
    curve = policy_entropy(store, run, engine=engine, **engine_options)
    perf = performance(store, run, reward)
    try:
        return fit_curves(curve, perf, run=run, bootstrap=bootstrap, seed=seed,
                          early_fraction=early_fraction)
    except EntropylensError as exc:
        raise EntropylensError(f"run {run!r}: {exc.message}", path=store.run_dir(run)) from None


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
    return fit


def fit_saturation(store: Store | str, run: str | Sequence[str] | None = None, *,
                   reward: str | None = None, bootstrap: int = BOOTSTRAP, seed: int = 0,
                   early_fraction: float = EARLY_FRACTION, engine: str = "local",
                   **engine_options) -> SaturationFit | list[SaturationFit]:
    """Fit the saturation law R = -a * exp(H) + b to each run.

    Parameters
    ----------
    store : Store or path
    run : str or sequence of str, optional
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

    Returns
    -------
    SaturationFit or list of SaturationFit
        One fit when one run is asked for or the store holds one run, else a list. In a list,
        a run that cannot be fitted has ``error`` set and no numbers; a single run that cannot
        be fitted, or a list where none can, raises.

    Raises
    ------
    EntropylensError
        Too few points, constant entropy, or no entropy or performance curve (single run).
    """
    store = open_store(store)
    names = store.resolve_runs(run)
    options = dict(bootstrap=bootstrap, seed=seed, early_fraction=early_fraction,
                   engine=engine, engine_options=engine_options)
    if len(names) == 1:
        return _fit_run(store, names[0], reward, **options)
    fits = []
    for name in names:
        try:
            fits.append(_fit_run(store, name, reward, **options))
        except EntropylensError as exc:
            fits.append(SaturationFit(run=name, x=None, y=None, a=None, b=None, ceiling=None,
                                      r2=None, n=0, a_ci=None, b_ci=None, error=exc.message))
    if all(f.error for f in fits):
        raise EntropylensError("no run could be fitted: " + "; ".join(f.error for f in fits),
                               path=store.path)
    return fits
