"""Record Hugging Face ``generate()`` outputs into a store (a Python API, not a file format).

``model.generate(..., output_logits=True, return_dict_in_generate=True)`` returns, next to the
sequences, the **raw** logits of every generation step. From them this module computes the
exact full-vocabulary entropy of ``softmax(logits / T)``, the log-probability of the sampled
token at the same temperature and the top-k alternatives, and writes them as a run.
``output.scores`` is not used: it holds the logits after the logits processors (temperature,
top-k, top-p), whose entropy is not the policy's.

>>> out = model.generate(**inputs, do_sample=True, temperature=0.7, max_new_tokens=64,
...                      output_logits=True, return_dict_in_generate=True)  # doctest: +SKIP
>>> from entropylens.record import from_hf_generate
>>> from_hf_generate(out, tokenizer, "store", run="gen", temperature=0.7)   # doctest: +SKIP

No format is registered: there is no file to sniff.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import EntropylensError
from ..store import RunWriter, Store


@dataclass
class RecordResult:
    """What :func:`from_hf_generate` or :func:`entropylens.record_generate` wrote."""

    store: Store
    run: str
    sequences: int
    tokens: int
    stopped: int

    def to_dict(self) -> dict:
        return {"store": str(self.store.path), "run": self.run, "sequences": self.sequences,
                "tokens": self.tokens, "stopped": self.stopped}


def _eos_ids(tokenizer, eos_token_id) -> set[int]:
    if eos_token_id is None:
        eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, (int, np.integer)):
        return {int(eos_token_id)}
    return {int(i) for i in eos_token_id}


def _per_row(values, n: int, name: str) -> list:
    """``values`` as a list of ``n`` (a scalar or a sequence of length n)."""
    if values is None or isinstance(values, (str, int, np.integer)):
        return [values] * n
    values = list(values)
    if len(values) != n:
        raise EntropylensError(f"{name} has {len(values)} entries for {n} sequences")
    return values


def scored_generations(output, tokenizer, *, prompt_lengths=None, prompts=None,
                       temperature: float = 1.0, top_k: int = 20, step=None,
                       split: str | None = "inference", sample_ids=None, group_ids=None,
                       eos_token_id=None, first_index: int = 0, rows: int | None = None):
    """Score one ``generate()`` output; returns a list of :class:`ScoredSequence`.

    See :func:`from_hf_generate` for the parameters. ``first_index`` numbers the default
    sample ids when several outputs go into one run.
    """
    from .model import require_torch
    from .scoring import TokenScores, score_block, to_numpy
    from .scoring import block_rows as default_block_rows
    from .tables import ScoredSequence

    torch = require_torch()
    if getattr(output, "beam_indices", None) is not None:
        raise EntropylensError("beam search outputs are not supported: their logits follow "
                               "beams, not the returned sequences; generate with sampling or "
                               "greedy decoding")
    logits = getattr(output, "logits", None)
    sequences = getattr(output, "sequences", None)
    if sequences is None:
        raise EntropylensError("the output has no sequences: call generate(..., "
                               "return_dict_in_generate=True, output_logits=True)")
    if not logits:
        raise EntropylensError("the output holds no raw logits: call generate(..., "
                               "output_logits=True, return_dict_in_generate=True) "
                               "(output.scores are processed logits and give a wrong entropy)")
    if not (temperature > 0 and np.isfinite(temperature)):
        raise EntropylensError(f"temperature must be positive, got {temperature}")
    if top_k < 0:
        raise EntropylensError(f"top-k must be 0 or more, got {top_k}")
    batch, width = int(sequences.shape[0]), int(sequences.shape[1])
    new = len(logits)
    if new > width or int(logits[0].shape[0]) != batch:
        raise EntropylensError(f"{new} logit steps of batch {int(logits[0].shape[0])} do not "
                               f"fit sequences of shape {tuple(sequences.shape)}")
    generated = sequences[:, width - new:].detach().cpu().numpy().astype(np.int64)
    eos = _eos_ids(tokenizer, eos_token_id)
    lengths = np.full(batch, new, dtype=np.int64)
    stopped = np.zeros(batch, dtype=bool)
    if eos:
        is_eos = np.isin(generated, list(eos))
        first = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1), new)
        stopped = first < new
        # the end-of-turn token was sampled and is part of the completion
        lengths = np.where(stopped, first + 1, new)

    # score step by step; rows of finished sequences are skipped
    vocab = int(logits[0].shape[-1])
    rows = rows or default_block_rows(vocab)
    logprob = np.full((batch, new), np.nan, np.float32)
    entropy = np.full((batch, new), np.nan, np.float32)
    k = min(top_k, vocab)
    top_ids = np.zeros((batch, new, k), np.int64)
    top_lp = np.zeros((batch, new, k), np.float32)
    targets_all = torch.from_numpy(generated)
    for t in range(new):
        active = np.flatnonzero(lengths > t)
        if not len(active):
            break
        for start in range(0, len(active), rows):
            idx = active[start:start + rows]
            step_logits = logits[t][torch.from_numpy(idx).to(logits[t].device)]
            target = targets_all[idx, t].to(step_logits.device)
            scores = to_numpy(score_block(step_logits, target, temperature=temperature,
                                          top_k=k))
            logprob[idx, t], entropy[idx, t] = scores.logprob, scores.entropy
            top_ids[idx, t], top_lp[idx, t] = scores.top_ids, scores.top_logprobs

    # prompts: given texts, or decoded from the sequences without the padding
    prompt_part = sequences[:, :width - new].detach().cpu().numpy()
    if prompt_lengths is not None:
        plens = _per_row(prompt_lengths, batch, "prompt_lengths")
        prompt_part = [row[len(row) - int(p):] if p else row[:0]
                       for row, p in zip(prompt_part, plens)]
    else:
        pad = tokenizer.pad_token_id
        prompt_part = [row[np.argmax(row != pad):] if pad is not None and (row != pad).any()
                       else (row[:0] if pad is not None else row) for row in prompt_part]
    if prompts is not None:
        prompts = list(prompts)
        if not prompts or batch % len(prompts):
            raise EntropylensError(f"{len(prompts)} prompts for {batch} sequences: the "
                                   "sequences must be the prompts, each repeated "
                                   "num_return_sequences times")
        repeat = batch // len(prompts)
        prompt_texts = [prompts[b // repeat] for b in range(batch)]
        if group_ids is None:
            group_ids = [str(first_index // repeat + b // repeat) for b in range(batch)]
    else:
        prompt_texts = [tokenizer.decode(p, skip_special_tokens=False) for p in prompt_part]
    sample_ids = _per_row(sample_ids, batch, "sample_ids") if sample_ids is not None \
        else [str(first_index + b) for b in range(batch)]
    group_ids = _per_row(group_ids, batch, "group_ids")
    steps = _per_row(step, batch, "step")
    out = []
    for b in range(batch):
        n = int(lengths[b])
        ids = generated[b, :n]
        meta = {"step": None if steps[b] is None else int(steps[b]), "split": split,
                "sample_id": str(sample_ids[b]),
                "group_id": None if group_ids[b] is None else str(group_ids[b]),
                "prompt": prompt_texts[b],
                "completion": tokenizer.decode(ids, skip_special_tokens=True),
                "finish_reason": "stop" if stopped[b] else "length"}
        out.append(ScoredSequence(meta, ids, TokenScores(logprob[b, :n], entropy[b, :n],
                                                         top_ids[b, :n], top_lp[b, :n])))
    return out


def write_generations(writer: RunWriter, scored, tokenizer, *, temperature: float, top_k: int,
                      vocab_size: int, notes: dict | None = None) -> None:
    """Write scored generations and the provenance of a generate() run."""
    from .tables import PieceTable, sequence_table, token_table

    if scored:
        writer.write_tokens(token_table(scored, PieceTable(tokenizer, vocab_size), top_k),
                            path="generate()")
        writer.write_sequences(sequence_table(scored), path="generate()")
    writer.add_source("generate()", format="hf_generate")
    writer.manifest["temperature"] = float(temperature)
    writer.manifest["logprob_basis"] = "tempered"
    writer.manifest["vocab_size"] = int(vocab_size)
    writer.manifest["top_k"] = top_k or None
    writer.manifest.setdefault("notes", {}).update(notes or {})


def from_hf_generate(output, tokenizer, out: str | Path | Store, *, run: str,
                     prompt_lengths: int | Sequence[int] | None = None,
                     prompts: Sequence[str] | None = None, temperature: float = 1.0,
                     top_k: int = 20, step: int | Sequence[int] | None = None,
                     split: str | None = "inference", sample_ids: Sequence[str] | None = None,
                     group_ids: Sequence[str] | None = None, eos_token_id=None,
                     model: str | None = None, replace: bool = False) -> RecordResult:
    """Write a ``generate()`` result as a run with exact per-token entropies.

    Parameters
    ----------
    output : transformers GenerateOutput
        From ``generate(..., output_logits=True, return_dict_in_generate=True)`` of a
        decoder-only model (sampling or greedy; not beam search).
    tokenizer : transformers tokenizer
        Decodes prompts and completions and names the token pieces.
    out : path or Store
        The store (created when missing).
    run : str
        Name of the run to write.
    prompt_lengths : int or sequence of int, optional
        Prompt tokens at the end of the prompt part of each row (to drop left padding when
        decoding prompts). Default: everything before the generated tokens, less leading pad
        tokens. Not needed when ``prompts`` is given.
    prompts : sequence of str, optional
        Prompt texts to store; each repeated ``num_return_sequences`` times in the batch.
        The index of the prompt becomes the ``group_id``.
    temperature : float
        The temperature the tokens were sampled at: scores are those of
        ``softmax(logits / T)`` (``logprob_basis: tempered``).
    top_k : int
        Alternatives to store per token.
    step : int or sequence of int, optional
        Training step of the rows (null for pure inference).
    split : str, optional
        ``train``, ``val`` or ``inference`` (default).
    sample_ids, group_ids : sequence of str, optional
        Default: the row index, and the prompt index when ``prompts`` is given.
    eos_token_id : int or list of int, optional
        End-of-turn token(s) that end a completion (default: the tokenizer's). A completion
        ends at its first one, which is kept; later tokens are padding.
    model : str, optional
        Model name or path, recorded in the manifest.
    replace : bool
        Overwrite a run of that name.

    Returns
    -------
    RecordResult
    """
    store = out if isinstance(out, Store) else Store.create(out)
    scored = scored_generations(output, tokenizer, prompt_lengths=prompt_lengths,
                                prompts=prompts, temperature=temperature, top_k=top_k,
                                step=step, split=split, sample_ids=sample_ids,
                                group_ids=group_ids, eos_token_id=eos_token_id)
    vocab = int(output.logits[0].shape[-1])
    with store.write_run(run, replace=replace) as writer:
        write_generations(writer, scored, tokenizer, temperature=temperature, top_k=top_k,
                          vocab_size=vocab, notes={"generate": {"model": model}})
    return RecordResult(store, run, len(scored), int(sum(len(s.token_ids) for s in scored)),
                        int(sum(s.meta["finish_reason"] == "stop" for s in scored)))
