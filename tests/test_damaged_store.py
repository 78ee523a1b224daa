"""Damaged stores (issue 23): unreadable files and folders, a token part of the wrong schema,
truncated Parquet files. Every analysis command and ``report`` that reads the damaged path
ends with one line naming it and exit code 1, never a traceback or a partial result; the
commands that do not read it are not disturbed.

Permissions are real: the commands run in a forked child process (no start-up cost) which,
when the tests run as root (who reads any file), first drops to the unprivileged ``nobody``
user; as any other user, a mode-0 file is unreadable to its owner already.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import entropylens as el
from _hardening_helpers import SAMPLE_RUN

COMMANDS = [["summary"], ["phases"], ["fit"], ["compare"], ["covariance"], ["forks"],
            ["roles"], ["report", "--out", "{out}"]]
ALL = {command[0] for command in COMMANDS}
#: damage -> the commands that read the damaged path (the others must not notice it)
DAMAGES = {
    "runs-unreadable": ALL,
    "tokens-unreadable": ALL,
    "part-wrong-schema": ALL,
    "part-truncated": ALL,
    "metrics-unreadable": {"summary", "phases", "fit", "compare", "report"},
    "metrics-truncated": {"summary", "phases", "fit", "compare", "report"},
    "sequences-unreadable": {"report"},
    "sequences-truncated": {"report"},
}


def _argv(path: Path, out: Path) -> list[list[str]]:
    return [[command[0], str(path), *(c.format(out=out) for c in command[1:])]
            for command in COMMANDS]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """The undamaged store; every command succeeds on it (which also imports everything the
    commands import: the unprivileged child may not read the Python installation)."""
    from typer.testing import CliRunner

    from entropylens.cli import app

    path = tmp_path_factory.mktemp("pristine") / "store"
    el.ingest(SAMPLE_RUN, path, run="r", progress=False)
    for argv in _argv(path, path.parent / "report"):
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, (argv, result.output)
    return path


def _copy(pristine: Path) -> Path:
    """A copy of the store that the ``nobody`` user can reach (pytest's folders are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="el-damaged-"))
    os.chmod(root, 0o777)
    path = root / "store"
    shutil.copytree(pristine, path)
    for folder, _, files in os.walk(path):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(Path(folder) / name, 0o644)
    return path


def _part(path: Path) -> Path:
    return sorted((path / "runs" / "r" / "tokens").glob("part-*.parquet"))[0]


def _truncate(file: Path) -> Path:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    return file


def _damage(path: Path, how: str) -> Path:
    """Damage the store as named; the path an error must name."""
    run = path / "runs" / "r"
    if how == "runs-unreadable":
        os.chmod(path / "runs", 0)
        return path / "runs"
    if how == "tokens-unreadable":
        os.chmod(_part(path), 0)
        return _part(path)
    if how == "part-wrong-schema":
        pq.write_table(pa.table({"step": ["one", "two"], "colour": ["red", "blue"]}),
                       _part(path))
        return _part(path)
    if how == "part-truncated":
        return _truncate(_part(path))
    name = how.split("-")[0] + ".parquet"
    if how.endswith("-unreadable"):
        os.chmod(run / name, 0)
        return run / name
    return _truncate(run / name)


def _run_cli(argv_list: list[list[str]], *, unprivileged: bool) -> list[tuple[int, str]]:
    """Run CLI invocations in a forked child (as ``nobody`` when asked); exit codes and
    output (or the uncaught exception, as exit code -1) come back through a pipe."""
    from typer.testing import CliRunner

    from entropylens.cli import app

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            os.close(read)
            if unprivileged:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp()  # nobody has no home
            results = []
            for argv in argv_list:
                result = CliRunner().invoke(app, argv)
                crash = result.exception
                if crash is not None and not isinstance(crash, SystemExit):
                    results.append((-1, f"{type(crash).__name__}: {crash}"))
                else:
                    results.append((result.exit_code, result.output))
            with os.fdopen(write, "w") as fh:
                json.dump(results, fh)
        except BaseException:  # noqa: BLE001 - reported through the exit status
            code = 3
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as fh:
        data = fh.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, data
    return [tuple(result) for result in json.loads(data)]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="runs the commands in a forked child")
@pytest.mark.parametrize("how", sorted(DAMAGES))
def test_every_command_names_the_damaged_path(pristine, how):
    path = _copy(pristine)
    try:
        named = _damage(path, how)
        out = path.parent / "report"
        out.mkdir()
        os.chmod(out, 0o777)
        argv = _argv(path, out)
        results = _run_cli(argv, unprivileged=os.geteuid() == 0)
        for command, (code, output) in zip(argv, results):
            if command[0] not in DAMAGES[how]:
                assert code == 0, (command, output)
                continue
            assert code == 1, (command, output)
            assert output.startswith(f"error: {named}: "), (command, output)
            assert len(output.strip().splitlines()) == 1, (command, output)
            assert output.count(str(named)) == 1, (command, output)
    finally:
        os.chmod(path / "runs", stat.S_IRWXU)
        shutil.rmtree(path.parent, ignore_errors=True)


def test_store_read_error_crosses_processes():
    """The local engine's workers hand errors back pickled: the path must survive."""
    import pickle

    from entropylens.errors import StoreReadError

    error = pickle.loads(pickle.dumps(StoreReadError("cannot read: Permission denied",
                                                     "/s/runs/r/metrics.parquet")))
    assert str(error) == "/s/runs/r/metrics.parquet: cannot read: Permission denied"
    assert isinstance(error, OSError) and error.filename == "/s/runs/r/metrics.parquet"
