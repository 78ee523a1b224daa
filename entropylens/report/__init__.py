"""The diagnostic report: ``index.html`` (one self-contained page), ``report.md``,
``report.json`` (every number of the page) and ``figures/*.png``.

>>> from entropylens.report import build_report
>>> build_report("store", "report").path  # doctest: +SKIP
PosixPath('report/index.html')

The package is also callable: ``entropylens.report(store, out)`` is
:func:`build_report`. Importing it is cheap: matplotlib, seaborn and jinja2 load on first use.
"""

from ..base.modules import make_callable

__all__ = ["Report", "build_report"]


def __getattr__(name):
    if name in __all__:
        from . import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


make_callable(__name__, "build_report")
