"""Worker processes for the local engine: scan units side by side on one machine.

Each worker is a fresh Python process running :func:`serve` (not a fork of the caller,
whose Arrow threads a fork would copy in an unknown state, and not a ``multiprocessing``
spawn, which would re-run the caller's script). Parent and worker exchange length-prefixed
pickles over the worker's stdin and stdout; the worker's own prints go to stderr. Workers
start on first use and live until the outermost :func:`session` ends (one analysis, or every
analysis of a report), so their start-up is paid once per analysis and idle workers hold no
memory.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import struct
import subprocess
import sys
from typing import Any, BinaryIO, Callable, Iterable, Iterator

from .errors import EntropylensError

_HEADER = struct.Struct("<Q")
#: A worker's program (``-c`` rather than ``-m``: the package imports this module first).
_ENTRY = "from entropylens.workers import serve; serve()"
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                     "ARROW_NUM_THREADS")


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
    def __init__(self):
        env = dict(os.environ)
        # the caller's import path, so aggregators defined in its own modules unpickle
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        # the workers share the machine: one thread each for Arrow and the maths libraries
        env.update({name: "1" for name in _THREAD_VARIABLES})
        self.process = subprocess.Popen([sys.executable, "-c", _ENTRY],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        env=env)

    def submit(self, function: Callable, args: tuple) -> None:
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
        if not ok:
            raise value
        return value

    def close(self) -> None:
        try:
            self.process.stdin.close()
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()


class WorkerPool:
    """``size`` worker processes that call functions in submission order."""

    def __init__(self, size: int):
        self.size = size
        self.workers = [_Worker() for _ in range(size)]

    def map(self, function: Callable, arguments: Iterable[tuple]) -> Iterator[Any]:
        """``function(*args)`` for each item, run by the workers, yielded in order.

        Item ``k`` goes to worker ``k % size`` and each worker holds one item at a time, so
        at most ``size`` results wait to be taken. A worker that raised passes the error on;
        a worker that died is replaced before the next call.
        """
        items = iter(arguments)
        pending: list[int] = []   # worker of each item in flight, in item order
        try:
            for k, args in zip(range(self.size), items):
                self.workers[k].submit(function, args)
                pending.append(k)
            while pending:
                k = pending.pop(0)
                value = self.workers[k].result()
                following = next(items, None)
                if following is not None:
                    self.workers[k].submit(function, following)
                    pending.append(k)
                yield value
        except BaseException:
            # results still in flight would be read as the answers of the next call
            self.restart()
            raise

    def restart(self) -> None:
        self.close()
        self.workers = [_Worker() for _ in range(self.size)]

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


_POOLS: dict[int, WorkerPool] = {}
_DEPTH = [0]


def pool(size: int) -> WorkerPool:
    """The pool of ``size`` workers of the current :func:`session` (one pool at a time)."""
    found = _POOLS.get(size)
    if found is None:
        close_pools()
        found = _POOLS[size] = WorkerPool(size)
    return found


@contextlib.contextmanager
def session():
    """Keep workers alive across the scans of one analysis; close them when the outermost
    session ends, so that idle workers hold no memory (in a notebook, say)."""
    _DEPTH[0] += 1
    try:
        yield
    finally:
        _DEPTH[0] -= 1
        if _DEPTH[0] == 0:
            close_pools()


@atexit.register
def close_pools() -> None:
    for found in _POOLS.values():
        found.close()
    _POOLS.clear()


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
            _send(replies, (False, EntropylensError(
                f"a worker could not rebuild its task ({type(exc).__name__}: {exc}): what "
                "the engine hands to workers must pickle and unpickle")))
            continue
        try:
            reply = (True, function(*args))
        except Exception as exc:  # noqa: BLE001 - the caller decides what an error means
            reply = (False, exc if _picklable(exc) else EntropylensError(
                f"{type(exc).__name__}: {exc}"))
        _send(replies, reply)


def _picklable(value: Any) -> bool:
    try:
        pickle.loads(pickle.dumps(value))
    except Exception:  # noqa: BLE001
        return False
    return True
