"""Diversity of a policy's samples per prompt: pass@k, best@k, distinct answers, signal.

Token entropy is one face of exploration; what a policy does *across* its samples for one
prompt is another. RL tends to narrow it: pass@1 rises while pass@k at large k stalls or falls
and distinct strategies disappear. Per step and split (``train``, ``val``, ``inference``;
a null split counts as ``train``), over the prompt groups (``group_id``) of that step:

- **pass@k**, the unbiased estimator of Chen et al. 2021 (arXiv 2107.03374, Eq. 1): a group of
  ``n`` completions of which ``c`` are correct has ``1 - C(n-c, k) / C(n, k)``, computed as the
  product ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` (no large binomials); averaged over the groups
  with ``n >= k``. A completion is correct when its reward is at least ``correct`` (1.0).
- **best@k**: the expected largest reward of ``k`` completions drawn without replacement from
  the group, exact from the order statistics (the ``i``-th smallest of ``n`` rewards is the
  maximum with probability ``C(i-1, k-1) / C(n, k)``); averaged over groups.
- **distinct completions** (exact text, surrounding whitespace stripped) and **distinct final
  answers** per group, averaged over groups. The answer of a completion is its
  ``final_answer`` column when the source logged it, else extracted from the text: the (last)
  match of ``answer_regex`` (one group), else the last ``\\boxed{...}``, else the last number
  (``1,000`` and ``15.0`` read as ``1000`` and ``15``). The rule used is stated in the result.
- **zero-variance groups**: the share of groups (of two or more rewarded completions) whose
  rewards are all equal: they carry no GRPO learning signal (DAPO, arXiv 2503.14476, filters
  them); **reward variance**: the mean over groups of the population variance of rewards.
- **test-time variance**: per group, the variance ``p(1-p)`` of correctness and the Shannon
  entropy (nats) of the answers; averaged over groups and shown per split next to the
  training policy entropy of the step (:func:`~entropylens.analysis.curves.policy_entropy`).
- **reward-space diversity** (Vector Policy Optimization, arXiv 2605.22817), for completions
  with a ``reward_vector``: ``draws`` weightings ``w ~ Dirichlet(1, ..., 1)`` (fixed ``seed``)
  score each completion by ``w . r``; the number of distinct completions that win (argmax) under
  at least one weighting, averaged over groups.

A completion without a ``group_id`` is a group of its own; completions without a reward count
for the distinct completions and answers but not for pass@k, best@k and the variances.
Every mean over groups comes with its standard error over groups (the groups are the sampled
unit), so a change between checkpoints is claimed only beyond it.

Streaming: completions are one row each (a run holds about a thousandth as many as tokens),
stored in one ``sequences.parquet`` without step-sorted row groups. They are read on the
caller's side in bounded batches of whole steps (:func:`step_batches`: one pass over the step
column, then one filtered read per batch of about ``STEP_BATCH_ROWS`` rows); only the
training entropy next to them scans tokens, through the engine (local or Ray). Both engines
therefore give identical results.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from ..engine import Plan
from ..errors import EntropylensError
from ..schema import SEQUENCE_SCHEMA
from ..store import Store
from .curves import open_store, policy_entropy_plan
from .registry import Analysis, Finding, FigureSpec, register, run_analysis
from ..base.jsonable import records as _records
from ..base.lazy import LazyModule

# scipy.special loads with the first best@k, not with every command
special = LazyModule("scipy.special")

#: Reward at or above which a completion is correct (default of ``--correct``).
CORRECT = 1.0
#: Random weightings of a reward vector drawn per group (reward-space diversity).
DRAWS = 256
SEED = 0
#: Rows of sequences read at a time (whole steps; a larger step is read alone).
STEP_BATCH_ROWS = 256 * 1024
#: How far apart two means must be, in standard errors of their difference, to be a change.
Z = 2.0

STEP_COLUMNS = ["run", "step", "split", "prompts", "samples", "samples_per_prompt",
                "distinct_completions_mean", "distinct_answers_mean", "answered_share",
                "zero_variance_groups", "zero_variance_share", "reward_mean",
                "reward_variance_mean", "correct_share", "correctness_variance_mean",
                "answer_entropy_mean", "reward_space_winners_mean", "reward_vector_size",
                "entropy"]
PASS_COLUMNS = ["run", "step", "split", "k", "prompts", "pass_at_k", "pass_at_k_se",
                "best_at_k", "best_at_k_se"]
_READ_COLUMNS = ["step", "split", "sample_id", "group_id", "completion", "reward",
                 "final_answer", "reward_vector"]

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


# -- estimators ---------------------------------------------------------------------------

def pass_at_k(n: np.ndarray | int, c: np.ndarray | int, k: int) -> np.ndarray:
    """Unbiased pass@k of groups with ``n`` samples of which ``c`` are correct.

    ``1 - C(n-c, k) / C(n, k)`` (Chen et al. 2021, arXiv 2107.03374), computed as
    ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``, which never forms a large binomial.

    Parameters
    ----------
    n, c : int or array of int
        Samples and correct samples of each group (``0 <= c <= n``, ``n >= k``).
    k : int

    Returns
    -------
    numpy.ndarray of float64
    """
    n = np.atleast_1d(np.asarray(n, np.int64))
    c = np.atleast_1d(np.asarray(c, np.int64))
    if k < 1 or (n < k).any() or (c < 0).any() or (c > n).any():
        raise ValueError("pass@k needs 1 <= k <= n and 0 <= c <= n")
    out = np.ones(len(n), np.float64)
    todo = np.flatnonzero(n - c >= k)
    if len(todo):
        # groups share few (n, c) pairs: each product once
        pairs, inverse = np.unique(np.stack([n[todo], c[todo]]), axis=1, return_inverse=True)
        values = np.array([1.0 - np.prod(1.0 - k / np.arange(size - right + 1, size + 1,
                                                             dtype=np.float64))
                           for size, right in pairs.T.tolist()])
        out[todo] = values[inverse.reshape(-1)]
    return out


def best_at_k(rewards: np.ndarray, k: int) -> float:
    """Expected maximum reward of ``k`` of ``rewards`` drawn without replacement.

    With the rewards sorted, the ``i``-th smallest (1-based) is the maximum of a uniformly
    drawn ``k``-subset with probability ``C(i-1, k-1) / C(n, k)`` (weights from log-gamma).
    """
    values = np.sort(np.asarray(rewards, np.float64))
    n = len(values)
    if not 1 <= k <= n:
        raise ValueError("best@k needs 1 <= k <= n")
    return float(np.dot(_best_at_k_weights(n, k), values[k - 1:]))


def _best_at_k_weights(n: int, k: int) -> np.ndarray:
    """Probability that the ``i``-th smallest of ``n`` is the maximum of ``k``, for
    ``i = k .. n`` (the ranks that can be): ``C(i-1, k-1) / C(n, k)``, from log-gamma."""
    i = np.arange(k, n + 1, dtype=np.float64)
    log_w = (special.gammaln(i) - special.gammaln(k) - special.gammaln(i - k + 1)) \
        - (special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1))
    return np.exp(log_w)


def default_ks(samples_per_prompt: int) -> list[int]:
    """The powers of two up to ``samples_per_prompt``."""
    ks, k = [], 1
    while k <= samples_per_prompt:
        ks.append(k)
        k *= 2
    return ks


def parse_ks(text: str | Sequence[int] | None) -> list[int] | None:
    """``"1,2,4"`` (or a sequence) as sorted distinct positive ints; None stays None."""
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        ks = sorted({int(str(item).strip()) for item in items if str(item).strip()})
    except ValueError:
        raise EntropylensError(f"k must be positive integers separated by commas, got "
                               f"{text!r}") from None
    if not ks or ks[0] < 1:
        raise EntropylensError(f"k must be positive integers separated by commas, got {text!r}")
    return ks


# -- answers ------------------------------------------------------------------------------

def _normalise_number(text: str) -> str:
    text = text.replace(",", "")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() and abs(value) < 2 ** 63 else repr(value)


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces balanced), or None."""
    found = None
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for j in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                found = text[start:j].strip()
                break
    return found


