"""Search trees: nested JSON trees, flat node tables and graph-traversal episodes.

Three formats fill the node table (DESIGN: the node table; :mod:`._trees` checks each tree):

``tree-json``
    One tree per JSON document (a ``.json`` file holding one tree or a list of trees) or per
    JSONL line. A node is an object with ``id``, ``action``, ``prior`` or ``logprob``,
    ``visits``, ``value``, ``reward``, ``terminal`` and a ``children`` list; the document is
    the root node, optionally with top-level ``step`` and ``tree_id``, or a wrapper
    ``{"step", "tree_id", "root": NODE}`` (``tree`` also works). Recognised synonyms
    (:data:`._trees.FIELD_NAMES`) let trees saved by common MCTS-for-LLM code, such as
    ``{"state", "visits", "value", "children"}``, load as they are; ``--map
    canonical=field`` names any other field. Nodes without an id get their path of child
    positions (``0``, ``0.1``, ``0.1.0``), so ids are the same at every ingest.
``tree-table``
    Parquet, CSV or JSONL with one row per node and a ``parent_id`` column (``node_id`` or
    ``id``, optional ``tree_id``, ``step`` and the node fields; ``--map`` renames). Rows of
    one tree may be anywhere in the file: the file is gathered by tree before the trees are
    checked, so it is held in memory (node tables are small next to token logs).
``graph-episodes``
    JSONL, one traversal episode per line: ``{"episode_id", "step", "reward", "hops":
    [{"node", "candidates": [...], "logprobs": [...], "chosen"}, ...]}``. Each hop is a
    branching node whose children are the candidate neighbours, with the policy's
    log-probabilities over them (or ``probs``) and, when the traversal searched, their
    ``visits``; ``chosen`` (a candidate or its index) leads to the next hop. The episode's
    ``reward`` is the reward of the last node of the chosen path, which is ``terminal``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import pyarrow as pa

from ..errors import FormatError
from ._io import iter_lines
from ._trees import Node, concat, field_name, number, step_value, text, tree_table
from .registry import Chunk, Sample

#: Node rows gathered before a chunk of whole trees is yielded (bounds reader memory).
CHUNK_NODES = 64 * 1024
_WRAPPER_KEYS = ("root", "tree")
_HOPS = ("hops", "trajectory", "path_hops", "turns")
_CANDIDATES = ("candidates", "neighbors", "neighbours", "options")
_LOGPROBS = ("logprobs", "log_probs", "candidate_logprobs")
_PROBS = ("probs", "priors", "probabilities")
_CHOSEN = ("chosen", "next", "choice", "selected")
_CURRENT = ("node", "current", "at", "entity")


def _first_key(record: Mapping, names) -> str | None:
    return next((n for n in names if n in record), None)


# -- tree-json ---------------------------------------------------------------------------

def _root_of(document: Any, mapping: Mapping[str, str]) -> tuple[dict | None, dict]:
    """(root node, the document's top level) of a tree document; root None when the
    document is no tree."""
    if not isinstance(document, dict):
        return None, {}
    children = field_name(document, "children", mapping)
    if children is not None and isinstance(document[children], list):
        return document, document
    for key in _WRAPPER_KEYS:
        inner = document.get(key)
        if isinstance(inner, dict):
            children = field_name(inner, "children", mapping)
            if children is not None and isinstance(inner[children], list):
                return inner, document
    return None, document


def sniff_json(sample: Sample) -> float:
    if sample.suffix not in (".json", ".jsonl", ".ndjson"):
        return 0.0
    document = sample.first_json()
    if isinstance(document, list) and document:
        document = document[0]
    if document is not None:
        root, _ = _root_of(document, sample.mapping)
        return 0.9 if root is not None else 0.0
    # a tree too long for the head: an object whose text soon has a "children" list
    names = [sample.mapping.get("children", "children")] + ["kids"]
    head = sample.text.lstrip()
    if head[:1] in "{[" and any(re.search(rf'"{re.escape(n)}"\s*:\s*\[', head[:SNIFF_SPAN])
                                for n in names):
        return 0.7
    return 0.0


#: Characters of a long head searched for a ``children`` list.
SNIFF_SPAN = 16 * 1024


def _node_of(record: dict, node_id: str, parent_id: str | None, mapping, path: Path,
             line: int | None) -> Node:
    def get(canonical: str):
        key = field_name(record, canonical, mapping)
        return None if key is None else record[key]

    terminal = get("terminal")
    return Node(node_id=node_id, parent_id=parent_id, action=text(get("action")),
                prior=number(get("prior"), "prior", path=path, line=line, node=node_id),
                logprob=number(get("logprob"), "logprob", path=path, line=line, node=node_id),
                visits=number(get("visits"), "visits", path=path, line=line, node=node_id),
                value=number(get("value"), "value", path=path, line=line, node=node_id),
                reward=number(get("reward"), "reward", path=path, line=line, node=node_id),
                terminal=None if terminal is None else bool(terminal), where=line)


def nested_tree(document: Any, *, index: int, path: Path, line: int | None,
                mapping: Mapping[str, str]) -> pa.Table:
    """The node rows of one nested tree document (the ``index``-th of its file)."""
    root, top = _root_of(document, mapping)
    if root is None:
        raise FormatError("not a tree: expected a node object with a 'children' list (or "
                          "{'root': NODE}); map other names with --map children=FIELD",
                          path=path, line=line)
    step_key = field_name(top, "step", mapping)
    step = step_value(top.get(step_key) if step_key else None, path=path, line=line)
    tree_key = field_name(top, "tree_id", mapping)
    tree_id = text(top.get(tree_key)) if tree_key and top.get(tree_key) is not None \
        else f"{path.name}#{index}"
    nodes: list[Node] = []
    # depth first without recursion: deep searches must not hit Python's recursion limit
    pending: list[tuple[dict, str, str | None]] = [(root, "0", None)]
    while pending:
        record, position, parent = pending.pop()
        if not isinstance(record, dict):
            raise FormatError(f"tree {tree_id!r}: the child at {position} is "
                              f"{type(record).__name__}, not a node object", path=path,
                              line=line)
        id_key = field_name(record, "node_id", mapping)
        node_id = text(record[id_key]) if id_key and record[id_key] is not None else position
        nodes.append(_node_of(record, node_id, parent, mapping, path, line))
        kids_key = field_name(record, "children", mapping)
        kids = record[kids_key] if kids_key else None
        if kids is None:
            continue
        if not isinstance(kids, list):
            raise FormatError(f"tree {tree_id!r}: node {node_id!r} has children of type "
                              f"{type(kids).__name__}, not a list", path=path, line=line,
                              field=kids_key)
        for i in range(len(kids) - 1, -1, -1):
            pending.append((kids[i], f"{position}.{i}", node_id))
    return tree_table(nodes, tree_id=tree_id, step=step, path=path, line=line)


def _documents(path: Path, ctx) -> Iterator[tuple[int, int | None, Any]]:
    """(index, line, document) of every tree of a JSON or JSONL file (index from 1)."""
    suffix = Sample(path).suffix
    with ctx.open() as fh:
        if suffix == ".json":
            try:
                document = json.load(fh)
            except ValueError as exc:
                raise FormatError(f"invalid JSON: {exc}", path=path) from None
            documents = document if isinstance(document, list) else [document]
            for index, item in enumerate(documents, start=1):
                # a list of trees: "line" is the tree's record number in the list
                yield index, index if isinstance(document, list) else None, item
            return
        index = 0
        for number_, raw in iter_lines(fh):
            try:
                document = json.loads(raw)
            except ValueError as exc:
                ctx.reject(number_, f"invalid JSON: {exc}")
                continue
            index += 1
            yield index, number_, document


def _chunks(trees: Iterator[pa.Table]) -> Iterator[Chunk]:
    """Chunks of whole trees of about :data:`CHUNK_NODES` rows."""
    held: list[pa.Table] = []
    rows = offset = 0
    for table in trees:
        held.append(table)
        rows += table.num_rows
        if rows >= CHUNK_NODES:
            yield Chunk("nodes", concat(held), offset)
            offset += rows
            held, rows = [], 0
    if held:
        yield Chunk("nodes", concat(held), offset)


def _read_documents(path: Path, ctx, build) -> Iterator[Chunk]:
    """Node chunks of the trees ``build`` makes from each JSON document of ``path``; a
    malformed tree stops the ingest or, with ``--on-error skip``, is counted and skipped."""
    mapping = ctx.options.mapping

    def trees():
        for index, line, document in _documents(path, ctx):
            try:
                yield build(document, index=index, path=path, line=line, mapping=mapping)
            except FormatError as exc:
                if ctx.options.on_error == "stop":
                    raise
                ctx.reject(exc.line, exc.message, field=exc.field)

    yield from _chunks(trees())


def read_json(path: Path, ctx) -> Iterator[Chunk]:
    yield from _read_documents(path, ctx, nested_tree)


# -- tree-table ----------------------------------------------------------------------------

def _table_columns(sample: Sample) -> list[str] | None:
    if sample.suffix in (".jsonl", ".ndjson", ".json"):
        record = sample.first_json()
        if not isinstance(record, dict) or any(isinstance(v, (dict, list))
                                               for v in record.values()):
            return None
    return sample.columns()


def sniff_table(sample: Sample) -> float:
    names = _table_columns(sample)
    if not names:
        return 0.0
    record = dict.fromkeys(names)
    if field_name(record, "parent_id", sample.mapping) and \
            field_name(record, "node_id", sample.mapping):
        return 0.85
    return 0.0


def read_table(path: Path, ctx) -> Iterator[Chunk]:
    from .table import _batches, _is_parquet

    mapping = ctx.options.mapping
    suffix = Sample(path).suffix
    if suffix not in (".csv", ".tsv", ".jsonl", ".ndjson", ".json") and _is_parquet(path):
        suffix = ".parquet"
    keys: dict[str, str | None] | None = None
    # tree (step, tree_id) -> its nodes; a tree's rows may be anywhere in the file
    trees: dict[tuple, list[Node]] = {}
    first_row: dict[tuple, int] = {}
    row = 0
    for batch in _batches(path, suffix, ctx):
        if keys is None:
            record = dict.fromkeys(batch.schema.names)
            keys = {c: field_name(record, c, mapping) for c in
                    ("node_id", "parent_id", "action", "prior", "logprob", "visits", "value",
                     "reward", "terminal", "step", "tree_id")}
            for needed in ("node_id", "parent_id"):
                if keys[needed] is None:
                    raise FormatError(f"no '{needed}' column (columns: "
                                      f"{', '.join(batch.schema.names)}); map it with --map "
                                      f"{needed}=COLUMN", path=path, field=needed)
        columns = {c: batch.column(k).to_pylist() if k else None for c, k in keys.items()}
        for i in range(batch.num_rows):
            row += 1

            def get(canonical: str):
                values = columns[canonical]
                return None if values is None else values[i]

            node_id = text(get("node_id"))
            if node_id is None:
                raise FormatError("node id is empty", path=path, line=row,
                                  field=keys["node_id"])
            step = step_value(get("step"), path=path, line=row)
            tree = (step, text(get("tree_id")) if get("tree_id") is not None else path.name)
            first_row.setdefault(tree, row)
            parent = get("parent_id")
            parent = None if parent is None or parent == "" else text(parent)
            terminal = get("terminal")
            trees.setdefault(tree, []).append(Node(
                node_id=node_id, parent_id=parent, action=text(get("action")),
                prior=number(get("prior"), "prior", path=path, line=row, node=node_id),
                logprob=number(get("logprob"), "logprob", path=path, line=row, node=node_id),
                visits=number(get("visits"), "visits", path=path, line=row, node=node_id),
                value=number(get("value"), "value", path=path, line=row, node=node_id),
                reward=number(get("reward"), "reward", path=path, line=row, node=node_id),
                terminal=None if terminal is None else bool(terminal), where=row))
    if keys is None:
        return

    def tables():
        for (step, tree_id), nodes in trees.items():
            try:
                yield tree_table(nodes, tree_id=tree_id, step=step, path=path,
                                 line=first_row[(step, tree_id)])
            except FormatError as exc:
                if ctx.options.on_error == "stop":
                    raise
                ctx.reject(exc.line, exc.message, field=exc.field)

    yield from _chunks(tables())


# -- graph-episodes --------------------------------------------------------------------------

def _hops_of(document: Any, mapping: Mapping[str, str]) -> list | None:
    if not isinstance(document, dict):
        return None
    key = mapping.get("hops") or _first_key(document, _HOPS)
    hops = document.get(key) if key else None
    if isinstance(hops, list) and hops and isinstance(hops[0], dict) \
            and _first_key(hops[0], (mapping.get("candidates"),) + _CANDIDATES):
        return hops
    return None


def sniff_episodes(sample: Sample) -> float:
    if sample.suffix not in (".jsonl", ".ndjson", ".json"):
        return 0.0
    return 0.9 if _hops_of(sample.first_json(), sample.mapping) is not None else 0.0


def episode_tree(document: dict, *, index: int, path: Path, line: int | None,
                 mapping: Mapping[str, str]) -> pa.Table:
    """The node rows of one traversal episode: the start node is the root, each hop's
    candidates are the children of the node the walk is at, the chosen one leads on."""
    hops = _hops_of(document, mapping)
    if hops is None:
        raise FormatError("not a traversal episode: expected a 'hops' list whose hops have "
                          "'candidates'", path=path, line=line)
    step_key = field_name(document, "step", mapping)
    step = step_value(document.get(step_key) if step_key else None, path=path, line=line)
    tree_key = field_name(document, "tree_id", mapping)
    tree_id = text(document[tree_key]) if tree_key and document[tree_key] is not None \
        else f"{path.name}#{index}"
    start = hops[0].get(_first_key(hops[0], _CURRENT) or "", None)
    nodes = [Node(node_id="0", parent_id=None, action=text(start), visits=1.0, where=line)]
    at = "0"
    for h, hop in enumerate(hops, start=1):
        candidates = hop.get(_first_key(hop, (mapping.get("candidates"),) + _CANDIDATES))
        if not isinstance(candidates, list) or not candidates:
            raise FormatError(f"episode {tree_id!r}: hop {h} has no candidate list",
                              path=path, line=line, field="candidates")
        logprobs = hop.get(_first_key(hop, (mapping.get("logprob"),) + _LOGPROBS) or "")
        probs = hop.get(_first_key(hop, (mapping.get("prior"),) + _PROBS) or "")
        visits = hop.get("visits")
        for name, values in (("logprobs", logprobs), ("probs", probs), ("visits", visits)):
            if values is not None and (not isinstance(values, list)
                                       or len(values) != len(candidates)):
                raise FormatError(f"episode {tree_id!r}: hop {h} has {len(candidates)} "
                                  f"candidates but {name} is not a list of as many values",
                                  path=path, line=line, field=name)
        chosen = hop.get(_first_key(hop, (mapping.get("chosen"),) + _CHOSEN) or "")
        labels = [text(c) for c in candidates]
        if isinstance(chosen, int) and not isinstance(chosen, bool) \
                and 0 <= chosen < len(candidates) and text(chosen) not in labels:
            pick = chosen
        elif chosen is not None and text(chosen) in labels:
            pick = labels.index(text(chosen))
        elif chosen is None and h == len(hops):
            pick = None   # the walk stopped here, choosing nothing
        else:
            raise FormatError(f"episode {tree_id!r}: hop {h} chose {chosen!r}, which is not "
                              "one of its candidates", path=path, line=line, field="chosen")
        for j, label in enumerate(labels):
            node_id = f"{at}.{j}"
            nodes.append(Node(
                node_id=node_id, parent_id=at, action=label,
                prior=None if probs is None else number(probs[j], "prior", path=path,
                                                        line=line, node=node_id),
                logprob=None if logprobs is None else number(logprobs[j], "logprob",
                                                             path=path, line=line,
                                                             node=node_id),
                visits=number(visits[j], "visits", path=path, line=line, node=node_id)
                if visits is not None else float(j == pick),
                value=number(hop.get("value"), "value", path=path, line=line, node=node_id)
                if j == pick else None,
                where=line))
        if pick is None:
            break
        at = f"{at}.{pick}"
    end = next(n for n in nodes if n.node_id == at)
    reward_key = field_name(document, "reward", mapping)
    end.reward = number(document.get(reward_key) if reward_key else None, "reward", path=path,
                        line=line, node=at)
    end.terminal = True
    return tree_table(nodes, tree_id=tree_id, step=step, path=path, line=line)


def read_episodes(path: Path, ctx) -> Iterator[Chunk]:
    yield from _read_documents(path, ctx, episode_tree)
