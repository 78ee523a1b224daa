"""A TRL callback that feeds a store while a trainer runs and diagnoses it every N steps.

Install with ``pip install 'entropylens[trl]'``. Add it to a ``GRPOTrainer`` (any
``transformers.Trainer`` works for the metrics)::

    from entropylens.integrations.trl import EntropyLensCallback

    trainer = GRPOTrainer(..., args=GRPOConfig(..., log_completions=True))
    EntropyLensCallback("runs.store", run="grpo-1", every=10).attach(trainer)
    trainer.train()

At each logging step the callback appends the trainer's logged metrics (``entropy``,
``reward``, ``completions/mean_length``... mapped by the alias table) as one line of
``<log_dir>/metrics.jsonl`` (default ``<output_dir>/entropylens``), and every ``every``
steps it appends that log and the completions TRL writes with ``log_completions=True``
(``<output_dir>/completions/completions_<step>.parquet``, written just after the callbacks
of the step that logged them, so they reach the store at the next diagnosis) to the store
(:mod:`entropylens.ingest.append`) and runs the live diagnosis
(:func:`entropylens.live.live_diagnosis`). It logs one line per diagnosis on the
``entropylens`` logger and puts ``entropylens/status_code`` (the status's index in
:data:`~entropylens.analysis.diagnose.STATUSES`) and ``entropylens/collapse_alarm`` (1 when
collapsing, collapsed or exploded) into the trainer's logs, which reach W&B and TensorBoard
when the callback runs before their reporters (:meth:`EntropyLensCallback.attach` puts it
first). ``stop_on`` stops training on chosen statuses.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable, Iterable

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - without the extra
    raise ImportError("entropylens.integrations.trl needs transformers (and trl): "
                      "pip install 'entropylens[trl]'") from exc

from ..analysis.diagnose import STATUSES
from ..live import Refresh, Watcher, status_line

LOGGER = logging.getLogger("entropylens")
#: Statuses that raise ``entropylens/collapse_alarm``.
ALARM_STATUSES = ("collapsing", "collapsed_plateau", "entropy_explosion")


class EntropyLensCallback(TrainerCallback):
    """Write a training run into an entropylens store as it trains, and diagnose it.

    Parameters
    ----------
    store : str or Path
        The store (created when missing).
    run : str, optional
        Run name (default: the name of the trainer's ``output_dir``).
    every : int
        Diagnose every this many logging steps (and at the end of training).
    log_dir : str or Path, optional
        Where the metrics log is written (default: ``<output_dir>/entropylens``).
    stop_on : iterable of str
        Statuses that stop training (``control.should_training_stop``).
    on_status : callable, optional
        Called with each :class:`~entropylens.live.Refresh` whose status changed.
    val_size : int, optional
        Validation prompts behind each accuracy point (see ``diagnose``).
    """

    def __init__(self, store: str | Path, run: str | None = None, *, every: int = 10,
                 log_dir: str | Path | None = None, stop_on: Iterable[str] = (),
                 on_status: Callable[[Refresh], None] | None = None,
                 val_size: int | None = None):
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        unknown = set(stop_on) - set(STATUSES)
        if unknown:
            raise ValueError(f"unknown statuses in stop_on: {', '.join(sorted(unknown))} "
                             f"(statuses: {', '.join(STATUSES)})")
        self.store = Path(store)
        self.run = run
        self.every = every
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.stop_on = set(stop_on)
        self.on_status = on_status
        self.val_size = val_size
        self.last: Refresh | None = None
        self._watcher: Watcher | None = None
        self._logged = 0

    def attach(self, trainer) -> "EntropyLensCallback":
        """Add this callback to ``trainer`` ahead of the reporting callbacks, so the status
        it puts into the logs reaches W&B and TensorBoard in the same step."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    # -- TrainerCallback hooks ---------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        output = Path(args.output_dir)
        log_dir = self.log_dir or output / "entropylens"
        log_dir.mkdir(parents=True, exist_ok=True)
        self._metrics_log = log_dir / "metrics.jsonl"
        run = self.run or output.resolve().name
        # TRL's completion tables: one parquet file a logging step
        self._watcher = Watcher([self._metrics_log, output / "completions"], self.store, run,
                                val_size=self.val_size, hold_last_step=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._watcher is None or not logs:
            return
        record = {"step": int(state.global_step)}
        for key, value in logs.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value) and not key.startswith("entropylens/"):
                record[key] = value
        if len(record) > 1:
            with open(self._metrics_log, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
            self._logged += 1
        if self._logged and self._logged % self.every == 0:
            self._diagnose(control, logs)

    def on_train_end(self, args, state, control, **kwargs):
        if self._watcher is not None:
            self._diagnose(control, None)

    # -- the diagnosis -------------------------------------------------------------------
    def _diagnose(self, control, logs: dict | None) -> None:
        result = self._watcher.refresh()
        self.last = result
        if result.status is None:
            return
        LOGGER.info("entropylens: %s", status_line(result, self._watcher.run))
        if logs is not None:
            logs["entropylens/status_code"] = STATUSES.index(result.status)
            logs["entropylens/collapse_alarm"] = int(result.status in ALARM_STATUSES)
            if result.prediction is not None and result.prediction.predictable:
                logs["entropylens/predicted_ceiling"] = result.prediction.ceiling
        if result.changed and self.on_status is not None:
            self.on_status(result)
        if result.status in self.stop_on:
            LOGGER.warning("entropylens: stopping training: status %s", result.status)
            control.should_training_stop = True
