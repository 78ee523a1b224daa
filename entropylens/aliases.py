"""The metric-name alias table: every framework's raw keys mapped onto canonical metrics.

One place holds the mapping. Each rule is a regular expression matched against the whole raw
key; the first rule that matches wins. The raw key is always kept next to the canonical name
(column ``raw_key`` of the metrics table), and keys no rule knows keep their raw name.

A key is resolved in three passes:

1. the key as logged (framework-specific names such as verl's ``actor/entropy`` or
   ``val-core/<dataset>/acc/mean@N``);
2. without the ``train/`` (``training/``) prefix that trackers add (the Hugging Face W&B and
   TensorBoard callbacks log TRL's ``entropy`` as ``train/entropy``; OpenRLHF and NeMo-RL log
   everything under ``train/``);
3. without an evaluation prefix (``eval/``, ``eval_``, ``validation/``, ``val/``, ``test/``):
   the remainder is resolved by passes 1 and 2 and the canonical name gets a ``val_`` prefix
   (``eval_reward`` becomes ``val_reward_mean``), so that validation values never mix with
   training values under one name.

Traps the table knows:

- TRL PPO ``objective/entropy`` is a summed sequence NLL, not policy entropy
  (``policy/entropy_avg`` is); it is mapped to ``sequence_nll_sum``.
- NeMo-RL ``train/approx_entropy`` is an approximation: mapped to ``policy_entropy`` and
  flagged approximate (:func:`is_approximate`; ingest records such keys in the manifest notes
  under ``approximate_metrics``).
- verl renamed ``actor/entropy_loss`` (the masked mean token entropy) to ``actor/entropy``;
  OpenRLHF's ``entropy_loss`` is the same quantity.
- TRL PPO ``val/...`` keys (``val/clipfrac_avg``, ``val/ratio``) describe the *value head*,
  not validation: they stay in the train split.
- verl ``critic/rewards/mean`` is the score minus the in-reward KL penalty; the task reward is
  ``critic/score/mean``.
- verl logs validation per dataset as ``val-core/<ds>/acc/mean@N`` (older versions:
  ``val/test_score/<ds>`` and ``test_score/<ds>``): each becomes ``val_accuracy/<ds>``, and
  the ingestors add ``val_accuracy`` as the mean over datasets at each step.

Users extend the table with ``--alias RAW=CANONICAL`` or ``--aliases FILE`` (TOML or JSON
``{raw_key: canonical}``, see :func:`load_alias_file`); user aliases are consulted first.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping

from .errors import EntropylensError

#: Canonical metric names and what they mean.
CANONICAL_METRICS = {
    "policy_entropy": "mean token entropy of the policy on its own samples (nats)",
    "reward_mean": "mean training reward (task score) of the batch",
    "reward_std": "standard deviation of training rewards",
    "val_accuracy": "validation accuracy or score (fraction); the mean over datasets when "
                    "the source logs several",
    "val_accuracy/<dataset>": "validation accuracy on one dataset",
    "response_length_mean": "mean completion length in tokens",
    "kl": "KL divergence to the reference policy",
    "clip_fraction": "fraction of tokens whose ratio the PPO objective clipped",
    "truncation_ratio": "fraction of completions cut at the length limit",
    "loss": "training loss",
    "grad_norm": "gradient norm",
    "learning_rate": "learning rate",
    "value_clip_fraction": "fraction of value-head predictions clipped (PPO critic)",
    "sequence_nll_sum": "summed negative log-likelihood of sequences (not an entropy)",
    "val_<metric>": "any canonical metric measured on validation data (e.g. val_reward_mean)",
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
        An empty string keeps the key's own name (used to pin the split of a raw key).
    split : {"train", "val"}
    approximate : bool
        The source's value only approximates the canonical quantity.
    note : str
        Where the key comes from, for readers of the table.
    """

    pattern: str
    metric: str
    split: str = "train"
    approximate: bool = False
    note: str = ""

    def match(self, key: str) -> re.Match | None:
        return _compiled(self.pattern).fullmatch(key)


@lru_cache(maxsize=None)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)


