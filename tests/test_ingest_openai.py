"""openai_chat and openai_completion: real API examples and producer-faithful fixtures."""

from __future__ import annotations

import gzip
import json
import math
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

import entropylens as el
from entropylens.cli import app
from entropylens.errors import FormatError
from entropylens.ingest import openai as openai_format
from entropylens.ingest.driver import IngestContext, IngestOptions

from _ingest_helpers import FIXTURES, ingest_one, real_tokens

OPENAI = FIXTURES / "openai"


def test_real_chat_example_is_read_value_for_value(tmp_path, shared_samples):
    source = shared_samples / "openai_chat_completion_logprobs.json"
    tokens, sequences, manifest = ingest_one(source, tmp_path)
    raw = json.loads(source.read_text())
    content = raw["choices"][0]["logprobs"]["content"]
    assert tokens["token"].tolist() == [c["token"] for c in content]
    np.testing.assert_allclose(tokens["logprob"], [c["logprob"] for c in content], rtol=1e-6)
    for row, c in zip(tokens.itertuples(), content):
        assert list(row.top_tokens) == [a["token"] for a in c["top_logprobs"]]
        np.testing.assert_allclose(row.top_logprobs, [a["logprob"] for a in c["top_logprobs"]],
                                   rtol=1e-6)
    assert tokens["position"].tolist() == list(range(len(content)))
    assert set(tokens["sample_id"]) == {"chatcmpl-123:0"}
    assert set(tokens["split"]) == {"inference"} and tokens["step"].isna().all()
    assert sequences["completion"].tolist() == [raw["choices"][0]["message"]["content"]]
    assert manifest["logprob_basis"] == "raw" and manifest["top_k"] == 2
    assert manifest["sources"][0]["format"] == "openai_chat"


def _expected_top(row):
    """The alternatives behind vLLM's chat list, the first 5 of {sampled, rank 1, ...}, most
    likely first: ranks 1-5 when the sampled token ranks 1-5; ranks 1-4 and the sampled token
    when it ranks below (every row has k = 5 entries, so none is dropped: each is a real token
    with its true logprob)."""
    ids = [int(i) for i in row.top_ids]
    sampled = int(row.token_id)
    return ids[:5] if sampled in ids[:5] else ids[:4] + [sampled]


def test_vllm_chat_extras_sentinels_and_sampled_first_order(tmp_path):
    tokens, sequences, manifest = ingest_one(OPENAI / "vllm_chat_token_ids.jsonl", tmp_path)
    truth = real_tokens(steps=[0])
    truth = truth[truth.prompt_idx == 0].reset_index(drop=True)
    assert len(tokens) == len(truth)
    # tokens written as token_id:N give the ids and no text
    np.testing.assert_array_equal(tokens["token_id"], truth["token_id"])
    assert tokens["token"].isna().all()
    assert tokens["sample_id"].tolist() == [f"chatcmpl-{s}:0" for s in truth.sample_idx]
    for got, want in zip(tokens.itertuples(), truth.itertuples()):
        if want.sample_idx == 1 and want.position == 0:
            continue  # alternatives set to -inf, checked below
        assert list(got.top_ids) == _expected_top(want)
        expected = dict(zip(map(int, want.top_ids), want.top_logprobs))
        expected.setdefault(int(want.token_id), want.logprob)
        np.testing.assert_allclose(got.top_logprobs, [expected[i] for i in got.top_ids],
                                   rtol=1e-6)
    # the -9999.0 sentinel becomes null and is counted, never a number
    sentinel = tokens[(tokens.sample_id == "chatcmpl-2:0") & (tokens.position == 1)]
    assert sentinel["logprob"].isna().all()
    first = tokens[(tokens.sample_id == "chatcmpl-1:0") & (tokens.position == 0)].iloc[0]
    assert first.top_logprobs[0] == pytest.approx(truth.loc[
        (truth.sample_idx == 1) & (truth.position == 0), "logprob"].iloc[0], rel=1e-6)
    assert all(math.isnan(v) for v in first.top_logprobs[1:])
    counts = manifest["counts"]
    assert counts["sentinel_logprobs"] == 1 and counts["null_logprobs"] == 1
    assert counts["sentinel_top_logprobs"] == len(first.top_logprobs) - 1
    others = tokens[tokens.logprob.notna()]
    assert (others["logprob"] > -9999).all()
    assert sequences["num_tokens"].tolist() == truth.groupby("sample_idx").size().tolist()


