"""Real files from public repositories that broke entropylens (``../shared/samples/wild``),
checked against an independent parse of the same file (``tests/fixtures/wild`` holds copies)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import entropylens as el
from entropylens.cli import app
from entropylens.ingest.openai import _most_likely_first

WILD = Path(__file__).resolve().parent / "fixtures" / "wild"
runner = CliRunner()


def _ingest(source, tmp_path, **options):
    store = tmp_path / "store"
    runs = el.ingest(source, store, progress=False, **options)
    return el.open(store), runs


# -- vLLM chat response without training step (gonka) --------------------------------------
def test_vllm_rows_of_k_keep_every_alternative(tmp_path):
    source = WILD / "gonka_inference_response.json"
    store, (run,) = _ingest(source, tmp_path)
    tokens = store.read_tokens(run).to_pandas().sort_values("position")
    content = json.loads(source.read_text())["choices"][0]["logprobs"]["content"]
    assert len(tokens) == len(content) == 100
    for row, c in zip(tokens.itertuples(), content):
        pairs = sorted(((a["logprob"], a["token"]) for a in c["top_logprobs"]),
                       key=lambda p: -p[0])
        # every row holds k = 3 entries, so the sampled token listed first is a real one
        assert len(row.top_logprobs) == 3
        np.testing.assert_allclose(row.top_logprobs, [p[0] for p in pairs], rtol=1e-6)
        assert sorted(row.top_tokens) == sorted(p[1] for p in pairs)
    manifest = store.manifest(run)
    assert manifest["top_k"] == 3
    assert "dropped_sampled_alternatives" not in manifest.get("notes", {})
    # position 2 (' the', itself the third most likely) keeps its tail mass at 0.02
    tail = 1 - np.exp(tokens.iloc[2].top_logprobs).sum()
    assert tail == pytest.approx(1 - sum(math.exp(a["logprob"])
                                         for a in content[2]["top_logprobs"]), abs=1e-6)
    assert tail < 0.05


def test_sampled_token_added_beyond_k_is_dropped():
    # a row of k + 1 entries: the sampled token, listed first, lies outside the top k
    logprobs, tokens = _most_likely_first([-5.0, -0.1, -1.0, -2.0], ["s", "a", "b", "c"],
                                          "s", 3)
    assert tokens == ["a", "b", "c"] and logprobs == [-0.1, -1.0, -2.0]
    # a row of k entries: the sampled token is one of the top k and stays, in order
    logprobs, tokens = _most_likely_first([-1.5, -0.1, -1.0], ["s", "a", "b"], "s", 3)
    assert tokens == ["a", "b", "s"]


def test_inference_only_run_summary_forks_roles_and_report(tmp_path):
    store, (run,) = _ingest(WILD / "gonka_inference_response.json", tmp_path)
    path = str(store.path)
    summary = runner.invoke(app, ["summary", path, "--json"])
    assert summary.exit_code == 0, summary.output
    steps = json.loads(summary.stdout)["steps"]
    assert len(steps) == 1 and steps[0]["step"] is None and steps[0]["tokens"] == 100
    shown = runner.invoke(app, ["summary", path])
    assert "inference" in shown.stdout
    distribution = el.distribution(store)
    assert len(distribution.steps) == 1 and pd.isna(distribution.steps["step"].iloc[0])
    assert distribution.steps["tokens"].iloc[0] == 100
    for command in (["forks", path, "--json"], ["roles", path, "--json"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.output
    report = runner.invoke(app, ["report", path, "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    assert (tmp_path / "report" / "index.html").is_file()
    # the quantiles figure that used to crash on a run without steps is drawn
    figures = sorted(p.name for p in (tmp_path / "report" / "figures").iterdir())
    assert any(name.startswith("quantiles-") for name in figures), figures


@pytest.mark.parametrize("command", ["fit", "phases"])
def test_inference_only_run_step_commands_say_why_in_one_line(tmp_path, command):
    store, _ = _ingest(WILD / "gonka_inference_response.json", tmp_path)
    result = runner.invoke(app, [command, str(store.path)])
    assert result.exit_code == 1
    message = result.output.strip()
    assert "\n" not in message and "inference tokens only" in message
    assert "training steps" in message and "--alias" not in message


# -- ms-swift 3.x and 2.x -------------------------------------------------------------------
def _swift_truth(path: Path):
    """Independent parse: (step, key) -> value of the numeric fields, summary record apart."""
    points, summary = {}, None
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "log_history" in record:
            summary = record
            continue
        step = record.get("global_step")
        if not isinstance(step, int):
            step = int(record["global_step/max_steps"].split("/")[0])
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "global_step":
                points[(step, key)] = value  # the last logged wins, as in the store
    return points, summary


def _stored_points(store, run):
    metrics = store.read_metrics(run)
    return {(int(r.step), r.raw_key): r.value for r in metrics.itertuples()}


def test_swift_3x_reads_every_record_and_keeps_the_summary(tmp_path):
    source = WILD / "deepclima_logging.jsonl"
    store, (run,) = _ingest(source, tmp_path)
    truth, summary = _swift_truth(source)
    stored = _stored_points(store, run)
    # the last record per (step, key) wins in the store; the 3.x file has no repeats
    assert set(stored) == set(truth)
    for key, value in truth.items():
        assert stored[key] == pytest.approx(value, rel=1e-9)
    manifest = store.manifest(run)
    assert manifest["sources"][0]["format"] == "ms_swift"
    kept = manifest["notes"]["swift_summary"]
    assert kept["best_metric"] == summary["best_metric"]
    assert kept["last_model_checkpoint"] == summary["last_model_checkpoint"]
    assert manifest["rejected"]["count"] == 0
    assert max(s for s, _ in stored) == 438


def test_swift_2x_integer_global_step_records_once(tmp_path, shared_samples):
    source = shared_samples / "wild" / "tangbinghao_swift_logging.jsonl"
    store, (run,) = _ingest(source, tmp_path)
    lines = source.read_text().splitlines()
    truth, summary = _swift_truth(source)
    stored = _stored_points(store, run)
    assert set(stored) == set(truth)
    for key, value in truth.items():
        if "speed" not in key[1] and "runtime" not in key[1] and "per_second" not in key[1]:
            assert stored[key] == pytest.approx(value, rel=1e-9)
    manifest = store.manifest(run)
    assert manifest["sources"][0]["format"] == "ms_swift"
    # every record but the two last-step ones is written twice
    records = [json.loads(line) for line in lines[:-1]]
    assert manifest["notes"]["duplicate_records"] == len(records) - len(
        {(r["global_step"], tuple(sorted(r))) for r in records}) == 2958
    assert manifest["notes"]["swift_summary"]["global_step"] == summary["global_step"]
    assert manifest["counts"]["metrics"] == len(truth)
    forced = el.ingest(source, tmp_path / "forced", format="ms_swift", progress=False)
    assert forced == [run]


# -- TRL console output (juncylu): steps from the progress bar ------------------------------
JUNCYLU = WILD / "juncylu_run_terminal_20251022_181457.md"


def _console_dicts(text: str) -> list[dict]:
    """Independent parse: every printed metrics dict, in file order."""
    import ast
    import re
    return [ast.literal_eval(m.group(0)) for m in re.finditer(r"\{'loss'[^\n]*?\}(?=\s)", text)]


def _points_of(dicts, steps):
    return {(step, key): float(value) for d, step in zip(dicts, steps)
            for key, value in d.items() if isinstance(value, (int, float))}


def test_trl_console_steps_come_from_the_progress_bar(tmp_path):
    text = JUNCYLU.read_bytes().decode("utf-8", "replace")
    dicts = _console_dicts(text)
    assert len(dicts) == 3
    store, (run,) = _ingest(JUNCYLU, tmp_path)
    # logging_steps=10: the bar after each dict reads 10/43, 20/43, 30/43
    assert _stored_points(store, run) == _points_of(dicts, [10, 20, 30])
    assert store.manifest(run)["notes"]["step_source"] == "progress_bar"
    entropy = store.read_metrics(run, pivot=True)["policy_entropy"]
    assert entropy.index.tolist() == [10, 20, 30]
    assert entropy.tolist() == [d["entropy"] for d in dicts]


def test_trl_console_dict_wrapped_over_lines_is_joined(tmp_path):
    raw = JUNCYLU.read_bytes()
    start = raw.index(b"{'loss'")
    cut = raw.index(b"'entropy'", start)
    wrapped = tmp_path / "wrapped.log"
    wrapped.write_bytes(raw[:cut] + b"\n" + raw[cut:])
    store, (run,) = _ingest(wrapped, tmp_path)
    dicts = _console_dicts(JUNCYLU.read_bytes().decode("utf-8", "replace"))
    assert _stored_points(store, run) == _points_of(dicts, [10, 20, 30])
    notes = store.manifest(run)["notes"]
    assert notes["joined_wrapped_dicts"] == 1 and "malformed_lines" not in notes


def test_trl_console_appended_runs_become_runs_of_their_own(tmp_path):
    appended = tmp_path / "twice.log"
    appended.write_bytes(JUNCYLU.read_bytes() + b"\n" + JUNCYLU.read_bytes())
    store, runs = _ingest(appended, tmp_path)
    assert runs == ["twice", "twice-2"]
    dicts = _console_dicts(JUNCYLU.read_bytes().decode("utf-8", "replace"))
    for run in runs:
        assert _stored_points(store, run) == _points_of(dicts, [10, 20, 30])
    notes = store.manifest("twice")["notes"]
    lines = appended.read_bytes().count(b"\n", 0, appended.read_bytes().rindex(b"# Training"))
    assert [r["run"] for r in notes["appended_runs"]] == [1, 2]
    assert notes["appended_runs"][1]["first_line"] > lines


def test_trl_console_without_a_bar_uses_logging_steps(tmp_path):
    dicts = _console_dicts(JUNCYLU.read_bytes().decode("utf-8", "replace"))
    source = tmp_path / "dicts.log"
    source.write_text("TrainingArguments(\nlogging_steps=10,\n)\n"
                      + "\n".join(repr(d) for d in dicts) + "\n")
    store, (run,) = _ingest(source, tmp_path)
    assert _stored_points(store, run) == _points_of(dicts, [10, 20, 30])
    notes = store.manifest(run)["notes"]
    assert notes["step_source"] == "logging_steps" and notes["trainer_logging_steps"] == 10


# -- TensorBoard: a resumed run wrote steps twice (tensorboard-reducer's test runs) --------
def test_tensorboard_repeated_steps_keep_the_later_value_and_are_told(tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    folder = WILD / "tbreducer_duplicate_steps"
    store, runs = _ingest(folder, tmp_path)
    assert runs == ["run_1", "run_2", "run_3"]
    for run in runs:
        (file,) = (folder / run).iterdir()
        truth, repeated, logged = {}, 0, 0
        for event in EventFileLoader(str(file)).Load():
            for value in event.summary.value if event.HasField("summary") else ():
                key = (event.step, value.tag)
                repeated += key in truth
                logged += 1
                number = (value.simple_value if value.WhichOneof("value") == "simple_value"
                          else float(tensor_util.make_ndarray(value.tensor)))
                truth[key] = number  # the later value wins
        assert repeated and logged == len(truth) + repeated
        stored = _stored_points(store, run)
        assert stored.keys() == truth.keys()
        for key, value in truth.items():
            assert stored[key] == pytest.approx(value, rel=1e-6)
        notes = store.manifest(run)["notes"]["repeated_steps"]
        assert notes[run]["points"] == repeated and notes[run]["kept"] == "later"


# -- one run per run -----------------------------------------------------------------------
SAMPLE_LOGS = Path(__file__).resolve().parents[1] / "sample_logs"


def test_folder_of_runs_becomes_one_run_per_subfolder(tmp_path):
    store, runs = _ingest(SAMPLE_LOGS, tmp_path)
    assert runs == ["kg_mcts", "top20", "vanilla"]   # the search-tree example is a run too
    for run in ("top20", "vanilla"):
        truth = pd.read_parquet(SAMPLE_LOGS / run / "tokens.parquet")
        manifest = store.manifest(run)
        assert manifest["counts"]["tokens"] == len(truth)
        assert manifest["counts"]["duplicate_tokens"] == 0
        assert {Path(s["path"]).parent.name for s in manifest["sources"]} == {run}
    named = el.ingest(SAMPLE_LOGS, tmp_path / "named", run="exp", progress=False)
    assert named == ["exp-kg_mcts", "exp-top20", "exp-vanilla"]


def test_folder_with_runs_and_loose_files_is_refused(tmp_path):
    folder = tmp_path / "logs"
    for run in ("a", "b"):
        (folder / run).mkdir(parents=True)
        (folder / run / "metrics.csv").write_bytes((SAMPLE_LOGS / "vanilla" / "metrics.csv")
                                                   .read_bytes())
    (folder / "metrics.csv").write_bytes((SAMPLE_LOGS / "top20" / "metrics.csv").read_bytes())
    result = runner.invoke(app, ["ingest", str(folder), "--out", str(tmp_path / "s")])
    assert result.exit_code == 1
    assert "subfolders (a, b)" in result.output and "metrics.csv" in result.output
    assert not (tmp_path / "s").exists()


def test_two_runs_given_as_one_are_refused_across_files(tmp_path):
    truth = pd.concat([pd.read_parquet(SAMPLE_LOGS / r / "tokens.parquet")
                       for r in ("vanilla", "top20")])
    key = ["step", "prompt_idx", "sample_idx", "position"]
    repeated = int(truth.duplicated(key).sum())
    assert repeated == 16635
    result = runner.invoke(app, ["ingest", str(SAMPLE_LOGS / "vanilla"),
                                 str(SAMPLE_LOGS / "top20"), "--run", "both",
                                 "--out", str(tmp_path / "s")])
    assert result.exit_code == 1
    line = result.output.strip()
    assert f"{repeated} token rows repeat" in line and "tokens.parquet" in line
    assert "--on-duplicate" in line and "\n" not in line
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("keep", ["first", "last"])
def test_duplicates_across_part_files_keep_first_or_last(tmp_path, monkeypatch, keep):
    """Small part files: the repeated keys of the second run lie in other parts than the
    first run's, so the whole-run check (not the per-part one) must find them."""
    import entropylens.store as store_module
    monkeypatch.setattr(store_module, "ROWS_PER_PART", 4000)
    sources = [SAMPLE_LOGS / "vanilla" / "tokens.parquet", SAMPLE_LOGS / "top20" / "tokens.parquet"]
    runs = el.ingest(sources, tmp_path / "s", run="both", on_duplicate=f"keep-{keep}",
                     progress=False)
    store = el.open(tmp_path / "s")
    assert len(list((store.run_dir("both") / "tokens").iterdir())) >= 2
    frames = [pd.read_parquet(p) for p in sources]
    truth = pd.concat(frames)
    key = ["step", "prompt_idx", "sample_idx", "position"]
    kept = truth.drop_duplicates(key, keep=keep)
    stored = store.read_tokens(runs[0]).to_pandas()
    manifest = store.manifest("both")
    assert len(stored) == len(kept) == manifest["counts"]["tokens"]
    assert manifest["counts"]["duplicates_dropped"] == len(truth) - len(kept) == 16635
    assert not stored.duplicated(["step", "sample_id", "position"]).any()
    assert manifest["counts"]["tokens_with_entropy"] == kept["entropy"].notna().sum()
    np.testing.assert_allclose(np.sort(stored["entropy"].to_numpy()),
                               np.sort(kept["entropy"].to_numpy(dtype="float32")), rtol=1e-6)


