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
import queue
import select
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
    """One worker process; ``busy`` while items it was given have not been answered
    (``in_flight`` of them: a worker reads its next request as soon as it has answered).

    Requests go through a writer thread, so handing one over never waits on a worker busy
    with the one before (a request larger than the pipe's buffer would).
    """

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
        self.in_flight = 0
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_requests, daemon=True,
                                        name="entropylens-worker-input")
        self._writer.start()

    def _write_requests(self) -> None:
        stream = self.process.stdin
        while True:
            request = self._outbox.get()
            if request is None:
                return
            try:
                stream.write(_HEADER.pack(len(request)))
                stream.write(request)
                stream.flush()
            except (OSError, ValueError):
                # the worker is gone (or its input closed): result() reports it
                return

    @property
    def busy(self) -> bool:
        return self.in_flight > 0

    def submit(self, function: Callable, args: tuple) -> None:
        self.send(pickle.dumps((function, args), protocol=pickle.HIGHEST_PROTOCOL))

    def send(self, request: bytes) -> None:
        """Hand over a pickled ``(function, args)`` (written by the writer thread)."""
        self.in_flight += 1
        self._outbox.put(request)

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
        self.in_flight -= 1
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
        self._outbox.put(None)
        try:
            if self.busy or not self.alive:
                self.process.kill()
            else:
                self._writer.join(timeout=5)   # every request written, then the input ends
                self.process.stdin.close()
                self.process.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:   # pragma: no cover - kill is not refused
            pass
        self._writer.join(timeout=5)   # a write cut short by the kill ends with an error
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass


#: Answers the calling process may hold, waiting for a slower worker's earlier item, before
#: it stops taking items itself (each is a unit's sealed state: memory stays bounded).
_CALLER_LEAD = 8


def _first(iterator: Iterator) -> list:
    """The iterator's next item in a list, or an empty list at its end."""
    for item in iterator:
        return [item]
    return []


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

    def map(self, function: Callable, arguments: Iterable[tuple], *,
            caller: bool = False) -> Iterator[Any]:
        """``function(*args)`` for each item, run by the workers, yielded in order.

        Each worker holds two items: one it works on, the next waiting, so that a worker
        that answers starts on its next item at once. With ``caller`` this process runs
        items too, whenever no answer is waiting (and it holds fewer than
        :data:`_CALLER_LEAD` answers): a pool of ``n`` workers keeps ``n + 1`` processes
        busy, and a small job is done before the workers have started. Answers wait, in
        memory, to be yielded in order. A worker that raised passes the error on (with its
        traceback as a note); a worker that died is reported and replaced.
        """
        caller = caller or not self.size
        items = enumerate(arguments)
        upcoming: list = []                     # the next item, drawn but not handed out
        held: dict[int, Any] = {}               # answers not yet yielded, by item
        flight: list[list[int]] = [[] for _ in range(self.size)]   # items of each worker
        following = 0

        try:
            while True:
                while following in held:
                    yield held.pop(following)
                    following += 1
                self._hand_out(function, items, upcoming, flight)
                for k in self._answered(flight):
                    held[flight[k].pop(0)] = self.workers[k].result()
                if following in held:
                    continue
                if caller and len(held) < _CALLER_LEAD:
                    if not upcoming:
                        upcoming.extend(_first(items))
                    if upcoming:
                        index, args = upcoming.pop()
                        held[index] = function(*args)
                        continue
                waiting = [k for k in range(self.size) if flight[k]]
                if not waiting:
                    return
                k = min(waiting, key=lambda w: flight[w][0])   # the earliest item
                held[flight[k].pop(0)] = self.workers[k].result()
        finally:
            # abandoned (an error here or in the caller, or the caller stopped early):
            # answers still in flight must not reach the next call
            for k in range(self.size):
                if flight[k]:
                    self.workers[k].close()
                    self.workers[k] = None

    def _hand_out(self, function: Callable, items: Iterator, upcoming: list,
                  flight: list[list[int]]) -> None:
        """Give items to the workers with room for one."""
        for k in range(self.size):
            while len(flight[k]) < 2:
                if not upcoming:
                    upcoming.extend(_first(items))
                    if not upcoming:
                        return
                index, args = upcoming.pop()
                worker = self.workers[k] if flight[k] else self._ready(k)
                worker.submit(function, args)
                flight[k].append(index)

    def _answered(self, flight: list[list[int]]) -> list[int]:
        """Workers whose answer has started to arrive (without waiting; none where pipes
        cannot be polled)."""
        busy = {self.workers[k].process.stdout.fileno(): k for k in range(self.size)
                if flight[k]}
        if not busy or os.name == "nt":
            return []
        ready, _, _ = select.select(list(busy), [], [], 0)
        return sorted(busy[fd] for fd in ready)

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
