"""Step basis: the same run written by four trackers gives the token table's saturation fit.

The shared vanilla run logs policy versions (step s: the policy after s updates, for its
entropy and its validation). verl and the Hugging Face Trainer log a 1-based step g instead:
training metrics at g come from the policy after g - 1 updates, a validation logged at g ran
after update g. The writers below turn the run's ``metrics.csv`` into what those trackers
write; ingest must undo it so that every validation is paired with the validated policy.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import entropylens as el
from entropylens.analysis.curves import align_metric_steps, run_step_basis
from entropylens.ingest.step_basis import source_step_basis

VAL_KEY = "val-core/arith/acc/mean@2"


def _logged_rows(metrics_csv):
    """``{logged step: {kind: value}}`` as a 1-based trainer logs the run.

    Training row s (policy s) is logged at g = s + 1; validation of policy s at g = s
    (step 0: the validation before training).
    """
    frame = pd.read_csv(metrics_csv)
    rows: dict[int, dict] = {}
    for r in frame.itertuples():
        step = int(r.step)
        if np.isfinite(r.entropy):
            rows.setdefault(step + 1, {}).update(entropy=float(r.entropy), reward=float(r.reward))
        if np.isfinite(r.val_acc):
            rows.setdefault(step, {})["val"] = float(r.val_acc)
    return dict(sorted(rows.items()))


def _write_verl_console(rows, path):
    lines = ["(TaskRunner pid=4242) Initial validation metrics: "
             + repr({VAL_KEY: rows[0]["val"]})]
    for step, row in rows.items():
        if step == 0:
            continue
        items = [f"actor/entropy:{row['entropy']!r}", f"critic/score/mean:{row['reward']!r}"]
        if "val" in row:
            items.append(f"{VAL_KEY}:{row['val']!r}")
        lines.append(f"(TaskRunner pid=4242) step:{step} - " + " - ".join(items))
    path.write_text("\n".join(lines) + "\n")


def _write_wandb_csv(rows, path):
    # verl's Tracking passes step=global_steps to wandb.log (so _step is the global step) and
    # logs training/global_step with the training metrics; the validation before training
    # is a row of its own at step 0
    records = []
    for step, row in rows.items():
        record = {"_step": step, "_runtime": 10.0 * step, "_timestamp": 1.7e9 + 10 * step}
        if "entropy" in row:
            record.update({"training/global_step": step, "actor/entropy": row["entropy"],
                           "critic/score/mean": row["reward"]})
        if "val" in row:
            record[VAL_KEY] = row["val"]
        records.append(record)
    pd.DataFrame(records).to_csv(path, index=False)


def _write_tensorboard(rows, folder):
    # transformers' TensorBoardCallback: add_scalar(tag, value, state.global_step), with
    # "train/" and "eval/" prefixes
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(folder))
    for step, row in rows.items():
        if "entropy" in row:
            writer.add_scalar("train/entropy", row["entropy"], step)
            writer.add_scalar("train/reward", row["reward"], step)
        if "val" in row:
            writer.add_scalar("eval/accuracy", row["val"], step)
    writer.close()


def _write_trainer_state(rows, path):
    history = []
    for step, row in rows.items():
        if "entropy" in row:
            history.append({"entropy": row["entropy"], "reward": row["reward"], "step": step})
        if "val" in row:
            history.append({"eval_accuracy": row["val"], "step": step})
    path.write_text(json.dumps({"global_step": max(rows), "log_history": history}))


WRITERS = {
    "verl_console": (_write_verl_console, "verl.log", "val_accuracy/arith"),
    "wandb": (_write_wandb_csv, "wandb_history.csv", "val_accuracy/arith"),
    "tensorboard": (_write_tensorboard, "tb", None),
    "hf_trainer": (_write_trainer_state, "trainer_state.json", None),
}


@pytest.fixture(scope="module")
def reference_fit(shared_run, tmp_path_factory):
    """The fit of the token table (entropy from the tokens, after-EOS tokens kept: the
    quantity the trainer logged) and of the run's own metrics.csv, both policy versions."""
    path = tmp_path_factory.mktemp("basis") / "store"
    el.ingest(shared_run / "vanilla", path, run="tokens", step_basis="policy_version")
    el.ingest(shared_run / "vanilla" / "metrics.csv", path, run="csv",
              step_basis="policy_version")
    return (el.fit_saturation(path, "tokens", keep_after_eos=True),
            el.fit_saturation(path, "csv"))


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_every_tracker_format_gives_the_token_table_fit(fmt, shared_run, tmp_path,
                                                        reference_fit):
    tokens_fit, csv_fit = reference_fit
    write, name, reward = WRITERS[fmt]
    source = tmp_path / name
    if fmt == "tensorboard":
        source.mkdir()
    write(_logged_rows(shared_run / "vanilla" / "metrics.csv"), source)
    el.ingest(source, tmp_path / "s", run="r")
    store = el.open(tmp_path / "s")
    manifest = store.manifest("r")
    assert {s["format"] for s in manifest["sources"]} == {fmt}
    assert manifest["step_basis"] == {"metrics": "logged_step"}
    assert "warnings" not in manifest

    fit = el.fit_saturation(store, "r", reward=reward)
    # the same (entropy, validation) pairs as the run's own policy-version metrics
    assert fit.n == csv_fit.n == tokens_fit.n
    np.testing.assert_allclose(fit.data["R"], csv_fit.data["R"], rtol=0, atol=0)
    np.testing.assert_allclose(fit.data["H"], csv_fit.data["H"], rtol=1e-12)
    assert fit.r2 == pytest.approx(csv_fit.r2, rel=1e-9)
    assert (fit.a, fit.b) == pytest.approx((csv_fit.a, csv_fit.b), rel=1e-9)
    # the token table's own fit: its per-step token mean is the logged entropy to ~1e-6
    np.testing.assert_allclose(fit.data["H"], tokens_fit.data["H"], atol=1e-5)
    assert fit.r2 == pytest.approx(tokens_fit.r2, abs=1e-4)
    assert any("g+1" in note for note in fit.notes)


