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

import json
import math
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import EntropylensError
from ..store import Store, open_store
from .model import ScoringModel, load_model, require_torch, wrap_model
from .scoring import TokenScores, score_block, to_numpy
from .scoring import block_rows as default_block_rows
from .tables import PieceTable, ScoredSequence, sequence_table, token_table

EOS_MODES = ("auto", "always", "never")
#: A role line of a chat template whose special tokens were stripped (verl rollout prompts).
_ROLE_LINE = re.compile(r"(?:^|\n)(system|user|assistant|tool)\n")
TOKEN_MODES = ("text", "source")
_STOP_REASONS = {"stop", "eos", "eos_token", "end_turn", "stop_token", "end"}
_LENGTH_REASONS = {"length", "max_tokens", "truncated", "abort", "max_length"}


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


# -- reading the source -------------------------------------------------------------------
@dataclass
class _Source:
    sequences: pa.Table
    label: str
    sources: list
    store: Store | None
    run: str | None
    record_numbers: np.ndarray
    ingested: bool = False  # a sequence file read into a temporary store


def _read_source(src, source_run: str | None, format: str | None, steps, limit: int | None,
                 workdir: Path) -> _Source:
    """The sequences to rescore, from a store run or a sequence file ingested on the side."""
    is_store = isinstance(src, Store) or (Path(src) / "store.json").exists()
    if is_store:
        store = open_store(src)
        runs = store.runs()
        if source_run is None:
            if len(runs) != 1:
                raise EntropylensError(f"the store holds {len(runs)} runs "
                                       f"({', '.join(runs) or 'none'}): pick one with "
                                       "--source-run", path=store.path)
            source_run = runs[0]
        table = store.read_sequences(source_run)
        label = f"{store.path}#{source_run}"
        sources = [{"path": str(store.run_dir(source_run).resolve()),
                    "format": "entropylens-store", "size": None, "sha256": None,
                    "run": source_run}]
    else:
        from ..ingest import ingest

        path = Path(src)
        if not path.exists():
            raise EntropylensError("no such file or folder", path=path)
        tmp = Store.create(workdir / "source")
        ingest(path, tmp, run="source", format=format, progress=False)
        store, source_run = tmp, "source"
        table = store.read_sequences(source_run)
        label = str(path)
        sources = store.manifest(source_run)["sources"]
    if table.num_rows == 0:
        raise EntropylensError("holds no completions to rescore (no sequences table with "
                               "prompt and completion text)", path=label)
    numbers = np.arange(1, table.num_rows + 1)
    if steps is not None:
        keep = pc.fill_null(pc.is_in(table.column("step"),
                                     value_set=pa.array(list(steps), pa.int64())), False)
        table, numbers = table.filter(keep), numbers[keep.to_numpy(zero_copy_only=False)]
        if table.num_rows == 0:
            raise EntropylensError(f"no completion at step(s) {', '.join(map(str, steps))}",
                                   path=label)
    if limit is not None:
        table, numbers = table.slice(0, limit), numbers[:limit]
    return _Source(table, label, sources, store, source_run, numbers, ingested=not is_store)


def _logged_ids(source: _Source, window: pa.Table) -> dict[tuple, np.ndarray]:
    """Token ids the source run logged for a window's completions, per ``(step, sample_id)``."""
    store, run = source.store, source.run
    if store is None or not store.manifest(run)["counts"].get("tokens"):
        return {}
    import pyarrow.dataset as ds

    steps = sorted(set(window.column("step").drop_null().to_pylist()))
    samples = sorted(set(window.column("sample_id").to_pylist()))
    filter = ds.field("step").isin(pa.array(steps, pa.int64())) if steps else None
    if window.column("step").null_count:
        filter = ds.field("step").is_null() if filter is None else \
            (filter | ds.field("step").is_null())
    filter = filter & ds.field("sample_id").isin(pa.array(samples, pa.string()))
    table = store.read_tokens(run, columns=["step", "sample_id", "position", "token_id"],
                              filter=filter)
    if table.num_rows == 0 or table.column("token_id").null_count == table.num_rows:
        return {}
    table = table.sort_by([("step", "ascending"), ("sample_id", "ascending"),
                           ("position", "ascending")])
    step = np.asarray(table.column("step").to_pylist(), dtype=object)
    sample = np.asarray(table.column("sample_id").to_pylist(), dtype=object)
    ids = table.column("token_id").to_numpy(zero_copy_only=False)
    change = np.flatnonzero((step[1:] != step[:-1]) | (sample[1:] != sample[:-1])) + 1
    bounds = np.concatenate([[0], change, [len(ids)]])
    return {(step[start], sample[start]): ids[start:end].astype(np.int64)
            for start, end in zip(bounds[:-1], bounds[1:])}