def answer_rule(answer_regex: str | None) -> str:
    """The answer-extraction rule in words (stated in the result)."""
    if answer_regex:
        return (f"logged final_answer, else the group of the last match of the regular "
                f"expression {answer_regex}")
    return "logged final_answer, else the last \\boxed{...}, else the last number"


def compile_answer_regex(answer_regex: str | None) -> re.Pattern | None:
    """The compiled ``answer_regex`` (one capturing group), or None."""
    if not answer_regex:
        return None
    try:
        pattern = re.compile(answer_regex, re.DOTALL)
    except re.error as exc:
        raise EntropylensError(f"--answer-regex {answer_regex!r} is not a regular "
                               f"expression: {exc}") from None
    if pattern.groups != 1:
        raise EntropylensError(f"--answer-regex {answer_regex!r} must have exactly one "
                               f"capturing group (it has {pattern.groups})")
    return pattern


def extract_answer(text: str | None, pattern: re.Pattern | None = None) -> str | None:
    """The final answer of a completion (see the module docstring), or None (also for a
    completion whose text was not logged, which pandas hands over as NaN)."""
    if not isinstance(text, str):
        return None
    if pattern is not None:
        matches = list(pattern.finditer(text))
        return matches[-1].group(1).strip() if matches else None
    boxed = _last_boxed(text)
    if boxed is not None:
        return _normalise_number(boxed) if _NUMBER.fullmatch(boxed) else boxed
    numbers = _NUMBER.findall(text)
    return _normalise_number(numbers[-1]) if numbers else None


