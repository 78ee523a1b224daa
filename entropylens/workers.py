"""Worker processes for the local engine: scan units side by side on one machine.

Each worker is a fresh Python process running :func:`serve` (not a fork of the caller,
whose Arrow threads a fork would copy in an unknown state, and not a ``multiprocessing``
spawn, which would re-run the caller's script). Parent and worker exchange length-prefixed
pickles over the worker's stdin and stdout; the worker's own prints go to stderr. Workers
start on first use and live until the outermost :func:`session` ends (one analysis, or every
analysis of a report), so their start-up is paid once per analysis and idle workers hold no
memory. Each thread has its own pool. Workers use one thread each for Arrow and the maths
libraries, and the C allocator for Arrow buffers (``ARROW_DEFAULT_MEMORY_POOL``, unless the
caller set it).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import struct
import subprocess
import sys
import threading
import traceback
from typing import Any, BinaryIO, Callable, Iterable, Iterator

from .errors import EntropylensError

_HEADER = struct.Struct("<Q")
#: A worker's program (``-c`` rather than ``-m``: the package imports this module first).
_ENTRY = "from entropylens.workers import serve; serve()"
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                     "ARROW_NUM_THREADS")


def _add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)`` (Python 3.11+); on 3.10, the same ``__notes__`` list that
    tracebacks of 3.11 print and that callers may read."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:  # pragma: no cover - Python 3.10
        error.__notes__ = [*getattr(error, "__notes__", []), note]


def _send(stream: BinaryIO, payload: Any) -> None:
    data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def _receive_bytes(stream: BinaryIO) -> bytes:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("the other side closed the pipe")
    size = _HEADER.unpack(header)[0]
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the other side closed the pipe mid-message")
    return data


def _receive(stream: BinaryIO) -> Any:
    return pickle.loads(_receive_bytes(stream))


class _Worker:
    """One worker process; ``busy`` while an item it was given has not been answered."""

    def __init__(self):
        env = dict(os.environ)
        # the caller's import path, so aggregators defined in its own modules unpickle
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        # the workers share the machine: one thread each for Arrow and the maths libraries
        env.update({name: "1" for name in _THREAD_VARIABLES})
        # Arrow buffers from the C allocator: the default mimalloc pool hands each unit's
        # freed buffers back to the system, and faulting them in again cost the workers
        # about a sixth of their time (measured: 4-5 s of system time in 25 s at 50M tokens)
        env.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
        self.process = subprocess.Popen([sys.executable, "-c", _ENTRY],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        env=env)
        self.busy = False

    def submit(self, function: Callable, args: tuple) -> None:
        self.busy = True
        try:
            _send(self.process.stdin, (function, args))
        except OSError as exc:   # a broken pipe: the worker is gone
            raise self._stopped(exc) from exc

    def _stopped(self, exc: Exception) -> EntropylensError:
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        return EntropylensError(f"a worker process stopped (exit code {code}): {exc}")

    def result(self) -> Any:
        try:
            ok, value = _receive(self.process.stdout)
        except (EOFError, OSError, pickle.UnpicklingError) as exc:
            raise self._stopped(exc) from exc
        self.busy = False
        if not ok:
            error, trace = value
            _add_note(error, f"raised in an entropylens worker process:\n{trace}")
            raise error
        return value

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        """End the worker: at once when it is busy (its answer is of no use now), else by
        closing its input."""
        try:
            if self.busy or not self.alive:
                self.process.kill()
            else:
                self.process.stdin.close()
                self.process.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:   # pragma: no cover - kill is not refused
            pass
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass


class WorkerPool:
    """``size`` worker processes that call functions in submission order.

    Workers start on first use; one left busy by an abandoned call, or dead, is replaced
    when the next call starts, so an answer meant for an earlier call is never read as
    the answer of a later one.
    """

    def __init__(self, size: int):
        self.size = size
        self.workers: list[_Worker | None] = [None] * size

    def _ready(self, k: int) -> _Worker:
        worker = self.workers[k]
        if worker is None or worker.busy or not worker.alive:
            if worker is not None:
                worker.close()
            worker = self.workers[k] = _Worker()
        return worker

    def map(self, function: Callable, arguments: Iterable[tuple]) -> Iterator[Any]:
        """``function(*args)`` for each item, run by the workers, yielded in order.

        Item ``k`` goes to worker ``k % size`` and each worker holds one item at a time, so
        at most ``size`` results wait to be taken. A worker that raised passes the error on
        (with its traceback as a note); a worker that died is reported and replaced.
        """
        items = iter(arguments)
        pending: list[int] = []   # worker of each item in flight, in item order
        try:
            for k, args in zip(range(self.size), items):
                self._ready(k).submit(function, args)
                pending.append(k)
            while pending:
                k = pending.pop(0)
                value = self.workers[k].result()
                following = next(items, None)
                if following is not None:
                    self.workers[k].submit(function, following)
                    pending.append(k)
                yield value
        finally:
            # abandoned (an error here or in the caller, or the caller stopped early):
            # answers still in flight must not reach the next call
            for k in pending:
                self.workers[k].close()
                self.workers[k] = None

    def close(self) -> None:
        for k, worker in enumerate(self.workers):
            if worker is not None:
                worker.close()
            self.workers[k] = None


class _Pools(threading.local):
    """Each thread's pool and session depth: threads never share workers."""

    def __init__(self):
        self.pool: WorkerPool | None = None
        self.depth = 0


