"""Search trees shared by the tree readers: field names, node checks and the node table.

Every tree reader (nested JSON trees, flat node tables, graph-traversal episodes) turns one
tree into a list of :class:`Node` and hands it to :func:`tree_table`, which checks the tree
whole and returns its rows of the canonical node table (parents before children, ``depth``
computed from the parent links). A malformed tree raises :class:`FormatError` naming the file,
the line or record and the node: duplicate node ids, a parent that is not in the tree, a
cycle, no root or several roots, negative or non-finite visits, priors outside [0, 1] and
positive log-probabilities.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pyarrow as pa

from ..errors import FormatError
from ..schema import NODE_SCHEMA

#: Field names recognised without ``--map``: canonical name -> names tried in order.
#: ``state`` is the action of trees saved by common MCTS-for-LLM code (the partial solution
#: a child adds), ``N``/``Q``/``P`` their single-letter statistics.
FIELD_NAMES: dict[str, tuple[str, ...]] = {
    "node_id": ("id", "node_id", "node", "name"),
    "parent_id": ("parent_id", "parent", "parent_node"),
    "action": ("action", "state", "text", "move", "label"),
    "prior": ("prior", "prior_prob", "probability", "prob", "P"),
    "logprob": ("logprob", "log_prob", "logp", "log_prior"),
    "visits": ("visits", "visit_count", "n_visits", "N"),
    "value": ("value", "q_value", "Q", "mean_value"),
    "reward": ("reward", "score"),
    "terminal": ("terminal", "is_terminal", "done", "is_leaf_terminal"),
    "children": ("children", "kids"),
    "step": ("step", "global_step", "training_step"),
    "tree_id": ("tree_id", "prompt_id", "episode_id", "episode", "question_id"),
}
#: Relative tolerance of a prior above 1 and an absolute one of a logprob above 0
#: (rounding in the source).
_PRIOR_SLACK = 1e-6
_LOGPROB_SLACK = 1e-6


@dataclass
class Node:
    """One node of a tree as a reader found it (before checks and depths).

    ``where`` is the 1-based line or record of the source that holds it (named in errors).
    """

    node_id: str
    parent_id: str | None
    action: str | None = None
    prior: float | None = None
    logprob: float | None = None
    visits: float | None = None
    value: float | None = None
    reward: float | None = None
    terminal: bool | None = None
    where: int | None = None


def field_name(record: Mapping, canonical: str, mapping: Mapping[str, str]) -> str | None:
    """The key of ``record`` that holds ``canonical``: the user's ``--map`` first, then the
    recognised names (:data:`FIELD_NAMES`); None when it has none."""
    if canonical in mapping:
        return mapping[canonical] if mapping[canonical] in record else None
    for name in FIELD_NAMES.get(canonical, (canonical,)):
        if name in record:
            return name
    return None


def text(value: Any) -> str | None:
    """An action or id as text (numbers and structures as compact JSON)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool) or isinstance(value, (int, float)):
        return json.dumps(value)
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def number(value: Any, what: str, *, path: Path, line: int | None, node: str) -> float | None:
    """A numeric node field as float (None stays None); anything else is a clear error."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)   # numbers written as strings ("0.25")
        except (TypeError, ValueError):
            raise FormatError(f"node {node!r}: {what} {value!r} is not a number", path=path,
                              line=line, field=what) from None
    return float(value)


def step_value(value: Any, *, path: Path, line: int | None) -> int | None:
    """A tree's training step as int (None when absent)."""
    if value is None:
        return None
    try:
        step = int(value)
        if step != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise FormatError(f"step {value!r} is not a whole number", path=path, line=line,
                          field="step") from None
    return step


def _check_values(node: Node, path: Path) -> None:
    def fail(message: str, field: str) -> None:
        raise FormatError(f"node {node.node_id!r}: {message}", path=path, line=node.where,
                          field=field)

    for name in ("prior", "logprob", "visits", "value", "reward"):
        value = getattr(node, name)
        if value is not None and math.isnan(value):
            setattr(node, name, None)   # NaN is how pandas and numpy write "not known"
        elif value is not None and math.isinf(value) and name != "logprob":
            fail(f"{name} is {value} (not finite)", name)
    if node.visits is not None and node.visits < 0:
        fail(f"negative visits ({node.visits:g})", "visits")
    if node.prior is not None and not 0 <= node.prior <= 1 + _PRIOR_SLACK:
        fail(f"prior {node.prior:g} is not a probability in [0, 1] (log-probabilities go "
             "in 'logprob': --map logprob=FIELD)", "prior")
    if node.logprob is not None and node.logprob > _LOGPROB_SLACK:
        fail(f"logprob {node.logprob:g} is positive (a log-probability is at most 0)",
             "logprob")


