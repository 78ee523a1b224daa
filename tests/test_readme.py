"""README.md stays true: its CLI reference is the current ``--help``, its walkthrough runs on
a real W&B export, its format table names every registered format, and every CLI command
has its Python function."""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
#: Real W&B history exports of one prime-rl run of Qwen3-0.6B (400 steps): the trainer
#: (entropy) and the orchestrator (reward), as the walkthrough tells users to export them.
WANDB_EXPORT = (REPO / "tests" / "fixtures" / "samples" / "real_runs"
                / "dakota_qwen3_0.6b_primerl_ledger400")
WANDB_TRAINER = "yut26kcm_history.csv"

#: CLI command -> the API function it calls (names differ where the verb reads better).
COMMAND_FUNCTIONS = {"watch": "watch", "ingest": "ingest", "formats": "formats", "summary": "summary",
                     "demo": "demo", "phases": "phases", "fit": "fit_saturation",
                     "compare": "compare", "covariance": "covariance",
                     "forks": "forking_tokens", "report": "report", "roles": "roles",
                     "mine-lexicon": "mine_lexicon", "rescore": "rescore",
                     "diagnose": "diagnose", "diversity": "diversity", "origins": "origins",
                     "branches": "branches"}


def _generator():
    spec = importlib.util.spec_from_file_location("gen_cli_reference",
                                                  REPO / "scripts" / "gen_cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def test_cli_reference_matches_help():
    generator = _generator()
    block = generator.readme_block(_readme())
    current = generator.cli_reference()
    assert block == current, "README CLI reference is stale: run scripts/gen_cli_reference.py"


def test_cli_reference_covers_every_command():
    import typer.main

    from entropylens.cli import app

    block = _generator().readme_block(_readme())
    commands = typer.main.get_command(app).list_commands(None)
    assert len(commands) >= 10
    for name in commands:
        assert f"#### `entropylens {name}`" in block
        assert f"Usage: entropylens {name} " in block


def test_every_command_has_its_api_function():
    import typer.main

    import entropylens as el
    from entropylens import cli

    commands = set(typer.main.get_command(cli.app).list_commands(None))
    assert commands == set(COMMAND_FUNCTIONS), "update COMMAND_FUNCTIONS and the README"
    source = "".join(path.read_text(encoding="utf-8")
                     for path in Path(cli.__file__).parent.glob("*.py"))
    for command, function in COMMAND_FUNCTIONS.items():
        assert callable(getattr(el, function)), function
        # the API's function, or the same function from its own module (formats: no pandas)
        assert re.search(rf"api\.{function}\b|import {function}\b", source), \
            f"the {command} command does not call el.{function}"


def test_format_table_names_every_format():
    import entropylens as el

    text = _readme()
    table = text[text.index("## Supported formats"):text.index("## How entropy is estimated")]
    for fmt in el.formats():
        assert f"`{fmt.name}`" in table, fmt.name


def test_required_sections():
    text = _readme()
    for heading in ("## The two commands", "## From your own W&B export to a report",
                    "## Supported formats", "## How entropy is estimated",
                    "## Analyses and where they come from", "## Python API tour",
                    "## Scale-out", "## Bad input", "## CLI reference"):
        assert heading in text, heading
    for paper in ("2505.22617", "2506.01939", "2509.03646"):
        assert paper in text
    assert "make demo" in text and "make test" in text


def _walkthrough() -> list[list[str]]:
    text = _readme()
    block = text[text.index("<!-- walkthrough:start -->"):text.index("<!-- walkthrough:end -->")]
    return [shlex.split(line) for line in block.splitlines() if line.startswith("entropylens ")]


@pytest.mark.slow  # several seconds: `make test` runs it
def test_walkthrough_runs_on_a_real_wandb_export(tmp_path):
    """Every command of the walkthrough, as written, on a real W&B history export."""
    shutil.copytree(WANDB_EXPORT, tmp_path / "wandb_export")
    commands = _walkthrough()
    assert [c[1] for c in commands] == ["ingest", "summary", "phases", "fit", "report"]
    outputs = {}
    for argv in commands:
        done = subprocess.run([sys.executable, "-m", "entropylens.cli", *argv[1:]],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env={"PATH": "/usr/bin:/bin", "COLUMNS": "100",
                                   "MPLBACKEND": "Agg", "HOME": str(tmp_path)})
        assert done.returncode == 0, f"{shlex.join(argv)}: {done.stderr}"
        outputs[argv[1]] = done.stdout + done.stderr
    # what the walkthrough promises, checked against the file itself
    import pandas as pd

    history = pd.read_csv(WANDB_EXPORT / WANDB_TRAINER)
    assert "my-run: 0 tokens, 0 sequences" in outputs["ingest"]
    assert f"{len(history)} steps, entropy from metric" in outputs["summary"]
    first = history.sort_values("step")["entropy/mean"].iloc[0]
    assert f"{first:.3f}" in outputs["summary"]
    assert "slope/step" in outputs["phases"]
    assert "reward_mean = -a*exp(H) + b" in outputs["fit"]
    assert f"n = {len(history)}" in outputs["fit"]
    assert (tmp_path / "report" / "index.html").stat().st_size > 10_000
    assert {p.name for p in (tmp_path / "report").iterdir()} >= {
        "index.html", "report.md", "report.json", "figures"}


@pytest.mark.slow  # several seconds: `make test` runs it
def test_api_tour_runs(tmp_path, monkeypatch):
    """The README's Python tour, run as written from a copy of the sample logs."""
    import matplotlib

    matplotlib.use("Agg")
    text = _readme()
    section = text[text.index("## Python API tour"):text.index("## Notebooks")]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shutil.copytree(REPO / "sample_logs", tmp_path / "sample_logs")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md (Python API tour)", "exec"), namespace)
    assert namespace["store"].runs() == ["top20", "vanilla"]
    assert (tmp_path / "report" / "index.html").exists()
    fit = namespace["fit"]
    assert fit.ceiling == pytest.approx(fit.b - fit.a)
    import matplotlib.pyplot as plt

    plt.close("all")
