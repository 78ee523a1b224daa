"""What the commands share: the option set of analysis commands, choices, errors, JSON.

An analysis command declares only its own options and takes :class:`AnalysisOptions` first;
:func:`analysis_command` adds the store argument and the options every analysis takes
(``--run``, ``--engine``, ``--ray-address``, ``--workers``, ``--keep-after-eos``, ``--json``)
to what ``--help`` shows, and hands them over as one object that calls the API and prints.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, List, Optional

import typer

from .._safe_text import plain
from ..base.jsonable import finite, json_default
from ..errors import EntropylensError


class Engine(str, Enum):
    local = "local"
    ray = "ray"


class OnError(str, Enum):
    stop = "stop"
    skip = "skip"


class OnDuplicate(str, Enum):
    error = "error"
    keep_first = "keep-first"
    keep_last = "keep-last"


class StepBasis(str, Enum):
    policy_version = "policy_version"
    logged_step = "logged_step"
    unknown = "unknown"


def fail(exc: Exception) -> None:
    """Print ``error: ...`` on stderr and exit 1."""
    message = plain(str(exc).replace("\n", " "))  # data in messages: no terminal escapes
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)


@contextmanager
def user_errors():
    """Turn bad-data errors, and disk-full or permission errors, into a one-line message
    naming the path and exit code 1."""
    try:
        yield
    except EntropylensError as exc:
        fail(exc)
    except OSError as exc:  # out of space, no permission, read-only file system
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        fail(OSError(f"{where}{exc.strerror or exc}"))


@contextmanager
def working(what: str):
    """A spinner on stderr while a long command works, when stderr is a terminal."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(what):
        yield


def emit_json(obj) -> None:
    """Print ``obj`` as one line of standard JSON (NaN and infinities as null)."""
    typer.echo(json.dumps(finite(obj), default=json_default, allow_nan=False))


def pairs(values: Optional[List[str]], option: str) -> dict[str, str]:
    """``NAME=VALUE`` options as a dict; a usage error names the option."""
    found = {}
    for value in values or []:
        key, sep, target = value.partition("=")
        if not sep or not key.strip() or not target.strip():
            raise typer.BadParameter(f"expected NAME=VALUE, got {value!r}", param_hint=option)
        found[key.strip()] = target.strip()
    return found


def duration(text: Optional[str], option: str) -> Optional[float]:
    """Seconds in ``30``, ``30s``, ``10m`` or ``1h`` (None stays None)."""
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600}
    value, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(value) * units[unit]
    except ValueError:
        raise typer.BadParameter(f"expected a duration such as 30s, 10m or 1h, got {text!r}",
                                 param_hint=option) from None
    if not seconds > 0 or seconds == float("inf"):
        raise typer.BadParameter(f"must be positive, got {text!r}", param_hint=option)
    return seconds


JsonOption = typer.Option(False, "--json", help="Print one JSON object on stdout.")
RunOption = typer.Option(None, "--run", help="Run name (repeat for several; default: all).")
OnErrorOption = typer.Option(OnError.stop, "--on-error",
                             help="Stop at the first bad record or skip bad records.")
ReplaceOption = typer.Option(False, "--replace", help="Overwrite a run that exists.")

#: The shared options of analysis commands, in the order ``--help`` lists them after the
#: command's own: (name, annotation, typer default).
_SHARED = {
    "run": (Optional[List[str]], RunOption),
    "engine": (Engine, typer.Option(Engine.local, "--engine", help="Where to compute.")),
    # --engine ray: Ray Data tasks (pip install 'entropylens[ray]'), results identical to local
    "ray_address": (Optional[str], typer.Option(
        None, "--ray-address", help="Ray cluster for --engine ray (auto, ray://HOST:10001); "
        "default: a new local Ray instance.")),
    "workers": (Optional[int], typer.Option(
        None, "--workers", min=1, help="Processes of the local engine that scan side by side "
        "(each holds one unit of about 800k tokens; default: the CPUs, at most 4, or "
        "$ENTROPYLENS_WORKERS; 1: no extra process).")),
    "keep_after_eos": (bool, typer.Option(
        False, "--keep-after-eos",
        help="Keep the tokens after the end of their sequence (padding never sampled), which "
             "token analyses leave out by default.")),
    "as_json": (bool, JsonOption),
}


