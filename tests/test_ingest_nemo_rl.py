"""nemo_rl: train_data_step<N>.jsonl written as NeMo-RL's logger writes it."""

from __future__ import annotations

import json

import numpy as np
import pytest

import entropylens as el
from entropylens.errors import FormatError
from entropylens.ingest import detect

from _ingest_helpers import FIXTURES, ingest_one, real_sequences, real_tokens

FOLDER = FIXTURES / "nemo_rl"


@pytest.mark.slow
def test_steps_masks_and_padding(tmp_path):
    for name in ("train_data_step1.jsonl", "train_data_step2.jsonl"):
        assert detect(FOLDER / name).name == "nemo_rl"
    tokens, sequences, manifest = ingest_one(FOLDER, tmp_path)
    truth = real_tokens()
    # idx is the sample's index in its step's batch (prompt-major order)
    truth["sample_id"] = (truth.prompt_idx * 4 + truth.sample_idx).astype(str)
    truth["step"] = truth["step"] + 1  # NeMo-RL counts steps from 1
    truth = truth.sort_values(["step", "sample_id", "position"]).reset_index(drop=True)
    assert len(tokens) == len(truth)  # prompt and padding positions are masked out
    assert tokens["sample_id"].tolist() == truth["sample_id"].tolist()
    np.testing.assert_array_equal(tokens["step"], truth["step"])
    np.testing.assert_array_equal(tokens["token_id"], truth["token_id"])
    assert tokens["position"].tolist() == truth["position"].tolist()
    np.testing.assert_allclose(tokens["logprob"], truth["logprob"], rtol=1e-6)
    seq = real_sequences()
    advantage = {(s + 1, str(p * 4 + k)): a for s, p, k, a in
                 zip(seq.step, seq.prompt_idx, seq.sample_idx, seq.advantage)}
    np.testing.assert_allclose(tokens["advantage"],
                               [advantage[(s, i)] for s, i in zip(tokens.step, tokens.sample_id)],
                               rtol=1e-6)
    assert manifest["logprob_basis"] == "tempered"
    assert sorted(sequences["reward"]) == sorted(seq["reward"])
    assert json.loads(sequences["extra"].iloc[0])["content"].startswith("Tom has")


def test_input_length_beyond_the_arrays_is_rejected(tmp_path):
    lines = (FOLDER / "train_data_step1.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    record["input_lengths"] = [10_000]
    path = tmp_path / "train_data_step7.jsonl"
    path.write_text(json.dumps(record) + "\n" + lines[1] + "\n")
    with pytest.raises(FormatError) as info:
        el.ingest(path, tmp_path / "s", run="r", progress=False)
    assert info.value.line == 1 and info.value.field == "input_lengths"
    tokens, _, manifest = ingest_one(path, tmp_path, on_error="skip")
    assert manifest["rejected"]["count"] == 1 and set(tokens["step"]) == {7}