def test_pairing_as_logged_gives_another_fit(shared_run, tmp_path, reference_fit):
    """Without the alignment (the steps declared policy versions) validation meets the
    entropy of the policy one update older: the fit the trackers used to give."""
    _, csv_fit = reference_fit
    source = tmp_path / "verl.log"
    _write_verl_console(_logged_rows(shared_run / "vanilla" / "metrics.csv"), source)
    el.ingest(source, tmp_path / "s", run="r", step_basis="policy_version")
    fit = el.fit_saturation(tmp_path / "s", "r", reward="val_accuracy/arith")
    assert el.open(tmp_path / "s").manifest("r")["step_basis"] == {"metrics": "policy_version"}
    # the validation before training has no entropy at "its" step 0, the others meet the
    # entropy of the previous policy
    assert fit.n == csv_fit.n - 1
    assert abs(fit.a - csv_fit.a) > 1e-3 and abs(fit.r2 - csv_fit.r2) > 1e-3


def test_unknown_basis_is_recorded_warned_and_said_in_the_fit(shared_run, tmp_path):
    with pytest.warns(UserWarning, match="step basis .* unknown"):
        el.ingest(shared_run / "vanilla" / "metrics.csv", tmp_path / "s", run="r")
    manifest = el.open(tmp_path / "s").manifest("r")
    assert manifest["step_basis"] == {"metrics": "unknown"}
    assert manifest["sources"][0]["step_basis"] == "unknown"
    assert "unknown" in manifest["warnings"][0]
    fit = el.fit_saturation(tmp_path / "s", "r")
    assert any("step basis unknown" in note for note in fit.notes)


def test_cli_ingest_takes_the_basis_and_prints_the_warning(shared_run, tmp_path):
    from typer.testing import CliRunner

    from entropylens.cli import app

    csv = str(shared_run / "vanilla" / "metrics.csv")
    runner = CliRunner()
    result = runner.invoke(app, ["ingest", csv, "--out", str(tmp_path / "s"), "--run", "a"])
    assert result.exit_code == 0 and "warning:" in result.stderr and "unknown" in result.stderr
    result = runner.invoke(app, ["ingest", csv, "--out", str(tmp_path / "s"), "--run", "b",
                                 "--step-basis", "policy_version"])
    assert result.exit_code == 0 and "warning" not in result.stderr
    assert el.open(tmp_path / "s").manifest("b")["step_basis"] == {"metrics": "policy_version"}
    result = runner.invoke(app, ["ingest", csv, "--out", str(tmp_path / "s"), "--run", "c",
                                 "--step-basis", "zero"])
    assert result.exit_code == 2


def test_basis_rules():
    assert source_step_basis("verl_console") == "logged_step"
    assert source_step_basis("table") == "unknown"
    assert source_step_basis("openai_chat") == "unknown"
    # W&B's own _step counter is not a trainer step; record numbers are not either
    assert source_step_basis("wandb", {"step_source": "_step"}) == "unknown"
    assert source_step_basis("hf_console", {"step_source": "record_index"}) == "unknown"
    assert source_step_basis("wandb", {"step_source": "train/global_step"}) == "logged_step"
    # training rows at step 0: not a 1-based trainer count (early verl)
    assert source_step_basis("verl_console", first_train_step=0) == "unknown"
    assert source_step_basis("table", override="logged_step") == "logged_step"


def test_alignment_moves_rows_policy_by_policy():
    metrics = pd.DataFrame({"step": [1, 2, 2], "metric": ["reward_mean", "reward_mean",
                                                          "val_accuracy"],
                            "value": [0.1, 0.2, 0.5], "raw_key": None,
                            "split": ["train", "train", "val"]})
    # entropy from 0-based tokens, metrics from a 1-based tracker: training rows move back
    manifest = {"counts": {"tokens": 10},
                "step_basis": {"tokens": "policy_version", "metrics": "logged_step"}}
    aligned, info = align_metric_steps(metrics, manifest)
    assert aligned["step"].tolist() == [0, 1, 2] and info["train_shift"] == -1
    # entropy and metrics from the same tracker: validation moves forward
    manifest = {"counts": {"tokens": 0}, "step_basis": {"metrics": "logged_step"}}
    aligned, info = align_metric_steps(metrics, manifest)
    assert aligned["step"].tolist() == [1, 2, 3] and info["val_shift"] == 1
    # a run ingested before the basis was recorded: from its sources' formats
    old = {"counts": {}, "sources": [{"format": "tensorboard"}]}
    assert run_step_basis(old, "metrics") == "logged_step"
    mixed = {"counts": {}, "sources": [{"format": "tensorboard"}, {"format": "table"}]}
    aligned, info = align_metric_steps(metrics, mixed)
    assert aligned["step"].tolist() == [1, 2, 2] and "mixed" in info["note"]