# -- reading ------------------------------------------------------------------------------

def _sequences_dataset(store: Store, run: str) -> ds.Dataset | None:
    path = store.run_dir(run) / "sequences.parquet"
    return ds.dataset(str(path), schema=SEQUENCE_SCHEMA, format="parquet") \
        if path.exists() else None


def step_batches(store: Store, run: str, columns: Sequence[str], *,
                 batch_rows: int | None = None) -> Iterator[pa.Table]:
    """The run's sequences in tables of whole steps, by increasing step (null steps last).

    The step column is read once to count rows per step; then each batch of consecutive
    steps holding about ``batch_rows`` rows is read with a step filter, so memory holds one
    batch (a step larger than ``batch_rows`` is read alone).
    """
    batch_rows = STEP_BATCH_ROWS if batch_rows is None else batch_rows
    dataset = _sequences_dataset(store, run)
    if dataset is None:
        return
    steps = dataset.to_table(columns=["step"]).column("step")
    counts = pc.value_counts(steps).to_pylist()
    known = sorted((c["values"], c["counts"]) for c in counts if c["values"] is not None)
    batch, held = [], 0
    for step, rows in known + [(None, 0)]:
        if batch and (step is None or held + rows > batch_rows):
            yield dataset.to_table(columns=list(columns),
                                   filter=ds.field("step").isin(pa.array(batch, pa.int64())))
            batch, held = [], 0
        if step is not None:
            batch.append(step)
            held += rows
    if steps.null_count:
        yield dataset.to_table(columns=list(columns), filter=ds.field("step").is_null())


# -- per-step statistics ------------------------------------------------------------------

def _mean_se(values: np.ndarray) -> tuple[float | None, float | None]:
    """Mean over groups and its standard error (None with no groups; 0 with one)."""
    values = np.asarray(values, np.float64)
    if not len(values):
        return None, None
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return float(values.mean()), se


def _winners(vectors: list, texts: list, rng: np.random.Generator, draws: int) -> int | None:
    """Distinct completions that win (argmax of ``w . r``) under ``draws`` Dirichlet(1)
    weightings; None when the group has no two vectors of one length."""
    keep = [i for i, v in enumerate(vectors) if v is not None and len(v)]
    if len(keep) < 2:
        return None
    size = len(vectors[keep[0]])
    if any(len(vectors[i]) != size for i in keep):
        raise EntropylensError(f"reward vectors of one group have different lengths "
                               f"({sorted({len(vectors[i]) for i in keep})})")
    matrix = np.asarray([vectors[i] for i in keep], np.float64)
    weights = rng.dirichlet(np.ones(size), size=draws)
    best = np.argmax(matrix @ weights.T, axis=0)
    return len({texts[keep[b]] for b in np.unique(best)})


def _label_codes(labels: pd.Series) -> np.ndarray:
    """Codes of labels compared as text (1 and "1" are one answer), numbered in the sorted
    order of the text; -1 for a missing label."""
    present = labels.notna().to_numpy()
    codes = np.full(len(labels), -1, np.int64)
    if present.any():
        codes[present] = pd.factorize(labels[present].astype(str).to_numpy(object),
                                      sort=True)[0]
    return codes


def _per_group(codes: np.ndarray, labels: np.ndarray, groups: int) -> tuple:
    """Distinct labels and the Shannon entropy (nats) of their shares, per group.

    ``labels`` are :func:`_label_codes`. Only rows with a label and a group count; groups
    with none are left out.

    Returns
    -------
    (distinct labels, entropy) : arrays in group order
    """
    keep = (codes >= 0) & (labels >= 0)
    if not keep.any():
        return np.zeros(0, np.int64), np.zeros(0)
    span = int(labels[keep].max()) + 1
    # (group, label) pairs in sorted order: labels by their text within each group
    pairs, n = np.unique(codes[keep] * span + labels[keep], return_counts=True)
    g = pairs // span
    n = n.astype(np.float64)
    distinct = np.bincount(g, minlength=groups)
    total = np.bincount(g, weights=n, minlength=groups)
    p = n / total[g]
    entropy = np.bincount(g, weights=-(p * np.log(p)), minlength=groups)
    present = np.flatnonzero(distinct)
    return distinct[present], entropy[present]