def tree_table(nodes: Sequence[Node], *, tree_id: str, step: int | None, path: Path,
               line: int | None = None) -> pa.Table:
    """Check one tree and return its rows of the node table, parents before children.

    Parameters
    ----------
    nodes : sequence of Node
        Every node of the tree, in any order.
    tree_id : str
    step : int or None
    path : Path
        The source, named in errors.
    line : int, optional
        Where the tree starts in the source (used when a node has no ``where``).

    Raises
    ------
    FormatError
        Naming the file, the line or record and the node: duplicate ids, a missing parent,
        a cycle, no root or several roots, or a bad value (:func:`_check_values`).
    """
    by_id: dict[str, Node] = {}
    children: dict[str, list[str]] = {}
    roots: list[str] = []
    for node in nodes:
        where = node.where if node.where is not None else line
        node.where = where
        if node.node_id in by_id:
            raise FormatError(f"tree {tree_id!r}: duplicate node id {node.node_id!r}",
                              path=path, line=where, field="node_id")
        _check_values(node, path)
        by_id[node.node_id] = node
        if node.parent_id is None:
            roots.append(node.node_id)
        else:
            children.setdefault(node.parent_id, []).append(node.node_id)
    for node in nodes:
        if node.parent_id is not None and node.parent_id not in by_id:
            raise FormatError(f"tree {tree_id!r}: node {node.node_id!r} has parent "
                              f"{node.parent_id!r}, which is not in the tree", path=path,
                              line=node.where, field="parent_id")
    if not nodes:
        raise FormatError(f"tree {tree_id!r} has no nodes", path=path, line=line)
    if not roots:
        cycle = _cycle_from(nodes[0].node_id, by_id)
        raise FormatError(f"tree {tree_id!r} has no root: parent links form a cycle "
                          f"({' -> '.join(repr(c) for c in cycle)})", path=path,
                          line=by_id[cycle[0]].where, field="parent_id")
    if len(roots) > 1:
        second = by_id[roots[1]]
        raise FormatError(f"tree {tree_id!r} has several roots ({roots[0]!r} and "
                          f"{roots[1]!r}): only the root has no parent", path=path,
                          line=second.where, field="parent_id")
    # breadth first from the root: the order written, and the depth of every node reached
    depth = {roots[0]: 0}
    order = [roots[0]]
    queue = deque(order)
    while queue:
        parent = queue.popleft()
        for child in children.get(parent, ()):
            depth[child] = depth[parent] + 1
            order.append(child)
            queue.append(child)
    if len(order) < len(by_id):
        # nodes not reached from the root hang on a cycle of parent links
        stray = next(n for n in nodes if n.node_id not in depth)
        cycle = _cycle_from(stray.node_id, by_id)
        raise FormatError(f"tree {tree_id!r}: parent links form a cycle "
                          f"({' -> '.join(repr(c) for c in cycle)})", path=path,
                          line=stray.where, field="parent_id")
    rows = [by_id[i] for i in order]
    return pa.table({
        "step": pa.array([step] * len(rows), pa.int64()),
        "tree_id": pa.array([tree_id] * len(rows), pa.string()),
        "node_id": pa.array([n.node_id for n in rows], pa.string()),
        "parent_id": pa.array([n.parent_id for n in rows], pa.string()),
        "depth": pa.array([depth[n.node_id] for n in rows], pa.int32()),
        "action": pa.array([n.action for n in rows], pa.string()),
        "prior": pa.array([n.prior for n in rows], pa.float64()),
        "logprob": pa.array([n.logprob for n in rows], pa.float64()),
        "visits": pa.array([n.visits for n in rows], pa.float64()),
        "value": pa.array([n.value for n in rows], pa.float64()),
        "reward": pa.array([n.reward for n in rows], pa.float64()),
        "terminal": pa.array([n.terminal for n in rows], pa.bool_()),
    }, schema=NODE_SCHEMA)


def _cycle_from(start: str, by_id: Mapping[str, Node]) -> list[str]:
    """The cycle of parent links reached from ``start`` (its first node repeated last)."""
    seen: dict[str, int] = {}
    walk: list[str] = []
    current = start
    while current not in seen:
        seen[current] = len(walk)
        walk.append(current)
        current = by_id[current].parent_id
    return walk[seen[current]:] + [current]


def concat(tables: Iterable[pa.Table]) -> pa.Table:
    """Trees' rows as one table (an empty node table when there are none)."""
    tables = list(tables)
    return pa.concat_tables(tables) if tables else NODE_SCHEMA.empty_table()
