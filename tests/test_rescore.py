"""Rescoring completions with the real SmolLM2-135M model (entropylens.record).

The shared GRPO run was sampled from this very model (its GGUF weights dequantized to float32)
at temperature 1, and its step-0 tokens come from the base weights, so rescoring them must give
back the logged entropies and logprobs. The logged values were computed on a GPU and differ
from an exact (float64) computation by about 1e-3 nats on average, while float32 on CPU is
within 1e-5 of float64: the tolerances below are those of the logged data, and a separate test
checks the rescorer against a float64 reference at 1e-4.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import entropylens as el
from entropylens.errors import EntropylensError, RunExistsError
from entropylens.estimators import entropy_from_logits

from _smollm2 import gguf_path, require_torch, smollm2

STEP0_COMPLETIONS = 16


@pytest.fixture(scope="module")
def model():
    return smollm2()


@pytest.fixture(scope="module")
def logged_store(tmp_path_factory, shared_run):
    """The shared ``vanilla`` run's tokens and sequences, read with the generic table format."""
    path = tmp_path_factory.mktemp("rescore") / "store"
    el.ingest([shared_run / "vanilla" / "tokens.parquet",
               shared_run / "vanilla" / "sequences.parquet"], path, run="vanilla",
              format="table", progress=False)
    return el.open(path)


@pytest.fixture(scope="module")
def rescored(logged_store, model):
    """Step-0 completions of the shared run rescored by the base model, re-tokenised."""
    result = el.rescore(logged_store, model, logged_store, source_run="vanilla", run="base",
                        steps=[0], limit=STEP0_COMPLETIONS, progress=False)
    return result


def _by_sample(table: pa.Table) -> dict[str, pd.DataFrame]:
    frame = table.to_pandas().sort_values(["sample_id", "position"])
    return {key: group.reset_index(drop=True) for key, group in frame.groupby("sample_id")}


def test_rescore_reproduces_logged_step0_entropies(logged_store, rescored):
    assert rescored.sequences == STEP0_COMPLETIONS and rescored.skipped == 0
    logged = _by_sample(logged_store.read_tokens("vanilla", steps=[0]))
    ours = _by_sample(logged_store.read_tokens("base"))
    assert sorted(ours) == sorted(logged_store.read_sequences("vanilla").to_pandas()
                                  .query("step == 0")["sample_id"].head(STEP0_COMPLETIONS))
    identical, diffs, lp_diffs, top1_same = [], [], [], []
    for sample_id, mine in ours.items():
        ref = logged[sample_id]
        ids = mine["token_id"].to_numpy()
        # the re-tokenised completion must be a prefix of the logged ids (the log also holds
        # the <|im_start|> padding artefact after <|im_end|>)
        if len(ids) > len(ref) or not np.array_equal(ref["token_id"].to_numpy()[:len(ids)], ids):
            continue
        identical.append(sample_id)
        ref = ref.iloc[:len(ids)]
        diffs.append(np.abs(mine["entropy"].to_numpy() - ref["entropy"].to_numpy()))
        lp_diffs.append(np.abs(mine["logprob"].to_numpy() - ref["logprob"].to_numpy()))
        top1_same.append([a[0] == b[0] for a, b in zip(mine["top_ids"], ref["top_ids"])])
    retok = rescored.retokenised
    print(f"\n{len(identical)} of {STEP0_COMPLETIONS} step-0 completions re-tokenised "
          f"identically; {retok['different']} did not: {retok['examples']}")
    assert retok["compared"] == STEP0_COMPLETIONS
    assert retok["identical"] == len(identical)
    assert retok["different"] == STEP0_COMPLETIONS - len(identical)
    assert len(identical) >= 12  # 13 on this data: BPE merges differ on a few texts
    diffs, lp_diffs = np.concatenate(diffs), np.concatenate(lp_diffs)
    top1 = np.concatenate(top1_same)
    print(f"{len(diffs)} tokens: entropy |diff| mean {diffs.mean():.5f}, p99 "
          f"{np.quantile(diffs, 0.99):.5f}, max {diffs.max():.5f}, within 1e-2: "
          f"{(diffs <= 1e-2).mean():.4f}; logprob |diff| mean {lp_diffs.mean():.5f}")
    assert len(diffs) > 700
    assert diffs.mean() < 3e-3
    assert (diffs <= 1e-2).mean() >= 0.99
    assert diffs.max() < 2e-2
    assert lp_diffs.mean() < 3e-3
    assert top1.mean() >= 0.97
    # completions that ended on <|im_end|> were scored with it (inferred from the token count)
    last = [frame["token"].iloc[-1] for key, frame in ours.items() if key in identical]
    logged_ends = [logged[key]["token"].str.contains("im_end").any() for key in identical]
    assert [t == "<|im_end|>" for t in last] == logged_ends