def _best_at_k_groups(values: np.ndarray, starts: np.ndarray, sizes: np.ndarray,
                      k: int) -> np.ndarray:
    """:func:`best_at_k` of every group at once: ``values`` sorted within each group, the
    groups at ``starts`` with ``sizes >= k``; one matrix product per group size."""
    out = np.empty(len(starts))
    for n in np.unique(sizes):
        mine = np.flatnonzero(sizes == n)
        matrix = values[starts[mine, None] + np.arange(k - 1, n)]
        out[mine] = matrix @ _best_at_k_weights(int(n), k)
    return out


def group_stats(frame: pd.DataFrame, *, ks: Sequence[int] | None, correct: float,
                pattern: re.Pattern | None, draws: int, seed: int) -> tuple[list, list]:
    """Rows of one step's table (``step, split, sample_id, group_id, completion, reward,
    final_answer, reward_vector``): one per split (:data:`STEP_COLUMNS` but ``run`` and
    ``entropy``) and one per split and k (:data:`PASS_COLUMNS` but ``run``).

    Every per-group figure is computed for all groups at once (bincounts over the group
    codes, one matrix product per group size for best@k): a step holds thousands of groups,
    and a Python loop over them cost more than reading the completions. Only the reward-space
    winners loop, over the groups that logged reward vectors.
    """
    steps, passes = [], []
    frame = frame.assign(split=frame["split"].fillna("train")).reset_index(drop=True)
    # the text work once for the frame (all its steps), not once per step
    completion = frame["completion"]
    texts_all = completion.fillna("").str.strip()
    answers_all = frame["final_answer"]
    missing = answers_all.isna().to_numpy()
    if missing.any():
        answers_all = answers_all.astype(object).copy()
        answers_all[missing] = [extract_answer(t, pattern)
                                for t in completion.to_numpy(object)[missing]]
    logged_codes = _label_codes(texts_all.where(completion.notna().to_numpy()))
    answer_codes = _label_codes(answers_all)
    answered_all = answers_all.notna().to_numpy()
    keys_all = frame["group_id"].fillna(frame["sample_id"]).to_numpy(object)
    reward_all = frame["reward"].to_numpy(np.float64, na_value=np.nan)
    vectors_all = frame["reward_vector"].to_numpy(object)
    texts_all = texts_all.to_numpy(object)
    for (step, split), rows in frame[["step", "split"]].groupby(["step", "split"], sort=True,
                                                                 dropna=False):
        idx = rows.index.to_numpy()
        # groups in sorted order of their key, as a sorted groupby; keyless rows in none
        codes, keys = pd.factorize(keys_all[idx], sort=True)
        groups = len(keys)
        sizes = np.bincount(codes[codes >= 0], minlength=groups)
        distinct, _ = _per_group(codes, logged_codes[idx], groups)
        distinct_answers, ans_ent = _per_group(codes, answer_codes[idx], groups)

        # rewards: the rewarded rows of each group, groups in order, rows in their order
        reward = reward_all[idx]
        has = (codes >= 0) & ~np.isnan(reward)
        order = np.flatnonzero(has)[np.argsort(codes[has], kind="stable")]
        r, g = reward[order], codes[order]
        counts = np.bincount(g, minlength=groups)
        rewarded = np.flatnonzero(counts)
        n_r = counts[rewarded]
        means = np.bincount(g, weights=r, minlength=groups)[rewarded] / n_r
        variance = np.bincount(g, weights=(r - np.repeat(means, n_r)) ** 2,
                               minlength=groups)[rewarded] / n_r
        c_r = np.bincount(g, weights=(r >= correct), minlength=groups)[rewarded]
        p = c_r / n_r
        corr_var = p * (1 - p)
        starts = np.concatenate([[0], np.cumsum(n_r)[:-1]]).astype(np.int64)
        if len(r):
            spread = np.maximum.reduceat(r, starts) - np.minimum.reduceat(r, starts)
        else:
            spread = np.zeros(0)
        zero = (spread == 0)[n_r >= 2]
        winners: list[int] = []
        vectors = [v if _is_vector(v) else None for v in vectors_all[idx]]
        logged_vectors = [v for v in vectors if v is not None]
        if logged_vectors:
            winners = _group_winners(codes, vectors, list(texts_all[idx]), groups,
                                     np.random.default_rng(seed), draws)
        spp = int(np.median(sizes)) if groups else 0
        answered = int(answered_all[idx].sum())
        row = {"step": None if pd.isna(step) else int(step), "split": split,
               "prompts": groups, "samples": len(idx), "samples_per_prompt": spp,
               "distinct_completions_mean": _mean_se(distinct)[0],
               "distinct_answers_mean": _mean_se(distinct_answers)[0],
               "answered_share": answered / len(idx) if len(idx) else None,
               "zero_variance_groups": int(zero.sum()),
               "zero_variance_share": float(np.mean(zero)) if len(zero) else None,
               "reward_mean": float(r.mean()) if len(r) else None,
               "reward_variance_mean": _mean_se(variance)[0],
               "correct_share": float((r >= correct).mean()) if len(r) else None,
               "correctness_variance_mean": _mean_se(corr_var)[0],
               "answer_entropy_mean": _mean_se(ans_ent)[0],
               "reward_space_winners_mean": _mean_se(winners)[0],
               "reward_vector_size": max(map(len, logged_vectors))
               if logged_vectors else None}
        steps.append(row)
        ranked = np.lexsort((r, g))   # rewards sorted within each group, for best@k
        for k in (default_ks(int(n_r.max()) if len(n_r) else 0) if ks is None else ks):
            usable = n_r >= k
            if not usable.any():
                continue
            p_mean, p_se = _mean_se(pass_at_k(n_r[usable], c_r[usable].astype(np.int64), k))
            b_mean, b_se = _mean_se(_best_at_k_groups(r[ranked], starts[usable],
                                                      n_r[usable], k))
            passes.append({"step": row["step"], "split": split, "k": int(k),
                           "prompts": int(usable.sum()), "pass_at_k": p_mean,
                           "pass_at_k_se": p_se, "best_at_k": b_mean, "best_at_k_se": b_se})
    return steps, passes


