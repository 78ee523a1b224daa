"""Packages that are also functions: ``el.ingest(...)`` next to ``el.ingest.from_vllm(...)``.

The public API has functions named like the subpackages that implement them
(``entropylens.ingest``, ``entropylens.report``). A plain function would shadow its package on
the ``entropylens`` namespace; instead the package's module object gets a class whose
``__call__`` runs the function (assigning ``__class__`` of a module to a
:class:`types.ModuleType` subclass is documented Python, see the ``sys.modules`` notes of the
data model reference).
"""

from __future__ import annotations

import inspect
import sys
import types

_TARGET = "__entropylens_call__"


class CallableModule(types.ModuleType):
    """A module that calls one of its functions when called."""

    def __call__(self, *args, **kwargs):
        return getattr(self, getattr(self, _TARGET))(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        # what inspect.signature() and IDEs show for ``el.ingest``: the function's parameters
        return inspect.signature(getattr(self, getattr(self, _TARGET)))


def make_callable(module_name: str, function_name: str) -> None:
    """Make the module ``module_name`` callable as its attribute ``function_name``.

    Parameters
    ----------
    module_name : str
        An imported module, usually ``__name__`` of the package calling this.
    function_name : str
        The attribute called; it may be resolved lazily by the module's ``__getattr__``.
    """
    module = sys.modules[module_name]
    setattr(module, _TARGET, function_name)
    module.__class__ = CallableModule
