"""Search trees: branch entropy by depth and step, policy versus search, one tree drawn.

The figures take the frames of :func:`entropylens.analysis.branches.branches`;
:func:`findings` turns one run's result into sentences for the report and ``diagnose``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns

from ._style import get_ax, require_columns

PRIOR_COLOR = "#1f4e79"
VISIT_COLOR = "#d95f02"
#: Nodes whose action is written next to them when the tree is this small.
LABEL_NODES = 40


def branch_entropy_heatmap(data: pd.DataFrame, *, value: str = "prior_entropy_mean",
                           ax=None):
    """Mean branch entropy by depth (rows) and training step (columns).

    Parameters
    ----------
    data : pandas.DataFrame
        ``RunBranches.by_depth``: ``step, depth`` and ``value``; rows without a step are
        left out.
    value : str
        ``prior_entropy_mean`` (the policy) or ``visit_entropy_mean`` (the search).
    ax : matplotlib.axes.Axes, optional

    Returns
    -------
    matplotlib.axes.Axes
    """
    require_columns(data, ["step", "depth", value], "branch_entropy_heatmap")
    ax = get_ax(ax)
    rows = data.dropna(subset=["step"])
    grid = rows.pivot_table(index="depth", columns="step", values=value, aggfunc="mean")
    sns.heatmap(grid.astype(float), ax=ax, cmap="viridis", mask=grid.isna(),
                cbar_kws={"label": "entropy (nats)"}, xticklabels="auto",
                yticklabels="auto")
    ax.set_xlabel("step")
    ax.set_ylabel("depth of the branching node")
    return ax


def policy_vs_search(data: pd.DataFrame, *, ax=None):
    """Prior (policy) and visit (search) branch entropy by depth.

    With several steps, the first step is dashed and the last solid, so that the change
    over training shows; nodes of each depth are averaged within a step.

    Parameters
    ----------
    data : pandas.DataFrame
        ``RunBranches.by_depth``.
    ax : matplotlib.axes.Axes, optional

    Returns
    -------
    matplotlib.axes.Axes
    """
    require_columns(data, ["step", "depth", "prior_entropy_mean", "visit_entropy_mean"],
                    "policy_vs_search")
    ax = get_ax(ax)
    steps = sorted(data["step"].dropna().unique())
    chosen = [(None, "-")] if not steps else \
        ([(steps[0], "--"), (steps[-1], "-")] if len(steps) > 1 else [(steps[0], "-")])
    for step, style in chosen:
        rows = data[data["step"].isna()] if step is None else data[data["step"] == step]
        rows = rows.sort_values("depth")
        label = "" if step is None else f" (step {int(step)})"
        for column, color, name in (("prior_entropy_mean", PRIOR_COLOR, "policy priors"),
                                    ("visit_entropy_mean", VISIT_COLOR, "search visits")):
            ax.plot(rows["depth"].to_numpy(dtype=float), rows[column].to_numpy(dtype=float),
                    style, color=color, marker="o", ms=3, lw=1.4, label=name + label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # depths are whole numbers
    ax.set_xlabel("depth of the branching node")
    ax.set_ylabel("mean branch entropy (nats)")
    ax.set_ylim(bottom=0)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", frameon=False)
    return ax


def _layout(tree: pd.DataFrame) -> np.ndarray:
    """x of every node: leaves one apart in depth-first order, a parent above the middle
    of its children; the row order of ``tree`` is parents before children."""
    index = {node: i for i, node in enumerate(tree["node_id"])}
    kids: dict[int, list[int]] = {}
    for i, parent in enumerate(tree["parent_id"]):
        if isinstance(parent, str) and parent in index:
            kids.setdefault(index[parent], []).append(i)
    x = np.zeros(len(tree))
    root = int(np.flatnonzero(tree["parent_id"].isna().to_numpy())[0])
    next_leaf = 0.0
    # iterative post-order: a node is placed after all its children
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        children = kids.get(node, [])
        if not children:
            x[node] = next_leaf
            next_leaf += 1
        elif done:
            x[node] = (x[children[0]] + x[children[-1]]) / 2
        else:
            stack.append((node, True))
            stack.extend((c, False) for c in reversed(children))
    return x


def branch_tree(data: pd.DataFrame, *, ax=None):
    """One search tree in layers: depth downwards, branching nodes coloured by the
    policy's branch entropy, edges darker with the child's share of its siblings' visits,
    the chosen (most visited) path in black.

    Parameters
    ----------
    data : pandas.DataFrame
        One tree as :func:`entropylens.analysis.branches.tree_nodes` returns it
        (``node_id, parent_id, depth, visits, action, prior_entropy, on_path``), parents
        before children. Readable up to a few hundred nodes.
    ax : matplotlib.axes.Axes, optional

    Returns
    -------
    matplotlib.axes.Axes
    """
    require_columns(data, ["node_id", "parent_id", "depth", "visits", "prior_entropy",
                           "on_path"], "branch_tree")
    from matplotlib.collections import LineCollection

    ax = get_ax(ax, figsize=(7.5, 4.5))
    tree = data.reset_index(drop=True)
    x = _layout(tree)
    y = -tree["depth"].to_numpy(dtype=float)
    index = {node: i for i, node in enumerate(tree["node_id"])}
    visits = tree["visits"].to_numpy(dtype=float)
    parent = np.array([index.get(p, -1) if isinstance(p, str) else -1
                       for p in tree["parent_id"]])
    child = np.flatnonzero(parent >= 0)
    sibling_total = pd.Series(np.nan_to_num(visits[child])).groupby(parent[child]) \
        .transform("sum").to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(sibling_total > 0, np.nan_to_num(visits[child]) / sibling_total, 0.3)
    on_path = tree["on_path"].to_numpy(dtype=bool)
    segments = [[(x[parent[c]], y[parent[c]]), (x[c], y[c])] for c in child]
    colors = [(0, 0, 0, 1) if on_path[c] else (0.4, 0.4, 0.4, 0.15 + 0.75 * s)
              for c, s in zip(child, share)]
    widths = [2.2 if on_path[c] else 0.6 + 1.6 * s for c, s in zip(child, share)]
    ax.add_collection(LineCollection(segments, colors=colors, linewidths=widths, zorder=1))
    entropy = tree["prior_entropy"].to_numpy(dtype=float)
    branching = ~np.isnan(entropy)
    leaves = ~np.isin(np.arange(len(tree)), parent[child])
    ax.scatter(x[leaves], y[leaves], s=8, color="#999999", zorder=2, label="leaf")
    inner = ~leaves & ~branching
    if inner.any():
        ax.scatter(x[inner], y[inner], s=18, facecolor="white", edgecolor="#666666",
                   zorder=2, label="no prior")
    if branching.any():
        high = max(float(np.nanmax(entropy)), 1e-9)
        points = ax.scatter(x[branching], y[branching], c=entropy[branching], cmap="viridis",
                            vmin=0, vmax=high, s=30, edgecolor="black", linewidth=0.4,
                            zorder=3)
        ax.figure.colorbar(points, ax=ax, label="branch entropy of the priors (nats)")
    if len(tree) <= LABEL_NODES and "action" in tree:
        for i, action in enumerate(tree["action"]):
            if isinstance(action, str) and action:
                ax.annotate(action[:18], (x[i], y[i]), xytext=(3, -8),
                            textcoords="offset points", fontsize=6, rotation=30)
    depth = int(tree["depth"].max()) if len(tree) else 0
    ax.set_yticks(-np.arange(depth + 1), [str(d) for d in range(depth + 1)])
    ax.set_ylabel("depth")
    ax.set_xticks([])
    ax.set_xlim(x.min() - 1, x.max() + 1)
    ax.set_ylim(-depth - 0.6, 0.6)
    ax.grid(False)
    return ax

