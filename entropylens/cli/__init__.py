"""The ``entropylens`` command line: a thin layer over the Python API.

:mod:`.commands` holds the commands, :mod:`.options` what they share (the option set of
analysis commands, errors, JSON) and :mod:`.render` how results read in a terminal. With
``--json`` stdout holds one JSON object and nothing else.
"""

from .commands import FAIL_ON_EXIT, app, main

__all__ = ["FAIL_ON_EXIT", "app", "main"]
