"""Rescore text completions with a model: exact per-token entropy from text-only logs.

verl rollout dumps, TRL completion files and most evaluation logs keep only text. Scoring the
same completions with the policy checkpoint recovers the token-level picture: the logprob of
each completion token, the exact full-vocabulary entropy and the top-k alternatives, at a given
temperature. Two checkpoints scored on the same completions give two runs whose forking
positions can be compared (:func:`entropylens.forking_overlap`).

How a completion is turned into tokens:

- The prompt goes through the tokenizer's chat template with the generation prompt when the
  source holds a raw prompt (a message list stored as JSON is templated too); a prompt that
  already contains the tokenizer's special tokens is taken as formatted. A templated prompt
  whose special tokens were stripped on decoding (verl rollout dumps) is restored when
  templating its role lines again reproduces it exactly. ``chat_template=False`` encodes every
  prompt as it is.
- The completion is encoded exactly as the tokenizer splits its text. The end-of-turn token is
  appended when the completion ended on it: ``finish_reason`` says ``stop``, or, with no
  finish reason, the source's token count is larger than the text's (``eos="auto"``).
- With ``tokens="source"`` the token ids the source run logged are scored instead (no
  re-tokenisation), which keeps positions aligned with the logged run.
"""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from ..errors import EntropylensError
from ..store import Store
from .model import ScoringModel, load_model, require_torch, wrap_model
from .prompts import PromptEncoder, completion_ids
from .scoring import TokenScores, score_block, to_numpy
from .scoring import block_rows as default_block_rows
from .sources import _logged_ids, _read_source, _Source
from .tables import PieceTable, ScoredSequence, sequence_table, token_table

EOS_MODES = ("auto", "always", "never")
TOKEN_MODES = ("text", "source")


@dataclass
class RescoreResult:
    """What :func:`rescore` wrote.

    Attributes
    ----------
    store : Store
    run : str
    sequences, tokens : int
        Completions and tokens scored.
    skipped : int
        Source records not scored (no prompt or completion, too long), each in the manifest.
    retokenised : dict or None
        When the source run logged token ids: ``compared`` completions, ``identical`` (the
        re-tokenised completion is a prefix of the logged ids) and ``different``, with the
        first differing ``examples`` (sample ids). None otherwise.
    seconds : float
        Wall time of the scoring loop (model loading excluded).
    device : str
    """

    store: Store
    run: str
    sequences: int
    tokens: int
    skipped: int
    retokenised: dict | None
    seconds: float
    device: str
    prompt_modes: dict = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        return {"store": str(self.store.path), "run": self.run, "sequences": self.sequences,
                "tokens": self.tokens, "skipped": self.skipped,
                "retokenised": self.retokenised, "seconds": self.seconds,
                "tokens_per_second": self.tokens_per_second, "device": self.device,
                "prompt_modes": self.prompt_modes}


# -- scoring ------------------------------------------------------------------------------
@dataclass
class _Item:
    index: int
    prompt_ids: list
    ids: np.ndarray