def test_unicode_tokens_keep_their_text_and_completions_decode_the_bytes(tmp_path):
    tokens, sequences, _ = ingest_one(OPENAI / "unicode_chat.jsonl", tmp_path)
    first = tokens[tokens.sample_id == "chatcmpl-u1:0"]
    # per-token text as the API wrote it (escapes for partial UTF-8 bytes)
    assert first["token"].tolist() == ["\\xe6\\x95", "\\xb0", "学", " \\xf0\\x9f", "\\x99\\x82"]
    completions = dict(zip(sequences.sample_id, sequences.completion))
    # no message content: the concatenated bytes decode to the right characters
    assert completions["chatcmpl-u1:0"] == "数学 🙂"
    second = tokens[tokens.sample_id == "chatcmpl-u2:0"]
    assert second["token"].tolist() == ["\ufffd", "\ufffd", "学"]
    assert completions["chatcmpl-u2:0"] == "数学"
    assert first["top_tokens"].iloc[0].tolist() == ["\\xe6\\x95", "数"]


def test_json_array_and_gzip_give_the_same_rows(tmp_path):
    plain, _, _ = ingest_one(OPENAI / "unicode_chat.jsonl", tmp_path / "a")
    array, _, _ = ingest_one(OPENAI / "responses.json", tmp_path / "b")
    packed = tmp_path / "unicode_chat.jsonl.gz"
    with gzip.open(packed, "wb") as fh:
        fh.write((OPENAI / "unicode_chat.jsonl").read_bytes())
    zipped, _, _ = ingest_one(packed, tmp_path / "c")
    for other in (array, zipped):
        assert other.drop(columns=["top_ids"]).equals(plain.drop(columns=["top_ids"]))


def test_stream_chunks_continue_positions(tmp_path):
    tokens, sequences, _ = ingest_one(OPENAI / "stream_chunks.txt", tmp_path)
    assert tokens["sample_id"].unique().tolist() == ["chatcmpl-s:0"]
    assert tokens["position"].tolist() == [0, 1, 2]
    assert tokens["token"].tolist() == ["学", " \\xf0\\x9f", "\\x99\\x82"]
    assert sequences["completion"].tolist() == ["学 🙂"]
    assert sequences["num_tokens"].tolist() == [3]


def test_batch_output_failed_request_stops_or_is_skipped(tmp_path):
    source = OPENAI / "batch_output.jsonl"
    with pytest.raises(FormatError) as info:
        el.ingest(source, tmp_path / "s", run="r", progress=False)
    assert info.value.line == 2 and info.value.path == str(source)
    assert not (tmp_path / "s").exists()  # nothing written
    tokens, _, manifest = ingest_one(source, tmp_path, on_error="skip")
    assert tokens["sample_id"].unique().tolist() == ["task-0:0"]
    assert manifest["rejected"]["count"] == 1
    assert manifest["rejected"]["examples"][0]["line"] == 2


def test_bad_record_names_file_line_and_field(tmp_path):
    source = OPENAI / "bad_record.jsonl"
    with pytest.raises(FormatError) as info:
        el.ingest(source, tmp_path / "s", run="r", progress=False)
    error = info.value
    assert error.line == 2 and "logprob" in error.field and "content[4]" in error.field
    result = CliRunner().invoke(app, ["ingest", str(source), "--out", str(tmp_path / "c")])
    assert result.exit_code == 1
    assert f"{source}:2" in result.output and "Traceback" not in result.output
    tokens, sequences, manifest = ingest_one(source, tmp_path, on_error="skip")
    assert sorted(tokens.sample_id.unique()) == ["chatcmpl-0:0", "chatcmpl-2:0"]
    assert manifest["rejected"]["count"] == 1
    assert "oops" in manifest["rejected"]["examples"][0]["message"] or \
        "logprob" in manifest["rejected"]["examples"][0]["message"]


