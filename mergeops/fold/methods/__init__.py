"""Merge methods as plug-ins: every module here defining a MergeMethod subclass with a ``name`` is one.

Adding a method means adding a file, usually two pure functions given to ``elementwise`` (``base.py``), composed of
the sparsifiers and consensus rules in ``parts.py``; the engine and the policy find it by name.
"""

from __future__ import annotations

import importlib
import pkgutil

from mergeops.errors import PolicyError, shown
from mergeops.fold.methods.base import MergeMethod


def _discover() -> dict[str, type[MergeMethod]]:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    found: dict[str, type[MergeMethod]] = {}
    pending = list(MergeMethod.__subclasses__())
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if "name" in cls.__dict__:
            found[cls.name] = cls
    return dict(sorted(found.items()))


METHODS = _discover()


def method_class(name: str, where: str = "method") -> type[MergeMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise PolicyError(f"{where}: unknown merge method {shown(name)}; choose one of {', '.join(METHODS)}.") from None
