"""Branch entropy in search trees: where the policy and the search stop exploring.

Every node with children is a decision point, like a forking token. For a branching node
``u`` with children ``c`` (README: search trees, formulas):

- **branch (prior) entropy**: ``p_c = w_c / sum_c' w_c'`` with ``w_c = exp(logprob_c)``
  when the child has a log-probability, else ``prior_c``: the policy's distribution
  renormalised over the children present, ``H_prior(u) = -sum_c p_c log p_c`` (nats; 0 log 0
  = 0). Unknown (null) when a child has neither, or every weight is 0.
- **visit entropy**: ``q_c = visits_c / sum_c' visits_c'``, ``H_visit(u) = -sum_c q_c log
  q_c``; zero-visit children count as probability 0. Unknown when a child's visits are
  unknown or the children have no visits at all.
- a node is **concentrated** when ``H_visit(u) < threshold`` (default 0.2 nats: for two
  children, more than about 96% of the visits on one), its prior **collapsed** when
  ``H_prior(u) < threshold``, and the search **maintains** a spread there when the prior
  collapsed but the visits are not concentrated (the seed's "maintenance").
- ``depth`` is the branching node's depth (the root is 0). ``by_depth`` averages over the
  branching nodes of each (step, depth); ``step`` is null for trees without one.
- **surviving paths**: the root survives; a child survives when its parent does and it
  holds at least ``survive`` (default 10%) of its siblings' visits. The **agreement depth**
  of a tree is the smallest depth >= 1 at which exactly one node survives (null when the
  survivors never narrow to one, or the tree has no visits).
- the **chosen path** follows from the root the most visited child (ties and trees without
  visits: the higher prior weight, then the first stored). Its *path entropy* is the mean
  ``H_prior`` of its branching nodes, its *value* the value of its first child (the search's
  estimate of its decision at the root) and its *reward* the sum of the rewards on it.
  ``outcomes`` gives Spearman's rank correlation over trees of path entropy with value and
  with reward.
- **shallow versus deep**: per tree, the mean ``H_prior`` of its branching nodes at depth
  ``<= shallow`` (planning; default 1) and deeper (execution); per step, the mean over
  trees. The change from the first to the last step with trees is bootstrapped over trees
  (2000 resamples within each of the two steps, seed 0, 95% percentile intervals); a claim
  ("shallow fell more" / "deep fell more") is made only when the interval of the difference
  of the two changes excludes 0, else the verdict is "inconclusive".

Streaming: node parts hold whole trees, so one :class:`~entropylens.engine.Map` applies
:func:`part_summary` to each part (in this process, the local workers or Ray tasks) and the
driver sums its per-(step, depth) counts and concatenates its per-tree rows in part order:
both engines give identical results; memory is one part plus per-tree rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from ..engine import Map, Plan
from ..errors import EntropylensError
from ..store import Store, read_node_part
from .curves import open_store
from .registry import Analysis, FigureSpec, Finding, register, run_analysis
from ..base.jsonable import records as _records
from ..base.lazy import LazyModule

# scipy.stats takes about half a second to import: only the correlations pay for it
stats = LazyModule("scipy.stats")

#: Nats below which the visits are concentrated (and the priors collapsed).
THRESHOLD = 0.2
#: Share of its siblings' visits a child needs to survive.
SURVIVE = 0.1
#: Deepest branching depth counted as shallow (planning).
SHALLOW = 1
#: Bootstrap resamples of the shallow-versus-deep change and its seed.
RESAMPLES = 2000
SEED = 0

DEPTH_COLUMNS = ["step", "depth", "nodes", "prior_entropy_mean", "visit_entropy_mean",
                 "concentrated_share", "collapsed_share", "maintained_share"]
STEP_COLUMNS = ["step", "trees", "nodes", "prior_entropy_mean", "visit_entropy_mean",
                "concentrated_share", "agree_depth_mean", "path_entropy_mean",
                "path_reward_mean"]
NODE_COLUMNS = ["step", "tree_id", "node_id", "depth", "children", "visits",
                "prior_entropy", "visit_entropy", "concentrated", "maintained", "survives",
                "on_path"]
TREE_COLUMNS = ["step", "tree_id", "nodes", "branching", "max_depth", "agree_depth",
                "path_depth", "path_entropy", "path_value", "path_reward", "shallow_entropy",
                "deep_entropy"]
#: Per-(step, depth) sums a part returns (means are taken after all parts are summed).
_SUMS = ["nodes", "prior_n", "prior_sum", "visit_n", "visit_sum", "concentrated",
         "collapsed", "collapsed_n", "maintained"]
_NODE_READ = ["step", "tree_id", "node_id", "parent_id", "depth", "prior", "logprob",
              "visits", "value", "reward"]


def _group_entropy(codes: np.ndarray, logw: np.ndarray, groups: int) -> np.ndarray:
    """Entropy (nats) of ``softmax(logw)`` within each group; NaN where a weight is NaN or
    every weight is 0 (``logw`` all ``-inf``)."""
    top = np.full(groups, -np.inf)
    np.maximum.at(top, codes, np.nan_to_num(logw, nan=-np.inf))
    bad = np.zeros(groups, dtype=bool)
    np.logical_or.at(bad, codes, np.isnan(logw))
    bad |= ~np.isfinite(top)
    shifted = logw - np.where(np.isfinite(top), top, 0.0)[codes]
    weight = np.exp(np.where(np.isnan(shifted), -np.inf, shifted))
    total = np.bincount(codes, weights=weight, minlength=groups).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = weight / total[codes]
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    entropy = -np.bincount(codes, weights=terms, minlength=groups).astype(float)
    entropy[bad] = np.nan
    return np.maximum(entropy, 0.0)   # -0.0 and rounding below 0 for one child


def branch_nodes(nodes: pd.DataFrame, *, threshold: float = THRESHOLD,
                 survive: float = SURVIVE, shallow: int = SHALLOW
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-node and per-tree measures of whole trees.

    Parameters
    ----------
    nodes : pandas.DataFrame
        Rows of the node table (whole trees, each parent before its children, as stored).
    threshold, survive : float
    shallow : int
        See the module docstring.

    Returns
    -------
    (pandas.DataFrame, pandas.DataFrame)
        The branching nodes (:data:`NODE_COLUMNS`) and the trees (:data:`TREE_COLUMNS`).
    """
    branching, trees, _ = _measure(nodes, threshold, survive, shallow)
    return branching, trees