@dataclass
class AnalysisOptions:
    """The shared options of one analysis command, as given.

    Attributes
    ----------
    store : Path
    runs : list of str or None
        ``--run`` values; None for every run of the store.
    engine, ray_address, workers
        Where to compute.
    keep_after_eos : bool or None
        None where the command's analysis reads no tokens (the option is not offered).
    as_json : bool
        ``--json``; False where the command prints no JSON.
    """

    store: Path
    runs: Optional[List[str]]
    engine: Engine
    ray_address: Optional[str]
    workers: Optional[int]
    keep_after_eos: Optional[bool]
    as_json: bool

    def engine_options(self) -> dict:
        """Keyword arguments of an API function: the engine (Ray is connected first), its
        workers and the token selection."""
        if self.ray_address and self.engine is not Engine.ray:
            raise typer.BadParameter("--ray-address needs --engine ray",
                                     param_hint="--ray-address")
        options = {"engine": self.engine.value}
        if self.workers is not None:
            if self.engine is Engine.ray:
                raise typer.BadParameter("--workers is for the local engine (Ray sizes its "
                                         "own)", param_hint="--workers")
            options["workers"] = self.workers
        if self.keep_after_eos is not None:
            options["keep_after_eos"] = self.keep_after_eos
        if self.engine is Engine.ray:
            from ..engine import init_ray

            with user_errors():
                init_ray(self.ray_address)
        return options

    def call(self, function: Callable, *args, **options):
        """``function(store, runs, *args, **options, **engine options)``, bad data turned
        into a one-line error."""
        engine = self.engine_options()
        with user_errors():
            return function(self.store, self.runs or None, *args, **options, **engine)

    def show(self, result, render: Callable, *args) -> None:
        """``result.to_dict()`` as JSON with ``--json``, else ``render(result, *args)``."""
        if self.as_json:
            emit_json(result.to_dict())
        else:
            render(result, *args)


def analysis_command(*, keep_after_eos: bool = True, as_json: bool = True):
    """Give an analysis command the store argument and the shared options.

    The decorated function takes an :class:`AnalysisOptions` as its first parameter and its
    own options after it; ``--help`` lists the store, the own options, then the shared ones.

    Parameters
    ----------
    keep_after_eos : bool
        Offer ``--keep-after-eos`` (analyses of tokens).
    as_json : bool
        Offer ``--json``.
    """
    def decorate(function: Callable) -> Callable:
        hints = typing.get_type_hints(function)  # real types: typer reads the wrapper's
        own = [parameter.replace(annotation=hints.get(parameter.name, parameter.annotation))
               for parameter in list(inspect.signature(function).parameters.values())[1:]]
        offered = [name for name in _SHARED
                   if (name != "keep_after_eos" or keep_after_eos)
                   and (name != "as_json" or as_json)]
        store = inspect.Parameter("store", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                  annotation=Path,
                                  default=typer.Argument(..., help="Store folder."))
        shared = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    annotation=_SHARED[name][0], default=_SHARED[name][1])
                  for name in offered]

        @functools.wraps(function)
        def command(**values):
            options = AnalysisOptions(
                store=values.pop("store"), runs=values.pop("run"),
                engine=values.pop("engine"), ray_address=values.pop("ray_address"),
                workers=values.pop("workers"),
                keep_after_eos=values.pop("keep_after_eos", None),
                as_json=values.pop("as_json", False))
            return function(options, **values)

        del command.__wrapped__  # typer must see the signature below, not the function's
        parameters = [store, *own, *shared]
        command.__signature__ = inspect.Signature(parameters)
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        return command

    return decorate
