"""The Python API: every CLI command has its function here, and the CLI calls it.

>>> import entropylens as el
>>> store = el.ingest("sample_logs/vanilla", "store", run="vanilla")  # doctest: +SKIP
>>> el.summary("store").steps                                         # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .analysis.summary import Summary, summary
from .errors import EntropylensError
from .ingest import formats, ingest
from .store import Store

__all__ = ["open", "ingest", "formats", "summary", "demo", "DemoResult"]


def open(path: str | Path) -> Store:  # noqa: A001 - reads naturally as el.open(...)
    """Open an existing store."""
    return Store.open(path)


@dataclass
class DemoResult:
    """What :func:`demo` produced."""

    store: Store
    summary: Summary
    report_path: Path | None


def demo(*, samples: str | Path = "sample_logs", store: str | Path = "demo_store",
         out: str | Path = "demo_report") -> DemoResult:
    """Ingest every run folder under ``samples`` into ``store`` and summarise it.

    Each subfolder of ``samples`` becomes a run of the same name (replacing an earlier demo).
    """
    samples = Path(samples)
    if not samples.is_dir():
        raise EntropylensError("sample folder not found (run the demo from the repository "
                               "root or pass --samples)", path=samples)
    folders = sorted(p for p in samples.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise EntropylensError("no run folders in the sample folder", path=samples)
    for folder in folders:
        ingest(folder, store, run=folder.name, replace=True)
    opened = Store.open(store)
    return DemoResult(store=opened, summary=summary(opened), report_path=None)
