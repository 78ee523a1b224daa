"""Hugging Face Trainer / TRL logs and ms-swift logging.jsonl, value by value."""

import ast
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import entropylens as el
from entropylens.cli import app
from entropylens.errors import EntropylensError

FIXTURES = Path(__file__).parent / "fixtures" / "metrics"
QWEN35 = ["qwen35_9b_grpo_rho1.00_seed44", "qwen35_9b_grpo_rho0.70_seed42",
          "qwen35_9b_grpo_rho0.70_seed44_collapse"]
CONSOLE = "real_runs/qwen25_7b_grpo_vanilla_seed42/vanilla_rho1.0_seed42.log"
runner = CliRunner()


def console_dicts(text: str) -> list[str]:
    """Dict texts of a console log: line segments (split at tqdm's carriage returns) that
    are a printed dict."""
    return [segment.strip() for line in text.split("\n") for segment in line.split("\r")
            if segment.strip().startswith("{'") and segment.strip().endswith("}")]


def record_points(records, steps) -> dict:
    points = {}
    for step, record in zip(steps, records):
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                points[(step, key)] = float(value)
    return points


def stored(store, run):
    metrics = store.read_metrics(run)
    assert not metrics.duplicated(["step", "raw_key"]).any()
    return {(int(s), k): v for s, k, v in zip(metrics["step"], metrics["raw_key"],
                                                metrics["value"])}


@pytest.mark.parametrize("folder,first_h,last_h,first_r,last_r", [
    (QWEN35[0], 0.248, 0.107, 0.225, 1.000),
    (QWEN35[1], 0.245, 0.052, 0.125, 0.900),
    (QWEN35[2], 0.256, 2.470, 0.200, 0.013),
])
@pytest.mark.slow
def test_step_logs_json_value_by_value(tmp_path, shared_samples, folder, first_h, last_h,
                                       first_r, last_r):
    source = shared_samples / "real_runs" / folder / "step_logs.json"
    records = json.loads(source.read_text())
    el.ingest(source, tmp_path / "S", run="r")
    store = el.open(tmp_path / "S")
    assert stored(store, "r") == record_points(records, [r["step"] for r in records])
    wide = store.read_metrics("r", pivot=True)
    entropy, reward = wide["policy_entropy"].dropna(), wide["reward_mean"].dropna()
    assert entropy.index.tolist() == list(range(5, 201, 5))
    for got, want in zip((entropy.iloc[0], entropy.iloc[-1], reward.iloc[0], reward.iloc[-1]),
                         (first_h, last_h, first_r, last_r)):
        assert got == pytest.approx(want, abs=5e-4 + 1e-12)  # the README rounds to 3 places
    assert wide["truncation_ratio"].tolist() == \
        [r["completions/clipped_ratio"] for r in records[:-1]]
    # the final summary record stays at its step under its own names
    assert wide.loc[200, "train_runtime"] == records[-1]["train_runtime"]


def test_trainer_state_json(tmp_path, shared_samples):
    el.ingest(FIXTURES / "trainer_state.json", tmp_path / "S", run="state")
    el.ingest(shared_samples / "real_runs" / QWEN35[0] / "step_logs.json", tmp_path / "S",
              run="list")
    store = el.open(tmp_path / "S")
    assert stored(store, "state") == stored(store, "list")
    notes = store.manifest("state")["notes"]
    assert notes["trainer_max_steps"] == 200 and notes["trainer_logging_steps"] == 5


def test_console_dicts_take_steps_from_the_progress_bar(tmp_path, shared_samples):
    source = shared_samples / CONSOLE
    text = source.read_bytes().decode("utf-8", "replace")
    dicts = [ast.literal_eval(d) for d in console_dicts(text)]
    train = [d for d in dicts if "train_runtime" not in d]
    assert len(train) == 40 and len(dicts) == 41
    # the README: logged every 5 steps, so the k-th dict is step 5k; the summary closes at 200
    steps = [5 * (k + 1) for k in range(len(train))] + [200]
    el.ingest(source, tmp_path / "S", run="c")
    store = el.open(tmp_path / "S")
    expected = record_points(train, steps[:-1])
    expected.update(record_points(dicts[-1:], [200]))
    assert stored(store, "c") == expected
    assert store.manifest("c")["notes"]["step_source"] == "progress_bar"
    wide = store.read_metrics("c", pivot=True)
    entropy, reward = wide["policy_entropy"].dropna(), wide["reward_mean"].dropna()
    assert (round(entropy.loc[5], 3), round(entropy.loc[200], 3)) == (0.179, 0.055)
    assert (round(reward.loc[5], 3), round(reward.loc[200], 3)) == (0.900, 0.925)