def _is_vector(value) -> bool:
    """Whether a ``reward_vector`` cell holds a vector (pandas hands a missing one over as
    None or NaN)."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _group_winners(codes: np.ndarray, vectors: list, texts: list, groups: int,
                   rng: np.random.Generator, draws: int) -> list[int]:
    """:func:`_winners` of each group in order (one generator, drawn group after group)."""
    members: list[list[int]] = [[] for _ in range(groups)]
    for row, code in enumerate(codes):
        if code >= 0:
            members[code].append(row)
    won = (_winners([vectors[i] for i in rows], [texts[i] for i in rows], rng, draws)
           for rows in members)
    return [w for w in won if w is not None]


# -- result -------------------------------------------------------------------------------

@dataclass
class Diversity:
    """Result of :func:`diversity`.

    Attributes
    ----------
    steps : pandas.DataFrame
        :data:`STEP_COLUMNS`: one row per run, step and split (``entropy`` is the step's
        training policy entropy, null without tokens).
    pass_at_k : pandas.DataFrame
        :data:`PASS_COLUMNS`: one row per run, step, split and k (groups with at least k
        rewarded completions; standard errors over groups).
    correct : float
        Reward threshold of a correct completion.
    answer_rule : str
        How final answers were read.
    draws, seed : int
        Weightings per group of the reward-space diversity and their seed.
    skipped : list of str
    """

    steps: pd.DataFrame
    pass_at_k: pd.DataFrame
    correct: float = CORRECT
    answer_rule: str = answer_rule(None)
    draws: int = DRAWS
    seed: int = SEED
    skipped: list[str] = field(default_factory=list)

    def run_rows(self, run: str) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``steps`` and ``pass_at_k`` of one run."""
        return (self.steps[self.steps["run"] == run],
                self.pass_at_k[self.pass_at_k["run"] == run])

    def run_steps(self, run: str) -> list[dict]:
        """The ``steps`` list of one run in :meth:`to_dict`."""
        steps, passes = self.run_rows(run)
        passes = _records(passes)
        out = []
        for row in _records(steps):
            mine = [p for p in passes if p["step"] == row["step"] and p["split"] == row["split"]]
            item = {k: row[k] for k in STEP_COLUMNS if k != "run"}
            for key in ("pass_at_k", "pass_at_k_se", "best_at_k"):
                item[key] = {str(p["k"]): p[key] for p in mine}
            out.append(item)
        return out

    def to_dict(self) -> dict:
        """The JSON of ``entropylens diversity --json``."""
        return {"correct": self.correct, "answer_rule": self.answer_rule,
                "reward_space": {"draws": self.draws, "seed": self.seed,
                                 "weights": "Dirichlet(1)"},
                "runs": [{"run": run, "steps": self.run_steps(run)}
                         for run in pd.unique(self.steps["run"])],
                "skipped": list(self.skipped)}


