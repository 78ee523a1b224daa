"""The command line starts without the heavy libraries: ``--help``, ``--version``, ``formats``.

Each check runs in a fresh interpreter, the only honest way to see what an import pulls in.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Libraries that must load only when a command computes something.
HEAVY = ("scipy", "torch", "ray", "matplotlib", "pandas", "seaborn", "jinja2", "tensorboard")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def _loaded_after(code: str) -> list[str]:
    done = _python(code + "\nimport json, sys\n"
                   f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_cli_loads_no_heavy_library():
    assert _loaded_after("import entropylens.cli") == []


def test_importing_the_package_loads_no_heavy_library():
    assert _loaded_after("import entropylens") == []


def test_help_and_version_load_no_heavy_library():
    code = ("import sys\nfrom entropylens.cli import app\n"
            "for args in (['--help'], ['--version'], ['summary', '--help']):\n"
            "    try:\n        app(args)\n    except SystemExit as exc:\n"
            "        assert exc.code == 0, (args, exc.code)\n")
    assert _loaded_after(code) == []


def test_formats_lists_every_format_without_numpy_or_pyarrow():
    # the catalogue declares the built-in formats: listing them imports no reader module
    code = ("import sys\nfrom entropylens.cli import app\n"
            "try:\n    app(['formats'])\nexcept SystemExit as exc:\n"
            "    assert exc.code in (0, None), exc.code\n"
            "assert not [m for m in ('numpy', 'pyarrow') if m in sys.modules]\n")
    assert _loaded_after(code) == []
    listed = _python("from entropylens.cli import app\napp(['formats'])").stdout
    assert "vllm_offline" in listed and "tensorboard" in listed and "slime" in listed


@pytest.mark.slow
def test_the_package_loads_the_api_on_first_use():
    # the lazy root resolves every public name, and only then pulls the libraries in
    assert "pandas" in _loaded_after("import entropylens as el\n"
                                     "[getattr(el, name) for name in el.__all__]")


def test_version_option():
    from typer.testing import CliRunner

    from entropylens._version import __version__
    from entropylens.cli import app

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"entropylens {__version__}\n"


def test_the_api_loads_scipy_only_for_the_analyses_that_use_it():
    # scipy.stats costs about half a second, more than pandas: summary and forks never need it
    loaded = _loaded_after("import entropylens.api")
    assert "pandas" in loaded and "scipy" not in loaded