# Order matters: the first match wins, so traps come before broad patterns. The position of a
# rule is also its priority when two raw keys of one source map onto the same canonical name.
ALIASES: tuple[Alias, ...] = (
    # -- traps ---------------------------------------------------------------------------
    Alias(r"objective/entropy", "sequence_nll_sum",
          note="TRL PPO/RLOO: summed sequence NLL of the samples, not policy entropy"),
    Alias(r"approx_entropy", "policy_entropy", approximate=True,
          note="NeMo-RL train/approx_entropy: an estimate from the sampled tokens"),
    Alias(r"val/clipfrac_avg", "value_clip_fraction",
          note="TRL PPO value-head clip fraction ('val' is the value head)"),
    Alias(r"val/(ratio|ratio_var|num_eos_tokens)", "",
          note="TRL PPO: policy ratio statistics and EOS counts, train split"),
    # -- policy entropy ------------------------------------------------------------------
    Alias(r"actor/entropy", "policy_entropy", note="verl >= 0.3"),
    Alias(r"actor/entropy_loss", "policy_entropy",
          note="verl < 0.3: the masked mean token entropy despite the name"),
    Alias(r"policy/entropy_avg", "policy_entropy", note="TRL PPO/RLOO"),
    Alias(r"entropy(/mean)?", "policy_entropy",
          note="TRL GRPO 'entropy' (0.17+), prime-rl trainer 'entropy/mean'"),
    Alias(r"entropy_loss", "policy_entropy",
          note="OpenRLHF train/entropy_loss: masked mean token entropy"),
    Alias(r"policy_entropy(_mean)?", "policy_entropy"),
    # -- reward --------------------------------------------------------------------------
    Alias(r"critic/score/mean", "reward_mean", note="verl: the task score of the batch"),
    Alias(r"rewards?(/mean)?", "reward_mean",
          note="TRL GRPO 'reward', prime-rl 'reward/mean', NeMo-RL and OpenRLHF "
               "train/reward"),
    Alias(r"reward_mean", "reward_mean", note="OpenRLHF evaluation (eval/reward_mean)"),
    Alias(r"objective/scores", "reward_mean", note="TRL PPO/RLOO reward-model score"),
    Alias(r"(reward_std|reward/std|critic/score/std)", "reward_std"),
    # -- validation (framework-specific, per dataset) -------------------------------------
    Alias(r"val-core/(?P<ds>.+)/(acc|reward)/mean[@_]\d+", "val_accuracy/{ds}", split="val",
          note="verl >= 0.3 core validation metric per data source (TensorBoard writers "
               "turn '@' into '_')"),
    Alias(r"val/test_score/(?P<ds>.+)", "val_accuracy/{ds}", split="val",
          note="verl 0.2"),
    Alias(r"test_score/(?P<ds>.+)", "val_accuracy/{ds}", split="val",
          note="verl 0.1 (also in 'Initial/Final validation metrics' lines)"),
    Alias(r"eval/(?P<ds>[^/]+)/avg[@_]\d+", "val_accuracy/{ds}", split="val",
          note="prime-rl evaluation per environment"),
    Alias(r"eval/pass1", "val_accuracy", split="val", note="OpenRLHF"),
    Alias(r"eval/(eval_)?(?P<ds>.+)_pass1", "val_accuracy/{ds}", split="val",
          note="OpenRLHF per data source"),
    Alias(r"(val_acc(uracy)?|validation/accuracy|eval_accuracy|eval/accuracy|"
          r"val/accuracy|val/acc)", "val_accuracy", split="val",
          note="NeMo-RL validation/accuracy, HF Trainer eval_accuracy"),
    # -- lengths -------------------------------------------------------------------------
    Alias(r"(response_length|completion_length)(/mean)?", "response_length_mean",
          note="verl response_length/mean, TRL <= 0.16 completion_length, OpenRLHF"),
    Alias(r"completions/mean_length", "response_length_mean", note="TRL GRPO 0.17+"),
    Alias(r"completion_len/mean", "response_length_mean", note="prime-rl orchestrator"),
    Alias(r"mean_gen_tokens_per_sample", "response_length_mean", note="NeMo-RL"),
    Alias(r"response_length_mean", "response_length_mean",
          note="OpenRLHF evaluation (eval/response_length_mean)"),
    # -- truncation ----------------------------------------------------------------------
    Alias(r"response_length/clip_ratio", "truncation_ratio", note="verl"),
    Alias(r"completions/clipped_ratio", "truncation_ratio", note="TRL GRPO"),
    Alias(r"is_truncated/mean", "truncation_ratio", note="prime-rl orchestrator"),
    Alias(r"(truncated|truncated_rate|truncation_ratio)", "truncation_ratio",
          note="OpenRLHF"),
    # -- kl ------------------------------------------------------------------------------
    Alias(r"actor/kl_loss", "kl", note="verl with use_kl_loss"),
    Alias(r"actor/reward_kl_penalty", "kl", note="verl with KL in the reward"),
    Alias(r"critic/kl", "kl", note="verl 0.1 KL in the reward"),
    Alias(r"kl", "kl", note="TRL GRPO, OpenRLHF"),
    Alias(r"objective/kl", "kl", note="TRL PPO/RLOO"),
    # -- clipping ------------------------------------------------------------------------
    Alias(r"actor/pg_clipfrac", "clip_fraction", note="verl"),
    Alias(r"clip_ratio/region_mean", "clip_fraction", note="TRL GRPO 0.18+"),
    Alias(r"clip_ratio", "clip_fraction", note="TRL GRPO 0.15-0.17"),
    Alias(r"policy/clipfrac_avg", "clip_fraction", note="TRL PPO/RLOO"),
    Alias(r"ppo_clip_ratio", "clip_fraction", note="OpenRLHF"),
    # -- optimisation --------------------------------------------------------------------
    Alias(r"(loss|loss/mean)", "loss"),
    Alias(r"(grad_norm|actor/grad_norm|optim/grad_norm)", "grad_norm"),
    Alias(r"(learning_rate|lr|actor/lr|optim/lr|actor_lr)", "learning_rate"),
)

