"""W&B history exports and chart CSVs, checked row by row against the files."""

import csv
import json
import math
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import entropylens as el
from entropylens.cli import app

FIXTURES = Path(__file__).parent / "fixtures" / "metrics"
DAKOTA = "real_runs/dakota_qwen3_0.6b_primerl_ledger400"
W_AND_B = {"_step", "_runtime", "_timestamp"}
runner = CliRunner()


def expected_points(path: Path, step_column: str) -> dict:
    """{(step, raw_key): value} of a W&B history CSV, read with the csv module."""
    points = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            step = int(float(row[step_column]))
            for key, text in row.items():
                if key in W_AND_B or key == step_column or text == "":
                    continue
                value = float(text)
                if math.isfinite(value):
                    points[(step, key)] = value
    return points


def stored_points(store, run: str) -> dict:
    metrics = store.read_metrics(run)
    metrics = metrics[~metrics["raw_key"].str.startswith("mean(")]
    assert not metrics.duplicated(["step", "raw_key"]).any()
    return {(int(s), k): v for s, k, v in zip(metrics["step"], metrics["raw_key"],
                                                metrics["value"])}


@pytest.mark.parametrize("name", [
    f"{DAKOTA}/yut26kcm_history.csv", f"{DAKOTA}/1y33h9zr_history.csv",
    "prime_rl_trainer_wandb_history_head.csv", "prime_rl_orchestrator_wandb_history_head.csv",
])
@pytest.mark.slow
def test_prime_rl_histories_row_by_row(tmp_path, shared_samples, name):
    source = shared_samples / name
    el.ingest(source, tmp_path / "S", run="r")
    store = el.open(tmp_path / "S")
    assert stored_points(store, "r") == expected_points(source, "step")
    metrics = store.read_metrics("r")
    assert not metrics.duplicated(["step", "metric"]).any()
    # keys both prime-rl processes log are named by process
    for key in ("time/step", "perf/throughput"):
        names = set(metrics.loc[metrics["raw_key"] == key, "metric"])
        assert names in ({f"trainer/{key}"}, {f"orchestrator/{key}"})
    framework = store.manifest("r")["notes"]["framework"]
    assert framework in ("prime-rl trainer", "prime-rl orchestrator")


def test_dakota_trainer_and_orchestrator_join_on_step(tmp_path, shared_samples):
    trainer = shared_samples / DAKOTA / "yut26kcm_history.csv"
    orchestrator = shared_samples / DAKOTA / "1y33h9zr_history.csv"
    result = runner.invoke(app, ["ingest", str(trainer), str(orchestrator),
                                 "--out", str(tmp_path / "S"), "--run", "dakota"])
    assert result.exit_code == 0, result.output
    store = el.open(tmp_path / "S")
    assert store.runs() == ["dakota"]
    long = store.read_metrics("dakota")
    assert not long.duplicated(["step", "metric"]).any()
    wide = store.read_metrics("dakota", pivot=True)
    assert len(wide) == 400 and wide.index.tolist() == list(range(400))
    trainer_rows = pd.read_csv(trainer).set_index("step")
    orchestrator_rows = pd.read_csv(orchestrator).set_index("step")
    assert (wide["policy_entropy"] == trainer_rows["entropy/mean"]).all()
    assert (wide["reward_mean"] == orchestrator_rows["reward/mean"]).all()
    assert (wide["trainer/time/step"] == trainer_rows["time/step"]).all()
    assert (wide["orchestrator/time/step"] == orchestrator_rows["time/step"]).all()
    # the README's first/last values
    assert round(wide["policy_entropy"].iloc[0], 3) == 0.947
    assert round(wide["policy_entropy"].iloc[-1], 3) == 0.277
    assert round(wide["reward_mean"].iloc[0], 3) == 0.128
    assert round(wide["reward_mean"].iloc[-1], 3) == 0.321
    sources = store.manifest("dakota")["sources"]
    assert [Path(s["path"]).name for s in sources] == [trainer.name, orchestrator.name]


@pytest.mark.slow
def test_every_export_container_gives_the_same_rows(tmp_path, shared_samples):
    source = shared_samples / DAKOTA / "yut26kcm_history.csv"
    el.ingest(source, tmp_path / "S", run="csv")
    store = el.open(tmp_path / "S")
    reference = stored_points(store, "csv")
    frame = pd.read_csv(source)
    frame.to_parquet(tmp_path / "history.parquet")
    records = frame.to_dict(orient="records")
    with open(tmp_path / "history.json", "w") as fh:
        json.dump(records, fh)
    with open(tmp_path / "history.jsonl", "w") as fh:
        fh.writelines(json.dumps(record) + "\n" for record in records)
    frame.to_csv(tmp_path / "with_index.csv")
    for name in ("history.parquet", "history.json", "history.jsonl", "with_index.csv"):
        el.ingest(tmp_path / name, store, run=name.replace(".", "-"))
        assert stored_points(store, name.replace(".", "-")) == reference, name


