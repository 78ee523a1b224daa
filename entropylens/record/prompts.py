"""Prompts and completions as token ids: the chat template, restored special tokens and the
end-of-turn token (see :mod:`entropylens.record.rescorer` for the rules)."""

from __future__ import annotations

import json
import re

#: A role line of a chat template whose special tokens were stripped (verl rollout prompts).
_ROLE_LINE = re.compile(r"(?:^|\n)(system|user|assistant|tool)\n")
_STOP_REASONS = {"stop", "eos", "eos_token", "end_turn", "stop_token", "end"}
_LENGTH_REASONS = {"length", "max_tokens", "truncated", "abort", "max_length"}


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