def test_rescored_run_manifest_and_sequences(logged_store, rescored):
    manifest = logged_store.manifest("base")
    assert manifest["temperature"] == 1.0
    assert manifest["logprob_basis"] == "tempered"
    assert manifest["vocab_size"] == 49152
    assert manifest["top_k"] == 20
    assert manifest["entropy_sources"][0] == "exact"
    model = manifest["notes"]["model"]
    digest = hashlib.sha256(gguf_path().read_bytes()).hexdigest()
    assert model["sha256"] == digest and model["path"].endswith(".gguf")
    assert manifest["notes"]["rescore"]["prompt_modes"] == {"chat_template": STEP0_COMPLETIONS}
    tokens = logged_store.read_tokens("base")
    assert tokens.num_rows == rescored.tokens == manifest["counts"]["tokens"]
    assert set(pc_unique(tokens, "top_ids", len)) == {20}
    seqs = logged_store.read_sequences("base").to_pandas()
    source = logged_store.read_sequences("vanilla").to_pandas().query("step == 0")
    source = source.head(STEP0_COMPLETIONS)
    assert seqs["sample_id"].tolist() == source["sample_id"].tolist()
    assert seqs["completion"].tolist() == source["completion"].tolist()
    assert seqs["reward"].tolist() == source["reward"].tolist()
    counts = tokens.to_pandas().groupby("sample_id").size()
    assert (seqs.set_index("sample_id")["num_tokens"] == counts).all()
    # top_logprobs are sorted and the sampled token's logprob is at most the top one
    frame = tokens.to_pandas()
    tops = np.stack(frame["top_logprobs"].to_numpy())
    assert (np.diff(tops, axis=1) <= 0).all()
    assert (frame["logprob"].to_numpy() <= tops[:, 0] + 1e-6).all()


def pc_unique(table, column, fn):
    return {fn(v) for v in table.column(column).to_pylist()}


def test_rescore_matches_float64_reference_at_a_temperature(logged_store, model):
    """Blocked float32 scoring versus a full float64 forward pass, at T = 0.7."""
    import copy

    import torch

    result = el.rescore(logged_store, model, logged_store, source_run="vanilla", run="t07",
                        steps=[0], limit=2, temperature=0.7, tokens="source", top_k=5,
                        block_rows=7, progress=False)
    assert result.sequences == 2
    mine = _by_sample(logged_store.read_tokens("t07"))
    seqs = logged_store.read_sequences("vanilla").to_pandas().query("step == 0").head(2)
    tok = model.tokenizer
    reference = copy.deepcopy(model.model).double()
    for row in seqs.itertuples():
        frame = mine[row.sample_id]
        prompt = tok.apply_chat_template([{"role": "user", "content": row.prompt}],
                                         tokenize=False, add_generation_prompt=True)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = frame["token_id"].tolist()
        with torch.no_grad():
            logits = reference(torch.tensor([prompt_ids + ids])).logits[0].numpy()
        logits = logits[len(prompt_ids) - 1:len(prompt_ids) - 1 + len(ids)]
        entropy = entropy_from_logits(logits, 0.7)
        z = logits / 0.7
        logz = z.max(axis=1) + np.log(np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1))
        logprob = z[np.arange(len(ids)), ids] - logz
        assert np.abs(frame["entropy"].to_numpy() - entropy).max() < 1e-4
        assert np.abs(frame["logprob"].to_numpy() - logprob).max() < 1e-4
        order = np.argsort(-z, axis=1)[:, :5]
        tops = np.stack(frame["top_ids"].to_numpy())
        gap = np.sort(z, axis=1)[:, -5:-4].ravel() - np.sort(z, axis=1)[:, -6:-5].ravel()
        clear = gap > 1e-3  # ties at the k-th place may swap in float32
        assert (np.sort(tops[clear], axis=1) == np.sort(order[clear], axis=1)).all()
        assert np.abs(np.stack(frame["top_logprobs"].to_numpy())[:, 0]
                      - (z.max(axis=1) - logz)).max() < 1e-4