def score_batch(scoring: ScoringModel, items: Sequence[_Item], *, temperature: float,
                top_k: int, rows: int | None = None) -> list[TokenScores]:
    """Score a batch of (prompt, completion) token lists: right-padded, one forward pass.

    The head is applied to the completion-predicting positions only, ``rows`` at a time.
    """
    torch = require_torch()
    lengths = [len(it.prompt_ids) + len(it.ids) for it in items]
    width = max(lengths)
    pad = scoring.tokenizer.pad_token_id
    pad = pad if pad is not None else (scoring.tokenizer.eos_token_id or 0)
    input_ids = torch.full((len(items), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    batch_index, positions, targets, counts = [], [], [], []
    for b, it in enumerate(items):
        seq = np.concatenate([np.asarray(it.prompt_ids, np.int64), it.ids])
        input_ids[b, :len(seq)] = torch.from_numpy(seq)
        mask[b, :len(seq)] = 1
        p, n = len(it.prompt_ids), len(it.ids)
        # the logits at position t predict the token at t + 1
        positions.append(np.arange(p - 1, p - 1 + n))
        batch_index.append(np.full(n, b))
        targets.append(it.ids)
        counts.append(n)
    device = scoring.device
    hidden = scoring.hidden(input_ids.to(device), mask.to(device))
    flat_b = torch.from_numpy(np.concatenate(batch_index)).to(device)
    flat_t = torch.from_numpy(np.concatenate(positions)).to(device)
    target = torch.from_numpy(np.concatenate(targets)).to(device)
    rows = rows or default_block_rows(scoring.vocab_size)
    parts = []
    with torch.inference_mode():
        for start in range(0, int(target.shape[0]), rows):
            block = hidden[flat_b[start:start + rows], flat_t[start:start + rows]]
            logits = scoring.logits(block)
            parts.append(to_numpy(score_block(logits, target[start:start + rows],
                                              temperature=temperature, top_k=top_k)))
    del hidden
    scores = TokenScores.concat(parts, top_k)
    out, offset = [], 0
    for n in counts:
        out.append(TokenScores(scores.logprob[offset:offset + n],
                               scores.entropy[offset:offset + n],
                               scores.top_ids[offset:offset + n],
                               scores.top_logprobs[offset:offset + n]))
        offset += n
    return out


def _progress(total: int, show: bool | None):
    """A rich progress bar over completions on stderr (None off a terminal)."""
    if not (sys.stderr.isatty() if show is None else show):
        return None
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn)
    bar = Progress("[progress.description]{task.description}", BarColumn(),
                   MofNCompleteColumn(), TimeRemainingColumn(), transient=True,
                   console=Console(stderr=True))
    bar.start()
    bar.add_task("rescoring completions", total=total)
    return bar


def _check_options(temperature, top_k, batch_size, eos, tokens, on_error):
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise EntropylensError(f"temperature must be positive, got {temperature}")
    if top_k < 0:
        raise EntropylensError(f"top-k must be 0 or more, got {top_k}")
    if batch_size < 1:
        raise EntropylensError(f"batch size must be at least 1, got {batch_size}")
    if eos not in EOS_MODES:
        raise EntropylensError(f"eos must be one of {', '.join(EOS_MODES)}, got {eos!r}")
    if tokens not in TOKEN_MODES:
        raise EntropylensError(f"tokens must be one of {', '.join(TOKEN_MODES)}, got {tokens!r}")
    if on_error not in ("stop", "skip"):
        raise EntropylensError(f"on_error must be stop or skip, got {on_error!r}")


def rescore(src, model, out, *, run: str | None = None, source_run: str | None = None,
            format: str | None = None, temperature: float = 1.0, device: str | None = None,
            batch_size: int = 8, top_k: int = 20, chat_template: bool = True,
            eos: str = "auto", tokens: str = "text", steps: Iterable[int] | None = None,
            limit: int | None = None, dtype: str = "float32", on_error: str = "stop",
            replace: bool = False, progress: bool | None = None,
            block_rows: int | None = None) -> RescoreResult:
    """Score completions with a model and write exact per-token entropies as a run.

    Parameters
    ----------
    src : path or Store
        A store (pick the run with ``source_run``) or a sequence file any ingestor reads
        (verl rollout JSONL, TRL completions Parquet, a table with prompt/completion columns).
    model : path, ScoringModel or (model, tokenizer)
        A Hugging Face model folder or a ``.gguf`` file (see :func:`load_model`), a loaded
        :class:`ScoringModel`, or a transformers model and tokenizer already in memory.
    out : path or Store
        Store to write the run into (created when missing; may be the source store).
    run : str, optional
        Name of the new run (default: the source's name with ``-rescored``).
    source_run : str, optional
        Run of a store source (needed when the store holds several).
    format : str, optional
        Format of a sequence file (default: auto-detection).
    temperature : float
        Scores are those of ``softmax(logits / T)``; the manifest says ``logprob_basis:
        tempered``.
    device : {"cpu", "cuda"}, optional
        Default: CUDA when available, else CPU (ignored for a model already loaded).
    batch_size : int
        Completions per forward pass (sorted by length to reduce padding).
    top_k : int
        Alternatives stored per token.
    chat_template : bool
        Format raw prompts with the tokenizer's chat template (see the module notes).
    eos : {"auto", "always", "never"}
        When to append the end-of-turn token to the completion.
    tokens : {"text", "source"}
        Re-tokenise the completion text, or score the token ids the source run logged.
    steps : iterable of int, optional
        Only completions of these steps.
    limit : int, optional
        Only the first ``limit`` completions (after the step filter).
    dtype : {"float32", "bfloat16", "float16"}
        Weights dtype when loading from a path; scores are computed in float32.
    on_error : {"stop", "skip"}
        Stop at a record that cannot be scored (no text, too long) or skip and count it.
    replace : bool
        Overwrite a run of that name.
    progress : bool, optional
        Show a progress bar (default: when stderr is a terminal).
    block_rows : int, optional
        Positions whose logits are computed at once (default: 64 MiB of float32 logits).

    Returns
    -------
    RescoreResult

    Raises
    ------
    EntropylensError
        Naming the source and record for bad input; nothing is written then.
    """
    _check_options(temperature, top_k, batch_size, eos, tokens, on_error)
    if limit is not None and limit < 1:
        raise EntropylensError(f"limit must be at least 1, got {limit}")
    steps = list(steps) if steps is not None else None
    created = not isinstance(out, Store) and not (Path(out) / "store.json").exists()
    out_store = out if isinstance(out, Store) else Store.create(out)
    workdir = Path(tempfile.mkdtemp(prefix="entropylens-rescore-"))
    try:
        source = _read_source(src, source_run, format, steps, limit, workdir)
        name = run or f"{_stem(src) if source.ingested else source.run}-rescored"
        writer = out_store.write_run(name, replace=replace)
        try:
            result = _rescore_into(writer, source, model, temperature=temperature,
                                   device=device, batch_size=batch_size, top_k=top_k,
                                   chat_template=chat_template, eos=eos, tokens=tokens,
                                   dtype=dtype, on_error=on_error, progress=progress,
                                   rows=block_rows)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
    except BaseException:
        # a store this call created and left empty is removed, as ingest does
        if created and not out_store.runs():
            shutil.rmtree(out_store.path, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def _stem(src) -> str:
    path = Path(src)
    return (path.name.split(".")[0] or "source") if path.name else "source"


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


#: Completions encoded, sorted by length and scored together: memory holds one window's
#: token ids, not the whole source's.
WINDOW = 1024


def _rescore_into(writer, source: _Source, model, *, temperature, device, batch_size, top_k,
                  chat_template, eos, tokens, dtype, on_error, progress, rows) -> RescoreResult:
    if isinstance(model, ScoringModel):
        scoring = model
    elif isinstance(model, tuple) and len(model) == 2:
        scoring = wrap_model(*model)
    else:
        scoring = load_model(model, device=device, dtype=dtype)
    tokenizer = scoring.tokenizer
    if top_k > scoring.vocab_size:
        raise EntropylensError(f"top-k {top_k} is larger than the vocabulary "
                               f"({scoring.vocab_size})")
    encoder = PromptEncoder(tokenizer, chat_template=chat_template)
    pieces = PieceTable(tokenizer, scoring.vocab_size)
    stats = {"modes": {}, "eos_added": 0, "compared": 0, "identical": 0, "different": [],
             "sequences": 0, "tokens": 0}
    bar = _progress(source.sequences.num_rows, progress)

    def advance(n: int) -> None:
        if bar is not None:
            bar.advance(bar.task_ids[0], n)

    started = time.perf_counter()
    try:
        for offset in range(0, source.sequences.num_rows, WINDOW):
            window = source.sequences.slice(offset, WINDOW)
            items, metas = _encode_window(window, offset, source, encoder, tokenizer, tokens,
                                          eos, scoring.max_length, on_error, writer, stats)
            scored = _score_window(scoring, items, metas, batch_size=batch_size,
                                   temperature=temperature, top_k=top_k, rows=rows,
                                   advance=advance)
            scorable = [seq for seq in scored if len(seq.token_ids)]
            if scorable:
                writer.write_tokens(token_table(scorable, pieces, top_k), path=source.label)
            if scored:
                writer.write_sequences(sequence_table(scored), path=source.label)
            stats["sequences"] += len(scored)
            stats["tokens"] += int(sum(len(seq.token_ids) for seq in scored))
            advance(window.num_rows - len(scored))  # the rejected rows
    finally:
        if bar is not None:
            bar.stop()
    seconds = time.perf_counter() - started
    retokenised = None
    if stats["compared"]:
        retokenised = {"compared": stats["compared"], "identical": stats["identical"],
                       "different": stats["compared"] - stats["identical"],
                       "examples": stats["different"][:20]}
    manifest = writer.manifest
    for entry in source.sources:
        entry = dict(entry)
        writer.add_source(entry.pop("path"), format=entry.pop("format", None) or "unknown",
                          sha256=entry.pop("sha256", None), size=entry.pop("size", None),
                          **entry)
    manifest["temperature"] = float(temperature)
    manifest["logprob_basis"] = "tempered"
    manifest["vocab_size"] = scoring.vocab_size
    manifest["top_k"] = top_k or None
    notes = manifest.setdefault("notes", {})
    notes["model"] = scoring.describe()
    notes["rescore"] = {"source": source.label,
                        "source_run": None if source.ingested else source.run, "tokens": tokens,
                        "chat_template": encoder.template, "prompt_modes": stats["modes"],
                        "eos": eos, "eos_appended": stats["eos_added"],
                        "retokenised": retokenised, "batch_size": batch_size,
                        "seconds": round(seconds, 3)}
    return RescoreResult(store=writer.store, run=writer.name, sequences=stats["sequences"],
                         tokens=stats["tokens"],
                         skipped=source.sequences.num_rows - stats["sequences"],
                         retokenised=retokenised, seconds=seconds, device=scoring.device,
                         prompt_modes=stats["modes"])


def _encode_window(window: pa.Table, offset: int, source: _Source, encoder: PromptEncoder,
                   tokenizer, tokens: str, eos: str, max_length: int | None, on_error: str,
                   writer, stats: dict) -> tuple[list[_Item], dict[int, dict]]:
    """Token ids of one window of source rows; rows that cannot be scored are rejected."""
    rows = window.to_pylist()
    logged = _logged_ids(source, window)
    items: list[_Item] = []
    metas: dict[int, dict] = {}

    def reject(i: int, message: str) -> None:
        record = int(source.record_numbers[offset + i])
        if on_error == "stop":
            raise EntropylensError(f"record {record}: {message}", path=source.label)
        writer.reject(path=source.label, line=record, message=message)

    for i, row in enumerate(rows):
        prompt, completion = _text(row.get("prompt")), _text(row.get("completion"))
        key = (row.get("step"), row.get("sample_id"))
        if prompt is None:
            reject(i, "no prompt text to condition the completion on")
            continue
        prompt_ids, mode = encoder(prompt)
        if not prompt_ids:
            bos = tokenizer.bos_token_id
            if bos is None:
                reject(i, "the prompt encodes to no token and the tokenizer has no BOS token")
                continue
            prompt_ids = [bos]
        if tokens == "source":
            if key not in logged:
                reject(i, f"the source run logged no token ids for step {key[0]}, sample "
                          f"{key[1]!r}")
                continue
            ids = logged[key]
        else:
            if completion is None:
                reject(i, "no completion text")
                continue
            ids, added = completion_ids(tokenizer, completion,
                                        finish_reason=row.get("finish_reason"),
                                        num_tokens=row.get("num_tokens"), eos=eos)
            ids = np.asarray(ids, dtype=np.int64)
            stats["eos_added"] += added
            if key in logged:
                stats["compared"] += 1
                ref = logged[key]
                if len(ids) <= len(ref) and np.array_equal(ref[:len(ids)], ids):
                    stats["identical"] += 1
                else:
                    stats["different"].append(str(key[1]) if key[0] is None
                                              else f"{key[0]}/{key[1]}")
        if max_length and len(prompt_ids) + len(ids) > max_length:
            reject(i, f"prompt and completion hold {len(prompt_ids) + len(ids)} tokens, more "
                      f"than the model's {max_length}")
            continue
        stats["modes"][mode] = stats["modes"].get(mode, 0) + 1
        items.append(_Item(i, np.asarray(prompt_ids, np.int64), ids))
        metas[i] = row
    return items, metas


def _score_window(scoring: ScoringModel, items: list[_Item], metas: dict[int, dict], *,
                  batch_size: int, temperature: float, top_k: int, rows: int | None,
                  advance=lambda n: None) -> list[ScoredSequence]:
    """Score a window's items in length-sorted batches; returns them in source order."""
    order = sorted(items, key=lambda it: -(len(it.prompt_ids) + len(it.ids)))
    scored: dict[int, ScoredSequence] = {}
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        scorable = [it for it in batch if len(it.ids)]
        results = score_batch(scoring, scorable, temperature=temperature, top_k=top_k,
                              rows=rows) if scorable else []
        for it, scores in zip(scorable, results):
            scored[it.index] = ScoredSequence(metas[it.index], it.ids, scores)
        for it in batch:
            if not len(it.ids):  # an empty completion still gets its sequence row
                scored[it.index] = ScoredSequence(metas[it.index], it.ids,
                                                  TokenScores.concat([], top_k))
        advance(len(batch))
    return [scored[i] for i in sorted(scored)]
