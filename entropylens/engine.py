"""Streaming execution of analyses over a run's tokens.

An analysis over tokens is an :class:`Aggregator`: ``start`` makes an empty partial state,
``update`` folds in one Arrow batch, ``merge`` combines two partial states, and ``finish``
turns a state into the result. The local engine streams ``pyarrow.dataset`` batches with
column projection and step filters through every aggregator in one scan, so memory is bounded
by the aggregators' states, not by the data.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterable, Mapping

import pyarrow as pa

from .errors import EntropylensError
from .store import Store

ENGINES = ("local",)


class Aggregator(ABC):
    """A mergeable computation over token batches.

    Attributes
    ----------
    columns : tuple of str
        Token columns the aggregator reads (the scan projects onto their union).
    """

    columns: tuple[str, ...] = ()

    @abstractmethod
    def start(self) -> Any:
        """An empty partial state."""

    @abstractmethod
    def update(self, state: Any, batch: pa.RecordBatch) -> Any:
        """Fold one batch into ``state`` and return the new state."""

    @abstractmethod
    def merge(self, left: Any, right: Any) -> Any:
        """Combine two partial states (from disjoint sets of batches)."""

    @abstractmethod
    def finish(self, state: Any) -> Any:
        """Turn a final state into the result."""


def run_aggregators(store: Store, run: str, aggregators: Mapping[str, Aggregator], *,
                    steps: Iterable[int] | None = None, engine: str = "local",
                    batch_size: int = 256 * 1024, **engine_options) -> dict[str, Any]:
    """Run several aggregators over one run's tokens in a single scan.

    Parameters
    ----------
    store : Store
    run : str
    aggregators : mapping of str to Aggregator
    steps : iterable of int, optional
        Only these steps.
    engine : {"local"}
        Where to run.
    batch_size : int
        Rows per batch of the scan.

    Returns
    -------
    dict
        The finished result of each aggregator, by the same keys.
    """
    if engine not in ENGINES:
        raise EntropylensError(f"unknown engine {engine!r} (one of {', '.join(ENGINES)})")
    columns = sorted({c for agg in aggregators.values() for c in agg.columns})
    states = {name: agg.start() for name, agg in aggregators.items()}
    for batch in store.scan_tokens(run, columns=columns, steps=steps, batch_size=batch_size):
        if not batch.num_rows:
            continue
        for name, agg in aggregators.items():
            states[name] = agg.update(states[name], batch)
    return {name: agg.finish(states[name]) for name, agg in aggregators.items()}
