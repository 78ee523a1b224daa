"""The README's contributor walkthrough quotes the covariance analysis as it is."""

from __future__ import annotations

import re
from pathlib import Path

from entropylens.analysis import registry

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "entropylens" / "analysis" / "covariance.py"
TEMPLATES = REPO / "entropylens" / "report" / "templates" / "sections"
COMMANDS = REPO / "entropylens" / "cli" / "commands.py"


def _section() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return text[text.index("## Adding an analysis (contributors)"):
                text.index("## CLI reference")]


def _quoted_lines(block: str) -> list[str]:
    """The block's lines, stripped, without ``...`` lines and the README's own comments."""
    lines = []
    for line in block.splitlines():
        line = re.sub(r"  # .*$", "", line).strip()
        if line and line != "...":
            lines.append(line)
    return lines


def test_every_quoted_line_is_in_the_code():
    section = _section()
    module = {line.strip() for line in MODULE.read_text(encoding="utf-8").splitlines()}
    commands = {line.strip() for line in COMMANDS.read_text(encoding="utf-8").splitlines()}
    python = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(python) == 4
    for block in python:
        # the CLI command is quoted from the commands module, the rest from the analysis
        source = commands if "@app.command()" in block else module
        for line in _quoted_lines(block):
            assert line in source, line
    (jinja,) = re.findall(r"```jinja\n(.*?)```", section, re.S)
    template = {line.strip() for line in
                (TEMPLATES / "covariance.html.j2").read_text(encoding="utf-8").splitlines()}
    for line in _quoted_lines(jinja):
        assert line in template, line


def test_what_the_walkthrough_names_exists():
    section = _section()
    assert "entropylens.analysis.covariance" in registry.MODULES
    covariance = registry.get("covariance")
    assert (covariance.name, covariance.needs, covariance.order) == ("covariance", ("tokens",),
                                                                      60)
    for name in ("policy_entropy", "performance"):
        for user in ("phases", "saturation", "compare"):
            assert name in registry.get(user).requires
    assert callable(registry.required) and callable(registry.run_analysis)
    for path in ("covariance.html.j2", "covariance.md.j2"):
        assert (TEMPLATES / path).is_file() and path in section
    assert (REPO / "tests" / "test_registry_analyses.py").is_file()
