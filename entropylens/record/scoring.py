"""Per-token scores from logits: sampled-token logprob, exact entropy and top-k, in torch.

Shared by the rescorer (logits computed block by block from hidden states) and by the
``generate()`` recorder (logits returned by ``model.generate(..., output_logits=True)``). All
arithmetic is float32, whatever the model's dtype, and a block is at most ``rows × V``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Bytes of float32 logits one block may hold. The shifted logits, their exponentials and
#: their product need blocks of the same size, so a block of 64 MiB keeps the work space near
#: 200 MiB whatever the vocabulary.
BLOCK_BYTES = 64 * 1024 * 1024


def block_rows(vocab_size: int, block_bytes: int = BLOCK_BYTES) -> int:
    """Rows of logits that fit in ``block_bytes`` of float32 (at least 1)."""
    return max(1, int(block_bytes // (4 * max(1, vocab_size))))


@dataclass
class TokenScores:
    """Scores of ``n`` predicted positions (numpy arrays, float32 / int64).

    Attributes
    ----------
    logprob : ndarray, shape (n,)
        log p(target) under ``softmax(logits / T)``.
    entropy : ndarray, shape (n,)
        Exact full-vocabulary entropy of ``softmax(logits / T)``, in nats.
    top_ids : ndarray, shape (n, k)
        The k most likely token ids, most likely first.
    top_logprobs : ndarray, shape (n, k)
        Their log-probabilities.
    """

    logprob: np.ndarray
    entropy: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray

    @classmethod
    def concat(cls, parts: list["TokenScores"], top_k: int) -> "TokenScores":
        """Join the scores of consecutive blocks (an empty list gives empty arrays)."""
        if not parts:
            return cls(np.empty(0, np.float32), np.empty(0, np.float32),
                       np.empty((0, top_k), np.int64), np.empty((0, top_k), np.float32))
        return cls(np.concatenate([p.logprob for p in parts]),
                   np.concatenate([p.entropy for p in parts]),
                   np.concatenate([p.top_ids for p in parts]),
                   np.concatenate([p.top_logprobs for p in parts]))


def score_block(logits, targets, *, temperature: float = 1.0, top_k: int = 20):
    """Score one block of logits in torch (no copy to the host).

    Parameters
    ----------
    logits : torch.Tensor, shape (n, V)
        Logits of any float dtype; cast to float32.
    targets : torch.Tensor, shape (n,)
        Token id whose log-probability is wanted at each row.
    temperature : float
        The entropy and logprobs are those of ``softmax(logits / T)``.
    top_k : int
        Alternatives kept per row (0 keeps none).

    Returns
    -------
    tuple of torch.Tensor
        ``(logprob, entropy, top_ids, top_logprobs)`` on the logits' device.

    Notes
    -----
    With ``z = logits / T`` shifted by its maximum, ``y = z - max z``, ``e = exp y`` and
    ``S = Σ e``: ``log p_i = y_i - log S`` and ``H = log S - Σ e_i y_i / S``. The shift keeps
    every term small, so float32 stays within about 1e-6 nats of a float64 computation (the
    unshifted ``logsumexp(z) - Σ softmax(z) z`` loses 3e-4 to cancellation on real logits).
    Tokens masked with ``-inf`` have probability zero and add nothing to the entropy. One
    ``exp`` over the block is the only transcendental pass.
    """
    import torch

    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    y = z - z.max(dim=-1, keepdim=True).values
    del z
    weights = torch.exp(y)
    total = weights.sum(dim=-1)
    expected = (weights * y).sum(dim=-1)
    if not bool(torch.isfinite(expected).all()):
        # 0 * -inf is NaN: only rows with masked tokens take the slower exact path
        bad = ~torch.isfinite(expected)
        yb = y[bad]
        expected[bad] = (weights[bad] * torch.where(torch.isfinite(yb), yb,
                                                    torch.zeros_like(yb))).sum(dim=-1)
    del weights
    log_total = torch.log(total)
    entropy = torch.clamp(log_total - expected / total, min=0.0)
    logprob = y.gather(1, targets.long().view(-1, 1).to(y.device)).squeeze(1) - log_total
    if top_k > 0:
        top_values, top_ids = torch.topk(y, k=min(top_k, y.shape[-1]), dim=-1)
        top_logprobs = top_values - log_total.unsqueeze(1)
    else:
        top_ids = torch.empty((y.shape[0], 0), dtype=torch.long, device=y.device)
        top_logprobs = torch.empty((y.shape[0], 0), dtype=torch.float32, device=y.device)
    return logprob, entropy, top_ids, top_logprobs


def to_numpy(scored) -> TokenScores:
    """Move the tensors of :func:`score_block` to the host as a :class:`TokenScores`."""
    logprob, entropy, top_ids, top_logprobs = scored
    return TokenScores(logprob.detach().cpu().numpy().astype(np.float32, copy=False),
                       entropy.detach().cpu().numpy().astype(np.float32, copy=False),
                       top_ids.detach().cpu().numpy().astype(np.int64, copy=False),
                       top_logprobs.detach().cpu().numpy().astype(np.float32, copy=False))


def score_logits(logits, targets, *, temperature: float = 1.0, top_k: int = 20,
                 rows: int | None = None) -> TokenScores:
    """Score ``logits`` block by block so at most ``rows × V`` float32 exist at a time.

    Parameters
    ----------
    logits : torch.Tensor, shape (n, V)
    targets : torch.Tensor, shape (n,)
    temperature, top_k
        As in :func:`score_block`.
    rows : int, optional
        Rows per block (default: :func:`block_rows` of the vocabulary).
    """
    rows = rows or block_rows(int(logits.shape[-1]))
    parts = [to_numpy(score_block(logits[start:start + rows], targets[start:start + rows],
                                  temperature=temperature, top_k=top_k))
             for start in range(0, int(logits.shape[0]), rows)]
    return TokenScores.concat(parts, top_k)
