"""Auto-detection of the per-token and text formats on every real sample and fixture."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from entropylens.cli import app
from entropylens.errors import FormatError
from entropylens.ingest import detect
from entropylens.ingest.registry import scores

from _ingest_helpers import FIXTURES

EXPECTED_SAMPLES = {
    "openai_chat_completion_logprobs.json": "openai_chat",
    "openai_legacy_completion_logprobs.json": "openai_completion",
    "vllm_offline_logprobs_repr.txt": "vllm_offline",
    "wild/gonka_inference_response.json": "openai_chat",
}
EXPECTED_FIXTURES = {
    "openai": None,  # checked per file in test_ingest_openai
    "vllm/outputs.jsonl": "vllm_offline",
    "sglang/generate.jsonl": "sglang_native",
    "prime_rl": "prime_rl",
    "prime_rl/token_exports": "prime_rl",
    "prime_rl/token_exports/step_0/rank_0.jsonl": "prime_rl",
    "prime_rl/token_exports/step_1/rank_1.jsonl": "prime_rl",
    "nemo_rl/train_data_step1.jsonl": "nemo_rl",
    "verl_rollout/rollout/1.jsonl": "verl_rollout",
    "verl_rollout/validation/2.jsonl": "verl_rollout",
    "trl/completions/completions_00001.parquet": "trl_completions",
    "trl/completions/completions_00002.parquet": "trl_completions",
}
MINE = {"openai_chat", "openai_completion", "vllm_offline", "sglang_native", "prime_rl",
        "nemo_rl", "verl_rollout", "trl_completions"}


@pytest.mark.parametrize("name,expected", sorted(EXPECTED_SAMPLES.items()))
def test_real_samples_are_detected(shared_samples, name, expected):
    ranked = scores(shared_samples / name)
    assert detect(shared_samples / name).name == expected
    assert ranked[0][0] >= 0.8 and all(s < 0.6 for s, f in ranked[1:])


@pytest.mark.parametrize("name,expected",
                         sorted((k, v) for k, v in EXPECTED_FIXTURES.items() if v))
def test_fixtures_are_detected_with_a_clear_margin(name, expected):
    path = FIXTURES / name
    ranked = scores(path)
    assert detect(path).name == expected
    assert ranked[0][0] >= 0.8
    assert len(ranked) == 1 or ranked[0][0] - ranked[1][0] >= 0.25


def test_other_real_samples_are_not_claimed_as_token_formats(shared_samples):
    for path in sorted(shared_samples.rglob("*")):
        if not path.is_file() or path.relative_to(shared_samples).as_posix() in \
                EXPECTED_SAMPLES or path.suffix == ".md":
            continue
        claimed = [f.name for s, f in scores(path) if s >= 0.5 and f.name in MINE]
        assert not claimed, (path.name, claimed)


def test_ambiguous_file_names_the_candidates(tmp_path):
    # a record that is both a chat response and an SGLang response: both sniffers fire
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"choices": [{"index": 0, "logprobs": {"content": []}}], '
                    '"meta_info": {"output_token_logprobs": []}, "text": ""}\n')
    with pytest.raises(FormatError, match="openai_chat.*sglang_native|sglang_native.*openai_chat"):
        detect(path)


def test_formats_command_lists_every_format_with_a_description():
    result = CliRunner().invoke(app, ["formats"])
    assert result.exit_code == 0
    listed = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
    for name in MINE:
        assert name in listed and len(listed[name].split(None, 1)[1]) > 20


def test_canonical_tables_stay_with_the_table_format():
    # sample_logs holds canonical-looking parquet files (prompt, completion, advantage...)
    from _ingest_helpers import SAMPLE_RUN

    for path in sorted(SAMPLE_RUN.iterdir()):
        claimed = [f.name for s, f in scores(path) if s >= 0.5 and f.name in MINE]
        assert not claimed, (path.name, claimed)