# -- tokenising ---------------------------------------------------------------------------
class PromptEncoder:
    """Prompt text to token ids, through the chat template where the prompt is raw.

    Parameters
    ----------
    tokenizer : transformers tokenizer
    chat_template : bool
        Use the tokenizer's chat template for raw prompts and message lists.
    """

    def __init__(self, tokenizer, chat_template: bool = True):
        self.tokenizer = tokenizer
        self.template = bool(chat_template and getattr(tokenizer, "chat_template", None))
        specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
        specials.update(str(t) for t in (getattr(tokenizer, "added_tokens_decoder", {}) or {})
                        .values() if getattr(t, "special", False))
        self.specials = sorted((s for s in specials if s and len(s) > 1), key=len)
        self.bos = getattr(tokenizer, "bos_token", None)

    @staticmethod
    def messages(prompt: str) -> list | None:
        """The prompt as a chat message list when it is one stored as JSON."""
        text = prompt.lstrip()
        if not text.startswith("["):
            return None
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if isinstance(value, list) and value and all(
                isinstance(m, dict) and "role" in m and "content" in m for m in value):
            return value
        return None

    def restore(self, prompt: str) -> str | None:
        """The templated prompt whose special tokens were stripped to give ``prompt``, or None.

        verl decodes its rollout prompts with ``skip_special_tokens=True``: the chat template's
        text stays (``system\n...\nuser\n...\nassistant\n``) but its special tokens are
        gone. The role lines give the messages back; the result is used only when templating
        them and stripping the special tokens again gives the prompt exactly.
        """
        parts = _ROLE_LINE.split(prompt)
        if len(parts) < 5 or parts[0] or parts[-2] != "assistant" or parts[-1]:
            return None
        messages = [{"role": role, "content": content}
                    for role, content in zip(parts[1:-2:2], parts[2:-2:2])]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
        except Exception:  # a template that rejects these roles: not a stripped template
            return None
        stripped = text
        for special in reversed(self.specials):  # longest first
            stripped = stripped.replace(special, "")
        return text if stripped == prompt else None

    def __call__(self, prompt: str) -> tuple[list[int], str]:
        """``(ids, mode)`` with mode ``messages``, ``restored``, ``chat_template`` or ``as_is``."""
        tok = self.tokenizer
        messages = self.messages(prompt)
        if messages is not None and self.template:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return tok(text, add_special_tokens=False)["input_ids"], "messages"
        restored = self.restore(prompt) if self.template else None
        if restored is not None:
            return tok(restored, add_special_tokens=False)["input_ids"], "restored"
        if self.template and not any(s in prompt for s in self.specials):
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            return tok(text, add_special_tokens=False)["input_ids"], "chat_template"
        starts_with_bos = bool(self.bos) and prompt.startswith(self.bos)
        return tok(prompt, add_special_tokens=not starts_with_bos)["input_ids"], "as_is"


def completion_ids(tokenizer, completion: str, *, finish_reason: str | None,
                   num_tokens: int | None, eos: str = "auto") -> tuple[list[int], bool]:
    """The completion's token ids as the tokenizer splits its text, plus the end-of-turn token
    where the completion ended on it. Returns ``(ids, eos_appended)``."""
    ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    eos_id = tokenizer.eos_token_id
    if eos_id is None or eos == "never" or (ids and ids[-1] == eos_id):
        return ids, False
    if eos == "always":
        return ids + [eos_id], True
    reason = (finish_reason or "").strip().lower()
    if reason in _STOP_REASONS:
        return ids + [eos_id], True
    if reason in _LENGTH_REASONS or reason:
        return ids, False
    if num_tokens is not None and num_tokens > len(ids):
        return ids + [eos_id], True
    return ids, False


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