def diversity_plan(store: Store, run: str, *, k=None, answer_regex: str | None = None,
                   correct: float = CORRECT, draws: int = DRAWS, seed: int = SEED,
                   engine: str = "local", **engine_options) -> Plan:
    """One run's ``(steps, pass_at_k)`` frames of :func:`diversity`, as a plan."""
    ks, pattern = parse_ks(k), compile_answer_regex(answer_regex)
    step_rows, pass_rows = [], []
    for table in step_batches(store, run, _READ_COLUMNS):
        frame = table.to_pandas()
        for _, one_step in frame.groupby(frame["step"].isna(), sort=False):
            s, p = group_stats(one_step, ks=ks, correct=correct, pattern=pattern,
                               draws=draws, seed=seed)
            step_rows += s
            pass_rows += p
    if not step_rows:
        raise EntropylensError(f"run {run!r} has no completions (sequences): diversity needs "
                               "one row per completion with its group_id and reward",
                               path=store.run_dir(run))
    steps = pd.DataFrame(step_rows)
    steps.insert(0, "run", run)
    steps["step"] = steps["step"].astype("Int64")
    entropy = pd.DataFrame(columns=["step", "entropy"])
    if store.manifest(run).get("counts", {}).get("tokens"):
        try:
            curve = yield from policy_entropy_plan(store, run, engine=engine, **engine_options)
            entropy = curve[["step", "entropy"]]
        except EntropylensError:
            pass   # only inference or validation tokens: no training entropy to show
    steps = steps.merge(entropy.astype({"step": "Int64"}), on="step", how="left")
    passes = pd.DataFrame(pass_rows, columns=PASS_COLUMNS[1:])
    passes.insert(0, "run", run)
    passes["step"] = passes["step"].astype("Int64")
    return steps.reindex(columns=STEP_COLUMNS), passes


def diversity_from_parts(parts: Sequence[tuple], *, skipped: Sequence[str] = (),
                         answer_regex: str | None = None, correct: float = CORRECT,
                         draws: int = DRAWS, seed: int = SEED, **_) -> Diversity:
    """The :class:`Diversity` of runs from their :func:`diversity_plan` results."""
    return Diversity(steps=pd.concat([p[0] for p in parts], ignore_index=True),
                     pass_at_k=pd.concat([p[1] for p in parts], ignore_index=True),
                     correct=float(correct), answer_rule=answer_rule(answer_regex),
                     draws=int(draws), seed=int(seed), skipped=list(skipped))


# -- narrowing: early versus late checkpoints ---------------------------------------------

