"""The TRL callback on a real, tiny GRPO run of SmolLM2-135M on CPU."""

from __future__ import annotations

import copy
import logging
import re

import pandas as pd
import pytest

from entropylens.analysis.diagnose import STATUSES
from entropylens.store import Store

from _smollm2 import require_torch, smollm2

pytest.importorskip("trl")


def _last_number_reward(completions, answer, **kwargs):
    """1 when the last integer of the completion is the answer, else 0."""
    scores = []
    for completion, expected in zip(completions, answer):
        numbers = re.findall(r"-?\d+", completion if isinstance(completion, str)
                             else completion[-1]["content"])
        scores.append(float(bool(numbers) and int(numbers[-1]) == expected))
    return scores


@pytest.mark.slow
def test_callback_writes_a_store_during_grpo_training(tmp_path, caplog):
    require_torch()
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from entropylens.integrations.trl import EntropyLensCallback

    loaded = smollm2()
    # train a copy: the loaded model is shared with the other tests of this process
    model = copy.deepcopy(loaded.model)
    # its GGUF weights were dequantized to float32 at load: a plain trainable model
    model.is_quantized = False
    model.hf_quantizer = None
    model.train()
    pairs = [(a, b) for a in range(2, 6) for b in range(2, 6)][:8]
    dataset = Dataset.from_list([{"prompt": f"What is {a} plus {b}? Answer with a number.",
                                  "answer": a + b} for a, b in pairs])
    # tiny on purpose (2 cores): 2 prompts x 2 completions of at most 8 tokens, 4 steps
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                      num_generations=2, max_completion_length=8, max_steps=4,
                      gradient_checkpointing=False,
                      logging_steps=1, learning_rate=1e-5, report_to=[], use_cpu=True,
                      log_completions=True, save_strategy="no", seed=0,
                      dataloader_num_workers=0, disable_tqdm=True)
    tokenizer = loaded.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    trainer = GRPOTrainer(model=model, reward_funcs=_last_number_reward, args=args,
                          train_dataset=dataset, processing_class=tokenizer)
    seen = []
    callback = EntropyLensCallback(tmp_path / "store", run="tiny", every=2,
                                   on_status=seen.append).attach(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    with caplog.at_level(logging.INFO, logger="entropylens"):
        trainer.train()
    store = Store.open(tmp_path / "store")
    metrics = store.read_metrics("tiny", pivot=True)
    logged = pd.DataFrame([row for row in trainer.state.log_history if "entropy" in row])
    # every logged step's entropy and reward reached the store, value for value
    assert list(metrics.index) == logged["step"].tolist()
    assert metrics["policy_entropy"].tolist() == pytest.approx(logged["entropy"].tolist())
    assert metrics["reward_mean"].tolist() == pytest.approx(logged["reward"].tolist())
    # the completions TRL logged, one row per completion of each step
    sequences = store.read_sequences("tiny").to_pandas()
    assert sorted(sequences["step"].unique()) == logged["step"].tolist()
    assert (sequences.groupby("step").size() == 4).all()  # 2 prompts x 2
    assert sequences["completion"].notna().all()
    # diagnosed on the way and at the end: a status in the logs and on the logger
    assert callback.last is not None and callback.last.status in STATUSES
    assert seen and seen[0].status in STATUSES
    assert any("entropylens:" in record.getMessage() for record in caplog.records)
