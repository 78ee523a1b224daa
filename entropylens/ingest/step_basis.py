"""What a source's ``step`` means: a policy version, or a trainer's 1-based logged step.

Pairing a validation score with the entropy of the policy that was validated needs to know
how each source counts steps. Two conventions exist among the formats entropylens reads:

``policy_version``
    Step ``s`` is the policy after ``s`` updates, for every row: its rollouts, their entropy
    and its validation. The shared SmolLM2 run's token tables and ``metrics.csv`` count this
    way (validation at step 0 is the initial policy; the last row, step 69, holds only the
    validation of the policy after 69 updates).
``logged_step``
    The trainer's 1-based global step ``g``: training rows logged at ``g`` (rollouts, entropy,
    reward) come from the policy after ``g - 1`` updates, while a validation logged at ``g``
    ran after update ``g``, on the policy after ``g`` updates; a validation before training is
    logged at step 0. verl (console log, FileLogger JSONL, W&B, TensorBoard: every backend of
    ``verl.utils.tracking.Tracking`` receives ``step=self.global_steps``) and the Hugging Face
    Trainer family (``trainer_state.json`` ``log_history``, console dicts, TensorBoard and W&B
    callbacks, TRL) count this way.
``unknown``
    The format does not say (a generic table, a W&B history whose only step is W&B's own
    ``_step`` counter). Rows are paired at equal steps, and ingest and the fit say so.

Evidence for ``logged_step`` (producers' code):

- verl ``verl/trainer/ppo/ray_trainer.py`` ``RayPPOTrainer.fit``: ``self.global_steps = 0``;
  the optional validation before training is logged with ``step=self.global_steps`` (0); then
  ``self.global_steps += 1  # we start from step 1``; each iteration generates with the
  current policy, computes ``actor/entropy`` from ``compute_log_prob`` (the rollout policy,
  before the update), runs ``update_actor``, then ``_validate()`` when
  ``global_steps % test_freq == 0``, and finally ``logger.log(data=metrics,
  step=self.global_steps)`` before ``self.global_steps += 1``.
- transformers ``Trainer._inner_training_loop``: ``optimizer.step()`` then
  ``self.state.global_step += 1`` then ``_maybe_log_save_evaluate`` logs the training metrics
  accumulated since the last log and runs ``evaluate()`` on the updated weights, both with
  ``state.global_step``; ``log()`` appends ``{..., "step": state.global_step}`` to
  ``log_history`` and the TensorBoard/W&B callbacks log ``state.global_step``. TRL's PPO loop
  likewise does ``self.state.global_step += 1`` before ``self.log(metrics)``.
"""

from __future__ import annotations

STEP_BASES = ("policy_version", "logged_step", "unknown")

#: The basis each format implies; formats absent here (inference logs) are ``unknown`` when a
#: file of theirs carries steps anyway.
FORMAT_STEP_BASIS = {
    "verl_console": "logged_step",
    "verl_jsonl": "logged_step",
    # verl's _dump_generations writes {self.global_steps}.jsonl during step g (policy g - 1)
    "verl_rollout": "logged_step",
    "tensorboard": "logged_step",
    "hf_trainer": "logged_step",
    "hf_console": "logged_step",
    "ms_swift": "logged_step",   # the Hugging Face Trainer's global_step ("N/M")
    "wandb": "logged_step",
    "wandb_panel": "logged_step",
    "table": "unknown",
    "prime_rl": "unknown",
    "nemo_rl": "unknown",
    "trl_completions": "unknown",
}

#: ``notes.step_source`` values that mean the steps are not the trainer's own steps.
_UNRELIABLE_STEP_SOURCES = {"_step", "Step", "record_index", "none", ""}


def source_step_basis(format_name: str, notes: dict | None = None,
                      override: str | None = None, *,
                      first_train_step: float | None = None) -> str:
    """The step basis of one source.

    Parameters
    ----------
    format_name : str
        The source's format (see :func:`entropylens.formats`).
    notes : dict, optional
        What the reader noted about the source; a ``step_source`` of W&B's ``_step`` counter
        or of record numbers makes a tracker's steps ``unknown``.
    override : {"policy_version", "logged_step", "unknown"}, optional
        The user's ``--step-basis``; wins over the format.
    first_train_step : float, optional
        The smallest step of the source's training rows. A tracker's training steps start
        at 1; training rows at step 0 mean another count (early verl also trained at step 0,
        validating after that update), so the basis is ``unknown`` then.

    Returns
    -------
    str
        One of :data:`STEP_BASES`.
    """
    if override is not None:
        return override
    basis = FORMAT_STEP_BASIS.get(format_name, "unknown")
    source = (notes or {}).get("step_source")
    if basis == "logged_step" and isinstance(source, str) and source in _UNRELIABLE_STEP_SOURCES:
        return "unknown"
    if basis == "logged_step" and first_train_step is not None and first_train_step < 1:
        return "unknown"
    return basis


def step_offset(basis: str | None) -> int:
    """Updates between a training row's logged step and its policy: 1 for ``logged_step``."""
    return 1 if basis == "logged_step" else 0
