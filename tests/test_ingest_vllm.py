"""vllm_offline: the real printed repr, JSON dumps and from_vllm() on duck-typed objects."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

import entropylens as el
from entropylens.errors import FormatError
from entropylens.ingest import detect, from_vllm
from entropylens.ingest.vllm import dump_request_outputs

from _ingest_helpers import FIXTURES, ingest_one, real_sequences, real_tokens


def _make_fixtures():
    spec = importlib.util.spec_from_file_location("make_fixtures",
                                                  FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_real_repr_sample(tmp_path, shared_samples):
    source = shared_samples / "vllm_offline_logprobs_repr.txt"
    assert detect(source).name == "vllm_offline"
    tokens, sequences, manifest = ingest_one(source, tmp_path)
    first = tokens[tokens.sample_id == "line2:0"]
    assert first["token_id"].tolist() == [785, 4462, 594, 2400]
    assert first["token"].tolist() == ["The", " member", "'s", " date"]
    assert first["logprob"].tolist() == [0.0] * 4
    # top 5 by rank; the -inf alternatives become nulls, counted in the manifest
    assert first["top_ids"].iloc[0].tolist() == [785, 2, 0, 3, 1]
    assert first["top_tokens"].iloc[0].tolist() == ["The", "#", "!", "$", '"']
    assert all(math.isnan(v) for v in first["top_logprobs"].iloc[0][1:])
    assert manifest["counts"]["sentinel_top_logprobs"] == 16
    # old-style prompt logprobs: null first position, k+1 entries when the token is not top-1
    second = tokens[tokens.sample_id == "line4:0"].reset_index(drop=True)
    assert math.isnan(second["logprob"].iloc[0]) and second["top_ids"].iloc[0] is None
    assert second["token_id"].tolist()[1:] == [15043, 29892, 590, 1024, 338]
    assert second["logprob"].iloc[1] == pytest.approx(-7.584228515625)
    assert second["top_ids"].iloc[1].tolist() == [917]  # 15043 was added: not in the top 1
    assert second["top_ids"].iloc[3].tolist() == [306]
    assert second["top_ids"].iloc[2].tolist() == [29892]
    assert manifest["top_k"] == 5 and manifest["logprob_basis"] == "raw"
    assert len(sequences) == 2


def test_json_dump_matches_the_run_it_was_made_from(tmp_path):
    source = FIXTURES / "vllm" / "outputs.jsonl"
    assert detect(source).name == "vllm_offline"
    tokens, sequences, manifest = ingest_one(source, tmp_path)
    truth = real_tokens(steps=[0])
    assert len(tokens) == len(truth)
    np.testing.assert_array_equal(tokens["token_id"], truth["token_id"])
    np.testing.assert_allclose(tokens["logprob"], truth["logprob"], rtol=1e-6)
    assert tokens["sample_id"].tolist() == [f"{p}:{s}" for p, s in
                                            zip(truth.prompt_idx, truth.sample_idx)]
    assert tokens["group_id"].tolist() == [str(p) for p in truth.prompt_idx]
    assert (tokens["step"] == 0).all()
    inf_row = (truth.prompt_idx == 1) & (truth.sample_idx == 0) & (truth.position == 0)
    for got, want, special in zip(tokens.itertuples(), truth.itertuples(), inf_row):
        # the top 5 by rank, the sampled token's extra entry (rank 6) dropped
        assert got.top_ids.tolist() == [int(i) for i in want.top_ids]
        if special:
            assert all(math.isnan(v) for v, i in zip(got.top_logprobs, got.top_ids)
                       if i != want.token_id)
            continue
        np.testing.assert_allclose(got.top_logprobs, want.top_logprobs, rtol=1e-6)
    assert manifest["top_k"] == 5
    seq = real_sequences(steps=[0])
    assert sequences["completion"].tolist() == seq["completion"].tolist()
    assert sequences["num_tokens"].tolist() == truth.groupby(
        ["prompt_idx", "sample_idx"]).size().tolist()


def test_from_vllm_objects_equal_the_json_dump(tmp_path):
    fixtures = _make_fixtures()
    requests = fixtures.vllm_request_outputs(real_tokens(), real_sequences())
    run = from_vllm(requests, tmp_path / "objects", run="v", step=0, temperature=1.0)
    direct = el.open(tmp_path / "objects")
    el.ingest(FIXTURES / "vllm" / "outputs.jsonl", tmp_path / "dump", run="v", progress=False)
    dumped = el.open(tmp_path / "dump")
    assert direct.read_tokens(run).equals(dumped.read_tokens("v"))
    assert direct.read_sequences(run).equals(dumped.read_sequences("v"))
    manifest = direct.manifest(run)
    assert manifest["temperature"] == 1.0 and manifest["logprob_basis"] == "raw"
    assert manifest["counts"]["sentinel_top_logprobs"] == \
        dumped.manifest("v")["counts"]["sentinel_top_logprobs"] > 0


def test_dump_round_trip_writes_minus_infinity(tmp_path):
    fixtures = _make_fixtures()
    requests = fixtures.vllm_request_outputs(real_tokens(), real_sequences())
    path = dump_request_outputs(requests[1:], tmp_path / "out.jsonl")
    record = json.loads(path.read_text().splitlines()[0])
    assert record["request_id"] == "1"
    assert "-Infinity" in path.read_text()
    assert set(record["outputs"][0]["logprobs"][0]) >= {str(i) for i in
                                                        record["outputs"][0]["token_ids"][:1]}


def test_from_vllm_bad_object_writes_nothing(tmp_path):
    class Output:
        index, text, finish_reason = 0, "x", "stop"
        token_ids = [1, 2]
        logprobs = [{1: None}]  # one position for two tokens

    class Request:
        request_id, prompt, outputs = "r", "p", [Output()]

    with pytest.raises(FormatError, match="request output 1"):
        from_vllm([Request()], tmp_path / "s", run="bad")
    assert "bad" not in el.open(tmp_path / "s").runs()


def test_bad_json_record_is_rejected_with_its_line(tmp_path):
    good = (FIXTURES / "vllm" / "outputs.jsonl").read_text().splitlines()[0]
    path = tmp_path / "dump.jsonl"
    bad = json.loads(good)
    bad["outputs"][0]["logprobs"][0] = {"not-an-id": {"logprob": -1.0}}
    path.write_text(good + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(FormatError) as info:
        el.ingest(path, tmp_path / "s", run="r", format="vllm_offline", progress=False)
    assert info.value.line == 2 and info.value.field == "outputs"
    tokens, _, manifest = ingest_one(path, tmp_path, on_error="skip")
    assert manifest["rejected"]["count"] == 1 and tokens["group_id"].unique().tolist() == ["0"]