def test_source_tokens_keep_logged_positions_and_forking_overlap(logged_store, model,
                                                                 monkeypatch):
    import entropylens.record.rescorer as rescorer

    monkeypatch.setattr(rescorer, "WINDOW", 3)  # two windows: 3 completions, then 1
    el.rescore(logged_store, model, logged_store, source_run="vanilla", run="base-logged",
               steps=[0], limit=4, tokens="source", top_k=5, batch_size=2, progress=True)
    source = logged_store.read_sequences("vanilla").to_pandas().query("step == 0").head(4)
    assert logged_store.read_sequences("base-logged").column("sample_id").to_pylist() == \
        source["sample_id"].tolist()
    mine = logged_store.read_tokens("base-logged").to_pandas()
    logged = logged_store.read_tokens("vanilla", steps=[0]).to_pandas()
    logged = logged[logged["sample_id"].isin(mine["sample_id"].unique())]
    assert len(mine) == len(logged)
    joined = mine.merge(logged, on=["step", "sample_id", "position"], suffixes=("", "_log"))
    assert len(joined) == len(mine) and (joined["token_id"] == joined["token_id_log"]).all()
    overlap = el.forking_overlap(logged_store, "base-logged", "vanilla", ratio=0.2,
                                 scope="sequence")
    assert overlap.token_mismatches == 0
    # the padding after end-of-sequence is left out of token analyses by default
    assert overlap.shared_positions == int((~mine["after_eos"].fillna(False)).sum())
    # the same weights on the same tokens: forking positions agree but for near-ties
    assert overlap.overlap > 0.9


