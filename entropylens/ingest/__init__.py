"""Ingestors: one module per source family, a registry that sniffs formats, and the driver.

The package is also callable: ``entropylens.ingest(...)`` is :func:`ingest`.

>>> import entropylens as el
>>> el.ingest("runs/vanilla", "store", run="vanilla")   # doctest: +SKIP
>>> el.ingest.from_vllm(outputs, "store", run="r", temperature=1.0)   # doctest: +SKIP
"""

from ..base.modules import make_callable

from .driver import IngestContext, IngestOptions, ingest, resolve_sources
from .registry import Chunk, Format, Sample, detect, formats, get_format, register
# a Python API, not a file format (torch is imported only when it runs)
from .hf_generate import from_hf_generate  # noqa: E402
# vLLM RequestOutput objects straight from Python (duck-typed; vLLM need not be installed)
from .vllm import dump_request_outputs, from_vllm  # noqa: E402

__all__ = ["Chunk", "Format", "IngestContext", "IngestOptions", "Sample", "detect", "formats",
           "get_format", "ingest", "register", "resolve_sources", "from_hf_generate"]
__all__ += ["dump_request_outputs", "from_vllm"]

make_callable(__name__, "ingest")