def _window_change(passes: pd.DataFrame, k: int, split: str) -> dict | None:
    """pass@k of the first and last quarter of a split's steps (at least one step each),
    pooled over their groups, with the standard error of each mean."""
    rows = passes[(passes["k"] == k) & (passes["split"] == split)].dropna(subset=["step"])
    steps = sorted(rows["step"].unique())
    if len(steps) < 2:
        return None
    width = max(1, len(steps) // 4)
    early, late = rows[rows["step"].isin(steps[:width])], rows[rows["step"].isin(steps[-width:])]

    def pooled(part):   # mean of group means weighted by groups; SE from the per-step SEs
        w = part["prompts"].to_numpy(float)
        mean = float(np.average(part["pass_at_k"], weights=w))
        se = float(np.sqrt(np.sum((w / w.sum()) ** 2 * part["pass_at_k_se"] ** 2)))
        return mean, se

    (a, a_se), (b, b_se) = pooled(early), pooled(late)
    diff_se = math.hypot(a_se, b_se)
    return {"k": k, "from": a, "to": b, "from_se": a_se, "to_se": b_se,
            "from_steps": [int(steps[0]), int(steps[width - 1])],
            "to_steps": [int(steps[-width]), int(steps[-1])],
            "significant": bool(diff_se > 0 and abs(b - a) > Z * diff_se)}


def narrowing(result: Diversity, run: str, split: str = "train") -> dict | None:
    """Whether ``run`` narrows: pass@1 against pass@K (K the largest k every step has)
    between the first and last quarter of its steps.

    Returns
    -------
    dict or None
        ``verdict`` (``"narrowing"``, ``"widening"``, ``"both rising"``, ``"both falling"``,
        ``"inconclusive"``), ``pass1`` and ``passk`` changes (``from``, ``to``, their standard
        errors, step windows, ``significant``); None with fewer than two steps or k values.
    """
    _, passes = result.run_rows(run)
    passes = passes[passes["split"] == split]
    if passes.empty:
        return None
    per_step = passes.groupby("step")["k"].max()
    k_max = int(per_step.min()) if len(per_step) else 1
    if k_max < 2:
        return None
    one, many = _window_change(passes, 1, split), _window_change(passes, k_max, split)
    if one is None or many is None:
        return None
    up1, upk = one["to"] > one["from"], many["to"] > many["from"]
    if not (one["significant"] and many["significant"]):
        verdict = "inconclusive"
    elif up1 and not upk:
        verdict = "narrowing"
    elif upk and not up1:
        verdict = "widening"
    else:
        verdict = "both rising" if up1 else "both falling"
    return {"split": split, "verdict": verdict, "pass1": one, "passk": many}


class DiversityAnalysis(Analysis):
    """Registered form of :func:`diversity` (see :mod:`entropylens.analysis.registry`)."""

    name = "diversity"
    title = "Diversity across samples: pass@k, distinct answers, learning signal"
    needs = ("sequences",)
    order = 70

    def plan(self, store: Store, run: str, inputs, **options) -> Plan:
        return diversity_plan(store, run, **options)

    def combine(self, parts, *, skipped=(), **options) -> Diversity:
        return diversity_from_parts(list(parts), skipped=skipped, **options)

    def figures(self, result: Diversity, run: str) -> list[FigureSpec]:
        from ..plots import diversity_steps, pass_at_k_curves

        steps, passes = result.run_rows(run)
        figures = []
        for split in sorted(passes["split"].unique()):
            rows = passes[passes["split"] == split]
            figures.append(FigureSpec(
                f"pass-at-k-{split}", f"{run}: pass@k of {split} samples",
                "Unbiased pass@k (Chen et al. 2021) against k (log axis), one line per "
                "checkpoint, darker later.",
                lambda ax, rows=rows, split=split: pass_at_k_curves(rows, run=run, split=split,
                                                                    ax=ax)))
        if steps.empty:
            return figures
        for kind, column, title, caption in (
                ("distinct-answers", "distinct_answers_mean", "distinct final answers",
                 "Mean distinct final answers among a prompt's samples, per step and split."),
                ("zero-variance", "zero_variance_share", "zero-variance groups",
                 "Share of prompt groups whose rewards are all equal (no GRPO signal), per "
                 "step and split."),
                ("split-variance", "correctness_variance_mean", "variance of correctness",
                 "Per-prompt variance of correctness p(1-p) by split (train against "
                 "inference), with the training policy entropy (dotted).")):
            if steps[column].notna().any():
                figures.append(FigureSpec(
                    kind, f"{run}: {title}", caption,
                    lambda ax, column=column: diversity_steps(
                        steps, y=column, run=run, entropy=column.startswith("correctness"),
                        ax=ax)))
        return figures

    def section(self, result: Diversity, run: str) -> dict:
        steps, passes = result.run_rows(run)
        splits = []
        for split, rows in steps.groupby("split", sort=True):
            splits.append({"split": split, "steps": int(rows["step"].notna().sum()),
                           "prompts": int(rows["prompts"].sum()),
                           "correctness_variance_mean": _finite_mean(
                               rows["correctness_variance_mean"]),
                           "answer_entropy_mean": _finite_mean(rows["answer_entropy_mean"]),
                           "distinct_answers_mean": _finite_mean(rows["distinct_answers_mean"]),
                           "zero_variance_share": _finite_mean(rows["zero_variance_share"])})
        every = result.run_steps(run)
        highlights = []
        for split in sorted({row["split"] for row in every}):
            mine = [row for row in every if row["split"] == split]
            highlights += [mine[0]] + ([mine[-1]] if len(mine) > 1 else [])
        return {"correct": result.correct, "answer_rule": result.answer_rule,
                "narrowing": narrowing(result, run), "splits": splits,
                "reward_vectors": bool(steps["reward_vector_size"].notna().any()),
                "highlights": highlights, "steps": every}

    def findings(self, result: Diversity, run: str) -> list[Finding]:
        found = narrowing(result, run)
        if found is None:
            return []
        one, many = found["pass1"], found["passk"]
        k = many["k"]
        numbers = {"pass1_from": one["from"], "pass1_to": one["to"], "passk_from": many["from"],
                   "passk_to": many["to"], "k": k, "pass1_se": [one["from_se"], one["to_se"]],
                   "passk_se": [many["from_se"], many["to_se"]]}
        link = "while" if found["verdict"] in ("narrowing", "widening", "inconclusive") \
            else "and"
        change = (f"pass@1 {'rose' if one['to'] > one['from'] else 'fell'} from "
                  f"{one['from']:.3f} to {one['to']:.3f} {link} pass@{k} "
                  f"{'rose' if many['to'] > many['from'] else 'fell'} from {many['from']:.3f} "
                  f"to {many['to']:.3f} (steps {one['from_steps'][0]}-{one['from_steps'][1]} "
                  f"against {one['to_steps'][0]}-{one['to_steps'][1]})")
        if found["verdict"] == "narrowing":
            return [Finding("diversity", f"{change}: RL is narrowing the policy.",
                            severity="warning", tier="key", numbers=numbers)]
        if found["verdict"] == "inconclusive":
            return [Finding("diversity", f"{change}; inconclusive: the changes are within "
                            f"{Z:g} standard errors over prompt groups.", numbers=numbers)]
        return [Finding("diversity", f"{change}: {found['verdict']}.", severity="info",
                        numbers=numbers)]


def _finite_mean(values: pd.Series) -> float | None:
    values = pd.to_numeric(values, errors="coerce").dropna()
    return float(values.mean()) if len(values) else None


register(DiversityAnalysis())


def diversity(store: Store | str, runs: str | Sequence[str] | None = None, *,
              k: str | Sequence[int] | None = None, answer_regex: str | None = None,
              correct: float = CORRECT, draws: int = DRAWS, seed: int = SEED,
              engine: str = "local", workers: int | None = None,
              **engine_options) -> Diversity:
    """Diversity of each step's samples per prompt: pass@k, best@k, distinct answers, signal.

    Parameters
    ----------
    store : Store or path
    runs : str or sequence of str, optional
        Default: every run; runs without completions are left out (a single one raises).
    k : str or sequence of int, optional
        The k of pass@k and best@k (``"1,2,4"``); default the powers of two up to the
        largest group of the step.
    answer_regex : str, optional
        Regular expression with one group that captures the final answer (last match);
        default the last ``\\boxed{...}``, else the last number.
    correct : float
        A completion is correct when its reward is at least this.
    draws, seed : int
        Dirichlet(1) weightings of a reward vector per group, and their seed.
    engine : {"local", "ray"}
        Engine of the token scan for the training entropy next to each step.
    workers : int, optional

    Returns
    -------
    Diversity
    """
    parse_ks(k), compile_answer_regex(answer_regex)   # bad options fail once, not per run
    return run_analysis("diversity", open_store(store), runs, engine=engine, workers=workers,
                        k=k, answer_regex=answer_regex, correct=correct, draws=draws,
                        seed=seed, **engine_options)


# -- two evaluations of one checkpoint (e.g. two temperatures) ----------------------------

COMPARE_COLUMNS = ["step", "split", "k", "pass_at_k_a", "pass_at_k_b", "difference",
                   "difference_se", "significant"]


@dataclass
class DiversityComparison:
    """Result of :func:`diversity_compare`: run ``b`` against run ``a``, step by step.

    Attributes
    ----------
    run_a, run_b : str
    diversity : Diversity
        Both runs' own results.
    pass_at_k : pandas.DataFrame
        :data:`COMPARE_COLUMNS`: per step, split and k both runs have, pass@k of each, the
        difference ``b - a``, its standard error (the two runs' group SEs in quadrature) and
        whether it exceeds :data:`Z` of them.
    steps : pandas.DataFrame
        ``step, split`` and, for ``a`` and ``b``, ``distinct_answers_mean``,
        ``correctness_variance_mean``, ``answer_entropy_mean``.
    """

    run_a: str
    run_b: str
    diversity: Diversity
    pass_at_k: pd.DataFrame
    steps: pd.DataFrame

    def to_dict(self) -> dict:
        """The JSON of ``entropylens diversity --run A --run B --compare --json``: that of
        the two runs plus ``comparison``."""
        out = self.diversity.to_dict()
        out["comparison"] = {"run_a": self.run_a, "run_b": self.run_b,
                             "pass_at_k": _records(self.pass_at_k),
                             "steps": _records(self.steps)}
        return out


_COMPARED = ["distinct_answers_mean", "correctness_variance_mean", "answer_entropy_mean"]


def compare_runs(result: Diversity, run_a: str, run_b: str) -> DiversityComparison:
    """Compare two runs of a :class:`Diversity` (see :func:`diversity_compare`)."""
    keys = ["step", "split"]
    (sa, pa_), (sb, pb) = result.run_rows(run_a), result.run_rows(run_b)
    both = pa_.merge(pb, on=keys + ["k"], suffixes=("_a", "_b"))
    if both.empty:
        raise EntropylensError(f"runs {run_a!r} and {run_b!r} share no step, split and k to "
                               "compare (an evaluation without steps matches one without)")
    both["difference"] = both["pass_at_k_b"] - both["pass_at_k_a"]
    both["difference_se"] = np.hypot(both["pass_at_k_se_a"], both["pass_at_k_se_b"])
    both["significant"] = (both["difference_se"] > 0) & \
        (both["difference"].abs() > Z * both["difference_se"])
    steps = sa[keys + _COMPARED].merge(sb[keys + _COMPARED], on=keys, suffixes=("_a", "_b"))
    return DiversityComparison(run_a, run_b, result, both[COMPARE_COLUMNS].reset_index(
        drop=True), steps.reset_index(drop=True))


def diversity_compare(store: Store | str, run_a: str, run_b: str, **options
                      ) -> DiversityComparison:
    """Two evaluation runs of one checkpoint (e.g. two temperatures), side by side.

    Parameters
    ----------
    store : Store or path
    run_a, run_b : str
        Runs whose steps and splits match (rows without a step match each other).
    **options
        Those of :func:`diversity` (``k``, ``answer_regex``, ``correct``, ``engine``, ...).

    Returns
    -------
    DiversityComparison
    """
    return compare_runs(diversity(store, [run_a, run_b], **options), run_a, run_b)