def test_reader_streams_in_bounded_chunks(tmp_path, monkeypatch):
    from entropylens.ingest import _records

    monkeypatch.setattr(_records, "CHUNK_TOKENS", 100)
    source = OPENAI / "vllm_chat_token_ids.jsonl"
    ctx = IngestContext(source, IngestOptions(), "openai_chat")
    chunks = [c for c in openai_format.read_chat(source, ctx) if c.kind == "tokens"]
    sizes = [c.data.num_rows for c in chunks]
    # a chunk is handed on as soon as 100 tokens are buffered: at most 100 + one response
    lengths = [len(json.loads(line)["choices"][0]["logprobs"]["content"])
               for line in source.read_text().splitlines()]
    assert len(chunks) >= 2 and max(sizes) < 100 + max(lengths)
    assert sum(sizes) == sum(lengths)
    assert [c.row_offset for c in chunks] == list(np.cumsum([0] + sizes[:-1]))


def test_real_legacy_completion_drops_the_echoed_prompt(tmp_path, shared_samples):
    source = shared_samples / "openai_legacy_completion_logprobs.json"
    tokens, sequences, manifest = ingest_one(source, tmp_path)
    raw = json.loads(source.read_text())["choices"][0]
    assert raw["logprobs"]["token_logprobs"][0] is None  # the echoed prompt token
    assert tokens["token"].tolist() == [" crisp"]
    assert tokens["logprob"].iloc[0] == pytest.approx(-12.203847)
    assert tokens["top_tokens"].iloc[0].tolist() == [","]
    assert sequences["completion"].tolist() == [" crisp"]
    assert manifest["notes"]["echoed_prompt_tokens_dropped"] == 1


def test_echo_scoring_keeps_a_null_first_logprob(tmp_path):
    tokens, _, manifest = ingest_one(OPENAI / "echo_scoring.jsonl", tmp_path)
    assert tokens["token"].tolist() == ["The", " cat", " sat"]
    assert math.isnan(tokens["logprob"].iloc[0])  # null, not a number that skews a mean
    assert tokens["logprob"].iloc[1:].tolist() == [-7.25, -3.5]
    assert tokens["top_logprobs"].iloc[0] is None
    assert tokens["top_tokens"].iloc[1].tolist() == [" first", " cat"]
    assert manifest["counts"]["null_logprobs"] == 1


def test_vllm_legacy_completion_keeps_the_top_k_only(tmp_path):
    tokens, _, _ = ingest_one(OPENAI / "vllm_completion.jsonl", tmp_path)
    truth = real_tokens(steps=[1])
    truth = truth[(truth.prompt_idx == 1) & (truth.sample_idx == 0)].head(12)
    np.testing.assert_array_equal(tokens["token_id"], truth["token_id"])
    for got, want in zip(tokens.itertuples(), truth.itertuples()):
        assert list(got.top_ids) == [int(i) for i in want.top_ids[:2]]


def test_sniffers_claim_their_files_only(shared_samples):
    from entropylens.ingest import detect

    assert detect(shared_samples / "openai_chat_completion_logprobs.json").name == "openai_chat"
    assert detect(shared_samples / "openai_legacy_completion_logprobs.json").name == \
        "openai_completion"
    for name in ("vllm_chat_token_ids.jsonl", "unicode_chat.jsonl", "stream_chunks.txt",
                 "batch_output.jsonl", "responses.json"):
        assert detect(OPENAI / name).name == "openai_chat", name
    for name in ("vllm_completion.jsonl", "echo_scoring.jsonl"):
        assert detect(OPENAI / name).name == "openai_completion", name


def test_long_pretty_printed_document_is_detected(tmp_path):
    # a single response much longer than the sniff head, pretty-printed
    response = json.loads((OPENAI / "vllm_chat_token_ids.jsonl").read_text().splitlines()[0])
    path = tmp_path / "big.json"
    path.write_text(json.dumps(response, indent=2))
    assert path.stat().st_size > 64 * 1024
    from entropylens.ingest import detect
    assert detect(path).name == "openai_chat"
    shutil.rmtree(tmp_path / "store", ignore_errors=True)
    tokens, _, _ = ingest_one(path, tmp_path)
    assert len(tokens) == len(response["choices"][0]["logprobs"]["content"])
