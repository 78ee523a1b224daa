"""Ingestors: one module per source family, a registry that sniffs formats, and the driver.

The package is also callable: ``entropylens.ingest(...)`` is :func:`ingest`.

>>> import entropylens as el
>>> el.ingest("runs/vanilla", "store", run="vanilla")   # doctest: +SKIP
>>> el.ingest.from_vllm(outputs, "store", run="r", temperature=1.0)   # doctest: +SKIP

Importing the package is cheap: the registry and the catalogue of formats load at once, the
driver and the readers (numpy, pyarrow, pandas) when first used.
"""

from ..base.modules import make_callable
from .registry import Chunk, Format, Sample, detect, formats, get_format, register

#: Names loaded on first use, and the module of each.
_LAZY = {"IngestContext": "driver", "IngestOptions": "driver",
         "resolve_sources": "driver",
         # vLLM RequestOutput objects straight from Python (duck-typed; no vLLM needed)
         "dump_request_outputs": "vllm", "from_vllm": "vllm"}

__all__ = ["Chunk", "Format", "IngestContext", "IngestOptions", "Sample", "detect", "formats",
           "get_format", "ingest", "register", "resolve_sources", "dump_request_outputs",
           "from_vllm"]


def _ingest(sources, out, *, append: bool = False, **options) -> list[str]:
    # becomes ``ingest`` on first use, with the driver's signature and docstring
    if append:
        from .append import ingest_appending  # appending builds on the driver

        return ingest_appending(sources, out, **options)
    from .driver import ingest as read_into_store

    return read_into_store(sources, out, **options)


def __getattr__(name: str):
    if name == "ingest":
        import functools

        from .driver import ingest as read_into_store

        # __wrapped__ makes inspect.signature() show the driver's parameters
        globals()["ingest"] = functools.update_wrapper(_ingest, read_into_store)
        return _ingest
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


make_callable(__name__, "ingest")
