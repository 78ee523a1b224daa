"""entropylens: token-level entropy diagnostics for RL training of language models.

>>> import entropylens as el
>>> el.ingest("sample_logs/vanilla", "store", run="vanilla")  # doctest: +SKIP
>>> el.summary("store").steps                                # doctest: +SKIP
"""

__version__ = "0.1.0"

from .api import DemoResult, demo, formats, ingest, open, summary  # noqa: E402
from .errors import EntropylensError  # noqa: E402
from .store import Store  # noqa: E402

__all__ = ["DemoResult", "EntropylensError", "Store", "demo", "formats", "ingest", "open",
           "summary", "__version__"]
