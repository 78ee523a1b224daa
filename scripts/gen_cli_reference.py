"""Regenerate the CLI reference of README.md from the ``--help`` of every command.

The block between ``<!-- cli-reference:start -->`` and ``<!-- cli-reference:end -->`` is
produced here and checked by ``tests/test_readme.py``, so the README cannot drift from the CLI.

    .venv/bin/python scripts/gen_cli_reference.py          # rewrite the block in README.md
    .venv/bin/python scripts/gen_cli_reference.py --check  # exit 1 when the block is stale

Help is rendered in a child interpreter with a fixed width of 100 columns and no colour: typer
and rich read the terminal settings when they are imported, so the parent's terminal must not
leak into the text.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
START = "<!-- cli-reference:start -->"
END = "<!-- cli-reference:end -->"
WIDTH = 100

HELP_ENV = {"COLUMNS": str(WIDTH), "LINES": "50", "TERMINAL_WIDTH": str(WIDTH),
            "NO_COLOR": "1", "TERM": "dumb", "_TYPER_FORCE_DISABLE_TERMINAL": "1"}
# Variables that would force colour or a width on rich whatever we set above.
UNSET = ("FORCE_COLOR", "PY_COLORS", "GITHUB_ACTIONS", "CLICOLOR_FORCE", "JUPYTER_COLUMNS")


def _render_all() -> str:
    """Help of the program and of each command, as Markdown (runs in the child)."""
    import typer.main
    from typer.testing import CliRunner

    from entropylens.cli import app

    group = typer.main.get_command(app)
    runner = CliRunner()
    parts = []
    for name in [None, *group.list_commands(None)]:
        args = ["--help"] if name is None else [name, "--help"]
        result = runner.invoke(app, args, prog_name="entropylens")
        if result.exit_code != 0:
            raise SystemExit(f"entropylens {' '.join(args)} exited {result.exit_code}")
        text = "\n".join(line.rstrip() for line in result.output.splitlines()).strip("\n")
        title = "entropylens" if name is None else f"entropylens {name}"
        parts.append(f"#### `{title}`\n\n```text\n{text}\n```")
    return "\n\n".join(parts)


def cli_reference() -> str:
    """The Markdown block (without the markers) for the current CLI."""
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env.update(HELP_ENV)
    done = subprocess.run([sys.executable, __file__, "--render"], env=env, cwd=REPO,
                          capture_output=True, text=True, encoding="utf-8", check=False)
    if done.returncode != 0:
        raise RuntimeError(f"rendering the CLI help failed:\n{done.stderr}")
    return done.stdout.strip("\n")


def readme_block(text: str) -> str:
    """The text between the markers of ``text`` (ValueError when they are missing)."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md lacks the markers {START} ... {END}")
    return text[start + len(START):end].strip("\n")


def replace_block(text: str, block: str) -> str:
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md lacks the markers {START} ... {END}")
    return text[:start + len(START)] + "\n" + block + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the README's CLI reference.")
    parser.add_argument("--check", action="store_true", help="exit 1 when the block is stale")
    parser.add_argument("--render", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.render:
        sys.stdout.write(_render_all() + "\n")
        return 0
    text = README.read_text(encoding="utf-8")
    block = cli_reference()
    if args.check:
        if readme_block(text) != block:
            print("README.md CLI reference is stale: run scripts/gen_cli_reference.py",
                  file=sys.stderr)
            return 1
        return 0
    README.write_text(replace_block(text, block), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
