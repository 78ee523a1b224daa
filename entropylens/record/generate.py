"""Generate with a transformers model and record the tokens with exact entropies, in one call.

For people who sample completions with ``model.generate`` themselves: prompts go through the
chat template, batches are left-padded, ``generate`` returns raw logits, and
:mod:`entropylens.ingest.hf_generate` scores and writes them (the same code as
``from_hf_generate``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from ..errors import EntropylensError
from .hf_generate import RecordResult, scored_generations, write_generations
from ..store import Store
from .model import ScoringModel, load_model, require_torch
from .rescorer import PromptEncoder


def record_generate(model, tokenizer, prompts: Sequence[str], out: str | Path | Store, *,
                    run: str, temperature: float = 1.0, top_k: int = 20,
                    max_new_tokens: int = 64, num_return_sequences: int = 1,
                    batch_size: int = 8, chat_template: bool = True, step: int | None = None,
                    split: str | None = "inference", replace: bool = False,
                    generate_kwargs: dict | None = None,
                    reward: Callable[[str, str], float] | None = None) -> RecordResult:
    """Sample completions with ``model.generate`` and write them as a run.

    Parameters
    ----------
    model : transformers model, ScoringModel, or path
        A causal LM in memory, or a model folder / ``.gguf`` file to load (then ``tokenizer``
        may be None).
    tokenizer : transformers tokenizer or None
    prompts : sequence of str
        Raw prompts (templated with the chat template unless ``chat_template=False``), or
        JSON message lists.
    out : path or Store
    run : str
    temperature : float
        Sampling temperature; the recorded scores are those of ``softmax(logits / T)``.
    top_k : int
        Alternatives stored per token (sampling itself is not truncated unless
        ``generate_kwargs`` asks for it).
    max_new_tokens, num_return_sequences : int
        Passed to ``generate``; the ``num_return_sequences`` samples of a prompt share its
        ``group_id``.
    batch_size : int
        Prompts per ``generate`` call.
    chat_template : bool
    step : int, optional
        Training step to record.
    split : str, optional
    replace : bool
    generate_kwargs : dict, optional
        More ``generate`` arguments (``top_p``, ``top_k``, ``do_sample``...). By default
        sampling is plain: ``do_sample=True, top_k=0, top_p=1.0``.
    reward : callable, optional
        ``reward(prompt, completion) -> float`` for every sample, stored as its reward (so
        that :func:`~entropylens.analysis.diversity.diversity` can score an evaluation run).

    Returns
    -------
    RecordResult
    """
    torch = require_torch()
    if isinstance(model, (str, Path)):
        loaded = load_model(model)
        model, tokenizer = loaded.model, loaded.tokenizer
    elif isinstance(model, ScoringModel):
        model, tokenizer = model.model, model.tokenizer
    if tokenizer is None:
        raise EntropylensError("a tokenizer is needed with a model in memory")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise EntropylensError("no prompts given")
    if batch_size < 1 or num_return_sequences < 1 or max_new_tokens < 1:
        raise EntropylensError("batch_size, num_return_sequences and max_new_tokens must be "
                               "at least 1")
    kwargs = {"do_sample": True, "top_k": 0, "top_p": 1.0}
    kwargs.update(generate_kwargs or {})
    if kwargs.get("do_sample"):
        kwargs["temperature"] = temperature
    kwargs.update(max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
                  output_logits=True, return_dict_in_generate=True)
    encoder = PromptEncoder(tokenizer, chat_template=chat_template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    device = next(model.parameters()).device
    scored = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        encoded = [encoder(p)[0] for p in chunk]
        width = max(len(ids) for ids in encoded)
        # decoder-only generation continues from the last column: pad on the left
        input_ids = torch.full((len(chunk), width), int(pad), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[row, width - len(ids):] = 1
        with torch.inference_mode():
            output = model.generate(input_ids=input_ids.to(device),
                                    attention_mask=mask.to(device), pad_token_id=pad, **kwargs)
        lengths = [len(ids) for ids in encoded for _ in range(num_return_sequences)]
        scored += scored_generations(output, tokenizer, prompt_lengths=lengths, prompts=chunk,
                                     temperature=temperature, top_k=top_k, step=step,
                                     split=split, first_index=start * num_return_sequences)
        vocab = int(output.logits[0].shape[-1])
    if reward is not None:
        for sample in scored:
            value = reward(sample.meta["prompt"], sample.meta["completion"])
            try:
                sample.meta["reward"] = None if value is None else float(value)
            except (TypeError, ValueError):
                raise EntropylensError(f"reward() returned {value!r} for sample "
                                       f"{sample.meta['sample_id']}: not a number") from None
    store = out if isinstance(out, Store) else Store.create(out)
    sampling = {k: v for k, v in kwargs.items() if k not in ("output_logits",
                                                             "return_dict_in_generate")}
    with store.write_run(run, replace=replace) as writer:
        write_generations(writer, scored, tokenizer, temperature=temperature, top_k=top_k,
                          vocab_size=vocab, notes={"generate": {
                              "model": getattr(model, "name_or_path", None) or
                              type(model).__name__, "sampling": sampling,
                              "chat_template": encoder.template}})
    return RecordResult(store, run, len(scored), int(sum(len(s.token_ids) for s in scored)),
                        int(sum(s.meta["finish_reason"] == "stop" for s in scored)))