def _measure(nodes: pd.DataFrame, threshold: float, survive: float, shallow: int):
    """:func:`branch_nodes` and whether each node (leaves too) is on the chosen path."""
    frame = nodes.reset_index(drop=True)
    n = len(frame)
    step_key = frame["step"].astype("float64").fillna(np.inf).to_numpy()  # null: own key
    tree = pd.MultiIndex.from_arrays([step_key, frame["tree_id"].to_numpy()])
    tree_code, tree_keys = pd.factorize(tree)
    # each node's parent row, by (tree, parent id)
    own = pd.Series(np.arange(n), index=pd.MultiIndex.from_arrays(
        [tree_code, frame["node_id"].to_numpy()]))
    has_parent = frame["parent_id"].notna().to_numpy()
    parent_row = np.full(n, -1, dtype=np.int64)
    if has_parent.any():
        lookup = pd.MultiIndex.from_arrays([tree_code[has_parent],
                                            frame["parent_id"].to_numpy()[has_parent]])
        parent_row[has_parent] = own.reindex(lookup).to_numpy()
    children = np.flatnonzero(has_parent)
    parents, codes = np.unique(parent_row[children], return_inverse=True)
    groups = len(parents)
    logprob = frame["logprob"].to_numpy(dtype=float)
    with np.errstate(divide="ignore"):
        prior_log = np.log(frame["prior"].to_numpy(dtype=float))
    logw = np.where(np.isnan(logprob), prior_log, logprob)[children]
    prior_h = _group_entropy(codes, logw, groups)
    visits = frame["visits"].to_numpy(dtype=float)
    child_visits = visits[children]
    visit_total = np.bincount(codes, weights=np.nan_to_num(child_visits),
                              minlength=groups).astype(float)
    unknown = np.zeros(groups, dtype=bool)
    np.logical_or.at(unknown, codes, np.isnan(child_visits))
    with np.errstate(divide="ignore"):
        visit_h = _group_entropy(codes, np.log(np.nan_to_num(child_visits)), groups)
    visit_h[unknown | (visit_total <= 0)] = np.nan
    count = np.bincount(codes, minlength=groups)

    # survival and the chosen path, level by level from the root
    share = np.full(n, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        share[children] = child_visits / visit_total[codes]
    depth = frame["depth"].to_numpy()
    survives = np.zeros(n, dtype=bool)
    on_path = np.zeros(n, dtype=bool)
    roots = ~has_parent
    survives[roots] = True
    on_path[roots] = True
    # the best child of each parent: most visits, then the higher weight, then stored order
    order = np.lexsort((children, -np.nan_to_num(logw, nan=-np.inf),
                        -np.nan_to_num(child_visits, nan=-1.0), codes))
    first = np.ones(len(order), dtype=bool)
    first[1:] = codes[order][1:] != codes[order][:-1]
    best = np.zeros(n, dtype=bool)
    best[children[order[first]]] = True
    max_depth = int(depth.max()) if n else 0
    by_depth = [np.flatnonzero((depth == d) & has_parent) for d in range(max_depth + 1)]
    for d in range(1, max_depth + 1):
        rows = by_depth[d]
        up = parent_row[rows]
        survives[rows] = survives[up] & (share[rows] >= survive)
        on_path[rows] = on_path[up] & best[rows]

    branching = pd.DataFrame({
        "tree": tree_code[parents], "step": frame["step"].to_numpy()[parents],
        "tree_id": frame["tree_id"].to_numpy()[parents],
        "node_id": frame["node_id"].to_numpy()[parents], "depth": depth[parents],
        "children": count, "visits": visits[parents], "prior_entropy": prior_h,
        "visit_entropy": visit_h})
    branching["concentrated"] = np.where(np.isnan(visit_h), None, visit_h < threshold)
    collapsed = prior_h < threshold
    branching["maintained"] = np.where(np.isnan(prior_h) | np.isnan(visit_h), None,
                                       collapsed & (visit_h >= threshold))
    branching["survives"] = survives[parents]
    branching["on_path"] = on_path[parents]

    trees = _tree_rows(frame, tree_code, len(tree_keys), branching, depth, survives, on_path,
                       shallow)
    return branching.drop(columns="tree")[NODE_COLUMNS], trees, on_path


def _tree_rows(frame, tree_code, trees, branching, depth, survives, on_path,
               shallow) -> pd.DataFrame:
    """Per-tree agreement depth, chosen path and shallow/deep prior entropy."""
    first_row = np.full(trees, -1, dtype=np.int64)
    first_row[tree_code[::-1]] = np.arange(len(frame))[::-1]
    nodes = np.bincount(tree_code, minlength=trees)
    max_depth = np.zeros(trees, dtype=np.int64)
    np.maximum.at(max_depth, tree_code, depth)
    # agreement: smallest depth >= 1 with exactly one survivor
    agree = np.full(trees, np.nan)
    alive = survives & (depth >= 1)
    if alive.any():
        counts = pd.DataFrame({"tree": tree_code[alive], "depth": depth[alive]}) \
            .groupby(["tree", "depth"]).size()
        # a survivor's parent survives, so the levels with survivors run from depth 1 on
        ones = counts[counts == 1].reset_index().groupby("tree")["depth"].min()
        agree[ones.index.to_numpy()] = ones.to_numpy()
    path_rows = on_path
    path_depth = np.zeros(trees, dtype=np.int64)
    np.maximum.at(path_depth, tree_code[path_rows], depth[path_rows])
    rewards = frame["reward"].to_numpy(dtype=float)
    reward_rows = path_rows & ~np.isnan(rewards)
    path_reward = np.bincount(tree_code[reward_rows], weights=rewards[reward_rows],
                              minlength=trees).astype(float)
    path_reward[np.bincount(tree_code[reward_rows], minlength=trees) == 0] = np.nan
    path_value = np.full(trees, np.nan)
    first_move = path_rows & (depth == 1)
    path_value[tree_code[first_move]] = frame["value"].to_numpy(dtype=float)[first_move]

    def mean_by_tree(rows: pd.DataFrame) -> np.ndarray:
        out = np.full(trees, np.nan)
        means = rows.groupby("tree")["prior_entropy"].mean()
        out[means.index.to_numpy()] = means.to_numpy()
        return out

    known = branching[branching["prior_entropy"].notna()]
    return pd.DataFrame({
        "step": frame["step"].to_numpy()[first_row],
        "tree_id": frame["tree_id"].to_numpy()[first_row],
        "nodes": nodes, "branching": np.bincount(branching["tree"], minlength=trees),
        "max_depth": max_depth, "agree_depth": agree, "path_depth": path_depth,
        "path_entropy": mean_by_tree(known[known["on_path"]]),
        "path_value": path_value, "path_reward": path_reward,
        "shallow_entropy": mean_by_tree(known[known["depth"] <= shallow]),
        "deep_entropy": mean_by_tree(known[known["depth"] > shallow]),
    })[TREE_COLUMNS]


def depth_sums(branching: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Per-(step, depth) counts and sums of branching nodes (:data:`_SUMS`)."""
    prior = branching["prior_entropy"].astype(float)
    visit = branching["visit_entropy"].astype(float)
    both = prior.notna() & visit.notna()
    sums = pd.DataFrame({
        "step": branching["step"], "depth": branching["depth"], "nodes": 1,
        "prior_n": prior.notna().astype(int), "prior_sum": prior.fillna(0.0),
        "visit_n": visit.notna().astype(int), "visit_sum": visit.fillna(0.0),
        "concentrated": (visit < threshold).astype(int),
        "collapsed": (prior < threshold).astype(int),
        "collapsed_n": (both & (prior < threshold)).astype(int),
        "maintained": (both & (prior < threshold) & (visit >= threshold)).astype(int)})
    return sums.groupby(["step", "depth"], dropna=False, sort=True).sum().reset_index()


def part_summary(item: tuple) -> dict:
    """One node part's per-(step, depth) sums, trees and (optionally) branching nodes.

    ``item`` is ``(path, threshold, survive, shallow, with_nodes)``; a module-level function
    so that the local workers and Ray tasks can run it (:class:`~entropylens.engine.Map`).
    """
    path, threshold, survive, shallow, with_nodes = item
    nodes = read_node_part(path, columns=_NODE_READ).to_pandas()
    branching, trees = branch_nodes(nodes, threshold=threshold, survive=survive,
                                    shallow=shallow)
    return {"depth": depth_sums(branching, threshold), "trees": trees,
            "nodes": branching if with_nodes else None}


def _depth_rows(sums: pd.DataFrame) -> pd.DataFrame:
    """``by_depth`` rows (:data:`DEPTH_COLUMNS`) from summed per-(step, depth) counts."""
    if sums.empty:
        return pd.DataFrame(columns=DEPTH_COLUMNS)
    total = sums.groupby(["step", "depth"], dropna=False, sort=True)[_SUMS].sum().reset_index()

    def ratio(num: str, den: str) -> pd.Series:
        return (total[num] / total[den].where(total[den] > 0)).astype(float)

    rows = pd.DataFrame({
        "step": total["step"].astype("Int64"), "depth": total["depth"].astype(int),
        "nodes": total["nodes"].astype(int),
        "prior_entropy_mean": ratio("prior_sum", "prior_n"),
        "visit_entropy_mean": ratio("visit_sum", "visit_n"),
        "concentrated_share": ratio("concentrated", "visit_n"),
        "collapsed_share": ratio("collapsed", "prior_n"),
        # among nodes whose prior collapsed (and whose visits are known)
        "maintained_share": ratio("maintained", "collapsed_n")})
    return rows[DEPTH_COLUMNS]


def _step_rows(sums: pd.DataFrame, trees: pd.DataFrame) -> pd.DataFrame:
    """Per-step rows (:data:`STEP_COLUMNS`): branching nodes of every depth together."""
    if sums.empty:
        return pd.DataFrame(columns=STEP_COLUMNS)
    total = sums.groupby("step", dropna=False, sort=True)[_SUMS].sum()
    per_tree = trees.groupby("step", dropna=False, sort=True).agg(
        trees=("tree_id", "size"), agree_depth_mean=("agree_depth", "mean"),
        path_entropy_mean=("path_entropy", "mean"), path_reward_mean=("path_reward", "mean"))
    rows = total.join(per_tree, how="outer").reset_index()
    return pd.DataFrame({
        "step": rows["step"].astype("Int64"), "trees": rows["trees"].fillna(0).astype(int),
        "nodes": rows["nodes"].fillna(0).astype(int),
        "prior_entropy_mean": rows["prior_sum"] / rows["prior_n"].where(rows["prior_n"] > 0),
        "visit_entropy_mean": rows["visit_sum"] / rows["visit_n"].where(rows["visit_n"] > 0),
        "concentrated_share": rows["concentrated"] / rows["visit_n"].where(rows["visit_n"] > 0),
        "agree_depth_mean": rows["agree_depth_mean"],
        "path_entropy_mean": rows["path_entropy_mean"],
        "path_reward_mean": rows["path_reward_mean"]})[STEP_COLUMNS]


def _interval(values: np.ndarray) -> list[float | None]:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return [None, None]
    low, high = np.percentile(finite, [2.5, 97.5])
    return [float(low), float(high)]


def shallow_vs_deep(trees: pd.DataFrame, *, shallow: int = SHALLOW,
                    resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """Change of the mean prior entropy at shallow and deep depths from the first to the
    last step, bootstrapped over trees (module docstring); a verdict only beyond noise."""
    out = {"shallow_depths": f"<= {shallow}", "first_step": None, "last_step": None,
           "shallow_change": None, "shallow_ci": [None, None], "deep_change": None,
           "deep_ci": [None, None], "difference": None, "difference_ci": [None, None],
           "verdict": "not enough steps"}
    stepped = trees.dropna(subset=["step", "shallow_entropy", "deep_entropy"])
    steps = sorted(stepped["step"].unique())
    if len(steps) < 2:
        return out
    first = stepped[stepped["step"] == steps[0]]
    last = stepped[stepped["step"] == steps[-1]]
    out.update(first_step=int(steps[0]), last_step=int(steps[-1]))
    if len(first) < 2 or len(last) < 2:
        out["verdict"] = "not enough trees"
        return out
    rng = np.random.default_rng(seed)
    changes = {}
    picks_first = rng.integers(0, len(first), size=(resamples, len(first)))
    picks_last = rng.integers(0, len(last), size=(resamples, len(last)))
    for band in ("shallow", "deep"):
        a = first[f"{band}_entropy"].to_numpy(dtype=float)
        b = last[f"{band}_entropy"].to_numpy(dtype=float)
        out[f"{band}_change"] = float(b.mean() - a.mean())
        # the same resampled trees for both bands: their difference is paired per tree
        changes[band] = b[picks_last].mean(axis=1) - a[picks_first].mean(axis=1)
        out[f"{band}_ci"] = _interval(changes[band])
    difference = changes["shallow"] - changes["deep"]
    out["difference"] = out["shallow_change"] - out["deep_change"]
    out["difference_ci"] = low_high = _interval(difference)
    if low_high[1] is not None and low_high[1] < 0:
        out["verdict"] = "shallow fell more"
    elif low_high[0] is not None and low_high[0] > 0:
        out["verdict"] = "deep fell more"
    else:
        out["verdict"] = "inconclusive"
    return out


def outcomes(trees: pd.DataFrame) -> dict:
    """Spearman correlation over trees of the chosen path's entropy with its value and
    reward (null with fewer than 3 trees that have both, or constant values)."""
    out = {}
    for what in ("value", "reward"):
        both = trees.dropna(subset=["path_entropy", f"path_{what}"])
        rho = None
        if len(both) >= 3 and both["path_entropy"].nunique() > 1 \
                and both[f"path_{what}"].nunique() > 1:
            rho = float(stats.spearmanr(both["path_entropy"], both[f"path_{what}"])[0])
        out[f"path_{what}_spearman"] = rho
        out[f"path_{what}_n"] = int(len(both))
    return out


def _summary(sums: pd.DataFrame, trees: pd.DataFrame, shallow: int) -> dict:
    total = sums[_SUMS].sum() if not sums.empty else pd.Series(0, index=_SUMS)

    def share(num: str, den: str):
        return float(total[num] / total[den]) if total[den] else None

    return {
        "trees": int(len(trees)), "branching_nodes": int(total["nodes"]),
        "prior_entropy_mean": share("prior_sum", "prior_n"),
        "visit_entropy_mean": share("visit_sum", "visit_n"),
        "concentrated_share": share("concentrated", "visit_n"),
        "collapsed_share": share("collapsed", "prior_n"),
        "maintained_share": share("maintained", "collapsed_n"),
        "agree_depth_mean": None if trees["agree_depth"].isna().all()
        else float(trees["agree_depth"].mean()),
        "agree_share": float(trees["agree_depth"].notna().mean()) if len(trees) else None,
        "shallow_vs_deep": shallow_vs_deep(trees, shallow=shallow),
        "outcomes": outcomes(trees)}


@dataclass
class RunBranches:
    """One run's part of :class:`Branches`."""

    run: str
    by_depth: pd.DataFrame
    by_step: pd.DataFrame
    summary: dict
    trees: pd.DataFrame
    depth_totals: pd.DataFrame | None = None
    nodes: pd.DataFrame | None = None
    example: pd.DataFrame | None = None

    def to_dict(self) -> dict:
        out = {"run": self.run, "by_depth": _records(self.by_depth),
               "depth_totals": _records(self.depth_totals.drop(columns="step")),
               "by_step": _records(self.by_step), "summary": self.summary}
        if self.nodes is not None:
            out["trees"] = _records(self.trees)
            out["nodes"] = _records(self.nodes)
        return out


@dataclass
class Branches:
    """Result of :func:`branches`.

    Attributes
    ----------
    runs : list of RunBranches
        Per run: ``by_depth`` (:data:`DEPTH_COLUMNS`), ``depth_totals`` (the same over every
        step together, without ``step``), ``by_step`` (:data:`STEP_COLUMNS`),
        ``summary`` (totals, ``shallow_vs_deep``, ``outcomes``), ``trees``
        (:data:`TREE_COLUMNS`) and, with ``nodes=True``, the branching nodes
        (:data:`NODE_COLUMNS`).
    threshold, survive : float
    shallow : int
    skipped : list of str
        Why runs were left out (several runs asked for, some without search trees).
    """

    runs: list[RunBranches]
    threshold: float = THRESHOLD
    survive: float = SURVIVE
    shallow: int = SHALLOW
    skipped: list[str] = field(default_factory=list)

    def run(self, name: str) -> RunBranches:
        """The part of run ``name``."""
        for part in self.runs:
            if part.run == name:
                return part
        raise KeyError(name)

    def to_dict(self) -> dict:
        """The JSON of ``entropylens branches --json``."""
        return {"threshold": self.threshold, "survive": self.survive,
                "shallow": self.shallow, "runs": [r.to_dict() for r in self.runs],
                "skipped": list(self.skipped)}


def branches_plan(store: Store, run: str, *, threshold: float = THRESHOLD,
                  survive: float = SURVIVE, shallow: int = SHALLOW,
                  nodes: bool = False) -> Plan:
    """One run's :class:`RunBranches`, as a plan: one :class:`~entropylens.engine.Map` of
    :func:`part_summary` over its node parts."""
    if not threshold > 0:
        raise EntropylensError(f"threshold must be positive, not {threshold}")
    if not 0 < survive <= 1:
        raise EntropylensError(f"survive must be in (0, 1], not {survive}")
    if shallow < 0:
        raise EntropylensError(f"shallow must be a depth >= 0, not {shallow}")
    parts = store.node_parts(run)
    if not parts:
        raise EntropylensError(f"run {run!r} has no search-tree nodes",
                               path=store.run_dir(run))
    results = yield Map(part_summary, tuple((str(p), float(threshold), float(survive),
                                             int(shallow), bool(nodes)) for p in parts))
    sums = pd.concat([r["depth"] for r in results], ignore_index=True)
    trees = pd.concat([r["trees"] for r in results], ignore_index=True)
    if not len(sums):
        raise EntropylensError(f"run {run!r} has search trees but no node with children",
                               path=store.run_dir(run))
    node_rows = pd.concat([r["nodes"] for r in results], ignore_index=True) if nodes else None
    trees = trees.assign(step=trees["step"].astype("Int64"))
    if node_rows is not None:
        node_rows = node_rows.assign(step=node_rows["step"].astype("Int64"))
    example = _example_tree(trees)
    return RunBranches(run=run, by_depth=_depth_rows(sums), by_step=_step_rows(sums, trees),
                       summary=_summary(sums, trees, shallow), trees=trees,
                       # every step together: one row per depth
                       depth_totals=_depth_rows(sums.assign(step=pd.NA)), nodes=node_rows,
                       example=None if example is None else tree_nodes(
                           store, run, step=example[0], tree_id=example[1],
                           threshold=threshold, survive=survive))


class BranchesAnalysis(Analysis):
    """Registered form of :func:`branches` (see :mod:`entropylens.analysis.registry`)."""

    name = "branches"
    title = "Search trees: branch entropy"
    needs = ("nodes",)
    order = 90
    only_where_present = True   # the report shows the tree section only where trees exist

    def plan(self, store: Store, run: str, inputs, *, threshold: float = THRESHOLD,
             survive: float = SURVIVE, shallow: int = SHALLOW, nodes: bool = False) -> Plan:
        return branches_plan(store, run, threshold=threshold, survive=survive,
                             shallow=shallow, nodes=nodes)

    def combine(self, parts, *, skipped=(), threshold: float = THRESHOLD,
                survive: float = SURVIVE, shallow: int = SHALLOW, **options) -> Branches:
        return Branches(runs=list(parts), threshold=threshold, survive=survive,
                        shallow=shallow, skipped=list(skipped))

    def figures(self, result: Branches, run: str) -> list[FigureSpec]:
        from ..plots import branch_entropy_heatmap, branch_tree, policy_vs_search

        part = result.run(run)
        specs = []
        if part.by_depth["step"].notna().any() and part.by_depth["step"].nunique() > 1:
            specs.append(FigureSpec(
                "branches-heatmap", f"{run}: policy branch entropy by depth and step",
                "Mean entropy (nats) of the policy's renormalised priors over the children "
                "of each branching node, by depth (rows) and training step (columns).",
                lambda ax: branch_entropy_heatmap(part.by_depth, ax=ax)))
        specs.append(FigureSpec(
            "branches-depth", f"{run}: policy versus search by depth",
            "Mean branch entropy of the priors and of the visit counts by depth; where the "
            "visits stay spread while the priors collapse, the search maintains exploration.",
            lambda ax: policy_vs_search(part.by_depth, ax=ax)))
        if part.example is not None:
            step = part.example["step"].iloc[0]
            specs.append(FigureSpec(
                "branches-tree", f"{run}: one search tree",
                f"Tree {part.example['tree_id'].iloc[0]} (step "
                f"{'none' if pd.isna(step) else int(step)}), the largest of its step up to "
                f"{DRAW_NODES} nodes: branching nodes coloured by the policy's branch entropy, "
                "edges by the child's share of visits, the chosen path in black.",
                lambda ax: branch_tree(part.example, ax=ax), figsize=(7.5, 4.5)))
        return specs

    def section(self, result: Branches, run: str) -> dict:
        part = result.run(run)
        return {"threshold": result.threshold, "survive": result.survive,
                "shallow": result.shallow, "summary": part.summary,
                "by_depth": _records(part.by_depth.head(200))}

    def findings(self, result: Branches, run: str) -> list[Finding]:
        return branch_findings(result.run(run), threshold=result.threshold)


def _example_tree(trees: pd.DataFrame) -> tuple | None:
    """(step, tree_id) of the tree to draw: of the last step, the one with most branching
    nodes, at most :data:`DRAW_NODES` nodes."""
    trees = trees[trees["nodes"] <= DRAW_NODES]
    if trees.empty:
        return None
    if trees["step"].notna().any():
        trees = trees[trees["step"] == trees["step"].max()]
    row = trees.sort_values(["branching", "tree_id"], ascending=[False, True]).iloc[0]
    step = None if pd.isna(row["step"]) else int(row["step"])
    return step, row["tree_id"]


#: Largest tree the report draws.
DRAW_NODES = 400


def tree_nodes(store: Store | str, run: str, *, step: int | None, tree_id: str,
               threshold: float = THRESHOLD, survive: float = SURVIVE) -> pd.DataFrame:
    """One tree's nodes with their branch entropies, for drawing.

    Returns
    -------
    pandas.DataFrame
        The tree's node rows (parents before children) with ``prior_entropy``,
        ``visit_entropy`` and ``on_path`` of its branching nodes (NaN / False at leaves).
    """
    store = open_store(store)
    table = store.read_nodes(run, steps=None if step is None else [step])
    frame = table.to_pandas()
    same_step = frame["step"].isna() if step is None else frame["step"] == step
    frame = frame[same_step & (frame["tree_id"] == tree_id)].reset_index(drop=True)
    if frame.empty:
        raise EntropylensError(f"run {run!r} has no tree {tree_id!r} at step {step}")
    branching, _, on_path = _measure(frame, threshold, survive, SHALLOW)
    frame = frame.join(branching.set_index("node_id")[["prior_entropy", "visit_entropy"]],
                       on="node_id")
    frame["on_path"] = on_path
    return frame



def branch_findings(part, *, threshold: float) -> list:
    """Sentences about one run's search trees (:class:`~entropylens.analysis.branches.
    RunBranches`) for the report's findings and ``diagnose``."""
    summary = part.summary
    out = []
    concentrated = summary.get("concentrated_share")
    if concentrated is not None:
        depth = part.by_depth.dropna(subset=["concentrated_share"])
        shallowest = depth[depth["concentrated_share"] >= 0.5]
        where = (f"; from depth {int(shallowest['depth'].min())} on at least half of the "
                 "nodes do" if not shallowest.empty else "")
        out.append(Finding(
            "branches", f"The search concentrates its visits on essentially one child "
            f"(visit entropy below {threshold:g} nats) at {concentrated:.0%} of "
            f"{summary['branching_nodes']} branching nodes{where}.",
            severity="warning" if concentrated >= 0.8 else "info", tier="key",
            numbers={"concentrated_share": concentrated, "threshold": threshold}))
    collapsed, maintained = summary.get("collapsed_share"), summary.get("maintained_share")
    if collapsed is not None and maintained is not None:
        out.append(Finding(
            "branches", f"The policy's priors have collapsed (below {threshold:g} nats) at "
            f"{collapsed:.0%} of branching nodes; the search still keeps a spread at "
            f"{maintained:.0%} of those.",
            severity="good" if maintained >= 0.5 else "info",
            numbers={"collapsed_share": collapsed, "maintained_share": maintained}))
    change = summary.get("shallow_vs_deep", {})
    if change.get("difference") is not None:
        low, high = change["difference_ci"]
        verdict = change["verdict"]
        text = ("training moved the priors' entropy at shallow (planning) depths "
                f"{change['shallow_depths']} by {change['shallow_change']:+.3f} nats and at "
                f"deeper (execution) depths by {change['deep_change']:+.3f} nats from step "
                f"{change['first_step']} to {change['last_step']}")
        text = (f"{verdict.capitalize()}: {text} (difference 95% interval "
                f"[{low:+.3f}, {high:+.3f}], bootstrap over trees).")
        out.append(Finding("branches", text,
                           severity="info" if verdict == "inconclusive" else "warning",
                           numbers={k: change[k] for k in ("shallow_change", "deep_change",
                                                           "difference")}))
    link = summary.get("outcomes", {})
    rho = link.get("path_reward_spearman")
    if rho is not None:
        out.append(Finding(
            "branches", f"Across {link['path_reward_n']} trees, the branch entropy on the "
            f"chosen path and its reward have Spearman's rho = {rho:+.2f}.",
            numbers={"path_reward_spearman": rho, "n": link["path_reward_n"]}))
    return out


register(BranchesAnalysis())


def branches(store: Store | str, runs: str | Sequence[str] | None = None, *,
             engine: str = "local", workers: int | None = None,
             threshold: float = THRESHOLD, survive: float = SURVIVE, shallow: int = SHALLOW,
             nodes: bool = False) -> Branches:
    """Branch entropy of search trees: policy priors and search visits by depth and step.

    Parameters
    ----------
    store : Store or path
    runs : str or sequence of str, optional
        Default: every run. When several are asked for, runs without search trees are left
        out; a single such run raises.
    engine : {"local", "ray"}
        Where the node parts are summarised (the results are identical).
    workers : int, optional
        Worker processes of the local engine (1: none).
    threshold : float
        Nats below which a node's visits are concentrated (and its priors collapsed).
    survive : float
        Share of its siblings' visits a child needs to be on a surviving path.
    shallow : int
        Deepest branching depth counted as shallow (planning) in ``shallow_vs_deep``.
    nodes : bool
        Also return the per-tree rows and one row per branching node.

    Returns
    -------
    Branches

    Raises
    ------
    EntropylensError
        When no run asked for holds search trees.
    """
    return run_analysis("branches", open_store(store), runs, engine=engine, workers=workers,
                        threshold=threshold, survive=survive, shallow=shallow, nodes=nodes)
