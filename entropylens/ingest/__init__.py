"""Ingestors: one module per source family, a registry that sniffs formats, and the driver.

>>> import entropylens as el
>>> el.ingest("runs/vanilla", "store", run="vanilla")   # doctest: +SKIP
"""

from .driver import IngestContext, IngestOptions, ingest, resolve_sources
from .registry import Chunk, Format, Sample, detect, formats, get_format, register

__all__ = ["Chunk", "Format", "IngestContext", "IngestOptions", "Sample", "detect", "formats",
           "get_format", "ingest", "register", "resolve_sources"]