_LOCAL = _Pools()
_ALL: list[WorkerPool] = []        # every pool alive, for the exit handler
_ALL_LOCK = threading.Lock()


def pool(size: int) -> WorkerPool:
    """This thread's pool of ``size`` workers (one pool per thread)."""
    found = _LOCAL.pool
    if found is None or found.size != size:
        _close_local()
        found = _LOCAL.pool = WorkerPool(size)
        with _ALL_LOCK:
            _ALL.append(found)
    return found


def _close_local() -> None:
    found, _LOCAL.pool = _LOCAL.pool, None
    if found is not None:
        found.close()
        with _ALL_LOCK:
            if found in _ALL:
                _ALL.remove(found)


@contextlib.contextmanager
def session():
    """Keep this thread's workers alive across the scans of one analysis; close them when
    the outermost session ends, so that idle workers hold no memory (in a notebook, say)."""
    _LOCAL.depth += 1
    try:
        yield
    finally:
        _LOCAL.depth -= 1
        if _LOCAL.depth == 0:
            _close_local()


@atexit.register
def close_pools() -> None:
    """End every worker of every thread (at exit)."""
    with _ALL_LOCK:
        pools = list(_ALL)
        _ALL.clear()
    for found in pools:
        found.close()


def serve() -> None:
    """Worker loop: read (function, args), write (True, result) or (False, error)."""
    import pyarrow

    pyarrow.set_cpu_count(1)
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())   # stray prints must not corrupt replies
    requests = sys.stdin.buffer
    while True:
        try:
            data = _receive_bytes(requests)
        except EOFError:
            return
        try:
            function, args = pickle.loads(data)
        except Exception as exc:  # noqa: BLE001
            _send(replies, (False, (EntropylensError(
                f"a worker could not rebuild its task ({type(exc).__name__}: {exc}): what "
                "the engine hands to workers must pickle and unpickle"),
                "".join(traceback.format_exception(exc)))))
            continue
        try:
            reply = (True, function(*args))
        except Exception as exc:  # noqa: BLE001 - the caller decides what an error means
            trace = "".join(traceback.format_exception(exc))
            reply = (False, (exc if _picklable(exc) else EntropylensError(
                f"{type(exc).__name__}: {exc}"), trace))
        _send(replies, reply)


def _picklable(value: Any) -> bool:
    try:
        pickle.loads(pickle.dumps(value))
    except Exception:  # noqa: BLE001
        return False
    return True
