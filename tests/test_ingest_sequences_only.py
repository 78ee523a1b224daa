"""verl_rollout and trl_completions: text-only sources into the sequences table."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import entropylens as el
from entropylens.errors import FormatError
from entropylens.ingest import detect

from _ingest_helpers import FIXTURES, ingest_one, real_sequences

VERL = FIXTURES / "verl_rollout"
TRL = FIXTURES / "trl" / "completions"


def test_verl_rollout_dumps(tmp_path):
    for path in (VERL / "rollout" / "1.jsonl", VERL / "validation" / "2.jsonl"):
        assert detect(path).name == "verl_rollout"
    tokens, sequences, manifest = ingest_one(VERL, tmp_path)
    seq = real_sequences()
    assert tokens.empty and manifest["counts"]["sequences"] == len(seq)
    sequences = sequences.sort_values(["step", "sample_id"], key=lambda c: c.astype(int)) \
        .reset_index(drop=True)
    assert sequences["completion"].tolist() == seq["completion"].tolist()
    assert sequences["prompt"].tolist() == seq["prompt"].tolist()
    np.testing.assert_allclose(sequences["reward"], seq["reward"])
    assert sequences["step"].tolist() == (seq["step"] + 1).tolist()
    assert sequences.loc[sequences.step == 1, "split"].eq("train").all()
    assert sequences.loc[sequences.step == 2, "split"].eq("val").all()
    extra = json.loads(sequences["extra"].iloc[0])
    assert set(extra) == {"gts", "acc", "kind"} and extra["gts"] == str(seq["answer"].iloc[0])


def test_verl_bad_score_names_line_and_field(tmp_path):
    lines = (VERL / "rollout" / "1.jsonl").read_text().splitlines()
    record = json.loads(lines[2])
    record["score"] = "high"
    path = tmp_path / "5.jsonl"
    path.write_text("\n".join(lines[:2] + [json.dumps(record)]) + "\n")
    with pytest.raises(FormatError) as info:
        el.ingest(path, tmp_path / "s", run="r", progress=False)
    assert info.value.line == 3 and info.value.field == "score"


def test_trl_completions_rewards_and_conversations(tmp_path):
    for name in ("completions_00001.parquet", "completions_00002.parquet"):
        assert detect(TRL / name).name == "trl_completions"
    _, sequences, manifest = ingest_one(TRL, tmp_path)
    first = pd.read_parquet(TRL / "completions_00001.parquet")
    got = sequences[sequences.step == 1].sort_values("sample_id", key=lambda c: c.astype(int))
    # reward = the sum of the reward-function columns, skipping None (TRL's nansum)
    expected = first["correctness_reward"] + first["format_reward"].fillna(0)
    np.testing.assert_allclose(got["reward"], expected)
    np.testing.assert_allclose(got["advantage"], first["advantage"])
    assert got["completion"].tolist() == first["completion"].tolist()
    extra = json.loads(got["extra"].iloc[2])
    assert extra["format_reward"] is None and extra["kind"] == first["kind"].iloc[2]
    # the completions of one prompt share a group (first row of that prompt)
    groups = got.groupby("prompt")["group_id"].nunique()
    assert (groups == 1).all() and got["group_id"].nunique() == first["prompt"].nunique()
    second = sequences[sequences.step == 2]
    seq = real_sequences(steps=[1])
    assert sorted(second["completion"]) == sorted(seq["completion"])
    assert json.loads(second["prompt"].iloc[0])[0]["role"] == "user"
    assert set(sequences["split"]) == {"train"}
    assert manifest["notes"]["reward_columns"] == ["correctness_reward", "format_reward"]
