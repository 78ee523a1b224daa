"""Tokens after end-of-sequence, told apart with plain pandas (independent of entropylens).

The shared SmolLM2 runs end most completions with ``<|im_end|>`` followed by one
``<|im_start|>`` the model never sampled; entropylens leaves such tokens out of its token
analyses by default. The tests compare against raw tables with the same rows removed.
"""

from __future__ import annotations

import pandas as pd

#: The shared runs' end-of-turn token (SmolLM2's ChatML template).
EOS = "<|im_end|>"


def after_eos(raw: pd.DataFrame, keys=("step", "prompt_idx", "sample_idx")) -> pd.Series:
    """Boolean mask of the rows after the first EOS of their completion."""
    keys = list(keys)
    first = raw["position"].where(raw["token"] == EOS).groupby(
        [raw[k] for k in keys]).transform("min")
    return raw["position"] > first


def before_eos(raw: pd.DataFrame, keys=("step", "prompt_idx", "sample_idx")) -> pd.DataFrame:
    """The rows up to and including the first EOS of each completion."""
    return raw[~after_eos(raw, keys)]
