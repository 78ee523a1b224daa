"""Render the report model with jinja2: HTML (autoescaped) and Markdown (escaped by default).

Every string that reaches either output is escaped unless it was produced by a formatting
filter of this module: log text (tokens, completions, prompts, run names) can never become
markup.
"""

from __future__ import annotations

import html
import math
import numbers
import re
from functools import lru_cache

import jinja2
from matplotlib import colormaps
from matplotlib.colors import Normalize, to_hex

from ..base.pieces import token_label

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#|!~])")


class MdSafe(str):
    """A string already fit for Markdown (made by this module's filters)."""


def md_escape(value) -> MdSafe:
    """Text that Markdown and the HTML inside Markdown show literally.

    ``& < >`` become entities, Markdown punctuation gets a backslash, line breaks become
    `` ↵ `` so a value never starts a new block.
    """
    text = html.escape(str(value), quote=False)
    text = _MARKDOWN_SPECIAL.sub(r"\\\1", text)
    return MdSafe(text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", " ↵ "))


def _finalize_markdown(value):
    if value is None:
        return MdSafe("–")
    if isinstance(value, MdSafe):
        return value
    if isinstance(value, str):
        return md_escape(value)
    return value


def fmt(value, digits: int = 3) -> str:
    """A number for display: ``digits`` significant digits, ``–`` when missing."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(number):
        return "–"
    return f"{number:.{digits}g}"


def pct(value, digits: int = 0) -> str:
    """A fraction as a percentage (``0.961`` -> ``96%``)."""
    if value is None:
        return "–"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "–" if not math.isfinite(number) else f"{number:.{digits}%}"


def interval(value, digits: int = 3) -> str:
    """A two-number interval as ``[lo, hi]``."""
    if not value or len(value) != 2:
        return "–"
    return f"[{fmt(value[0], digits)}, {fmt(value[1], digits)}]"


#: Columns of the comparison table shown on the page (report.json keeps them all).
COMPARE_COLUMNS = ("run", "steps", "entropy_source", "first_entropy", "last_entropy", "floor",
                   "drop", "early_drop_fraction", "arrival_step", "collapse_start",
                   "collapse_end", "alarm", "performance_metric", "first_performance",
                   "final_performance", "ceiling", "r2")

#: Colour map of the token view: pale for confident tokens, dark red for uncertain ones.
TOKEN_CMAP = "YlOrRd"


def entropy_colors(value, vmax: float) -> tuple[str, str]:
    """Background and text colour of a token of entropy ``value`` on a 0..vmax scale."""
    if value is None:
        return "#eeeeee", "#000000"
    rgba = colormaps[TOKEN_CMAP](Normalize(0.0, vmax, clip=True)(value))
    luminance = 0.2126 * rgba[0] + 0.7152 * rgba[1] + 0.0722 * rgba[2]
    return to_hex(rgba), "#ffffff" if luminance < 0.5 else "#000000"


def scale_gradient(steps: int = 8) -> str:
    """CSS linear-gradient of the token colour scale."""
    stops = ", ".join(to_hex(colormaps[TOKEN_CMAP](i / (steps - 1))) for i in range(steps))
    return f"linear-gradient(to right, {stops})"


def md_figure(figure: dict | None) -> MdSafe:
    """A Markdown image with its caption below (empty when there is no figure)."""
    if not figure:
        return MdSafe("")
    title, caption = md_escape(figure["title"]), md_escape(figure["caption"])
    return MdSafe(f"![{title}]({figure['file']})\n\n*{title}. {caption}*\n")


def _filters(markdown: bool) -> dict:
    def wrap(function):
        if not markdown:
            return function

        def safe(value, *args, **kwargs):
            # a formatted number is safe; text that was not a number is escaped like any text
            text = function(value, *args, **kwargs)
            return md_escape(text) if isinstance(value, str) else MdSafe(text)
        return safe

    return {"num": wrap(fmt), "pct": wrap(pct), "interval": wrap(interval),
            "token_label": token_label}


@lru_cache(maxsize=2)
def environment(markdown: bool) -> jinja2.Environment:
    """The jinja2 environment of the HTML (autoescape) or Markdown (finalize) templates."""
    loader = jinja2.PackageLoader("entropylens.report", "templates")
    if markdown:
        env = jinja2.Environment(loader=loader, autoescape=False, finalize=_finalize_markdown,
                                 undefined=jinja2.StrictUndefined, trim_blocks=True,
                                 lstrip_blocks=True, keep_trailing_newline=True)
        env.globals["md_figure"] = md_figure
        # the name section blocks use in both outputs (a macro of index.html.j2 in HTML)
        env.globals["figure"] = md_figure
    else:
        env = jinja2.Environment(loader=loader, autoescape=True,
                                 undefined=jinja2.StrictUndefined, trim_blocks=True,
                                 lstrip_blocks=True)
    env.filters.update(_filters(markdown))
    env.globals["entropy_colors"] = entropy_colors
    return env


def render_html(model: dict, data_uris: dict[str, str]) -> str:
    """``index.html`` from the report model and the figures' ``data:`` URIs."""
    return environment(False).get_template("index.html.j2").render(
        m=model, figures=data_uris, gradient=scale_gradient(), compare_columns=COMPARE_COLUMNS)


def render_markdown(model: dict) -> str:
    """``report.md`` from the report model."""
    return environment(True).get_template("report.md.j2").render(
        m=model, compare_columns=COMPARE_COLUMNS)
