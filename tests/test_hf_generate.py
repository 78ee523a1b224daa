"""Recording ``generate()`` outputs: ``from_hf_generate`` and ``record_generate``.

Checked against Hugging Face's own ``compute_transition_scores`` (the per-token scores of
``../shared/samples/hf_compute_transition_scores_docstring.txt``), against a full forward pass
of the generated text, and against the rescorer on the same tokens.
"""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest

import entropylens as el
from entropylens.errors import EntropylensError, RunExistsError
from entropylens.estimators import entropy_from_logits
from entropylens.record import from_hf_generate

from _smollm2 import require_torch, smollm2

PROMPTS = ["What is 2 + 3? Answer with one number.", "Name a colour."]


@pytest.fixture(scope="module")
def model():
    return smollm2()


def test_hf_score_sample_is_natural_log_probabilities(shared_samples):
    """The documented HF per-token scores are log-probabilities in nats, as entropylens stores."""
    text = (shared_samples / "hf_compute_transition_scores_docstring.txt").read_text()
    rows = re.findall(r"\|\s+(\d+)\s+\|\s+(\S+)\s+\|\s+(-?\d+\.\d+)\s+\|\s+(\d+\.\d+)%", text)
    assert len(rows) == 5
    for _, _, logprob, percent in rows:
        assert math.isclose(math.exp(float(logprob)), float(percent) / 100, abs_tol=6e-4)


