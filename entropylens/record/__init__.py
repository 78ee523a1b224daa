"""Rescoring text completions with a Hugging Face model (extra ``entropylens[torch]``).

- :func:`rescore`: score the completions of a store run or a sequence file with a model and
  write exact per-token entropies, logprobs and top-k as a run.
- :func:`record_generate`: sample with ``model.generate`` and record the tokens with their
  exact entropies (shares its code with :func:`from_hf_generate`).
- :func:`from_hf_generate`: write the outputs of a ``model.generate`` call you ran as a run.
- :func:`load_model`: a model folder or GGUF file, ready to score.

torch and transformers are imported only when a function here runs.
"""

from .generate import record_generate
from .hf_generate import RecordResult, from_hf_generate
from .model import ScoringModel, load_model, wrap_model
from .rescorer import PromptEncoder, RescoreResult, completion_ids, rescore
from .scoring import TokenScores, score_logits

__all__ = ["PromptEncoder", "RecordResult", "RescoreResult", "ScoringModel", "TokenScores", "completion_ids",
           "from_hf_generate", "load_model", "record_generate", "rescore", "score_logits", "wrap_model"]
