"""The metric alias table: framework keys, traps, user aliases and alias files."""

import json

import pytest
from typer.testing import CliRunner

from entropylens.aliases import (ALIASES, canonical_metric, is_approximate,
                                 load_alias_file)
from entropylens.cli import app
from entropylens.errors import EntropylensError

# (raw key as the framework logs it, canonical metric, split, approximate)
KEYS = [
    # verl (console, FileLogger, W&B and TensorBoard use the same keys)
    ("actor/entropy", "policy_entropy", "train", False),
    ("actor/entropy_loss", "policy_entropy", "train", False),
    ("critic/score/mean", "reward_mean", "train", False),
    ("critic/rewards/mean", "critic/rewards/mean", "train", False),
    ("response_length/mean", "response_length_mean", "train", False),
    ("response_length/clip_ratio", "truncation_ratio", "train", False),
    ("actor/pg_clipfrac", "clip_fraction", "train", False),
    ("actor/pg_clipfrac_lower", "actor/pg_clipfrac_lower", "train", False),
    ("actor/kl_loss", "kl", "train", False),
    ("actor/reward_kl_penalty", "kl", "train", False),
    ("critic/kl", "kl", "train", False),
    ("actor/ppo_kl", "actor/ppo_kl", "train", False),
    ("actor/grad_norm", "grad_norm", "train", False),
    ("actor/lr", "learning_rate", "train", False),
    ("val-core/math/acc/mean@1", "val_accuracy/math", "val", False),
    ("val-core/olympiad_bench/acc/mean@16", "val_accuracy/olympiad_bench", "val", False),
    ("val-core/gsm8k/reward/mean@4", "val_accuracy/gsm8k", "val", False),
    ("val-core/gsm8k/acc/mean_1", "val_accuracy/gsm8k", "val", False),  # via tensorboardX
    ("val-aux/math/format_score/mean@1", "val-aux/math/format_score/mean@1", "val", False),
    ("val/test_score/openai/gsm8k", "val_accuracy/openai/gsm8k", "val", False),
    ("test_score/openai/gsm8k", "val_accuracy/openai/gsm8k", "val", False),
    ("training/global_step", "training/global_step", "train", False),
    # TRL GRPO, directly (console, trainer_state) and through the HF W&B/TB callbacks
    ("entropy", "policy_entropy", "train", False),
    ("train/entropy", "policy_entropy", "train", False),
    ("reward", "reward_mean", "train", False),
    ("train/reward", "reward_mean", "train", False),
    ("reward_std", "reward_std", "train", False),
    ("rewards/reward_fn/mean", "rewards/reward_fn/mean", "train", False),
    ("completions/mean_length", "response_length_mean", "train", False),
    ("completion_length", "response_length_mean", "train", False),
    ("completions/clipped_ratio", "truncation_ratio", "train", False),
    ("clip_ratio/region_mean", "clip_fraction", "train", False),
    ("clip_ratio", "clip_fraction", "train", False),
    ("kl", "kl", "train", False),
    ("loss", "loss", "train", False),
    ("grad_norm", "grad_norm", "train", False),
    ("learning_rate", "learning_rate", "train", False),
    ("eval_reward", "val_reward_mean", "val", False),
    ("eval/reward", "val_reward_mean", "val", False),
    ("eval_entropy", "val_policy_entropy", "val", False),
    ("eval_loss", "val_loss", "val", False),
    ("eval_accuracy", "val_accuracy", "val", False),
    ("eval/accuracy", "val_accuracy", "val", False),
    ("eval_runtime", "eval_runtime", "val", False),
    # TRL PPO / RLOO: the entropy trap and the value-head 'val/' keys
    ("objective/entropy", "sequence_nll_sum", "train", False),
    ("train/objective/entropy", "sequence_nll_sum", "train", False),
    ("policy/entropy_avg", "policy_entropy", "train", False),
    ("objective/kl", "kl", "train", False),
    ("objective/scores", "reward_mean", "train", False),
    ("objective/rlhf_reward", "objective/rlhf_reward", "train", False),
    ("policy/clipfrac_avg", "clip_fraction", "train", False),
    ("val/clipfrac_avg", "value_clip_fraction", "train", False),
    ("val/ratio", "val/ratio", "train", False),
    ("val/ratio_var", "val/ratio_var", "train", False),
    ("train/val/num_eos_tokens", "train/val/num_eos_tokens", "train", False),
    ("lr", "learning_rate", "train", False),
    # prime-rl trainer and orchestrator
    ("entropy/mean", "policy_entropy", "train", False),
    ("entropy/median", "entropy/median", "train", False),
    ("reward/mean", "reward_mean", "train", False),
    ("completion_len/mean", "response_length_mean", "train", False),
    ("seq_len/mean", "seq_len/mean", "train", False),
    ("is_truncated/mean", "truncation_ratio", "train", False),
    ("optim/grad_norm", "grad_norm", "train", False),
    ("optim/lr", "learning_rate", "train", False),
    ("loss/mean", "loss", "train", False),
    ("mismatch_kl/mean", "mismatch_kl/mean", "train", False),
    ("eval/math500/avg@4", "val_accuracy/math500", "val", False),
    # NeMo-RL
    ("train/approx_entropy", "policy_entropy", "train", True),
    ("train/reward", "reward_mean", "train", False),
    ("train/mean_gen_tokens_per_sample", "response_length_mean", "train", False),
    ("train/lr", "learning_rate", "train", False),
    ("validation/accuracy", "val_accuracy", "val", False),
    ("validation/avg_length", "validation/avg_length", "val", False),
    # OpenRLHF
    ("train/entropy_loss", "policy_entropy", "train", False),
    ("train/ppo_clip_ratio", "clip_fraction", "train", False),
    ("train/response_length", "response_length_mean", "train", False),
    ("train/truncated", "truncation_ratio", "train", False),
    ("train/actor_lr", "learning_rate", "train", False),
    ("train/kl", "kl", "train", False),
    ("train/policy_loss", "train/policy_loss", "train", False),
    ("eval/pass1", "val_accuracy", "val", False),
    ("eval/aime24_pass1", "val_accuracy/aime24", "val", False),
    ("eval/eval_math_pass1", "val_accuracy/math", "val", False),
    ("eval/reward_mean", "val_reward_mean", "val", False),
    ("eval/response_length_mean", "val_response_length_mean", "val", False),
    ("eval/truncated_rate", "val_truncation_ratio", "val", False),
    # generic columns of plain tables (the shared SmolLM2 run's metrics.csv)
    ("val_acc", "val_accuracy", "val", False),
    ("response_length", "response_length_mean", "train", False),
    ("policy_entropy", "policy_entropy", "train", False),
]