def test_console_dicts_without_a_progress_bar_are_numbered(tmp_path, shared_samples):
    text = (shared_samples / CONSOLE).read_bytes().decode("utf-8", "replace")
    lines = console_dicts(text)
    # the dicts alone, with one cut short as copied logs often are
    path = tmp_path / "dicts.log"
    path.write_text("\n".join(lines[:10] + [lines[10][:200]] + lines[11:]) + "\n")
    el.ingest(path, tmp_path / "S", run="d")
    store = el.open(tmp_path / "S")
    notes = store.manifest("d")["notes"]
    assert notes["step_source"] == "record_index" and notes["malformed_lines"] == 1
    assert notes["malformed_examples"][0]["line"] == 11
    wide = store.read_metrics("d", pivot=True)
    assert wide.index.tolist() == list(range(1, 40))
    assert wide.loc[39, "train_runtime"] == 768.0168


def test_trl_console_samples(tmp_path, shared_samples):
    store_path = tmp_path / "S"
    el.ingest(shared_samples / "trl_ppo_console_logs.txt", store_path, run="ppo")
    el.ingest(shared_samples / "trl_grpo_console_logs.txt", store_path, run="grpo")
    store = el.open(store_path)
    for run, name in (("ppo", "trl_ppo_console_logs.txt"), ("grpo", "trl_grpo_console_logs.txt")):
        records = [ast.literal_eval(line) for line in
                   (shared_samples / name).read_text().splitlines() if line.strip()]
        assert stored(store, run) == record_points(records, range(1, len(records) + 1))
    ppo = store.read_metrics("ppo", pivot=True)
    # the trap: objective/entropy (~114, a summed NLL) is not the policy entropy (~1.1)
    assert ppo["policy_entropy"].tolist() == [1.1110224723815918, 1.099670171737671]
    assert ppo["sequence_nll_sum"].tolist() == [114.40665435791016, 113.01783752441406]
    assert ppo["reward_mean"].tolist() == [2.359375, 1.5234375]
    long = store.read_metrics("ppo")
    assert set(long.loc[long["raw_key"].str.startswith("val/"), "split"]) == {"train"}
    grpo = store.read_metrics("grpo", pivot=True)
    # lines 1-3 are TRL 0.17+ (completions/mean_length), lines 4-5 TRL <= 0.16
    assert grpo["response_length_mean"].dropna().to_dict() == \
        {1: 506.75, 3: 441.75, 4: 232.825, 5: 237.0375}
    assert grpo["policy_entropy"].dropna().index.tolist() == [1, 2, 3]


def test_ms_swift_logging_jsonl(tmp_path, shared_samples):
    source = shared_samples / "ms_swift_grpo_logging.jsonl"
    el.ingest(source, tmp_path / "S", run="s")
    store = el.open(tmp_path / "S")
    record = json.loads(source.read_text())
    assert stored(store, "s") == record_points([record], [2])
    wide = store.read_metrics("s", pivot=True)
    assert wide.loc[2, "reward_mean"] == 0.65625
    assert wide.loc[2, "truncation_ratio"] == 0.75
    assert wide.loc[2, "response_length_mean"] == 2362.40625
    path = tmp_path / "logging.jsonl"
    path.write_text(source.read_text() + '{"loss": 0.1, "global_step/max_steps": "3/4389", "re\n')
    with pytest.raises(EntropylensError) as info:
        el.ingest(path, tmp_path / "S", run="cut")
    assert f"{path}:2:" in str(info.value)


def test_a_log_without_trainer_dicts_is_an_error_naming_it(tmp_path, shared_samples):
    source = shared_samples / "verl_console_metrics_quickstart.log"
    result = runner.invoke(app, ["ingest", str(source), "--out", str(tmp_path / "S"),
                                 "--format", "hf_console"])
    assert result.exit_code == 1
    assert str(source) in result.stderr and "no Trainer log dicts" in result.stderr
