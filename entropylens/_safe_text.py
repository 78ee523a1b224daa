"""Text from data made safe for a terminal.

Token text, metric names and file contents may hold control characters (an ANSI escape can
clear the screen, set the window title or forge a hyperlink) and, when printed through rich,
markup such as ``[link=...]``. Everything that came from data goes through :func:`plain`
before a plain print, and through :func:`markup` before a rich print with markup on.
"""

from __future__ import annotations

import re

# C0 controls except tab, DEL, C1 controls, and the Unicode line/paragraph separators and
# bidirectional overrides that reorder what a reader sees
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _visible(found: re.Match) -> str:
    code = ord(found.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def plain(text: object) -> str:
    """``text`` with every control character shown as an escape (``\\x1b``), one line."""
    return _UNSAFE.sub(_visible, str(text))


def markup(text: object) -> str:
    """:func:`plain`, with rich markup escaped too, for ``console.print(..., markup=True)``
    and rich table cells."""
    from rich.markup import escape

    return escape(plain(text))