# -- ingest prints what it did; empty results exit 1 ---------------------------------------
def test_ingest_prints_format_mapping_and_guessed_steps(tmp_path):
    result = runner.invoke(app, ["ingest", str(JUNCYLU), "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "as hf_console: detected (hf_console 0.85" in out
    assert "entropy -> policy_entropy" in out and "reward -> reward_mean" in out
    assert "kept under their raw names (39): attention/all/aei_text" in out
    assert "steps not in the records: from the progress bar" in out
    swift = runner.invoke(app, ["ingest", str(WILD / "deepclima_logging.jsonl"),
                                "--out", str(tmp_path / "s2")])
    assert "eval_loss -> val_loss" in swift.output
    assert "summary record kept as run metadata" in swift.output


def test_ingest_report_escapes_control_characters(tmp_path):
    source = tmp_path / "metrics.csv"
    source.write_text("step,entropy,\x1b[31mred\n1,0.5,1\n2,0.4,2\n")
    result = runner.invoke(app, ["ingest", str(source), "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\\x1b[31mred" in result.output


def test_csv_of_unknown_columns_exits_1_with_the_reason(tmp_path):
    source = tmp_path / "unknown.csv"
    source.write_text("step,foo,bar\n1,1,2\n2,3,4\n")
    result = runner.invoke(app, ["ingest", str(source), "--out", str(tmp_path / "s")])
    assert result.exit_code == 1
    assert "no metric entropylens knows among the columns (bar, foo)" in result.output
    assert "--alias" in result.output and not (tmp_path / "s").exists()
    named = runner.invoke(app, ["ingest", str(source), "--out", str(tmp_path / "s"),
                                "--alias", "foo=policy_entropy"])
    assert named.exit_code == 0, named.output
    assert "foo -> policy_entropy" in named.output


def test_responses_without_logprobs_exit_1_with_the_reason(tmp_path, shared_samples):
    response = json.loads((shared_samples / "openai_chat_completion_logprobs.json").read_text())
    response["choices"][0]["logprobs"] = None
    source = tmp_path / "no_logprobs.json"
    source.write_text(json.dumps(response))
    result = runner.invoke(app, ["ingest", str(source), "--out", str(tmp_path / "s")])
    assert result.exit_code == 1
    assert "no response carries logprobs" in result.output and str(source) in result.output
    assert not (tmp_path / "s").exists()


# -- done when: every wild file ingests, summarises and reports ------------------------------
WILD_FILES = ["gonka_inference_response.json", "deepclima_logging.jsonl",
              "juncylu_run_terminal_20251022_181457.md", "tbreducer_duplicate_steps",
              "tangbinghao_swift_logging.jsonl"]


@pytest.mark.parametrize("name", WILD_FILES)
def test_every_wild_file_ingests_summarises_and_reports(tmp_path, shared_samples, name):
    source = shared_samples / "wild" / name
    store = tmp_path / "store"
    for command in (["ingest", str(source), "--out", str(store)],
                    ["summary", str(store), "--json"],
                    ["report", str(store), "--out", str(tmp_path / "report")]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, (command[0], result.output)
        assert "Traceback" not in result.output
    summary = json.loads(runner.invoke(app, ["summary", str(store), "--json"]).stdout)
    assert summary["runs"] and all(r["tokens"] or el.open(store).manifest(r["run"])["counts"]
                                   ["metrics"] for r in summary["runs"])
    assert (tmp_path / "report" / "index.html").stat().st_size > 1000


def test_trl_console_resumed_run_stays_one_run(tmp_path):
    """Steps going back to a checkpoint (not to the start) are a resume: one run, the later
    values kept."""
    dicts = _console_dicts(JUNCYLU.read_bytes().decode("utf-8", "replace"))
    resumed = [dict(d, step=s) for d, s in zip(dicts, [10, 20, 30])] + \
        [dict(dicts[2], step=20, loss=-1.0), dict(dicts[2], step=30, loss=-2.0)]
    source = tmp_path / "resumed.log"
    source.write_text("\n".join(repr(d) for d in resumed) + "\n")
    store, runs = _ingest(source, tmp_path)
    assert runs == ["resumed"]
    loss = store.read_metrics("resumed", pivot=True)["loss"]
    assert loss.to_dict() == {10: dicts[0]["loss"], 20: -1.0, 30: -2.0}
