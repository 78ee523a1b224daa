"""Ingestors: one module per source family, a registry that sniffs formats, and the driver.

The package is also callable: ``entropylens.ingest(...)`` is :func:`ingest`.

>>> import entropylens as el
>>> el.ingest("runs/vanilla", "store", run="vanilla")   # doctest: +SKIP
>>> el.ingest.from_vllm(outputs, "store", run="r", temperature=1.0)   # doctest: +SKIP
"""

import inspect

from ..base.modules import make_callable

from .driver import IngestContext, IngestOptions, resolve_sources
from .driver import ingest as _ingest_new
from .registry import Chunk, Format, Sample, detect, formats, get_format, register
# vLLM RequestOutput objects straight from Python (duck-typed; vLLM need not be installed)
from .vllm import dump_request_outputs, from_vllm  # noqa: E402

__all__ = ["Chunk", "Format", "IngestContext", "IngestOptions", "Sample", "detect", "formats",
           "get_format", "ingest", "register", "resolve_sources"]
__all__ += ["dump_request_outputs", "from_vllm"]



def ingest(sources, out, *, append: bool = False, **options) -> list[str]:
    """Read log files into a store (:func:`entropylens.ingest.driver.ingest`); with
    ``append=True``, add only what is new since the last ingest of the same sources
    (:func:`entropylens.ingest.append.ingest_appending`)."""
    if append:
        from .append import ingest_appending

        return ingest_appending(sources, out, **options)
    return _ingest_new(sources, out, **options)


ingest.__doc__ = _ingest_new.__doc__
ingest.__signature__ = inspect.signature(_ingest_new)

make_callable(__name__, "ingest")