@pytest.mark.parametrize("raw,metric,split,approximate", KEYS)
def test_framework_keys_map_to_canonical_names(raw, metric, split, approximate):
    name = canonical_metric(raw)
    assert (name.metric, name.split, name.approximate) == (metric, split, approximate)
    assert name.raw_key == raw
    assert is_approximate(raw) is approximate


def test_every_rule_is_exercised_by_a_real_key():
    # a rule's position is the priority of the names it produces
    used = {canonical_metric(raw).priority for raw, *_ in KEYS}
    unused = [alias.pattern for index, alias in enumerate(ALIASES) if index not in used]
    assert not unused


def test_traps_come_before_broad_rules():
    # 'objective/entropy' contains 'entropy', 'val/clipfrac_avg' looks like validation
    assert canonical_metric("objective/entropy").metric != "policy_entropy"
    assert canonical_metric("val/clipfrac_avg").split == "train"
    # collisions resolve by rule order: verl's actor/entropy ranks above the generic 'entropy'
    assert canonical_metric("actor/entropy").priority < canonical_metric("entropy").priority
    assert canonical_metric("actor/kl_loss").priority < \
        canonical_metric("actor/reward_kl_penalty").priority


def test_user_aliases_come_first():
    extra = {"my/ent": "policy_entropy", "entropy": "token_entropy_custom",
             "score@val": "val_accuracy"}
    assert canonical_metric("my/ent", extra).metric == "policy_entropy"
    assert canonical_metric("entropy", extra).metric == "token_entropy_custom"
    assert canonical_metric("score@val", extra).split == "val"
    assert canonical_metric("my/ent", extra).raw_key == "my/ent"
    assert canonical_metric("unknown/key").metric == "unknown/key"


def test_alias_files_toml_and_json(tmp_path):
    toml = tmp_path / "aliases.toml"
    toml.write_text('"my/entropy" = "policy_entropy"\n"val/score" = "val_accuracy"\n')
    assert load_alias_file(toml) == {"my/entropy": "policy_entropy",
                                     "val/score": "val_accuracy"}
    section = tmp_path / "section.toml"
    section.write_text('[aliases]\n"my/entropy" = "policy_entropy"\n')
    assert load_alias_file(section) == {"my/entropy": "policy_entropy"}
    js = tmp_path / "aliases.json"
    js.write_text(json.dumps({"aliases": {"rl/H": "policy_entropy"}}))
    assert load_alias_file(js) == {"rl/H": "policy_entropy"}


@pytest.mark.parametrize("name,text,needle", [
    ("bad.toml", '"a" = "b"\n"c" = \n', ":2: not valid TOML"),
    ("bad.json", '{"a": "b",\n "c": }', ":2: not valid JSON"),
    ("num.toml", '"a" = 3\n', "must be a non-empty string"),
    ("list.json", '["a"]', "expected a table"),
])
def test_bad_alias_files_name_the_file(tmp_path, name, text, needle):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(EntropylensError) as info:
        load_alias_file(path)
    assert str(path) in str(info.value) and needle in str(info.value)


@pytest.mark.slow
def test_cli_aliases_file_and_flag(tmp_path, shared_samples):
    import entropylens as el

    src = shared_samples / "verl_console_metrics_quickstart.log"
    aliases = tmp_path / "aliases.toml"
    aliases.write_text('"timing/gen" = "generation_seconds"\n'
                       '"critic/vf_loss" = "value_loss"\n')
    runner = CliRunner()
    result = runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "S"),
                                 "--run", "q", "--aliases", str(aliases),
                                 "--alias", "critic/vf_loss=critic_loss"])
    assert result.exit_code == 0, result.output
    metrics = el.open(tmp_path / "S").read_metrics("q")
    gen = metrics[metrics["raw_key"] == "timing/gen"]
    assert gen["metric"].unique().tolist() == ["generation_seconds"]
    assert gen["value"].tolist() == [21.470, 23.020]
    # --alias wins over the file
    assert metrics[metrics["raw_key"] == "critic/vf_loss"]["metric"].unique().tolist() == \
        ["critic_loss"]

    (tmp_path / "broken.toml").write_text("= nope\n")
    result = runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "T"),
                                 "--aliases", str(tmp_path / "broken.toml")])
    assert result.exit_code == 1
    assert str(tmp_path / "broken.toml") in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
