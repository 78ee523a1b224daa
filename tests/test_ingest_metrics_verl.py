"""verl console logs and FileLogger JSONL, checked value by value against the files."""

import ast
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import entropylens as el
from entropylens.cli import app
from entropylens.errors import EntropylensError

FIXTURES = Path(__file__).parent / "fixtures" / "metrics"
VERL = "real_runs/verl_gsm8k_ppo"
LOGS = ["Qwen2.5-0.5B-bsz256_2-prompt1024-resp512-0.567.log",
        "Qwen2.5-0.5B-bsz256_2-prompt512-resp256-0.538.log",
        "gemma-2-2b-it-ppo-bsz512_4-prompt1024-resp-512-0.640.log"]
runner = CliRunner()


def independent_parse(path: Path) -> dict:
    """{(step, key): value}: the README's recipe (strip colours and the Ray prefix, split
    step lines on ' - ' and items on the first ':'), validation dicts at the step before
    the first step line (initial) and the last step line (final), dict values winning."""
    points, dict_points = {}, {}
    steps_seen, pending = [], []
    for line in path.read_bytes().decode("utf-8", "replace").split("\n"):
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)
        line = re.sub(r"^\s*\(\w+ pid=\d+\)\s*", "", line).strip()
        if line.startswith("step:"):
            head, _, rest = line.partition(" - ")
            step = int(head[len("step:"):])
            steps_seen.append(step)
            for item in rest.split(" - "):
                key, _, value = item.partition(":")
                points[(step, key)] = float(value)
        elif "validation metrics: {" in line:
            kind = "initial" if "Initial" in line else "final"
            data = ast.literal_eval(line[line.index("{"):line.rindex("}") + 1])
            pending.append((kind, steps_seen[-1] if steps_seen else None, data))
    for kind, last, data in pending:
        step = max(steps_seen[0] - 1, 0) if kind == "initial" else last
        for key, value in data.items():
            dict_points[(step, key)] = float(value)
    points.update(dict_points)
    return points


def stored(store, run):
    metrics = store.read_metrics(run)
    raw = metrics[~metrics["raw_key"].str.startswith("mean(")]
    assert not raw.duplicated(["step", "raw_key"]).any()
    return {(int(s), k): v for s, k, v in zip(raw["step"], raw["raw_key"], raw["value"])}


@pytest.fixture(scope="module")
def verl_store(tmp_path_factory, shared_samples):
    path = tmp_path_factory.mktemp("verl") / "store"
    for index, name in enumerate(LOGS):
        el.ingest(shared_samples / VERL / name, path, run=f"log{index}")
    return el.open(path)


@pytest.mark.parametrize("index", range(len(LOGS)))
def test_real_logs_value_by_value(verl_store, shared_samples, index):
    expected = independent_parse(shared_samples / VERL / LOGS[index])
    assert stored(verl_store, f"log{index}") == expected
    notes = verl_store.manifest(f"log{index}")["notes"]
    assert notes["framework"] == "verl" and "malformed_lines" not in notes


@pytest.mark.parametrize("index,steps,first_h,last_h,first_r,last_r,initial,final", [
    (0, 435, 0.526, 0.066, 0.012, 0.707, 0.0007621951219512195, 0.5685975609756098),
    (1, 435, 0.450, 0.055, 0.004, 0.715, 0.0, None),
    (2, 106, 0.419, 0.149, 0.416, 0.682, 0.520579268292683, None),
])
def test_canonical_curves_match_the_readme(verl_store, index, steps, first_h, last_h,
                                           first_r, last_r, initial, final):
    wide = verl_store.read_metrics(f"log{index}", pivot=True)
    entropy = wide["policy_entropy"].dropna()
    reward = wide["reward_mean"].dropna()
    assert len(entropy) == steps and entropy.index[0] == 0
    assert (round(entropy.iloc[0], 3), round(entropy.iloc[-1], 3)) == (first_h, last_h)
    assert (round(reward.iloc[0], 3), round(reward.iloc[-1], 3)) == (first_r, last_r)
    val = wide["val_accuracy"].dropna()
    assert val.loc[0] == pytest.approx(initial, abs=1e-12)
    if final is not None:
        assert val.loc[steps - 1] == final
    # validation every 10 steps (9, 19, ...) plus the initial (and final) validation
    assert set(val.index) - {0, steps - 1} == set(range(9, steps, 10))
    # the mean over datasets is the one dataset's value here
    per = wide["val_accuracy/openai/gsm8k"].dropna()
    assert per.equals(val)
    raw = verl_store.read_metrics(f"log{index}")
    assert set(raw.loc[raw["metric"] == "policy_entropy", "raw_key"]) == {"actor/entropy_loss"}
    assert set(raw.loc[raw["metric"] == "val_accuracy", "raw_key"]) == \
        {"mean(val_accuracy/openai/gsm8k)"}


def test_gemma_initial_validation_keeps_full_precision(verl_store):
    # printed twice at step 0: 0.521 in the step line, 0.520579... in the dict line
    val = verl_store.read_metrics("log2", pivot=True)["val_accuracy"]
    assert val.loc[0] == 0.520579268292683