def test_rescore_sequence_file_with_the_cli(tmp_path, model, shared_run, monkeypatch):
    """A plain table with prompt/completion columns, through ``entropylens rescore``."""
    import entropylens.record.rescorer as rescore_module
    from entropylens.cli import app

    seqs = pq.read_table(shared_run / "vanilla" / "sequences.parquet").to_pandas()
    seqs = seqs[seqs["step"] == 3].head(3)[["step", "prompt_idx", "sample_idx", "prompt",
                                           "completion", "reward"]]
    src = tmp_path / "completions.parquet"
    seqs.to_parquet(src)
    loaded = []

    def fake_load(path, **kwargs):  # the model is loaded once per test session
        loaded.append((str(path), kwargs))
        return model

    monkeypatch.setattr(rescore_module, "load_model", fake_load)
    out = tmp_path / "store"
    args = ["rescore", str(src), "--model", str(gguf_path()), "--out", str(out), "--format",
            "table", "--device", "cpu", "--top-k", "3", "--temperature", "0.9", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["run"] == "completions-rescored" and payload["sequences"] == 3
    assert loaded == [(str(gguf_path()), {"device": "cpu", "dtype": "float32"})]
    store = el.open(out)
    tokens = store.read_tokens("completions-rescored").to_pandas()
    tok = model.tokenizer
    # no token count in the source: the completion's own tokens, no end-of-turn appended
    expected = [len(tok(c, add_special_tokens=False)["input_ids"]) for c in seqs["completion"]]
    assert tokens.groupby("sample_id").size().tolist() == expected
    assert payload["tokens"] == sum(expected)
    assert tokens["step"].unique().tolist() == [3]
    assert tokens["top_ids"].map(len).unique().tolist() == [3]
    manifest = store.manifest("completions-rescored")
    assert manifest["temperature"] == 0.9
    assert manifest["sources"][0]["path"].endswith("completions.parquet")
    assert manifest["sources"][0]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    # the same run again needs --replace; with it, it is overwritten
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1 and "already exists" in again.stderr
    assert CliRunner().invoke(app, args + ["--replace"]).exit_code == 0


def test_bad_sources_are_clear_errors(tmp_path, logged_store, model, shared_run):
    from entropylens.cli import app

    with pytest.raises(EntropylensError, match="pick one with --source-run"):
        el.rescore(logged_store.path, model, tmp_path / "o", progress=False)
    with pytest.raises(EntropylensError, match="no completions to rescore"):
        el.rescore(shared_run / "vanilla" / "metrics.csv", model, tmp_path / "o",
                   format="table", progress=False)
    with pytest.raises(RunExistsError):
        el.rescore(logged_store, model, logged_store, source_run="vanilla", run="base",
                   progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sample_id": "a", "prompt": "What is 1+1?", "completion": "2"}\n'
                   '{"sample_id": "b", "prompt": null, "completion": "an orphan"}\n')
    with pytest.raises(EntropylensError, match=r"bad\.jsonl.*record 2.*no prompt"):
        el.rescore(bad, model, tmp_path / "o", format="table", progress=False)
    result = el.rescore(bad, model, tmp_path / "o", format="table", on_error="skip",
                        progress=False)
    assert result.sequences == 1 and result.skipped == 1
    manifest = el.open(tmp_path / "o").manifest("bad-rescored")
    assert manifest["rejected"]["count"] == 1
    assert manifest["rejected"]["examples"][0]["line"] == 2
    missing = CliRunner().invoke(app, ["rescore", str(bad), "--model", str(tmp_path / "nope"),
                                       "--out", str(tmp_path / "o2"), "--format", "table"])
    assert missing.exit_code == 1 and "no such model" in missing.stderr
    assert not (tmp_path / "o2").exists()  # no empty store left behind
    assert "Traceback" not in missing.output
    with pytest.raises(EntropylensError, match="temperature"):
        el.rescore(bad, model, tmp_path / "o", temperature=0, progress=False)


def test_prompt_encoder_and_end_of_turn(model):
    from entropylens.record import PromptEncoder, completion_ids

    tok = model.tokenizer
    encode = PromptEncoder(tok)
    ids, mode = encode("Name a colour.")
    assert mode == "chat_template"
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nName a colour.<|im_end|>" in text
    # a prompt that already went through the template is taken as it is
    assert encode(text) == (ids, "as_is")
    # verl decodes rollout prompts without their special tokens: the template is restored
    stripped = tok.decode(ids, skip_special_tokens=True)
    assert stripped.startswith("system\n") and stripped.endswith("\nassistant\n")
    assert encode(stripped) == (ids, "restored")
    # role lines that the template does not reproduce exactly are a raw prompt
    assert encode("user\nhello\nassistant\n")[1] == "chat_template"
    messages = json.dumps([{"role": "system", "content": "Be short."},
                           {"role": "user", "content": "Name a colour."}])
    ids2, mode2 = encode(messages)
    assert mode2 == "messages" and "You are a helpful" not in tok.decode(ids2)
    plain, mode3 = PromptEncoder(tok, chat_template=False)("Name a colour.")
    assert mode3 == "as_is" and tok.decode(plain) == "Name a colour."
    text_ids = tok("Blue.", add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    assert completion_ids(tok, "Blue.", finish_reason="stop", num_tokens=None)[0] == \
        text_ids + [eos]
    assert completion_ids(tok, "Blue.", finish_reason="length", num_tokens=99)[0] == text_ids
    assert completion_ids(tok, "Blue.", finish_reason=None,
                          num_tokens=len(text_ids) + 2)[0] == text_ids + [eos]
    assert completion_ids(tok, "Blue.", finish_reason=None, num_tokens=None)[0] == text_ids
    assert completion_ids(tok, "Blue.", finish_reason="stop", num_tokens=None,
                          eos="never")[0] == text_ids
    assert completion_ids(tok, "Blue.<|im_end|>", finish_reason="stop",
                          num_tokens=None)[0] == text_ids + [eos]


def test_score_logits_against_numpy():
    """The torch scorer versus plain numpy, with masked tokens and uneven blocks."""
    require_torch()
    import torch

    from entropylens.record.scoring import score_logits

    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, size=(37, 501)).astype(np.float32)
    logits[5, 100:] = -np.inf  # a row with masked tokens
    logits[9] = 0.0  # uniform
    logits[11, 7] = 80.0  # nearly one-hot
    targets = rng.integers(0, 100, size=37)
    for temperature in (1.0, 0.6, 1.7):
        scores = score_logits(torch.from_numpy(logits), torch.from_numpy(targets),
                              temperature=temperature, top_k=4, rows=8)
        z = logits.astype(np.float64) / temperature
        zmax = z.max(axis=1, keepdims=True)
        logp = z - (zmax + np.log(np.exp(z - zmax).sum(axis=1, keepdims=True)))
        p = np.exp(logp)
        with np.errstate(invalid="ignore"):  # 0 * -inf for the masked tokens
            entropy = -np.sum(np.where(p > 0, p * logp, 0.0), axis=1)
        assert np.abs(scores.entropy - entropy).max() < 1e-4
        assert np.abs(scores.entropy - entropy_from_logits(logits, temperature)).max() < 1e-4
        assert np.abs(scores.logprob - logp[np.arange(37), targets]).max() < 1e-4
        order = np.argsort(-logp, axis=1, kind="stable")[:, :4]
        assert (scores.top_ids[[0, 1, 2, 5, 11]] == order[[0, 1, 2, 5, 11]]).all()
        assert np.abs(scores.top_logprobs - np.take_along_axis(logp, scores.top_ids,
                                                               axis=1)).max() < 1e-4
    assert abs(scores.entropy[9] - np.log(501)) < 1e-4
    assert scores.entropy[11] < 1e-6
