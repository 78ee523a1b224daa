"""sglang_native: /generate responses made from the real run, as SGLang writes them."""

from __future__ import annotations

import json

import numpy as np
import pytest

import entropylens as el
from entropylens.errors import FormatError
from entropylens.ingest import detect

from _ingest_helpers import FIXTURES, ingest_one, real_sequences, real_tokens

SOURCE = FIXTURES / "sglang" / "generate.jsonl"


def test_tokens_and_alternatives_match_the_run(tmp_path):
    assert detect(SOURCE).name == "sglang_native"
    tokens, sequences, manifest = ingest_one(SOURCE, tmp_path)
    truth = real_tokens(steps=[0])
    truth["sample_id"] = [f"req-{p}-{s}" for p, s in zip(truth.prompt_idx, truth.sample_idx)]
    truth = truth.sort_values(["sample_id", "position"]).reset_index(drop=True)
    assert len(tokens) == len(truth)
    assert tokens["sample_id"].tolist() == truth["sample_id"].tolist()
    np.testing.assert_array_equal(tokens["token_id"], truth["token_id"])
    np.testing.assert_allclose(tokens["logprob"], truth["logprob"], rtol=1e-6)
    # text only where return_text_in_logprobs was on (even samples)
    with_text = truth.sample_idx % 2 == 0
    assert tokens["token"][with_text.to_numpy()].tolist() == truth["token"][with_text].tolist()
    assert tokens["token"][~with_text.to_numpy()].isna().all()
    for got, want in zip(tokens.itertuples(), truth.itertuples()):
        if want.sample_idx == 3 and want.position == 0:
            assert got.top_ids is None  # no top logprobs at that position
            continue
        assert got.top_ids.tolist() == [int(i) for i in want.top_ids]
        np.testing.assert_allclose(got.top_logprobs, want.top_logprobs, rtol=1e-6)
    assert set(tokens["split"]) == {"inference"} and tokens["step"].isna().all()
    assert manifest["logprob_basis"] == "tempered" and manifest["top_k"] == 5
    seq = real_sequences(steps=[0])
    seq["sample_id"] = [f"req-{p}-{s}" for p, s in zip(seq.prompt_idx, seq.sample_idx)]
    got = sequences.set_index("sample_id")
    assert got.loc[seq.sample_id, "completion"].tolist() == seq["completion"].tolist()
    assert set(got["finish_reason"]) <= {"stop", "length"}


def test_batch_line_holds_two_responses(tmp_path):
    lines = SOURCE.read_text().splitlines()
    assert isinstance(json.loads(lines[-1]), list)
    tokens, _, _ = ingest_one(SOURCE, tmp_path)
    ids = [r["meta_info"]["id"] for r in json.loads(lines[-1])]
    assert set(ids) <= set(tokens["sample_id"])


def test_misaligned_top_logprobs_are_rejected(tmp_path):
    record = json.loads(SOURCE.read_text().splitlines()[0])
    record["meta_info"]["output_top_logprobs"].pop()
    path = tmp_path / "bad.jsonl"
    path.write_text(SOURCE.read_text().splitlines()[1] + "\n" + json.dumps(record) + "\n")
    with pytest.raises(FormatError) as info:
        el.ingest(path, tmp_path / "s", run="r", progress=False)
    assert info.value.line == 2 and "output_top_logprobs" in str(info.value)
    _, _, manifest = ingest_one(path, tmp_path, on_error="skip")
    assert manifest["rejected"]["count"] == 1
