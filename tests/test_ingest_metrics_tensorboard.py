"""TensorBoard event files written by real writers: every point comes back, value by value."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import entropylens as el
from entropylens.cli import app
from entropylens.errors import EntropylensError

DAKOTA = "real_runs/dakota_qwen3_0.6b_primerl_ledger400/yut26kcm_history.csv"
runner = CliRunner()


def points(store, run):
    metrics = store.read_metrics(run)
    return {(int(s), k): v for s, k, v in zip(metrics["step"], metrics["raw_key"],
                                                metrics["value"])}


@pytest.fixture(scope="module")
def logdir(tmp_path_factory, shared_samples):
    """Two runs as trainers lay them out: torch-style scalars (tensorboardX, 12,000 points of
    one tag, more than EventAccumulator's default reservoir of 10,000) and TF2-style scalar
    tensors (TensorBoard's own writer), values taken from a real prime-rl run."""
    import pandas as pd
    from tensorboard.summary import Writer
    from tensorboardX import SummaryWriter

    root = tmp_path_factory.mktemp("tb") / "logs"
    entropy = pd.read_csv(shared_samples / DAKOTA)["entropy/mean"].to_numpy()
    expected = {"verl_run": {}, "tf2_run": {}}
    with SummaryWriter(str(root / "verl_run")) as writer:
        for step in range(12_000):
            value = float(entropy[step % len(entropy)] * (1 + step / 12_000))
            writer.add_scalar("actor/entropy", value, step)
            expected["verl_run"][(step, "actor/entropy")] = float(np.float32(value))
            if step % 500 == 0:
                # tensorboardX (like torch) cleans the tag: verl's '@' becomes '_'
                writer.add_scalar("val-core/gsm8k/acc/mean@1", step / 12_000, step)
                expected["verl_run"][(step, "val-core/gsm8k/acc/mean_1")] = \
                    float(np.float32(step / 12_000))
    writer = Writer(str(root / "nested" / "tf2_run"))
    for step in range(0, 400, 2):
        writer.add_scalar("train/approx_entropy", entropy[step], step)
        expected["tf2_run"][(step, "train/approx_entropy")] = float(np.float32(entropy[step]))
    writer.close()
    return root, expected


@pytest.mark.slow
def test_folder_of_runs_keeps_every_point(tmp_path, logdir):
    root, expected = logdir
    runs = el.ingest(root, tmp_path / "S")
    assert runs == ["nested-tf2_run", "verl_run"]
    store = el.open(tmp_path / "S")
    got = points(store, "verl_run")
    per_dataset = {k: v for k, v in got.items() if not k[1].startswith("mean(")}
    assert per_dataset == expected["verl_run"]
    assert len(per_dataset) == 12_000 + 24
    metrics = store.read_metrics("verl_run")
    assert (metrics["metric"] == "policy_entropy").sum() == 12_000
    # one dataset: its mean is the same curve
    val = metrics[metrics["metric"] == "val_accuracy"]
    per = metrics[metrics["metric"] == "val_accuracy/gsm8k"]
    assert val["value"].tolist() == per["value"].tolist() and len(val) == 24
    assert points(store, "nested-tf2_run") == expected["tf2_run"]
    # TF2 run: NeMo-RL's approximate entropy is flagged in the manifest
    assert store.manifest("nested-tf2_run")["notes"]["approximate_metrics"] == \
        ["train/approx_entropy"]
    sources = store.manifest("verl_run")["sources"]
    assert {s["format"] for s in sources} == {"tensorboard"}
    assert any("/verl_run/" in s["path"] for s in sources)


def test_one_run_folder_and_one_event_file(tmp_path, logdir):
    root, expected = logdir
    (run,) = el.ingest(root / "nested" / "tf2_run", tmp_path / "S")
    store = el.open(tmp_path / "S")
    assert run == "tf2_run" and points(store, run) == expected["tf2_run"]
    event = next((root / "nested" / "tf2_run").iterdir())
    el.ingest(event, store, run="file")
    assert points(store, "file") == expected["tf2_run"]


def test_restarted_run_keeps_the_later_values(tmp_path):
    from tensorboardX import SummaryWriter

    # a run logs steps 0-9, crashes, and resumes from the checkpoint of step 5
    with SummaryWriter(str(tmp_path / "logs"), filename_suffix=".a") as writer:
        for step in range(10):
            writer.add_scalar("train/entropy", 1.0 + step, step)
    files = sorted((tmp_path / "logs").iterdir())
    with SummaryWriter(str(tmp_path / "logs"), filename_suffix=".b") as writer:
        for step in range(5, 12):
            writer.add_scalar("train/entropy", 100.0 + step, step)
    files = sorted((tmp_path / "logs").iterdir())
    assert len(files) == 2
    el.ingest(tmp_path / "logs", tmp_path / "S", run="r")
    metrics = el.open(tmp_path / "S").read_metrics("r")
    got = dict(zip(metrics["step"], metrics["value"]))
    assert got == {**{s: 1.0 + s for s in range(5)}, **{s: 100.0 + s for s in range(5, 12)}}


@pytest.mark.slow
def test_cli_ingest_then_summary(tmp_path, logdir):
    root, expected = logdir
    result = runner.invoke(app, ["ingest", str(root / "verl_run"), "--out", str(tmp_path / "S")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["summary", str(tmp_path / "S"), "--json"])
    data = json.loads(result.stdout)
    assert data["runs"][0]["steps"] == 12_000
    assert data["runs"][0]["entropy_source"] == "metric"


def test_files_without_scalars_are_an_error_naming_them(tmp_path):
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(tmp_path / "text_only")) as writer:
        writer.add_text("notes", "no scalars here", 0)
    with pytest.raises(EntropylensError) as info:
        el.ingest(tmp_path / "text_only", tmp_path / "S")
    assert "no scalar summaries" in str(info.value)
    assert str(tmp_path / "text_only") in str(info.value)
    assert not (tmp_path / "S").exists()
    garbage = tmp_path / "events.out.tfevents.123.host"
    garbage.write_bytes(b"this is not a record file at all")
    result = runner.invoke(app, ["ingest", str(garbage), "--out", str(tmp_path / "S")])
    assert result.exit_code == 1 and str(garbage) in result.stderr


def test_without_the_extra_the_error_names_it(tmp_path, monkeypatch):
    # tensorboard is the optional extra [tensorboard]: block its import as if not installed
    import sys

    from tensorboardX import SummaryWriter

    with SummaryWriter(str(tmp_path / "logs" / "run")) as writer:
        writer.add_scalar("actor/entropy", 0.5, 1)
    for name in [m for m in sys.modules if m == "tensorboard" or m.startswith("tensorboard.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)   # import raises ImportError
    event_file = next((tmp_path / "logs" / "run").iterdir())
    result = runner.invoke(app, ["ingest", str(event_file), "--out", str(tmp_path / "S")])
    assert result.exit_code == 1
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and message.startswith("error: ")
    assert str(event_file) in message and "pip install 'entropylens[tensorboard]'" in message
    assert not (tmp_path / "S").exists() or el.open(tmp_path / "S").runs() == []