def _generate(model, temperature: float, new_tokens: int, samples: int):
    import torch

    tok = model.tokenizer
    encoded = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"] for p in PROMPTS]
    width = max(map(len, encoded))
    ids = torch.full((len(encoded), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(encoded):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    torch.manual_seed(11)
    with torch.inference_mode():
        out = model.model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                   temperature=temperature, top_k=0, top_p=1.0,
                                   max_new_tokens=new_tokens, num_return_sequences=samples,
                                   output_logits=True, output_scores=True,
                                   return_dict_in_generate=True,
                                   pad_token_id=tok.pad_token_id)
    return out, encoded


def test_from_hf_generate_matches_transition_scores_and_a_full_forward(tmp_path, model):
    import torch

    temperature = 0.8
    out, encoded = _generate(model, temperature, new_tokens=20, samples=3)
    result = from_hf_generate(out, model.tokenizer, tmp_path / "store", run="gen",
                              prompts=PROMPTS, temperature=temperature, top_k=5, step=4,
                              model="SmolLM2-135M")
    assert result.sequences == 6
    store = el.open(tmp_path / "store")
    tokens = store.read_tokens("gen").to_pandas()
    seqs = store.read_sequences("gen").to_pandas().set_index("sample_id")
    assert seqs["group_id"].tolist() == ["0", "0", "0", "1", "1", "1"]
    assert seqs["prompt"].tolist() == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    assert (tokens["step"] == 4).all() and (tokens["split"] == "inference").all()
    manifest = store.manifest("gen")
    assert manifest["temperature"] == temperature and manifest["logprob_basis"] == "tempered"
    assert manifest["vocab_size"] == 49152 and manifest["top_k"] == 5

    # HF's own per-token scores: normalised processed scores are log softmax(logits / T)
    hf = model.model.compute_transition_scores(out.sequences, out.scores,
                                               normalize_logits=True).numpy()
    new = len(out.logits)
    generated = out.sequences[:, -new:].numpy()
    eos = model.tokenizer.eos_token_id
    for row in range(6):
        mine = tokens[tokens["sample_id"] == str(row)].sort_values("position")
        stop = np.flatnonzero(generated[row] == eos)
        length = stop[0] + 1 if len(stop) else new
        assert len(mine) == length
        assert seqs.loc[str(row), "finish_reason"] == ("stop" if len(stop) else "length")
        assert (mine["token_id"].to_numpy() == generated[row, :length]).all()
        # HF's float32 log_softmax is itself about 1e-4 off; float64 of the same logits is not
        assert np.abs(mine["logprob"].to_numpy() - hf[row, :length]).max() < 5e-4
        exact = torch.log_softmax(torch.stack([step[row] for step in out.logits[:length]])
                                  .double() / temperature, dim=-1).numpy()
        assert np.abs(mine["logprob"].to_numpy()
                      - exact[np.arange(length), generated[row, :length]]).max() < 1e-5
        # the same tokens through one full forward pass (no KV cache), entropy in numpy
        prompt = encoded[row // 3]
        with torch.inference_mode():
            logits = model.model(torch.tensor([prompt + generated[row, :length].tolist()])
                                 ).logits[0].double().numpy()
        logits = logits[len(prompt) - 1:len(prompt) - 1 + length]
        assert np.abs(mine["entropy"].to_numpy()
                      - entropy_from_logits(logits, temperature)).max() < 5e-4
        top = np.argsort(-logits[0])[:5]
        assert list(mine["top_ids"].iloc[0]) == top.tolist()


def test_record_generate_then_rescore_the_same_tokens(tmp_path, model):
    import torch

    torch.manual_seed(5)
    store_path = tmp_path / "store"
    result = el.record_generate(model, None, PROMPTS, store_path, run="gen", temperature=1.0,
                                max_new_tokens=16, num_return_sequences=2, batch_size=1,
                                step=0, top_k=8)
    assert result.sequences == 4 and result.tokens > 0
    store = el.open(store_path)
    seqs = store.read_sequences("gen").to_pandas()
    assert seqs["sample_id"].tolist() == ["0", "1", "2", "3"]
    assert seqs["group_id"].tolist() == ["0", "0", "1", "1"]
    assert seqs["prompt"].tolist() == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    notes = store.manifest("gen")["notes"]["generate"]
    assert notes["sampling"]["top_k"] == 0 and notes["sampling"]["temperature"] == 1.0
    assert notes["chat_template"] is True
    # the rescorer on the recorded token ids gives the same scores
    rescored = el.rescore(store, model, store, source_run="gen", run="re", tokens="source",
                          top_k=8, progress=False)
    assert rescored.tokens == result.tokens
    a = store.read_tokens("gen").to_pandas().sort_values(["sample_id", "position"])
    b = store.read_tokens("re").to_pandas().sort_values(["sample_id", "position"])
    assert (a["token_id"].to_numpy() == b["token_id"].to_numpy()).all()
    assert np.abs(a["entropy"].to_numpy() - b["entropy"].to_numpy()).max() < 5e-4
    assert np.abs(a["logprob"].to_numpy() - b["logprob"].to_numpy()).max() < 5e-4
    # and re-tokenising the decoded text is compared with the recorded ids
    text = el.rescore(store, (model.model, model.tokenizer), store, source_run="gen",
                      run="re-text", progress=False)  # a model and tokenizer in memory
    assert text.retokenised["compared"] == 4
    assert text.retokenised["identical"] + text.retokenised["different"] == 4


def _synthetic(tok):
    """A hand-made generate() output: 3 rows, left-padded prompts of width 4, 5 new tokens."""
    import torch

    pad, eos = tok.pad_token_id, tok.eos_token_id
    assert pad == eos  # SmolLM2 pads with <|im_end|>: the first one ends the completion
    prompt = torch.tensor([[pad, pad, 100, 200], [pad, 300, 400, 500], [pad, pad, 600, 700]])
    generated = torch.tensor([[10, 11, eos, pad, pad], [12, 13, 14, 15, 16],
                              [eos, pad, pad, pad, pad]])
    rng = np.random.default_rng(0)
    logits = [torch.from_numpy(rng.normal(0, 2, size=(3, 300)).astype(np.float32))
              for _ in range(5)]
    return SimpleNamespace(sequences=torch.cat([prompt, generated], dim=1), logits=tuple(logits),
                           beam_indices=None), generated.numpy(), logits


def test_from_hf_generate_on_a_handmade_output(tmp_path, model):
    require_torch()
    tok = model.tokenizer
    out, generated, logits = _synthetic(tok)
    result = from_hf_generate(out, tok, tmp_path / "s", run="g", temperature=1.3, top_k=3,
                              sample_ids=["a", "b", "c"], prompt_lengths=[2, 3, 2])
    assert (result.sequences, result.tokens, result.stopped) == (3, 3 + 5 + 1, 2)
    store = el.open(tmp_path / "s")
    tokens = store.read_tokens("g").to_pandas()
    seqs = store.read_sequences("g").to_pandas().set_index("sample_id")
    assert seqs["finish_reason"].to_dict() == {"a": "stop", "b": "length", "c": "stop"}
    assert seqs["num_tokens"].to_dict() == {"a": 3, "b": 5, "c": 1}
    assert seqs.loc["a", "prompt"] == tok.decode(out.sequences[0, 2:4])
    assert seqs["step"].isna().all() and seqs["group_id"].isna().all()
    full = np.stack([l.numpy() for l in logits], axis=1)  # (batch, step, vocab)
    for row, sample in enumerate("abc"):
        mine = tokens[tokens["sample_id"] == sample].sort_values("position")
        n = len(mine)
        z = full[row, :n].astype(np.float64) / 1.3
        logz = np.log(np.exp(z).sum(axis=1))
        assert np.abs(mine["entropy"].to_numpy() - entropy_from_logits(full[row, :n],
                                                                       1.3)).max() < 1e-5
        assert np.abs(mine["logprob"].to_numpy()
                      - (z[np.arange(n), generated[row, :n]] - logz)).max() < 1e-5
        assert [list(t) for t in mine["top_ids"]] == np.argsort(-z, axis=1)[:, :3].tolist()
    assert tokens.loc[tokens["sample_id"] == "c", "token"].tolist() == ["<|im_end|>"]

    with pytest.raises(RunExistsError):
        from_hf_generate(out, tok, tmp_path / "s", run="g")
    with pytest.raises(EntropylensError, match="output_logits=True"):
        from_hf_generate(SimpleNamespace(sequences=out.sequences, logits=None), tok,
                         tmp_path / "s", run="g2")
    with pytest.raises(EntropylensError, match="beam search"):
        from_hf_generate(SimpleNamespace(sequences=out.sequences, logits=out.logits,
                                         beam_indices=out.sequences), tok, tmp_path / "s",
                         run="g2")
    with pytest.raises(EntropylensError, match="2 prompts for 3 sequences"):
        from_hf_generate(out, tok, tmp_path / "s", run="g2", prompts=["x", "y"])
    with pytest.raises(EntropylensError, match="temperature"):
        from_hf_generate(out, tok, tmp_path / "s", run="g2", temperature=0)
    assert el.open(tmp_path / "s").runs() == ["g"]
