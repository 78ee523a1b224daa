"""Auto-detection: every real metric sample and fixture is claimed by its own format."""

from pathlib import Path

import pandas as pd
import pytest

from entropylens.ingest import detect, registry

FIXTURES = Path(__file__).parent / "fixtures" / "metrics"
METRIC_FORMATS = {"wandb", "wandb_panel", "tensorboard", "verl_console", "verl_jsonl",
                  "hf_trainer", "hf_console", "ms_swift"}

SAMPLES = {
    "ms_swift_grpo_logging.jsonl": "ms_swift",
    "prime_rl_orchestrator_wandb_history_head.csv": "wandb",
    "prime_rl_trainer_wandb_history_head.csv": "wandb",
    "trl_grpo_console_logs.txt": "hf_console",
    "trl_ppo_console_logs.txt": "hf_console",
    "verl_console_metrics_issue_excerpts.log": "verl_console",
    "verl_console_metrics_quickstart.log": "verl_console",
    "real_runs/dakota_qwen3_0.6b_primerl_ledger400/1y33h9zr_history.csv": "wandb",
    "real_runs/dakota_qwen3_0.6b_primerl_ledger400/yut26kcm_history.csv": "wandb",
    "real_runs/qwen25_7b_grpo_vanilla_seed42/vanilla_rho1.0_seed42.log": "hf_console",
    "real_runs/qwen35_9b_grpo_rho0.70_seed42/step_logs.json": "hf_trainer",
    "real_runs/qwen35_9b_grpo_rho0.70_seed44_collapse/step_logs.json": "hf_trainer",
    "real_runs/qwen35_9b_grpo_rho1.00_seed44/step_logs.json": "hf_trainer",
    "real_runs/verl_gsm8k_ppo/Qwen2.5-0.5B-bsz256_2-prompt1024-resp512-0.567.log":
        "verl_console",
    "real_runs/verl_gsm8k_ppo/Qwen2.5-0.5B-bsz256_2-prompt512-resp256-0.538.log":
        "verl_console",
    "real_runs/verl_gsm8k_ppo/gemma-2-2b-it-ppo-bsz512_4-prompt1024-resp-512-0.640.log":
        "verl_console",
    "wild/deepclima_logging.jsonl": "ms_swift",
    "wild/juncylu_run_terminal_20251022_181457.md": "hf_console",
    "wild/tangbinghao_swift_logging.jsonl": "ms_swift",
    **{f"wild/tbreducer_duplicate_steps/run_{i + 1}/events.out.tfevents.1622966509."
       f"janoshs-mbp.lan.86059.{i}": "tensorboard" for i in range(3)},
}

FIXTURE_FORMATS = {
    "trainer_state.json": "hf_trainer",
    "verl_filelogger.jsonl": "verl_jsonl",
    "wandb_history_hf_trainer.csv": "wandb",
    "wandb_panel_train_entropy.csv": "wandb_panel",
}


@pytest.mark.parametrize("name,expected", sorted(SAMPLES.items()))
def test_real_metric_samples_detect_as_their_format(shared_samples, name, expected):
    assert detect(shared_samples / name).name == expected


def test_every_metric_sample_is_listed(shared_samples):
    """A new metric sample in ../shared/samples must get an entry above."""
    claimed = set()
    for path in shared_samples.rglob("*"):
        # READMEs aside: a console log saved as Markdown is still a log
        if path.is_file() and not path.name.lower().startswith("readme"):
            fmt = detect(path, required=False)
            if fmt is not None and fmt.name in METRIC_FORMATS:
                claimed.add(path.relative_to(shared_samples).as_posix())
    assert claimed == set(SAMPLES)


def test_non_metric_samples_are_not_claimed_by_metric_formats(shared_samples):
    for path in shared_samples.rglob("*"):
        if path.is_file() and path.relative_to(shared_samples).as_posix() not in SAMPLES:
            for score, fmt in registry.scores(path):
                assert fmt.name not in METRIC_FORMATS or score < registry.MIN_CONFIDENCE, \
                    (path.name, fmt.name, score)


@pytest.mark.parametrize("name,expected", sorted(FIXTURE_FORMATS.items()))
def test_fixtures_detect_as_their_format(name, expected):
    assert detect(FIXTURES / name).name == expected


def test_fixture_list_is_complete():
    assert {p.name for p in FIXTURES.iterdir() if p.suffix != ".py"} == set(FIXTURE_FORMATS)


def test_wandb_exports_in_every_container(tmp_path, shared_samples):
    source = shared_samples / "real_runs/dakota_qwen3_0.6b_primerl_ledger400/yut26kcm_history.csv"
    frame = pd.read_csv(source)
    frame.to_parquet(tmp_path / "history.parquet")
    frame.to_json(tmp_path / "history.jsonl", orient="records", lines=True)
    frame.to_json(tmp_path / "history.json", orient="records")
    frame.to_csv(tmp_path / "with_index.csv")  # pandas' default keeps an index column
    frame.to_csv(tmp_path / "history.tsv", sep="\t", index=False)
    for name in ("history.parquet", "history.jsonl", "history.json", "with_index.csv",
                 "history.tsv"):
        assert detect(tmp_path / name).name == "wandb", name


@pytest.mark.slow
def test_tensorboard_files_and_folders(tmp_path):
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(tmp_path / "logs" / "run_a")) as writer:
        writer.add_scalar("train/entropy", 0.5, 1)
    event = next((tmp_path / "logs" / "run_a").iterdir())
    assert detect(event).name == "tensorboard"
    assert detect(tmp_path / "logs").name == "tensorboard"
    assert detect(tmp_path / "logs" / "run_a").name == "tensorboard"


def test_plain_metric_tables_stay_with_the_table_format(shared_run):
    assert detect(shared_run / "vanilla" / "metrics.csv").name == "table"