def test_wrapped_and_cut_lines_are_counted_not_fatal(tmp_path, shared_samples):
    source = shared_samples / "verl_console_metrics_issue_excerpts.log"
    el.ingest(source, tmp_path / "S", run="x")
    store = el.open(tmp_path / "S")
    notes = store.manifest("x")["notes"]
    # lines 1 and 4 are cut mid-item, lines 2 and 5 are the wrapped remainders
    assert notes["malformed_lines"] == 4
    assert [e["line"] for e in notes["malformed_examples"]] == [1, 2, 4, 5]
    wide = store.read_metrics("x", pivot=True)
    assert wide.loc[34, "policy_entropy"] == 0.22266578674316406  # actor/entropy
    assert wide.loc[5, "policy_entropy"] == 5.683  # actor/entropy_loss, older verl
    assert wide.loc[34, "clip_fraction"] == 0.0007935191160472839
    assert wide.loc[5, "truncation_ratio"] == 0.521
    core = [0.16129032258064516, 0.706, 0.33037037037037037]
    assert wide.loc[4, "val_accuracy"] == pytest.approx(sum(core) / 3, rel=1e-15)
    assert wide.loc[4, "val_accuracy/math"] == 0.706
    assert wide.loc[5, "val_accuracy"] == 0.171  # val/test_score/openai/gsm8k
    # the items of the cut lines before the cut are kept, the cut item and the wrapped
    # remainder are not
    points = stored(store, "x")
    assert points[(34, "critic/score/mean")] == -0.0182796623557806
    assert points[(5, "prompt_length/max")] == 201.0
    assert (5, "prompt_length/min") not in points and (34, "critic/rewards/min") not in points


def test_quickstart_lines(tmp_path, shared_samples):
    source = shared_samples / "verl_console_metrics_quickstart.log"
    el.ingest(source, tmp_path / "S", run="q")
    store = el.open(tmp_path / "S")
    assert stored(store, "q") == independent_parse(source)
    wide = store.read_metrics("q", pivot=True)
    assert wide["policy_entropy"].tolist() == [0.433, 0.440]
    assert wide["reward_mean"].tolist() == [0.004, 0.000]
    assert wide["response_length_mean"].tolist() == [239.133, 232.242]


def test_initial_validation_goes_to_the_step_before_training(tmp_path, shared_samples):
    # current verl counts training steps from 1 and validates before at step 0; a resumed
    # run validates at its checkpoint step
    excerpt = (shared_samples / "verl_console_metrics_quickstart.log").read_text().splitlines()
    for first, initial in ((1, 0), (41, 40), (0, 0)):
        lines = ["(TaskRunner pid=1) \"Initial validation metrics: {'val-core/gsm8k/acc/"
                 "mean@1': np.float64(0.25), 'val-core/math/acc/mean@1': 0.5}\""]
        for n, line in enumerate(excerpt):
            lines.append("(TaskRunner pid=1) " + line.replace("step:0", f"step:{first + n}")
                         .replace("step:1", f"step:{first + n}"))
        lines.append("(TaskRunner pid=1) Final validation metrics: "
                     "{'val-core/gsm8k/acc/mean@1': 0.75}")
        path = tmp_path / f"resume{first}.log"
        path.write_text("\n".join(lines) + "\n")
        el.ingest(path, tmp_path / "S", run=f"r{first}")
        wide = el.open(tmp_path / "S").read_metrics(f"r{first}", pivot=True)
        assert wide.loc[initial, "val_accuracy/gsm8k"] == 0.25
        assert wide.loc[initial, "val_accuracy"] == 0.375
        assert wide.loc[first + 1, "val_accuracy"] == 0.75


def test_filelogger_jsonl(tmp_path, shared_samples):
    el.ingest(FIXTURES / "verl_filelogger.jsonl", tmp_path / "S", run="f")
    store = el.open(tmp_path / "S")
    log = independent_parse(shared_samples / VERL / LOGS[2])
    # the fixture holds the first 20 steps; its step-0 score is the printed (rounded) one
    expected = {k: v for k, v in log.items() if k[0] < 20}
    expected[(0, "test_score/openai/gsm8k")] = 0.521
    assert stored(store, "f") == expected
    lines = (FIXTURES / "verl_filelogger.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    entropy = store.read_metrics("f", pivot=True)["policy_entropy"]
    assert entropy.tolist() == [r["data"]["actor/entropy_loss"] for r in records]


def test_filelogger_bad_records_follow_on_error(tmp_path):
    lines = (FIXTURES / "verl_filelogger.jsonl").read_text().splitlines()
    path = tmp_path / "cut.jsonl"
    path.write_text("\n".join(lines[:5] + [lines[5][:80]]) + "\n")
    with pytest.raises(EntropylensError) as info:
        el.ingest(path, tmp_path / "S", run="f")
    assert f"{path}:6:" in str(info.value)
    el.ingest(path, tmp_path / "S", run="f", on_error="skip")
    manifest = el.open(tmp_path / "S").manifest("f")
    assert manifest["rejected"]["count"] == 1
    assert manifest["counts"]["metric_steps"] == 5


def test_a_log_without_step_lines_is_an_error_naming_it(tmp_path, shared_samples):
    source = shared_samples / "hf_compute_transition_scores_docstring.txt"
    result = runner.invoke(app, ["ingest", str(source), "--out", str(tmp_path / "S"),
                                 "--format", "verl_console"])
    assert result.exit_code == 1
    assert str(source) in result.stderr and "no verl step lines" in result.stderr
    assert not (tmp_path / "S").exists()
