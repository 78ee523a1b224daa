"""Search trees: node table, tree readers and checks, the branches analysis and its report.

Entropies are checked against hand-built trees with known answers and against an independent
computation (plain Python/numpy over the parsed JSON, not the analysis' vectorised code) on
the real example in ``sample_logs/kg_mcts``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import entropylens as el
from entropylens.analysis import branches as br
from entropylens.analysis.registry import get
from entropylens.cli import app
from entropylens.errors import EntropylensError, FormatError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "sample_logs" / "kg_mcts" / "trees.jsonl"


def write_jsonl(path: Path, documents) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in documents), encoding="utf-8")
    return path


def leaf(visits, prior=None, **extra):
    node = {"visits": visits, **extra}
    if prior is not None:
        node["prior"] = prior
    return node


def entropy(weights) -> float:
    """Independent: entropy in nats of weights renormalised, 0 log 0 = 0."""
    w = np.asarray(weights, dtype=float)
    p = w / w.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@pytest.fixture
def known_store(tmp_path):
    """Hand-built trees with known answers, at steps 0 and 1 and one without a step."""
    trees = [
        # uniform over 4 children: log 4 for priors and visits; one child below: 0
        {"step": 0, "tree_id": "uniform", "id": "r", "visits": 8, "children": [
            {"id": "a", "prior": 0.25, "visits": 2, "children": [leaf(2, prior=1.0)]},
            leaf(2, prior=0.25), leaf(2, prior=0.25), leaf(2, prior=0.25)]},
        # priors present but not summing to 1 (renormalised), a zero-visit child
        {"step": 1, "tree_id": "skewed", "children": [
            leaf(6, prior=0.3), leaf(0, prior=0.1), leaf(2, prior=0.2)], "visits": 8},
        # logprobs instead of priors, no step
        {"tree_id": "logp", "visits": 3, "children": [
            {"logprob": -1.0, "visits": 1}, {"logprob": -2.0, "visits": 1},
            {"logprob": -3.0, "visits": 1}]},
    ]
    source = write_jsonl(tmp_path / "trees.jsonl", trees)
    store = tmp_path / "store"
    el.ingest(source, store, run="known")
    return store


def test_known_answers(known_store):
    result = el.branches(known_store, nodes=True, workers=1)
    nodes = result.run("known").nodes.set_index(["tree_id", "node_id"])
    assert nodes.loc[("uniform", "r"), "prior_entropy"] == pytest.approx(math.log(4))
    assert nodes.loc[("uniform", "r"), "visit_entropy"] == pytest.approx(math.log(4))
    assert nodes.loc[("uniform", "a"), "prior_entropy"] == 0.0   # one child
    assert nodes.loc[("uniform", "a"), "visit_entropy"] == 0.0
    assert nodes.loc[("skewed", "0"), "prior_entropy"] == pytest.approx(entropy([0.3, 0.1, 0.2]))
    # the zero-visit child is probability 0: entropy of (6/8, 2/8)
    assert nodes.loc[("skewed", "0"), "visit_entropy"] == pytest.approx(entropy([6, 2]))
    softmax = np.exp([-1.0, -2.0, -3.0])
    assert nodes.loc[("logp", "0"), "prior_entropy"] == pytest.approx(entropy(softmax))
    assert nodes.loc[("logp", "0"), "visit_entropy"] == pytest.approx(math.log(3))
    rows = {(r["step"], r["depth"]): r for r in result.to_dict()["runs"][0]["by_depth"]}
    assert set(rows) == {(0, 0), (0, 1), (1, 0), (None, 0)}   # step null without a step
    assert rows[(0, 1)]["concentrated_share"] == 1.0
    assert rows[(0, 0)]["concentrated_share"] == 0.0
    assert rows[(None, 0)]["prior_entropy_mean"] == pytest.approx(entropy(softmax))


def test_json_contract_and_cli(known_store):
    runner = CliRunner()
    out = runner.invoke(app, ["branches", str(known_store), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    run = data["runs"][0]
    assert run["run"] == "known" and "nodes" not in run
    keys = {"step", "depth", "nodes", "prior_entropy_mean", "visit_entropy_mean",
            "concentrated_share"}
    assert all(keys <= set(row) for row in run["by_depth"])
    with_nodes = json.loads(runner.invoke(app, ["branches", str(known_store), "--json",
                                                "--nodes"]).stdout)["runs"][0]
    assert len(with_nodes["nodes"]) == 4 and len(with_nodes["trees"]) == 3
    text = runner.invoke(app, ["branches", str(known_store)])
    assert text.exit_code == 0 and "branching nodes" in text.stdout


def test_synonyms_map_and_generated_ids(tmp_path):
    # trees as common MCTS-for-LLM code saves them: state, visits, value, children
    tree = {"state": "Q", "visits": 4, "value": 0.5, "children": [
        {"state": "step A", "visits": 3, "value": 0.7, "children": []},
        {"state": "step B", "visits": 1, "value": 0.0, "children": []}]}
    source = write_jsonl(tmp_path / "mcts.jsonl", [tree, tree])
    el.ingest(source, tmp_path / "s1", run="r")
    nodes = el.open(tmp_path / "s1").read_nodes("r").to_pandas()
    assert list(nodes["node_id"][:3]) == ["0", "0.0", "0.1"]
    assert list(nodes["action"][:3]) == ["Q", "step A", "step B"]
    assert nodes["tree_id"].nunique() == 2
    # other names with --map
    custom = {"uid": "root", "n": 4, "kids": [{"uid": "x", "n": 4, "p": 1.0, "kids": []}]}
    source = write_jsonl(tmp_path / "custom.jsonl", [custom])
    el.ingest(source, tmp_path / "s2", run="r", format="tree-json",
              mapping={"node_id": "uid", "visits": "n", "prior": "p", "children": "kids"})
    nodes = el.open(tmp_path / "s2").read_nodes("r").to_pandas()
    assert list(nodes["node_id"]) == ["root", "x"] and list(nodes["visits"]) == [4.0, 4.0]


def test_flat_table_and_episodes(tmp_path):
    flat = pd.DataFrame({"tree_id": ["t", "t", "u", "t", "u"], "step": [3, 3, 3, 3, 3],
                         "node_id": ["r", "a", "r", "b", "a"],
                         "parent_id": [None, "r", None, "r", "r"],
                         "prior": [None, 0.5, None, 0.5, 1.0], "visits": [2, 1, 1, 1, 1]})
    flat.to_parquet(tmp_path / "nodes.parquet")
    flat.to_csv(tmp_path / "nodes.csv", index=False)
    for name in ("nodes.parquet", "nodes.csv"):
        store = tmp_path / f"s-{name}"
        el.ingest(tmp_path / name, store, run="flat")
        table = el.open(store).read_nodes("flat").to_pandas()
        assert len(table) == 5 and table.groupby("tree_id")["depth"].max().to_dict() == \
            {"t": 1, "u": 1}
        part = el.branches(store, nodes=True, workers=1).run("flat")
        assert part.nodes.set_index("tree_id").loc["t", "prior_entropy"] == \
            pytest.approx(math.log(2))
    episode = {"episode_id": "e1", "step": 2, "reward": 1.0, "hops": [
        {"node": "Paris", "candidates": ["Berlin", "Rome"], "logprobs": [-0.1, -2.4],
         "chosen": "Berlin"},
        {"node": "Berlin", "candidates": ["Warsaw"], "logprobs": [-0.01], "chosen": 0}]}
    source = write_jsonl(tmp_path / "walks.jsonl", [episode])
    el.ingest(source, tmp_path / "s3", run="walk")
    nodes = el.open(tmp_path / "s3").read_nodes("walk").to_pandas()
    assert list(nodes["action"]) == ["Paris", "Berlin", "Rome", "Warsaw"]
    end = nodes[nodes["action"] == "Warsaw"].iloc[0]
    assert end["terminal"] and end["reward"] == 1.0 and end["depth"] == 2
    part = el.branches(tmp_path / "s3", nodes=True, workers=1).run("walk")
    root = part.nodes[part.nodes["depth"] == 0].iloc[0]
    assert root["prior_entropy"] == pytest.approx(entropy(np.exp([-0.1, -2.4])))
    assert root["visit_entropy"] == 0.0       # the walk took one candidate
    assert part.trees["path_reward"].iloc[0] == 1.0


@pytest.mark.parametrize("rows, message", [
    ([("r", None, 1), ("a", "r", 1), ("a", "r", 1)], "duplicate node id 'a'"),
    ([("r", None, 1), ("a", "zz", 1)], "node 'a' has parent 'zz', which is not in the tree"),
    ([("r", None, 1), ("a", "b", 1), ("b", "a", 1)], "cycle"),
    ([("a", "b", 1), ("b", "a", 1)], "cycle"),
    ([("r", None, 1), ("a", "r", -2)], "node 'a': negative visits"),
    ([("r", None, 1), ("s", None, 1)], "several roots"),
])
def test_malformed_trees_name_the_node(tmp_path, rows, message):
    frame = pd.DataFrame(rows, columns=["node_id", "parent_id", "visits"])
    frame.to_csv(tmp_path / "bad.csv", index=False)
    store = tmp_path / "store"
    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "bad.csv"), "--out",
                                      str(store)])
    assert result.exit_code == 1
    assert message in result.output and "bad.csv:" in result.output
    assert "\n" not in result.output.strip()
    assert not store.exists()    # nothing half-written


def test_malformed_nested_names_line_and_node(tmp_path):
    good = {"id": "r", "visits": 1, "children": []}
    bad = {"id": "r", "visits": 2, "children": [{"id": "r", "visits": 1}]}
    source = write_jsonl(tmp_path / "t.jsonl", [good, bad])
    with pytest.raises(FormatError) as caught:
        el.ingest(source, tmp_path / "store")
    assert caught.value.line == 2 and "duplicate node id 'r'" in str(caught.value)
    negative = {"id": "r", "visits": 2, "children": [{"id": "kid", "visits": -1}]}
    write_jsonl(source, [negative])
    with pytest.raises(FormatError, match="node 'kid': negative visits"):
        el.ingest(source, tmp_path / "store")
    # skipping bad trees keeps the good ones and counts the rest
    write_jsonl(source, [good, bad])
    el.ingest(source, tmp_path / "store", on_error="skip")
    manifest = el.open(tmp_path / "store").manifest("t")
    assert manifest["counts"]["trees"] == 1 and manifest["rejected"]["count"] == 1


def build_many_store(folder: Path) -> Path:
    """A store of 36 random trees (3 steps, depth 3) written in many small parts."""
    import importlib

    # entropylens.ingest is also the name of the API function: import the modules by path
    trees_reader = importlib.import_module("entropylens.ingest.trees")
    store_module = importlib.import_module("entropylens.store")
    rng = np.random.default_rng(1)
    documents = []
    for step in range(3):
        for t in range(12):
            deep = [{"prior": float(q), "visits": 1} for q in rng.dirichlet(np.ones(2))]
            kids = [{"prior": float(p), "visits": int(v), "children": [
                {"prior": 0.5, "visits": int(v) // 2, "children": deep},
                {"prior": 0.5, "visits": int(v) - int(v) // 2}]}
                for p, v in zip(rng.dirichlet(np.ones(3)), rng.integers(0, 9, 3))]
            documents.append({"step": step * 10, "tree_id": f"q{t}", "visits": 20,
                              "reward": float(rng.random()), "children": kids})
    source = write_jsonl(folder / "many.jsonl", documents)
    saved = trees_reader.CHUNK_NODES, store_module.NODE_ROWS_PER_PART
    trees_reader.CHUNK_NODES, store_module.NODE_ROWS_PER_PART = 30, 50
    try:
        el.ingest(source, folder / "store", run="many")
    finally:
        trees_reader.CHUNK_NODES, store_module.NODE_ROWS_PER_PART = saved
    return folder / "store"


def test_streamed_parts_and_local_workers_identical(tmp_path):
    build_many_store(tmp_path)
    store = el.open(tmp_path / "store")
    parts = store.node_parts("many")
    assert len(parts) > 3
    for part in parts:   # whole trees per part
        table = pq.read_table(part).to_pandas()
        keys = set(zip(table["step"], table["tree_id"]))
        for other in parts:
            if other != part:
                rest = pq.read_table(other).to_pandas()
                assert not keys & set(zip(rest["step"], rest["tree_id"]))
    one = el.branches(store, workers=1, nodes=True).to_dict()
    two = el.branches(store, workers=2, nodes=True).to_dict()
    assert json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True)
    # independent by_depth means from the whole table
    nodes = store.read_nodes("many").to_pandas()
    expected = _independent_by_depth(nodes)
    got = pd.DataFrame(one["runs"][0]["by_depth"]).set_index(["step", "depth"])
    for key, (prior, visit) in expected.items():
        assert got.loc[key, "prior_entropy_mean"] == pytest.approx(prior)
        assert got.loc[key, "visit_entropy_mean"] == pytest.approx(visit)
    verdict = one["runs"][0]["summary"]["shallow_vs_deep"]
    assert verdict["first_step"] == 0 and verdict["last_step"] == 20
    assert verdict["verdict"] in ("inconclusive", "shallow fell more", "deep fell more")


def _independent_by_depth(nodes: pd.DataFrame) -> dict:
    """(step, depth) -> (mean prior entropy, mean visit entropy), in plain Python loops."""
    out: dict = {}
    for (step, tree), rows in nodes.groupby(["step", "tree_id"]):
        rows = rows.to_dict("records")
        for node in rows:
            kids = [r for r in rows if r["parent_id"] == node["node_id"]]
            if not kids:
                continue
            weights = [math.exp(k["logprob"]) if k["logprob"] == k["logprob"]
                       and k["logprob"] is not None else k["prior"] for k in kids]
            prior = entropy(weights)
            visits = [k["visits"] for k in kids]
            visit = entropy(visits) if sum(visits) > 0 else float("nan")
            out.setdefault((int(step), node["depth"]), []).append((prior, visit))
    return {key: (np.mean([p for p, _ in v]), np.nanmean([q for _, q in v]))
            for key, v in out.items()}


def test_report_hooks_and_blocks(known_store, tmp_path):
    analysis = get("branches")
    result = el.branches(known_store, workers=1)
    section = analysis.section(result, "known")
    assert section["summary"]["trees"] == 3
    specs = analysis.figures(result, "known")
    assert {s.kind for s in specs} >= {"branches-depth", "branches-tree"}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for spec in specs:
        fig, ax = plt.subplots(figsize=spec.figsize)
        spec.draw(ax)
        plt.close(fig)
    assert all(f.kind == "branches" for f in analysis.findings(result, "known"))
    # the blocks render, escaping what comes from the data
    from markupsafe import Markup

    from entropylens.report.render import MdSafe, environment

    section.update(name="branches", title=analysis.title, available=True, reason=None,
                   figures=[{"id": "x"}])
    section["summary"]["shallow_vs_deep"]["verdict"] = "<b>&</b>"
    for markdown, suffix in ((False, "html"), (True, "md")):
        safe = MdSafe if markdown else Markup   # the report's figure macro returns markup
        text = environment(markdown).get_template(f"sections/branches.{suffix}.j2").render(
            s=section, r={"run": "known", "slug": "known"}, figures={},
            figure=lambda f, safe=safe: safe(f"[figure {f['id']}]"))
        assert "<b>&</b>" not in text and "[figure x]" in text
    # a run without trees: the block says why and draws nothing
    missing = dict(name="branches", title=analysis.title, available=False,
                   reason="the run has no search-tree nodes", figures=[])
    html = environment(False).get_template("sections/branches.html.j2").render(
        s=missing, r={}, figures={}, figure=lambda f: "")
    assert "no search-tree nodes" in html


def test_runs_without_trees_are_skipped(known_store, tmp_path):
    metrics = tmp_path / "metrics.csv"
    pd.DataFrame({"step": [1, 2], "policy_entropy": [1.0, 0.5]}).to_csv(metrics, index=False)
    el.ingest(metrics, known_store, run="plain")
    result = el.branches(known_store, workers=1)
    assert [r.run for r in result.runs] == ["known"]
    assert result.skipped == ["plain: the run has no search-tree nodes"]
    with pytest.raises(EntropylensError, match="no search-tree nodes"):
        el.branches(known_store, "plain")


@pytest.mark.skipif(not EXAMPLE.exists(), reason="example not generated")
def test_real_example_matches_independent_computation(tmp_path):
    el.ingest(EXAMPLE.parent, tmp_path / "store", run="kg")
    result = el.branches(tmp_path / "store", workers=1, nodes=True).run("kg")
    # parse the JSON again, walk the nested trees with a stack, compute with numpy
    expected: dict = {}
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        tree = json.loads(line)
        stack = [(tree["root"], 0)]
        while stack:
            node, depth = stack.pop()
            kids = node["children"]
            if kids:
                prior = entropy(np.exp([k["logprob"] for k in kids]))
                visits = [k["visits"] for k in kids]
                visit = entropy(visits) if sum(visits) else float("nan")
                expected.setdefault((tree["step"], depth), []).append((prior, visit))
            stack.extend((k, depth + 1) for k in kids)
    got = result.by_depth.set_index(["step", "depth"])
    assert len(got) == len(expected)
    for key, values in expected.items():
        assert got.loc[key, "nodes"] == len(values)
        assert got.loc[key, "prior_entropy_mean"] == pytest.approx(np.mean([p for p, _ in values]),
                                                                   rel=1e-9)
        visit = [q for _, q in values if q == q]
        if visit:
            assert got.loc[key, "visit_entropy_mean"] == pytest.approx(np.mean(visit), rel=1e-9)
