"""Modules imported on first use, so that cheap commands do not pay for heavy libraries.

``entropylens formats``, ``--help`` and format sniffing must start in a fraction of a second,
while pandas alone takes about half a second to import. A module that needs pandas only inside
a few functions binds ``pd = LazyModule("pandas")`` at the top, keeps writing ``pd.Series``,
and pandas is imported when the first such attribute is read.
"""

from __future__ import annotations

import importlib
import types


class LazyModule:
    """A stand-in for the module ``name`` that imports it when an attribute is first read.

    Unlike :class:`importlib.util.LazyLoader` it never places a half-loaded module in
    ``sys.modules``, so ``"pandas" in sys.modules`` stays a true statement of what loaded.
    """

    def __init__(self, name: str):
        self._name = name
        self._module: types.ModuleType | None = None

    def __getattr__(self, attribute: str):
        # only called for attributes not set in __init__
        module = self.__dict__["_module"]
        if module is None:
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attribute)

    def __repr__(self) -> str:
        state = "loaded" if self._module is not None else "not loaded yet"
        return f"<lazy module {self._name!r} ({state})>"
