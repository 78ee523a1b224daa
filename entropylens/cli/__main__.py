"""``python -m entropylens.cli``: the command line."""

from .commands import app

app(prog_name="entropylens")
