"""The metric-name alias table: every framework's raw keys mapped onto canonical metrics.

One place holds the mapping. Each rule is a regular expression matched against the whole raw
key; the first rule that matches wins. The raw key is always kept next to the canonical name
(column ``raw_key`` of the metrics table), and keys no rule knows keep their raw name.

Traps the table knows:

- TRL PPO ``objective/entropy`` is a summed sequence NLL, not policy entropy
  (``policy/entropy_avg`` is); it is mapped to ``sequence_nll_sum``.
- NeMo-RL ``train/approx_entropy`` is an approximation: mapped to ``policy_entropy`` and
  flagged approximate.
- verl renamed ``actor/entropy_loss`` (the masked mean token entropy) to ``actor/entropy``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

#: Canonical metric names and what they mean.
CANONICAL_METRICS = {
    "policy_entropy": "mean token entropy of the policy on its own samples (nats)",
    "reward_mean": "mean training reward of the batch",
    "reward_std": "standard deviation of training rewards",
    "val_accuracy": "validation accuracy or score (fraction)",
    "response_length_mean": "mean completion length in tokens",
    "kl": "KL divergence to the reference policy",
    "clip_fraction": "fraction of ratios clipped by the PPO objective",
    "truncation_ratio": "fraction of completions cut at the length limit",
    "loss": "training loss",
    "grad_norm": "gradient norm",
    "learning_rate": "learning rate",
    "sequence_nll_sum": "summed negative log-likelihood of sequences (not an entropy)",
}


@dataclass(frozen=True)
class Alias:
    """One rule of the alias table.

    Attributes
    ----------
    pattern : str
        Regular expression matched against the whole raw key.
    metric : str
        Canonical name; ``{name}`` inserts the named group of the pattern (a dataset name).
    split : {"train", "val"}
    approximate : bool
        The source's value only approximates the canonical quantity.
    """

    pattern: str
    metric: str
    split: str = "train"
    approximate: bool = False

    def match(self, key: str) -> re.Match | None:
        return re.fullmatch(self.pattern, key)


# Order matters: the first match wins, so traps come before broad patterns.
ALIASES: tuple[Alias, ...] = (
    # -- traps ---------------------------------------------------------------------------
    Alias(r"objective/entropy", "sequence_nll_sum"),
    Alias(r"(train/)?approx_entropy", "policy_entropy", approximate=True),
    # -- policy entropy ------------------------------------------------------------------
    Alias(r"actor/entropy(_loss)?", "policy_entropy"),
    Alias(r"policy/entropy_avg", "policy_entropy"),
    Alias(r"(train/)?entropy(/mean)?", "policy_entropy"),
    Alias(r"policy_entropy(_mean)?", "policy_entropy"),
    # -- reward --------------------------------------------------------------------------
    Alias(r"(train/)?rewards?(/mean)?", "reward_mean"),
    Alias(r"critic/(score|rewards)/mean", "reward_mean"),
    Alias(r"(train/)?reward_std", "reward_std"),
    # -- validation ----------------------------------------------------------------------
    Alias(r"val_acc(uracy)?", "val_accuracy", split="val"),
    # -- lengths, kl, clipping -----------------------------------------------------------
    Alias(r"(train/)?(response_length|completion_length)(/mean)?", "response_length_mean"),
    Alias(r"(train/)?completions/mean_length", "response_length_mean"),
    Alias(r"(train/)?kl", "kl"),
    Alias(r"(train/)?(loss)", "loss"),
    Alias(r"(train/)?grad_norm", "grad_norm"),
    Alias(r"(train/)?learning_rate", "learning_rate"),
)


@dataclass(frozen=True)
class MetricName:
    """The canonical reading of a raw key."""

    metric: str
    raw_key: str
    split: str
    approximate: bool = False


def _guess_split(key: str) -> str:
    return "val" if re.match(r"^(val|eval|test|validation)([-_/]|$)", key, re.IGNORECASE) \
        else "train"


def canonical_metric(raw_key: str, extra: Mapping[str, str] | None = None) -> MetricName:
    """Map a raw metric key onto its canonical name.

    Parameters
    ----------
    raw_key : str
        The name as the source logged it.
    extra : mapping of str to str, optional
        User aliases ``{raw_key: canonical}``, consulted first.

    Returns
    -------
    MetricName
        Unknown keys keep their raw name; the split is guessed from a ``val``/``eval``/``test``
        prefix.
    """
    key = raw_key.strip()
    if extra and key in extra:
        target = extra[key]
        return MetricName(target, raw_key, "val" if target.startswith("val") else _guess_split(key))
    for alias in ALIASES:
        found = alias.match(key)
        if found:
            metric = alias.metric.format(**found.groupdict()) if "{" in alias.metric \
                else alias.metric
            return MetricName(metric, raw_key, alias.split, alias.approximate)
    return MetricName(key, raw_key, _guess_split(key))


def approximate_metrics() -> set[str]:
    """Raw-key patterns whose canonical value is an approximation (for data-quality checks)."""
    return {alias.pattern for alias in ALIASES if alias.approximate}