def test_hf_trainer_history_merges_train_and_eval_rows(tmp_path, shared_run):
    el.ingest(FIXTURES / "wandb_history_hf_trainer.csv", tmp_path / "S", run="hf")
    store = el.open(tmp_path / "S")
    wide = store.read_metrics("hf", pivot=True)
    truth = pd.read_csv(shared_run / "vanilla" / "metrics.csv").set_index("step")
    train = truth.dropna(subset=["entropy"])
    assert wide["policy_entropy"].dropna().to_dict() == train["entropy"].to_dict()
    assert wide["reward_mean"].dropna().to_dict() == train["reward"].to_dict()
    assert wide["response_length_mean"].dropna().to_dict() == train["response_length"].to_dict()
    val = truth["val_acc"].dropna()
    assert wide["val_accuracy"].dropna().to_dict() == val.to_dict()
    # eval rows sit beside train rows of the same step, not on steps of their own
    assert sorted(wide.index) == sorted(truth.index)
    assert wide.loc[4, ["policy_entropy", "val_accuracy"]].notna().all()
    assert store.read_metrics("hf", split="val")["metric"].unique().tolist() == ["val_accuracy"]
    notes = store.manifest("hf")["notes"]
    assert notes["step_source"] == "train/global_step"


def test_rows_without_a_trainer_step_take_the_step_before(tmp_path, shared_run):
    frame = pd.read_csv(FIXTURES / "wandb_history_hf_trainer.csv")
    eval_rows = frame["eval/accuracy"].notna()
    frame.loc[eval_rows, "train/global_step"] = float("nan")
    # the last row (final validation at step 69) has no train row before it at step 69
    frame = frame.iloc[:-1]
    frame.to_csv(tmp_path / "history.csv", index=False)
    el.ingest(tmp_path / "history.csv", tmp_path / "S", run="hf")
    store = el.open(tmp_path / "S")
    wide = store.read_metrics("hf", pivot=True)
    truth = pd.read_csv(shared_run / "vanilla" / "metrics.csv").set_index("step")
    assert wide["val_accuracy"].dropna().to_dict() == truth["val_acc"].dropna().iloc[:-1].to_dict()
    assert store.manifest("hf")["notes"]["rows_with_carried_step"] == int(eval_rows.sum()) - 1


def test_panel_csv_gives_one_run_per_source_run(tmp_path, shared_samples):
    el.ingest(FIXTURES / "wandb_panel_train_entropy.csv", tmp_path / "S")
    store = el.open(tmp_path / "S")
    names = {"rho1.00_seed44": "qwen35_9b_grpo_rho1.00_seed44",
             "rho0.70_seed42": "qwen35_9b_grpo_rho0.70_seed42",
             "rho0.70_seed44_collapse": "qwen35_9b_grpo_rho0.70_seed44_collapse"}
    assert store.runs() == sorted(names)
    for run, folder in names.items():
        records = json.loads((shared_samples / "real_runs" / folder / "step_logs.json")
                             .read_text())
        expected = {r["step"]: r["entropy"] for r in records if "entropy" in r}
        metrics = store.read_metrics(run)
        assert set(metrics["metric"]) == {"policy_entropy"}
        assert set(metrics["raw_key"]) == {"train/entropy"}
        assert dict(zip(metrics["step"], metrics["value"])) == expected
    # with --run the source runs are named under it
    runs = el.ingest(FIXTURES / "wandb_panel_train_entropy.csv", tmp_path / "T", run="sweep")
    assert runs == [f"sweep-{name}" for name in sorted(names)]


def test_cli_ingest_then_summary_shows_the_steps(tmp_path, shared_samples):
    source = shared_samples / DAKOTA / "yut26kcm_history.csv"
    result = runner.invoke(app, ["ingest", str(source), "--out", str(tmp_path / "S")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["summary", str(tmp_path / "S"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    (run,) = data["runs"]
    assert run["run"] == "yut26kcm_history" and run["steps"] == 400
    assert run["entropy_source"] == "metric"
    truth = pd.read_csv(source)
    assert [s["step"] for s in data["steps"]] == truth["step"].tolist()
    assert [s["entropy_token_mean"] for s in data["steps"]] == truth["entropy/mean"].tolist()


def test_a_history_without_metrics_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "empty_history.csv"
    path.write_text("_step,_runtime,_timestamp,note\n0,1.0,1762700000.0,hello\n")
    result = runner.invoke(app, ["ingest", str(path), "--out", str(tmp_path / "S")])
    assert result.exit_code == 1
    assert str(path) in result.stderr and "no recognisable step metric" in result.stderr
    assert not (tmp_path / "S").exists()


def test_panel_with_a_time_axis_is_refused(tmp_path):
    path = tmp_path / "panel.csv"
    path.write_text('"Wall Time","a - train/loss"\n"1762700000","0.5"\n')
    result = runner.invoke(app, ["ingest", str(path), "--out", str(tmp_path / "S"),
                                 "--format", "wandb_panel"])
    assert result.exit_code == 1 and "x-axis" in result.stderr and str(path) in result.stderr
