"""The shared option set of analysis commands: offered everywhere, passed to the API as
arguments (not through the environment), and the same answers as the API."""

from __future__ import annotations

import json
import os

import pytest
import typer.main
from typer.testing import CliRunner

import entropylens as el
from entropylens.cli import app
from entropylens.engine import WORKERS_ENV

SHARED = ("--run", "--engine", "--ray-address", "--workers")
TOKEN_COMMANDS = ("summary", "phases", "fit", "compare", "covariance", "forks", "report",
                  "roles")
RUN_COMMANDS = ("diagnose", "diversity", "origins", "branches")


def _options(name: str) -> set[str]:
    command = typer.main.get_command(app).get_command(None, name)
    return {flag for param in command.params for flag in param.opts}


def test_every_analysis_command_offers_the_shared_options():
    for name in TOKEN_COMMANDS + RUN_COMMANDS:
        offered = _options(name)
        assert set(SHARED) <= offered, name
        assert ("--keep-after-eos" in offered) == (name in TOKEN_COMMANDS), name
        assert ("--json" in offered) == (name != "report"), name


def test_workers_reach_the_api_as_an_argument(sample_store, monkeypatch):
    monkeypatch.delenv(WORKERS_ENV, raising=False)
    result = CliRunner().invoke(app, ["summary", str(sample_store.path), "--workers", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert WORKERS_ENV not in os.environ  # nothing leaks into the process
    expected = el.summary(sample_store, workers=1).to_dict()
    assert json.loads(result.stdout) == json.loads(json.dumps(expected, default=str))


def test_workers_with_ray_and_ray_address_without_it_are_usage_errors(sample_store):
    runner = CliRunner()
    done = runner.invoke(app, ["summary", str(sample_store.path), "--engine", "ray", "--workers", "2"])
    assert done.exit_code == 2 and "--workers" in done.output
    done = runner.invoke(app, ["phases", str(sample_store.path), "--ray-address", "auto"])
    assert done.exit_code == 2 and "--ray-address" in done.output


def test_runs_are_passed_on(sample_store):
    runs = sample_store.runs()
    result = CliRunner().invoke(app, ["summary", str(sample_store.path), "--run", runs[0], "--json"])
    assert result.exit_code == 0, result.output
    assert [row["run"] for row in json.loads(result.stdout)["runs"]] == [runs[0]]


@pytest.mark.slow  # several seconds: `make test` runs it
def test_every_token_command_accepts_workers(sample_store, tmp_path):
    # each command hands --workers to its API function, which must take it
    store = str(sample_store.path)
    for name in TOKEN_COMMANDS + RUN_COMMANDS:
        extra = ["--out", str(tmp_path / "report")] if name == "report" else []
        done = CliRunner().invoke(app, [name, store, "--workers", "1", *extra])
        assert done.exit_code in (0, 1), (name, done.output)
        assert "TypeError" not in repr(done.exception) and "unexpected keyword" not in \
            done.output, (name, done.output)