#: Prefixes trackers put before a trainer's own keys (pass 2).
_TRAIN_PREFIX = re.compile(r"^(train|training)/")
#: Prefixes of evaluation keys (pass 3).
_EVAL_PREFIX = re.compile(r"^(eval|validation|val|test)[/_](?=.)")


@dataclass(frozen=True)
class MetricName:
    """The canonical reading of a raw key.

    Attributes
    ----------
    metric : str
        Canonical name (the raw key when no rule knows it).
    raw_key : str
    split : str
    approximate : bool
        The value only approximates the canonical quantity.
    priority : int
        Position of the rule that matched (lower wins when two raw keys of one source map
        onto the same canonical name); ``-1`` for user aliases, a large number for unknown
        keys.
    """

    metric: str
    raw_key: str
    split: str
    approximate: bool = False
    priority: int = 1 << 30


def _guess_split(key: str) -> str:
    return "val" if re.match(r"^(val|eval|test|validation)([-_/]|$)", key, re.IGNORECASE) \
        else "train"


def _lookup(key: str) -> tuple[Alias, re.Match, int] | None:
    for index, alias in enumerate(ALIASES):
        found = alias.match(key)
        if found:
            return alias, found, index
    return None


def _resolve(key: str) -> tuple[str, str, bool, int] | None:
    """Passes 1 and 2: (metric, split, approximate, priority) or None."""
    hit = _lookup(key)
    if hit is None:
        stripped = _TRAIN_PREFIX.sub("", key)
        if stripped != key:
            hit = _lookup(stripped)
    if hit is None:
        return None
    alias, found, index = hit
    metric = alias.metric.format(**found.groupdict()) if "{" in alias.metric else alias.metric
    return metric or key, alias.split, alias.approximate, index


@lru_cache(maxsize=65536)
def _builtin(key: str) -> MetricName:
    resolved = _resolve(key)
    if resolved is not None:
        metric, split, approximate, priority = resolved
        return MetricName(metric, key, split, approximate, priority)
    rest = _EVAL_PREFIX.sub("", key)
    if rest != key:
        resolved = _resolve(rest)
        if resolved is not None:
            metric, _, approximate, priority = resolved
            if not metric.startswith("val_"):
                metric = "val_" + metric
            return MetricName(metric, key, "val", approximate, priority)
    return MetricName(key, key, _guess_split(key))


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

    Examples
    --------
    >>> canonical_metric("train/objective/entropy").metric
    'sequence_nll_sum'
    >>> canonical_metric("val-core/math/acc/mean@1").metric
    'val_accuracy/math'
    >>> canonical_metric("eval_reward").metric, canonical_metric("eval_reward").split
    ('val_reward_mean', 'val')
    """
    key = raw_key.strip()
    if extra and key in extra:
        target = extra[key]
        split = "val" if target.startswith("val") else _guess_split(key)
        return MetricName(target, raw_key, split, False, -1)
    name = _builtin(key)
    return name if name.raw_key == raw_key else MetricName(
        name.metric, raw_key, name.split, name.approximate, name.priority)


def is_approximate(raw_key: str) -> bool:
    """Whether the built-in table flags ``raw_key``'s canonical value as an approximation.

    >>> is_approximate("train/approx_entropy"), is_approximate("actor/entropy")
    (True, False)
    """
    return canonical_metric(raw_key).approximate


def approximate_metrics() -> set[str]:
    """Raw-key patterns whose canonical value is an approximation (for data-quality checks)."""
    return {alias.pattern for alias in ALIASES if alias.approximate}


def load_alias_file(path: str | Path) -> dict[str, str]:
    """Read user aliases ``{raw_key: canonical}`` from a TOML or JSON file.

    A TOML file holds ``"raw/key" = "canonical"`` lines, at the top level or under an
    ``[aliases]`` table; a JSON file holds one object (or ``{"aliases": {...}}``).

    Raises
    ------
    EntropylensError
        When the file cannot be read or parsed, or a value is not a non-empty string; the
        message names the file (and the line for syntax errors).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise EntropylensError(f"cannot read alias file: {exc.strerror or exc}",
                               path=path) from None
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EntropylensError(f"not valid JSON: {exc.msg}", path=path,
                                   line=exc.lineno) from None
    else:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            line = getattr(exc, "lineno", None)
            if line is None:
                found = re.search(r"line (\d+)", str(exc))
                line = int(found.group(1)) if found else None
            raise EntropylensError(f"not valid TOML: {str(exc).split(' (at')[0]}",
                                   path=path, line=line) from None
    if isinstance(data, dict) and isinstance(data.get("aliases"), dict):
        data = data["aliases"]
    if not isinstance(data, dict):
        raise EntropylensError("expected a table of raw_key = canonical pairs", path=path)
    aliases = {}
    for key, value in data.items():
        if not isinstance(value, str) or not value.strip() or not str(key).strip():
            raise EntropylensError(f"alias for {key!r} must be a non-empty string, got "
                                   f"{value!r}", path=path, field=str(key))
        aliases[str(key).strip()] = value.strip()
    return aliases
